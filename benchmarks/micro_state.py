"""Micro-benchmark of the shared-state backends (numbers to read, not to assert).

Part 1, the choice of the embedded host-local store: SQLite in WAL mode (stdlib ``sqlite3``) against LMDB
(``lmdb``), both doing the same bookkeeping as ``wasm_gateway/state/local.py`` needs (value + cas + expiry +
write-order index + counters, cas values from one cross-process counter, commits not fsynced: SQLite
``synchronous=NORMAL``, LMDB ``sync=False``). Part 2: the real backends through ``SharedState.shared_data``
(memory, local, and Redis on 127.0.0.1:6379 when it answers).

Operations, each by 2 processes at once (spawned) for a fixed time, on one key (contended) and on 10,000 keys:

* ``get``: read a key; ``set``: write it (cas 0); ``cas``: a compare-and-swap increment (get, set with the
  cas read, retry on mismatch). Reported: operations/s over both processes, latency p50/p99 of one operation
  (for ``cas``: one successful increment, retries included), retries; ``cas`` runs check the final counts.

    python benchmarks/micro_state.py                 # both parts, 2 s per case, 1 and 2 processes (~4 min)
    python benchmarks/micro_state.py --quick --json  # part 2 only, 0.5 s per case; JSON on the last line
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmdb

from wasm_gateway.runtime.abi import Status
from wasm_gateway.state import CAS_CREATE, MAX_CAS, StateConfig, StateError, open_state

MANY_KEYS = 10_000
TTL = 86_400.0


class Store(Protocol):
    def get(self, key: bytes) -> tuple[bytes, int] | None: ...
    def set(self, key: bytes, value: bytes, cas: int) -> Status: ...


# -- part 1: the two candidates, the same bookkeeping each ---------------------------------------------------


class SqliteCandidate:
    """kv(key, value, cas, expires, seq) WITHOUT ROWID + index on seq; meta(seq, count, bytes)."""

    def __init__(self, directory: str) -> None:
        self.db = sqlite3.connect(
            os.path.join(directory, "state.sqlite"), isolation_level=None, timeout=30, check_same_thread=False
        )
        c = self.db
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute(
            "CREATE TABLE IF NOT EXISTS kv(key BLOB PRIMARY KEY, value BLOB NOT NULL, cas INTEGER NOT NULL,"
            " expires REAL NOT NULL, seq INTEGER NOT NULL) WITHOUT ROWID"
        )
        c.execute("CREATE INDEX IF NOT EXISTS kv_seq ON kv(seq)")
        c.execute("CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, v INTEGER NOT NULL)")
        c.execute("INSERT OR IGNORE INTO meta VALUES ('seq', 0), ('count', 0), ('bytes', 0)")

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        row = self.db.execute(
            "SELECT value, cas FROM kv WHERE key = ? AND expires > ?", (key, time.time())
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def set(self, key: bytes, value: bytes, cas: int) -> Status:
        c = self.db
        now = time.time()
        c.execute("BEGIN IMMEDIATE")  # take the write lock first: a CAS must not be decided on a stale read
        try:
            row = c.execute("SELECT cas, expires, length(value) FROM kv WHERE key = ?", (key,)).fetchone()
            if cas == CAS_CREATE:
                mismatch = row is not None and row[1] > now
            else:
                mismatch = bool(cas) and (row is None or row[0] != cas or row[1] <= now)
            if mismatch:
                c.execute("ROLLBACK")
                return Status.CAS_MISMATCH
            seq = c.execute("UPDATE meta SET v = v + 1 WHERE name = 'seq' RETURNING v").fetchone()[0]
            c.execute(
                "INSERT INTO kv VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value,"
                " cas = excluded.cas, expires = excluded.expires, seq = excluded.seq",
                (key, value, (seq - 1) % MAX_CAS + 1, now + TTL, seq),
            )
            if row is None:
                c.execute("UPDATE meta SET v = v + 1 WHERE name = 'count'")
            c.execute(
                "UPDATE meta SET v = v + ? WHERE name = 'bytes'",
                (len(value) - (row[2] if row else -len(key)),),
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return Status.OK


_ENTRY = struct.Struct(">IdQ")
_U64 = struct.Struct(">Q")
_META = struct.Struct(">QQQ")


class LmdbCandidate:
    """data: key -> cas, expires, seq, value; order: seq -> key; meta: seq, count, bytes."""

    def __init__(self, directory: str) -> None:
        self.env = lmdb.open(
            os.path.join(directory, "state.lmdb"),
            map_size=1 << 30,
            max_dbs=4,
            sync=False,
            metasync=False,
            readahead=False,
            max_spare_txns=2,
        )
        self.data = self.env.open_db(b"data")
        self.order = self.env.open_db(b"order")
        self.meta = self.env.open_db(b"meta")

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        with self.env.begin(db=self.data) as txn:
            raw = txn.get(key)
        if raw is None:
            return None
        cas, expires, _ = _ENTRY.unpack_from(raw)
        return None if expires <= time.time() else (raw[_ENTRY.size :], cas)

    def set(self, key: bytes, value: bytes, cas: int) -> Status:
        now = time.time()
        with self.env.begin(write=True) as txn:
            old = txn.get(key, db=self.data)
            if old is not None:
                old_cas, old_expires, old_seq = _ENTRY.unpack_from(old)
            if cas == CAS_CREATE:
                mismatch = old is not None and old_expires > now
            else:
                mismatch = bool(cas) and (old is None or old_cas != cas or old_expires <= now)
            if mismatch:
                return Status.CAS_MISMATCH
            raw_meta = txn.get(b"m", db=self.meta)
            seq, count, nbytes = _META.unpack(raw_meta) if raw_meta else (0, 0, 0)
            seq += 1
            if old is not None:
                txn.delete(_U64.pack(old_seq), db=self.order)
                nbytes -= len(old)
            else:
                count += 1
                nbytes += len(key)
            stored = _ENTRY.pack((seq - 1) % MAX_CAS + 1, now + TTL, seq) + value
            txn.put(_U64.pack(seq), key, db=self.order)
            txn.put(key, stored, db=self.data)
            txn.put(b"m", _META.pack(seq, count, nbytes + len(stored)), db=self.meta)
        return Status.OK


# -- the runs --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    part: str
    store: str
    op: str
    keys: int
    processes: int
    ops_per_s: float
    p50_us: float
    p99_us: float
    retries: int
    errors: (
        int  # backend failures (Redis timeouts): a timed-out write may still land, so cas counts can be off
    )
    check: str


def _open(kind: str, directory: str, prefix: str) -> tuple[Store, Any]:
    if kind == "sqlite_wal":
        return SqliteCandidate(directory), None
    if kind == "lmdb":
        return LmdbCandidate(directory), None
    config = StateConfig(backend=kind, path=Path(directory), key_prefix=prefix, max_entries=1_000_000)  # type: ignore[arg-type]
    state = open_state(config)
    return state.shared_data, state


def _worker(
    kind: str,
    directory: str,
    prefix: str,
    op: str,
    keys: list[bytes],
    seconds: float,
    barrier: Barrier,
    out: Any,
) -> None:
    store, state = _open(kind, directory, prefix)
    if kind == "memory" and op != "cas":
        for key in keys:  # the memory backend is per process: fill this process's store
            store.set(key, b"0", 0)
    rnd = random.Random(os.getpid())
    get, put = store.get, store.set
    latencies: list[float] = []
    retries = 0
    errors = 0
    done = 0
    increments: dict[bytes, int] = {}
    clock = time.perf_counter
    barrier.wait()
    end = clock() + seconds
    while True:
        t0 = clock()
        if t0 >= end:
            break
        key = keys[rnd.randrange(len(keys))] if len(keys) > 1 else keys[0]
        try:
            if op == "get":
                get(key)
            elif op == "set":
                errors += put(key, b"0123456789abcdef", 0) != Status.OK
            else:
                while True:
                    current = get(key)
                    if current is None:
                        status = put(key, b"1", CAS_CREATE)  # cas 0 would race with another creator
                    else:
                        status = put(key, b"%d" % (int(current[0]) + 1), current[1])
                    if status == Status.OK:
                        break
                    if status == Status.CAS_MISMATCH:
                        retries += 1
                    else:
                        errors += 1
                increments[key] = increments.get(key, 0) + 1
        except StateError:
            errors += 1
            time.sleep(0.05)
            continue
        latencies.append(clock() - t0)
        done += 1
    out.put((done, latencies, retries, increments, errors))
    if state is not None:
        state.close()


def run_case(part: str, kind: str, op: str, nkeys: int, processes: int, seconds: float) -> Row:
    directory = tempfile.mkdtemp(prefix="micro-state-")
    prefix = f"micro-state-{os.getpid()}-{random.randrange(1 << 30)}:"
    keys = [b"key-%06d" % i for i in range(nkeys)]
    try:
        store, state = _open(kind, directory, prefix)
        if op != "cas":
            for key in keys:
                store.set(key, b"0", 0)
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(processes)
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(kind, directory, prefix, op, keys, seconds, barrier, out))
            for _ in range(processes)
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=seconds + 60) for _ in procs]
        for p in procs:
            p.join()
        done = sum(r[0] for r in results)
        latencies = sorted(x for r in results for x in r[1])
        retries = sum(r[2] for r in results)
        errors = sum(r[4] for r in results)
        check = ""
        if op == "cas" and kind == "memory":
            check = "per process"
        elif op == "cas":
            expected: dict[bytes, int] = {}
            for r in results:
                for key, n in r[3].items():
                    expected[key] = expected.get(key, 0) + n
            wrong = 0
            for key, n in expected.items():
                got = store.get(key)
                wrong += got is None or int(got[0]) != n
            check = "exact" if not wrong else f"{wrong} keys off"
        if state is not None:
            _cleanup(kind, prefix)
            state.close()
        return Row(
            part,
            kind,
            op,
            nkeys,
            processes,
            done / seconds,
            latencies[len(latencies) // 2] * 1e6,
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e6,
            retries,
            errors,
            check,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _cleanup(kind: str, prefix: str) -> None:
    if kind != "redis":
        return
    import redis

    client = redis.Redis()
    for key in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(key)
    client.close()


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis(socket_connect_timeout=0.2).ping())
    except Exception:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="0.5 s per case, 2 processes, the real backends only (part 2)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object at the end")
    parser.add_argument("--seconds", type=float, help="per case (default 2, quick 0.5)")
    parser.add_argument(
        "--part", choices=("candidates", "backends", "all"), help="default: all (quick: backends)"
    )
    args = parser.parse_args()
    quick = args.quick or os.environ.get("BENCH_QUICK") == "1"
    seconds = args.seconds or (0.5 if quick else 2.0)
    process_counts = (2,) if quick else (1, 2)
    part = args.part or ("backends" if quick else "all")

    rows: list[Row] = []

    def show(row: Row) -> None:
        rows.append(row)
        print(
            f"{row.part:10} {row.store:10} {row.op:4} keys={row.keys:<6} procs={row.processes} "
            f"{row.ops_per_s:10,.0f} ops/s  p50 {row.p50_us:7.1f} us  p99 {row.p99_us:8.1f} us  "
            f"retries {row.retries:<6} errors {row.errors:<3} {row.check}",
            flush=True,
        )

    if part in ("candidates", "all"):
        for processes in process_counts:
            for nkeys in (1, MANY_KEYS):
                for op in ("get", "set", "cas"):
                    for kind in ("sqlite_wal", "lmdb"):
                        show(run_case("candidate", kind, op, nkeys, processes, seconds))
    if part in ("backends", "all"):
        kinds = ["memory", "local"] + (["redis"] if _redis_up() else [])
        for kind in kinds:
            for nkeys in (1, MANY_KEYS):
                for op in ("get", "set", "cas"):
                    # memory is per process: one process says all there is
                    show(run_case("backend", kind, op, nkeys, 1 if kind == "memory" else 2, seconds))
    if args.json:
        print(json.dumps({"seconds_per_case": seconds, "rows": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
