"""Entries, variants, chunked bodies, purges and bounds on the real engines (memory, LMDB, Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wasm_gateway.cache import CacheStore, Coalescer, KeySpec, extra_key, open_cache_store, primary_key
from wasm_gateway.cache.keys import canonical_target, secondary_key
from wasm_gateway.cache.policy import Freshness
from wasm_gateway.cache.store import decode_entry, encode_entry
from wasm_gateway.exceptions import StateError

FRESH = Freshness(60.0, 0.0, time.time(), 0.0, 0.0, 4, 60.0)


@pytest.fixture(params=["memory", "local", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CacheStore]:
    s = open_cache_store(
        backend=request.param,
        max_bytes=4 * 1024 * 1024,
        chunk_bytes=4096,
        max_ttl=600,
        directory=tmp_path / "lmdb",
        key_prefix=f"wgtest-{uuid.uuid4().hex}:",
    )
    yield s
    await s.aclose()


async def put(store: CacheStore, url: str, body: bytes, *, vary: tuple[bytes, ...] = (), extra: bytes = b"",
              request_headers: list[tuple[bytes, bytes]] | None = None, status: int = 200) -> None:  # fmt: skip
    writer = store.writer(10**9)
    for i in range(0, len(body), 1000):
        assert await writer.feed(body[i : i + 1000])
    await store.commit(
        writer, primary_key(url), extra, vary, request_headers or [], status, [(b"etag", b'"e"')], FRESH, url
    )


async def read_body(store: CacheStore, url: str, extra: bytes = b"", headers=()) -> bytes | None:  # type: ignore[no-untyped-def]
    entry, _ = await store.lookup(primary_key(url), extra, lambda: list(headers))
    if entry is None:
        return None
    if entry.body is not None:
        return entry.body
    return b"".join([c async for c in store.body_chunks(entry)])


async def test_inline_and_chunked_bodies(store: CacheStore) -> None:
    await put(store, "http://h/small", b"s" * 100)
    big = bytes(range(256)) * 100  # 25.6 KB: chunked at 4 KB
    await put(store, "http://h/big", big)
    small_entry, _ = await store.lookup(primary_key("http://h/small"), b"", list)
    assert small_entry is not None and small_entry.body == b"s" * 100 and small_entry.chunks == 0
    big_entry, _ = await store.lookup(primary_key("http://h/big"), b"", list)
    assert big_entry is not None and big_entry.body is None and big_entry.chunks >= 6
    assert await read_body(store, "http://h/big") == big
    assert big_entry.headers == [(b"etag", b'"e"')] and big_entry.url == "http://h/big"


async def test_variants(store: CacheStore) -> None:
    url = "http://h/v"
    gz = [(b"accept-encoding", b"gzip")]
    br = [(b"accept-encoding", b"br")]
    await put(store, url, b"gzip body", vary=(b"accept-encoding",), request_headers=gz)
    await put(store, url, b"br body", vary=(b"accept-encoding",), request_headers=br)
    assert await read_body(store, url, headers=gz) == b"gzip body"
    assert await read_body(store, url, headers=[(b"accept-encoding", b"GZIP")]) == b"gzip body"
    assert await read_body(store, url, headers=br) == b"br body"
    assert await store.lookup(primary_key(url), b"", lambda: [(b"accept-encoding", b"zstd")]) == (
        None,
        "vary-miss",
    )
    # an invalidation drops every variant
    assert await store.invalidate(primary_key(url))
    assert await store.lookup(primary_key(url), b"", lambda: gz) == (None, "uri-miss")


async def test_extra_key_parts_never_share_the_plain_entry(store: CacheStore) -> None:
    url = "http://h/me"
    await put(store, url, b"anonymous")
    assert await store.lookup(primary_key(url), b"user-a", list) == (None, "vary-miss")
    await put(store, url, b"for a", extra=b"user-a")
    assert await read_body(store, url, extra=b"user-a") == b"for a"
    assert await read_body(store, url, extra=b"user-b") is None


async def test_prefix_purge(store: CacheStore) -> None:
    await put(store, "http://h/docs/a", b"a")
    await put(store, "http://h/docs/b", b"b")
    await put(store, "http://h/other", b"o")
    await asyncio.sleep(0.01)
    await store.purge_prefix("http://h/docs/")
    assert await read_body(store, "http://h/docs/a") is None
    assert await read_body(store, "http://h/docs/b") is None
    assert await read_body(store, "http://h/other") == b"o"


async def test_writer_gives_up_beyond_max_bytes(store: CacheStore) -> None:
    writer = store.writer(10_000)
    assert await writer.feed(b"x" * 6000)
    assert not await writer.feed(b"x" * 6000)
    assert writer.failed and writer.chunks == 0


async def test_missing_chunk_is_an_error_not_a_short_body(store: CacheStore) -> None:
    await put(store, "http://h/big2", b"z" * 20_000)
    entry, _ = await store.lookup(primary_key("http://h/big2"), b"", list)
    assert entry is not None and entry.chunks > 1
    await store.kv.delete(b"b" + entry.body_id + (1).to_bytes(4, "big"))
    with pytest.raises(StateError):
        _ = [c async for c in store.body_chunks(entry)]


async def test_bounded_by_bytes_with_eviction(tmp_path: Path) -> None:
    for backend in ("memory", "local"):
        s = open_cache_store(
            backend=backend, max_bytes=1024 * 1024, chunk_bytes=64 * 1024, max_ttl=600,
            directory=tmp_path / f"lmdb-{backend}",
        )  # fmt: skip
        for i in range(100):
            await put(s, f"http://h/{i}", bytes([i % 256]) * 50_000)
        stats = s.stats()
        assert stats is not None
        assert stats.bytes <= 1024 * 1024 and stats.evictions > 0
        assert await read_body(s, "http://h/99") == bytes([99]) * 50_000
        assert await read_body(s, "http://h/0") is None
        await s.aclose()


def test_entry_codec_round_trip_and_garbage() -> None:
    raw = encode_entry(203, [(b"a", b"b:c"), (b"x", b"")], FRESH, "http://h/p?q", b"body", 4, 0, b"\x01" * 16)
    e = decode_entry(b"k", raw)
    assert e is not None
    assert (e.status, e.headers, e.url, e.body, e.freshness.lifetime) == (
        203, [(b"a", b"b:c"), (b"x", b"")], "http://h/p?q", b"body", 60.0,
    )  # fmt: skip
    assert decode_entry(b"k", b"garbage") is None
    assert decode_entry(b"k", raw[:-1]) is None  # truncated body


def test_keys() -> None:
    assert canonical_target("/a/./b/../c?x=1") == "/a/c?x=1"
    assert canonical_target("/%2e%2e/x") is None
    spec = KeySpec(headers=(b"x-user",), cookie=b"tenant")
    base = [(b"x-forwarded-host", b"h"), (b"x-forwarded-proto", b"http")]
    assert extra_key(KeySpec(), base, b"h", b"http") == b""
    assert extra_key(KeySpec(), [(b"x-forwarded-host", b"evil")], b"h", b"http") != b""
    a = extra_key(spec, [*base, (b"x-user", b"a")], b"h", b"http")
    b = extra_key(spec, [*base, (b"x-user", b"b")], b"h", b"http")
    c = extra_key(spec, [*base, (b"x-user", b"a"), (b"cookie", b"x=1; tenant=t1")], b"h", b"http")
    assert len({a, b, c}) == 3
    p = primary_key("http://h/x")
    assert secondary_key(p, b"", [b"accept"], [(b"accept", b"a")]) != secondary_key(
        p, b"", [b"accept"], [(b"accept", b"b")]
    )


async def test_coalescer() -> None:
    c = Coalescer(pass_seconds=60)
    assert c.join(b"k") is None  # leads
    event = c.join(b"k")
    assert event is not None and not event.is_set()
    c.done(b"k", stored=False)
    assert event.is_set()
    assert c.join(b"k") is None and not c.leads(b"k")  # "pass": no waiting, no leader
    c.done(b"k", stored=True)
    assert c.join(b"k") is None and c.leads(b"k")
