"""Cache entries on a shared-state engine (memory, LMDB, Redis) through the async KV interface.

Layout (keys inside the cache's own store, so cached bodies never evict filters' rate-limit state):

* ``u`` + primary key (32 bytes): the URI record. Either an entry (``E`` ...) when the response has no
  ``Vary`` and the request no extra key parts (one read per hit), or a variant index (``V`` + the Vary
  field names, ``\\n``-separated) pointing at:
* ``v`` + secondary key (32 bytes): an entry.
* ``b`` + body id (16 random bytes) + chunk number (u32): body chunks of entries larger than ``chunk_bytes``.
  Each stored response gets a new body id, so a refresh never overwrites a body being read.
* ``purges``: prefix purge rules (JSON list of ``[url prefix, unix time]``).

An entry is ``E`` + a fixed head (`_HEAD`: status, policy flags, freshness numbers, body length, chunk
count, body id, url and header block lengths), the URL it is filed under, the header block
(``name:value`` lines) and, for bodies up to ``chunk_bytes``, the body itself. Entries are written last
(after their chunks), so a reader never sees an entry whose body is still being written. A chunk that is
missing (evicted before its entry) makes the entry a miss, or aborts a response already under way.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import orjson

from ..exceptions import StateError
from ..state.base import AsyncKV
from .policy import Freshness

__all__ = ["CacheStore", "Entry", "EntryWriter", "StoreStats"]

Headers = Sequence[tuple[bytes, bytes]]

_VERSION = 1
# version, status, flags, lifetime, initial_age, response_time, swr, sie, body_len, chunks, body id,
# url length, header block length
_HEAD = struct.Struct(">BHHdddddQI16sHI")
_CHUNK = struct.Struct(">I")
_ENTRY = b"E"
_INDEX = b"V"
_PURGES = b"purges"
PURGE_REFRESH_S = 1.0
_CHUNK_TTL_SLACK = 60.0
_MEMO_MAX_RECORD = 128 * 1024
_MEMO_MAX_BYTES = 32 * 1024 * 1024
_NEAR_MAX_RECORDS = 16_384


class Entry:
    """One stored response, parsed."""

    __slots__ = (
        "body",
        "body_id",
        "body_len",
        "chunks",
        "freshness",
        "headers",
        "keep_for",
        "key",
        "status",
        "url",
    )

    def __init__(
        self,
        key: bytes,
        status: int,
        headers: list[tuple[bytes, bytes]],
        freshness: Freshness,
        url: str,
        body: bytes | None,
        body_len: int,
        chunks: int,
        body_id: bytes,
    ) -> None:
        self.key = key
        self.status = status
        self.headers = headers
        self.freshness = freshness
        self.url = url
        self.body = body
        self.body_len = body_len
        self.chunks = chunks
        self.body_id = body_id


def encode_entry(
    status: int,
    headers: Headers,
    freshness: Freshness,
    url: str,
    body: bytes | None,
    body_len: int,
    chunks: int,
    body_id: bytes,
) -> bytes:
    url_raw = url.encode("latin-1", "replace")[:65535]
    block = b"\n".join(n + b":" + v for n, v in headers)
    f = freshness
    head = _HEAD.pack(
        _VERSION,
        status,
        f.flags,
        f.lifetime,
        f.initial_age,
        f.response_time,
        f.stale_while_revalidate,
        f.stale_if_error,
        body_len,
        chunks,
        body_id,
        len(url_raw),
        len(block),
    )
    return b"".join((_ENTRY, head, url_raw, block, body or b""))


def decode_entry(key: bytes, raw: bytes) -> Entry | None:
    """The entry in a record, or None when it is not one (an index, an older format, garbage)."""
    if raw[:1] != _ENTRY or len(raw) < 1 + _HEAD.size:
        return None
    (
        version,
        status,
        flags,
        lifetime,
        initial_age,
        response_time,
        swr,
        sie,
        body_len,
        chunks,
        body_id,
        url_len,
        block_len,
    ) = _HEAD.unpack_from(raw, 1)
    if version != _VERSION:
        return None
    start = 1 + _HEAD.size
    url = raw[start : start + url_len].decode("latin-1")
    start += url_len
    block = raw[start : start + block_len]
    start += block_len
    headers = [_split(line) for line in block.split(b"\n")] if block else []
    body = raw[start:] if chunks == 0 else None
    if body is not None and len(body) != body_len:
        return None
    freshness = Freshness(lifetime, initial_age, response_time, swr, sie, flags, 0.0)
    return Entry(key, status, headers, freshness, url, body, body_len, chunks, body_id)


def _split(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name, value


@dataclass(frozen=True, slots=True)
class StoreStats:
    records: int
    bytes: int
    evictions: int


class CacheStore:
    """Entries, bodies and purge rules on one `AsyncKV`.

    ``stats`` reports the engine's records and bytes and this process's evictions (None: not known, e.g.
    Redis, which bounds itself with ``maxmemory``). Backend failures raise `StateError`; the caller treats
    them as a miss (lookups) or as "not stored" (writes).
    """

    def __init__(
        self,
        kv: AsyncKV,
        *,
        backend: str,
        chunk_bytes: int = 256 * 1024,
        max_ttl: float = 86_400.0,
        stats: Callable[[], StoreStats] | None = None,
        close: Callable[[], object] | None = None,
        near_ttl: float = 0.0,
    ) -> None:
        self.kv = kv
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.max_ttl = max_ttl
        self._stats = stats
        self._close = close
        self._purges: list[tuple[str, float]] = []
        self._purges_loaded = -1e18
        self._memo: dict[bytes, tuple[int, int, Entry]] = {}
        self._memo_bytes = 0
        # Remote stores: records read in the last near_ttl seconds are reused without a round trip (a purge
        # or invalidation made by another process reaches this one within near_ttl, like prefix purges).
        self._near_ttl = near_ttl
        self._near: dict[bytes, tuple[float, tuple[bytes, int] | None]] = {}
        self._near_bytes = 0
        self._writes = 0

    def stats(self) -> StoreStats | None:
        return self._stats() if self._stats is not None else None

    async def aclose(self) -> None:
        if self._close is not None:
            result = self._close()
            if hasattr(result, "__await__"):
                await result

    # -- reads

    async def lookup(
        self, primary: bytes, extra: bytes, headers: Callable[[], Headers]
    ) -> tuple[Entry | None, str]:
        """(entry, "") or (None, why): "uri-miss" (nothing for the URI) or "vary-miss" (not this variant).
        ``headers`` gives the request headers as sent upstream, asked for only when the URI has variants."""
        from .keys import secondary_key

        key = b"u" + primary
        found = await self._get(key)
        if found is None:
            return None, "uri-miss"
        raw, cas = found
        if raw[:1] == _ENTRY:
            if extra:
                return None, "vary-miss"
        elif raw[:1] == _INDEX:
            vary = [n for n in raw[1:].split(b"\n") if n]
            key = b"v" + secondary_key(primary, extra, vary, headers())
            found = await self._get(key)
            if found is None:
                return None, "vary-miss"
            raw, cas = found
        else:
            return None, "uri-miss"
        entry = self._decode(key, raw, cas)
        if entry is None:
            return None, "uri-miss"
        if await self._purged(entry):
            await self._delete(entry.key)
            return None, "uri-miss"
        return entry, ""

    async def _get(self, key: bytes) -> tuple[bytes, int] | None:
        if not self._near_ttl:
            return await self.kv.get(key)
        now = time.monotonic()
        near = self._near.get(key)
        if near is not None and near[0] > now:
            return near[1]
        writes = self._writes
        found = await self.kv.get(key)
        size = len(found[0]) if found is not None else 0
        # A write of this process during the read may have overtaken it: then the answer is not kept.
        if size <= _MEMO_MAX_RECORD and writes == self._writes:
            if len(self._near) >= _NEAR_MAX_RECORDS or self._near_bytes + size > _MEMO_MAX_BYTES:
                self._near.clear()
                self._near_bytes = 0
            self._near[key] = (now + self._near_ttl, found)
            self._near_bytes += size
        return found

    def _forget(self, key: bytes) -> None:
        self._writes += 1
        if self._near:
            self._near.pop(key, None)

    async def _set(self, key: bytes, value: bytes, ttl: float) -> None:
        self._forget(key)
        await self.kv.set(key, value, ttl=ttl)

    async def _delete(self, key: bytes) -> bool:
        self._forget(key)
        return await self.kv.delete(key)

    def _decode(self, key: bytes, raw: bytes, cas: int) -> Entry | None:
        """Parse a record, or reuse this process's parse of it: every write changes a record's cas (and its
        length), so (cas, length) names one version; a memo bounded by bytes keeps hot entries parsed."""
        memo = self._memo.get(key)
        if memo is not None and memo[0] == cas and memo[1] == len(raw):
            return memo[2]
        entry = decode_entry(key, raw)
        if entry is not None and len(raw) <= _MEMO_MAX_RECORD:
            if self._memo_bytes + len(raw) > _MEMO_MAX_BYTES:
                self._memo.clear()
                self._memo_bytes = 0
            if memo is not None:
                self._memo_bytes -= memo[1]
            self._memo[key] = (cas, len(raw), entry)
            self._memo_bytes += len(raw)
        return entry

    async def body_chunks(self, entry: Entry) -> AsyncIterator[bytes]:
        """The body of a chunked entry. Raises `StateError` when a chunk has gone (evicted)."""
        for index in range(entry.chunks):
            found = await self.kv.get(b"b" + entry.body_id + _CHUNK.pack(index))
            if found is None:
                raise StateError(f"cache body chunk {index} of {entry.url} is gone", self.backend)
            yield found[0]

    async def first_chunk(self, entry: Entry) -> bytes | None:
        found = await self.kv.get(b"b" + entry.body_id + _CHUNK.pack(0))
        return None if found is None else found[0]

    # -- writes

    def writer(self, max_bytes: int) -> EntryWriter:
        return EntryWriter(self, max_bytes)

    async def commit(
        self,
        writer: EntryWriter,
        primary: bytes,
        extra: bytes,
        vary: Sequence[bytes],
        request_headers: Headers,
        status: int,
        headers: Headers,
        freshness: Freshness,
        url: str,
    ) -> Entry:
        """Publish a complete entry (its chunks are already written); the entry as stored. `finish` and
        `publish` in one, for callers that need not hold the entry when publishing fails."""
        entry = await self.finish(writer, status, headers, freshness, url)
        await self.publish(entry, primary, extra, vary, request_headers)
        return entry

    async def finish(
        self, writer: EntryWriter, status: int, headers: Headers, freshness: Freshness, url: str
    ) -> Entry:
        """The entry a complete body makes (its last chunk written, or the body inline)."""
        body: bytes | None = None
        if writer.chunks == 0:
            body = b"".join(writer.parts)
        else:
            await writer.flush()
        writer.parts = []
        return Entry(
            b"", status, list(headers), freshness, url, body, writer.size, writer.chunks, writer.body_id
        )

    async def publish(
        self, entry: Entry, primary: bytes, extra: bytes, vary: Sequence[bytes], request_headers: Headers
    ) -> None:
        """Write the entry's record where lookups find it (after its chunks, so readers never see a body
        still being written)."""
        from .keys import secondary_key

        ttl = min(entry.freshness.keep_for, self.max_ttl)
        record = encode_entry(
            entry.status,
            entry.headers,
            entry.freshness,
            entry.url,
            entry.body,
            entry.body_len,
            entry.chunks,
            entry.body_id,
        )
        found = await self.kv.get(b"u" + primary)
        if not vary and not extra and (found is None or found[0][:1] != _INDEX):
            key = b"u" + primary
        else:
            # Once a URI has variants, its plain entry lives beside them (overwriting the index with it
            # would turn every other variant into a miss, and back, at each store).
            key = b"v" + secondary_key(primary, extra, vary, request_headers)
            index = _INDEX + b"\n".join(vary)
            if found is None or found[0] != index:
                await self._set(b"u" + primary, index, self.max_ttl)
        entry.key = key
        old = await self.kv.get(key)
        await self._set(key, record, ttl)
        if old is not None:
            previous = decode_entry(key, old[0])
            if previous is not None and previous.chunks and previous.body_id != entry.body_id:
                await self.delete_body(previous)

    async def update(self, entry: Entry, headers: Headers, freshness: Freshness) -> Entry:
        """Rewrite an entry's headers and freshness after a 304 (same body)."""
        record = encode_entry(
            entry.status,
            headers,
            freshness,
            entry.url,
            entry.body,
            entry.body_len,
            entry.chunks,
            entry.body_id,
        )
        ttl = min(freshness.keep_for, self.max_ttl)
        await self._set(entry.key, record, ttl)
        if entry.chunks:
            for index in range(entry.chunks):  # the body must outlive the refreshed entry
                chunk_key = b"b" + entry.body_id + _CHUNK.pack(index)
                found = await self.kv.get(chunk_key)
                if found is not None:
                    await self.kv.set(chunk_key, found[0], ttl=ttl + _CHUNK_TTL_SLACK)
        return Entry(
            entry.key,
            entry.status,
            list(headers),
            freshness,
            entry.url,
            entry.body,
            entry.body_len,
            entry.chunks,
            entry.body_id,
        )

    async def delete_body(self, entry: Entry) -> None:
        for index in range(entry.chunks):
            await self.kv.delete(b"b" + entry.body_id + _CHUNK.pack(index))

    async def invalidate(self, primary: bytes) -> bool:
        """Drop every variant of a URI (one delete: variants are reached through the URI record)."""
        return await self._delete(b"u" + primary)

    # -- purge rules

    async def purge_prefix(self, prefix: str, now: float | None = None) -> None:
        """Entries under ``prefix`` stored before now read as absent, in every process sharing the store
        (others see the rule within `PURGE_REFRESH_S`)."""
        now = time.time() if now is None else now
        rules = await self._load_purges(now)
        rules = [r for r in rules if r[0] != prefix] + [(prefix, now)]
        await self.kv.set(_PURGES, orjson.dumps(rules), ttl=self.max_ttl)
        self._purges = rules
        self._purges_loaded = time.monotonic()

    async def _load_purges(self, now: float) -> list[tuple[str, float]]:
        found = await self.kv.get(_PURGES)
        rules: list[tuple[str, float]] = []
        if found is not None:
            try:
                rules = [(str(p), float(t)) for p, t in orjson.loads(found[0])]
            except (orjson.JSONDecodeError, TypeError, ValueError):
                rules = []
        # A rule outlives every entry it can hide after max_ttl: drop it then.
        return [(p, t) for p, t in rules if now - t < self.max_ttl]

    async def _purged(self, entry: Entry) -> bool:
        mono = time.monotonic()
        if mono - self._purges_loaded > PURGE_REFRESH_S:
            self._purges_loaded = mono
            self._purges = await self._load_purges(time.time())
        if not self._purges:
            return False
        stored = entry.freshness.response_time
        url = entry.url
        return any(stored <= t and url.startswith(p) for p, t in self._purges)


