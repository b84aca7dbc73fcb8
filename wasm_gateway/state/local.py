"""Embedded host-local backend: one LMDB environment shared by every worker process of a host.

Chosen over SQLite in WAL mode by ``benchmarks/micro_state.py`` (docs/state.md has the numbers): reads are
lock-free snapshots (about 3x faster than SQLite's), and writers queue on a process-shared mutex instead of
SQLite's sleep-and-retry busy handler, which is what the CAS loops of a rate limiter do all the time.

Layout (named databases of one environment):

* ``data``:  key -> cas u32, expires f64 (unix time), seq u64, value
* ``order``: seq u64 -> key. Write order: eviction takes the least recently written entries first
* ``meta``:  counters: last seq (every write takes the next: it is also where cas values come from, so they are
  monotonic across processes), entries, bytes, queue bytes
* ``qslots``: token u32 -> items u32, bytes u64, ident;  ``qitems``: token u32 + seq u64 -> item

Every write is one LMDB write transaction, so compare-and-swap is atomic across processes. Commits are not
fsynced (``sync=False``): the data survives any process crash or restart, but not necessarily an OS crash.
Writes go straight into the shared map (``writemap=True``: no write syscalls per commit; a get + CAS put
measured 19-31 us without, 10 us with, on a shared 2-core machine). The file is sparse at the map size.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import lmdb

from ..exceptions import StateError
from ..runtime.abi import Status
from .base import (
    CAS_CREATE,
    MAX_CAS,
    EngineEdgeStore,
    EngineKV,
    EngineSharedData,
    QueueHub,
    SharedState,
    parse_int,
)

__all__ = ["FORMAT_VERSION", "LocalQueueStorage", "LocalStore", "open_local_state"]

_log = logging.getLogger("wasm_gateway.state")
T = TypeVar("T")

FORMAT_VERSION = 1
ENTRY_OVERHEAD = 64  # as in memory.py: bookkeeping per entry counted against max_bytes

_ENTRY = struct.Struct(">IdQ")  # cas, expires, seq
_SEQ = struct.Struct(">Q")
_TOKEN = struct.Struct(">I")
_QSLOT = struct.Struct(">IQ")  # items, bytes; the ident follows
_META = struct.Struct(">QQQQ")  # seq, entries, bytes, queue bytes
_META_KEY = b"meta"
_VERSION_KEY = b"version"
SEQ, ENTRIES, BYTES, QUEUE_BYTES = range(4)


def _get(txn: lmdb.Transaction, key: bytes, db: lmdb._Database | None = None) -> bytes | None:
    # Transactions are opened with buffers=False (the default): values are bytes, never memoryviews.
    return cast("bytes | None", txn.get(key, db=db))


def _bytes(value: bytes | memoryview) -> bytes:
    return cast(bytes, value)


# --------------------------------------------------------------------------- one environment per path and process

# LMDB forbids opening one environment twice in a process, and a forked child must not use its parent's:
# environments are shared by path, and a fork makes every store reopen (the generation changes).
_envs: dict[str, tuple[lmdb.Environment, int]] = {}
_envs_lock = threading.Lock()
_generation = 0


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1
    _envs.clear()  # the parent's handles: dropped, never used or closed here


os.register_at_fork(after_in_child=_after_fork_in_child)


def _acquire_env(directory: Path, map_size: int) -> lmdb.Environment:
    key = str(directory.resolve())
    with _envs_lock:
        held = _envs.get(key)
        if held is not None:
            _envs[key] = (held[0], held[1] + 1)
            return held[0]
        env = lmdb.open(
            key,
            map_size=map_size,
            max_dbs=8,
            max_readers=1024,
            sync=False,
            metasync=False,
            readahead=False,
            mode=0o600,
            max_spare_txns=2,
            writemap=True,
        )
        env.reader_check()  # free reader slots left by processes that died
        _envs[key] = (env, 1)
        return env


def _release_env(directory: Path, env: lmdb.Environment) -> None:
    key = str(directory.resolve())
    with _envs_lock:
        held = _envs.get(key)
        if held is None or held[0] is not env:
            return
        if held[1] > 1:
            _envs[key] = (env, held[1] - 1)
            return
        del _envs[key]
    env.sync(True)
    env.close()


def map_size_for(max_bytes: int, max_entries: int, queue_bytes: int) -> int:
    """Address space reserved for the file (sparse: disk use follows the data). B-tree pages, free pages
    kept for concurrent readers and queue items need room beyond the counted bytes."""
    return max(64 << 20, 2 * (max_bytes + queue_bytes) + max_entries * 512)


class LocalStore:
    """`Engine` on LMDB. Every operation is one transaction; failures raise `StateError`."""

    backend = "local"

    def __init__(
        self,
        directory: Path,
        *,
        max_entries: int,
        max_bytes: int,
        max_queue_items: int = 10_000,
        queue_max_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_queue_items = max_queue_items
        self.queue_max_bytes = queue_max_bytes if queue_max_bytes is not None else max_bytes // 4
        self._map_size = map_size_for(max_bytes, max_entries, self.queue_max_bytes)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create the local state directory {directory}: {exc}", "local") from None
        self._env: lmdb.Environment | None = None
        self.evictions = 0
        """Entries this process dropped to stay within the bounds (not expiries)."""
        self._open()

    def _open(self) -> None:
        try:
            env = _acquire_env(self.directory, self._map_size)
            self._data = env.open_db(b"data")
            self._order = env.open_db(b"order")
            self._meta = env.open_db(b"meta")
            self._qslots = env.open_db(b"qslots")
            self._qitems = env.open_db(b"qitems")
            with env.begin(write=True, db=self._meta) as txn:
                version = _get(txn, _VERSION_KEY)
                if version is None:
                    txn.put(_VERSION_KEY, _SEQ.pack(FORMAT_VERSION))
                elif _SEQ.unpack(version)[0] != FORMAT_VERSION:
                    raise StateError(
                        f"{self.directory} holds state format {_SEQ.unpack(version)[0]}, this gateway "
                        f"uses {FORMAT_VERSION}: point state.path elsewhere or delete the directory",
                        "local",
                    )
        except lmdb.Error as exc:
            raise StateError(
                f"cannot open the local state database in {self.directory}: {exc} (it holds only "
                "derived state: deleting the directory is safe when no gateway runs)",
                "local",
            ) from None
        self._env = env
        self._generation = _generation
        self._max_key = env.max_key_size()

    def _environment(self) -> lmdb.Environment:
        if self._generation != _generation:  # forked: reopen in this process
            self._env = None
            self._open()
        env = self._env
        if env is None:
            raise StateError("the local state store is closed", "local")
        return env

    def _dbkey(self, key: bytes) -> bytes:
        # LMDB keys are limited (511 bytes): longer ones are stored by digest, in their own 0xff namespace.
        return key if len(key) <= self._max_key else b"\xff" + hashlib.sha256(key).digest()

    # -- Engine

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        try:
            with self._environment().begin(db=self._data) as txn:
                raw = txn.get(self._dbkey(key))
        except lmdb.Error as exc:
            raise StateError(f"local state read failed: {exc}", "local") from None
        if raw is None:
            return None
        cas, expires, _ = _ENTRY.unpack_from(raw)
        if expires <= time.time():
            return None
        return raw[_ENTRY.size :], cas

    def put(self, key: bytes, value: bytes, cas: int, ttl: float) -> int:
        dbkey = self._dbkey(key)
        value = bytes(value)

        def op(txn: lmdb.Transaction, meta: list[int], now: float) -> int:
            raw = _get(txn, dbkey, db=self._data)
            if cas == CAS_CREATE:
                if raw is not None and _ENTRY.unpack_from(raw)[1] > now:
                    return 0
            elif cas:
                if raw is None:
                    return 0
                stored_cas, expires, _ = _ENTRY.unpack_from(raw)
                if stored_cas != cas or expires <= now:
                    return 0
            return self._store(txn, meta, dbkey, raw, value, now + ttl, now)

        return self._write(op)

    def incr(self, key: bytes, delta: int, ttl: float) -> int:
        dbkey = self._dbkey(key)

        def op(txn: lmdb.Transaction, meta: list[int], now: float) -> int:
            raw = _get(txn, dbkey, db=self._data)
            expires = now + ttl
            total = delta
            if raw is not None:
                _, old_expires, _ = _ENTRY.unpack_from(raw)
                if old_expires > now:
                    total, expires = parse_int(raw[_ENTRY.size :]) + delta, old_expires
            self._store(txn, meta, dbkey, raw, str(total).encode(), expires, now)
            return total

        return self._write(op)

    def delete(self, key: bytes) -> bool:
        dbkey = self._dbkey(key)

        def op(txn: lmdb.Transaction, meta: list[int], now: float) -> bool:
            raw = _get(txn, dbkey, db=self._data)
            if raw is None:
                return False
            self._remove(txn, meta, dbkey, raw)
            expires: float = _ENTRY.unpack_from(raw)[1]
            return expires > now

        return self._write(op)

    def scan(self, prefix: bytes, limit: int) -> list[bytes]:
        """Live keys starting with ``prefix`` in byte order, at most ``limit`` (one read transaction, a cursor
        over the prefix's range). Keys longer than LMDB's limit are stored by digest and never listed."""
        try:
            with self._environment().begin(db=self._data) as txn:
                return self._scan(txn, prefix, limit, time.time())
        except lmdb.Error as exc:
            raise StateError(f"local state read failed: {exc}", "local") from None

    def put_bounded(self, key: bytes, value: bytes, ttl: float, prefix: bytes, max_keys: int) -> bool:
        """Write unless ``key`` is new and ``max_keys`` live keys already start with ``prefix``: one write
        transaction, so exact across processes."""
        dbkey = self._dbkey(key)
        value = bytes(value)

        def op(txn: lmdb.Transaction, meta: list[int], now: float) -> bool:
            raw = _get(txn, dbkey, db=self._data)
            live = raw is not None and _ENTRY.unpack_from(raw)[1] > now
            if not live and len(self._scan(txn, prefix, max_keys, now)) >= max_keys:
                return False
            self._store(txn, meta, dbkey, raw, value, now + ttl, now)
            return True

        return self._write(op)

    def incr_bounded(self, key: bytes, delta: int, ttl: float, prefix: bytes, max_keys: int) -> int | None:
        """`incr`, or None when ``key`` is new and ``max_keys`` live keys already start with ``prefix``."""
        dbkey = self._dbkey(key)

        def op(txn: lmdb.Transaction, meta: list[int], now: float) -> int | None:
            raw = _get(txn, dbkey, db=self._data)
            expires = now + ttl
            total = delta
            if raw is not None and _ENTRY.unpack_from(raw)[1] > now:
                total, expires = parse_int(raw[_ENTRY.size :]) + delta, _ENTRY.unpack_from(raw)[1]
            elif len(self._scan(txn, prefix, max_keys, now)) >= max_keys:
                return None
            self._store(txn, meta, dbkey, raw, str(total).encode(), expires, now)
            return total

        return self._write(op)

    def _scan(self, txn: lmdb.Transaction, prefix: bytes, limit: int, now: float) -> list[bytes]:
        out: list[bytes] = []
        cursor = txn.cursor(db=self._data)
        if cursor.set_range(prefix):
            for key, raw in cursor:
                key = _bytes(key)
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                if _ENTRY.unpack_from(raw)[1] > now:
                    out.append(key)
        return out

    def stats(self) -> dict[str, int]:
        """Entries and bytes as counted for the bounds, and the file's size on disk."""
        try:
            with self._environment().begin(db=self._meta) as txn:
                raw = _get(txn, _META_KEY)
        except lmdb.Error as exc:
            raise StateError(f"local state read failed: {exc}", "local") from None
        meta = _META.unpack(raw) if raw else (0, 0, 0, 0)
        data_file = self.directory / "data.mdb"
        disk = data_file.stat().st_blocks * 512 if data_file.exists() else 0
        return {
            "entries": meta[ENTRIES],
            "bytes": meta[BYTES],
            "queue_bytes": meta[QUEUE_BYTES],
            "disk_bytes": disk,
        }

    def close(self) -> None:
        env, self._env = self._env, None
        if env is not None and self._generation == _generation:
            _release_env(self.directory, env)

    # -- write path

    def _write(self, op: Callable[[lmdb.Transaction, list[int], float], T]) -> T:
        env = self._environment()
        for attempt in range(2):
            try:
                with env.begin(write=True) as txn:
                    raw = _get(txn, _META_KEY, db=self._meta)
                    meta = list(_META.unpack(raw)) if raw else [0, 0, 0, 0]
                    before = list(meta)
                    result = op(txn, meta, time.time())
                    if meta != before:
                        txn.put(_META_KEY, _META.pack(*meta), db=self._meta)
                    return result
            except lmdb.MapFullError:
                if attempt:
                    raise StateError(
                        f"the local state file in {self.directory} is full even after eviction", "local"
                    ) from None
                self._shrink()
            except lmdb.Error as exc:
                raise StateError(f"local state write failed: {exc}", "local") from None
        raise AssertionError("unreachable")

    def _store(
        self,
        txn: lmdb.Transaction,
        meta: list[int],
        dbkey: bytes,
        old: bytes | None,
        value: bytes,
        expires: float,
        now: float,
    ) -> int:
        seq = meta[SEQ] + 1
        meta[SEQ] = seq
        new_cas = (seq - 1) % MAX_CAS + 1
        if old is not None:
            self._remove(txn, meta, dbkey, old, keep_data=True)
        stored = _ENTRY.pack(new_cas, expires, seq) + value
        txn.put(_SEQ.pack(seq), dbkey, db=self._order)
        txn.put(dbkey, stored, db=self._data)
        meta[ENTRIES] += 1
        meta[BYTES] += len(dbkey) + len(stored) + ENTRY_OVERHEAD
        self._evict(txn, meta, now, self.max_entries, self.max_bytes)
        return new_cas

    def _remove(
        self, txn: lmdb.Transaction, meta: list[int], dbkey: bytes, raw: bytes, keep_data: bool = False
    ) -> None:
        txn.delete(_SEQ.pack(_ENTRY.unpack_from(raw)[2]), db=self._order)
        if not keep_data:
            txn.delete(dbkey, db=self._data)
        meta[ENTRIES] -= 1
        meta[BYTES] -= len(dbkey) + len(raw) + ENTRY_OVERHEAD

    def _evict(
        self, txn: lmdb.Transaction, meta: list[int], now: float, max_entries: int, max_bytes: int
    ) -> None:
        """Oldest-written first while over a bound; and up to two expired entries per write, so expired
        entries do not wait for the bounds to be reached."""
        cursor = txn.cursor(db=self._order)
        swept = 0
        while cursor.first():
            dbkey = _bytes(cursor.value())
            raw = _get(txn, dbkey, db=self._data)
            if not (meta[ENTRIES] > max_entries or meta[BYTES] > max_bytes):
                if swept >= 2 or (raw is not None and _ENTRY.unpack_from(raw)[1] > now):
                    break
                swept += 1
            elif raw is not None:
                self.evictions += 1
            if raw is None or _SEQ.unpack(_bytes(cursor.key()))[0] != _ENTRY.unpack_from(raw)[2]:
                cursor.delete()  # an order record without its entry: repair, uncounted
                continue
            self._remove(txn, meta, dbkey, raw)

    def _shrink(self) -> None:
        """The file is full (fragmentation, queue items): evict a quarter of the entries."""
        _log.warning(
            "local state file in %s is full: evicting the oldest quarter of the entries", self.directory
        )
        try:
            with self._environment().begin(write=True) as txn:
                raw = _get(txn, _META_KEY, db=self._meta)
                meta = list(_META.unpack(raw)) if raw else [0, 0, 0, 0]
                self._evict(txn, meta, time.time(), meta[ENTRIES] * 3 // 4, meta[BYTES] * 3 // 4)
                txn.put(_META_KEY, _META.pack(*meta), db=self._meta)
        except lmdb.Error as exc:
            raise StateError(f"local state write failed: {exc}", "local") from None

    # -- queues (used by LocalQueueStorage)

    def q_slot(self, token: int) -> tuple[int, bytes] | None:
        try:
            with self._environment().begin(db=self._qslots) as txn:
                raw = _get(txn, _TOKEN.pack(token))
        except lmdb.Error as exc:
            raise StateError(f"local state read failed: {exc}", "local") from None
        if raw is None:
            return None
        return _QSLOT.unpack_from(raw)[0], raw[_QSLOT.size :]

    def q_claim(self, token: int, ident: bytes) -> bytes:
        tkey = _TOKEN.pack(token)

        def op(txn: lmdb.Transaction, meta: list[int], now: float) -> bytes:
            raw = _get(txn, tkey, db=self._qslots)
            if raw is not None:
                return raw[_QSLOT.size :]
            txn.put(tkey, _QSLOT.pack(0, 0) + ident, db=self._qslots)
            return ident

        return self._write(op)

    def q_push(self, token: int, item: bytes) -> Status:
        tkey = _TOKEN.pack(token)

        def op(txn: lmdb.Transaction, meta: list[int], now: float) -> Status:
            raw = _get(txn, tkey, db=self._qslots)
            if raw is None:
                return Status.NOT_FOUND
            items, nbytes = _QSLOT.unpack_from(raw)
            if items >= self.max_queue_items or meta[QUEUE_BYTES] + len(item) > self.queue_max_bytes:
                return Status.INTERNAL_FAILURE
            meta[SEQ] += 1
            txn.put(tkey + _SEQ.pack(meta[SEQ]), item, db=self._qitems)
            txn.put(tkey, _QSLOT.pack(items + 1, nbytes + len(item)) + raw[_QSLOT.size :], db=self._qslots)
            meta[QUEUE_BYTES] += len(item)
            return Status.OK

        return self._write(op)

    def q_pop(self, token: int) -> bytes | None:
        slot = self.q_slot(token)
        if slot is None or slot[0] == 0:
            return None  # answered from a read snapshot: no write lock for a poll of an empty queue
        tkey = _TOKEN.pack(token)

        def op(txn: lmdb.Transaction, meta: list[int], now: float) -> bytes | None:
            raw = _get(txn, tkey, db=self._qslots)
            cursor = txn.cursor(db=self._qitems)
            if raw is None or not cursor.set_range(tkey) or not _bytes(cursor.key()).startswith(tkey):
                return None
            item = _bytes(cursor.value())
            cursor.delete()
            items, nbytes = _QSLOT.unpack_from(raw)
            txn.put(
                tkey,
                _QSLOT.pack(max(items - 1, 0), max(nbytes - len(item), 0)) + raw[_QSLOT.size :],
                db=self._qslots,
            )
            meta[QUEUE_BYTES] = max(meta[QUEUE_BYTES] - len(item), 0)
            return item

        return self._write(op)


class LocalQueueStorage:
    """`QueueStorage` in the LMDB environment: items shared by every process of the host."""

    def __init__(self, store: LocalStore) -> None:
        self._store = store

    def slot(self, token: int) -> bytes | None:
        slot = self._store.q_slot(token)
        return None if slot is None else slot[1]

    def claim(self, token: int, ident: bytes) -> bytes:
        return self._store.q_claim(token, ident)

    def push(self, token: int, item: bytes) -> Status:
        return self._store.q_push(token, item)

    def pop(self, token: int) -> bytes | None:
        return self._store.q_pop(token)


def open_local_state(
    directory: Path,
    *,
    max_entries: int,
    max_bytes: int,
    max_value_bytes: int,
    default_ttl: float,
    max_queue_items: int,
) -> SharedState:
    store = LocalStore(
        directory,
        max_entries=max_entries,
        max_bytes=max_bytes,
        max_queue_items=max_queue_items,
        queue_max_bytes=max(max_bytes // 4, max_value_bytes),
    )
    return SharedState(
        backend="local",
        shared_data=EngineSharedData(store, ttl=default_ttl, max_value_bytes=max_value_bytes),
        queues=QueueHub(LocalQueueStorage(store), max_item_bytes=max_value_bytes),
        kv=EngineKV(store, ttl=default_ttl, max_value_bytes=max_value_bytes),
        close=store.close,
        edge=EngineEdgeStore(store),
    )