class EntryWriter:
    """Collects a body as it streams to the client: parts are the chunks already sent (no copy); every
    ``chunk_bytes`` they are joined once and written, so at most one chunk is held. ``feed`` answers False
    (and the writer gives up) once the body exceeds ``max_bytes``."""

    __slots__ = ("body_id", "chunks", "failed", "max_bytes", "parts", "pending", "size", "store")

    def __init__(self, store: CacheStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.parts: list[bytes] = []
        self.pending = 0
        self.size = 0
        self.chunks = 0
        self.failed = False
        self.body_id = os.urandom(16)

    async def feed(self, chunk: bytes) -> bool:
        if self.failed:
            return False
        self.size += len(chunk)
        if self.size > self.max_bytes:
            await self.abort()
            return False
        self.parts.append(chunk)
        self.pending += len(chunk)
        if self.pending >= self.store.chunk_bytes:
            await self.flush()
        return True

    async def flush(self) -> None:
        if not self.parts:
            return
        data = b"".join(self.parts)
        self.parts = []
        self.pending = 0
        key = b"b" + self.body_id + _CHUNK.pack(self.chunks)
        await self.store.kv.set(key, data, ttl=self.store.max_ttl + _CHUNK_TTL_SLACK)
        self.chunks += 1

    async def abort(self) -> None:
        """Give up: drop what was written."""
        self.failed = True
        self.parts = []
        for index in range(self.chunks):
            try:
                await self.store.kv.delete(b"b" + self.body_id + _CHUNK.pack(index))
            except StateError:
                return
        self.chunks = 0


def now_unix() -> float:
    return time.time()
