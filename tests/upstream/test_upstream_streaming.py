"""Large bodies stream both ways with bounded buffering; an early answer stops the request body."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from wasm_gateway.upstream import BodySource

from .conftest import Origins, Pools
from .origins import OriginConnection, response

HOST = [(b"host", b"origin.test")]
MB = 1024 * 1024
BODY_SIZE = 64 * MB
PIECE = b"0123456789abcdef" * 4096  # 64 KiB
# Kernel socket buffers on loopback can hold a few MB on each side; anything unbounded shows up as the full
# 64 MB. The client's own share is ~256 KiB plus one read.
LAG_BOUND = 16 * MB


async def wait_until_stalled(progress: list[int]) -> int:
    """Wait until a counter stops moving (the writer is blocked), return where it stopped."""
    last, steady = -1, 0
    while steady < 5:
        await asyncio.sleep(0.02)
        steady = steady + 1 if progress[0] == last else 0
        last = progress[0]
    return last


async def test_large_download_with_slow_consumer_is_bounded(origins: Origins, pools: Pools) -> None:
    written = [0]

    async def fast_writer(conn: OriginConnection) -> None:
        await conn.read_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BODY_SIZE)
        for _ in range(BODY_SIZE // len(PIECE)):
            conn.writer.write(PIECE)
            await conn.writer.drain()
            written[0] += len(PIECE)
        while await conn.read_request():
            await conn.send(response(b"small"))

    origin = await origins.start(fast_writer)
    pool = pools.make(origin)
    tracemalloc.start()
    try:
        resp = await pool.request("GET", "/big", HOST, None, idempotent=True)
        # The consumer does not read yet: the client must stop reading, so the origin blocks.
        stalled_at = await wait_until_stalled(written)
        assert stalled_at < LAG_BOUND
        received = 0
        async for chunk in resp.body():
            received += len(chunk)
            assert len(chunk) <= 1 * MB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await resp.aclose()
    assert received == BODY_SIZE
    assert peak < 4 * MB, f"client held {peak} bytes at peak while streaming {BODY_SIZE}"
    # Fully read with a content-length: the connection is reused.
    async with await pool.request("GET", "/again", HOST, None, idempotent=True) as resp:
        assert await resp.read() == b"small"
    assert origin.accepted == 1


@pytest.mark.parametrize("known_length", [False, True], ids=["chunked", "content-length"])
async def test_large_upload_follows_the_origins_pace(
    origins: Origins, pools: Pools, known_length: bool
) -> None:
    produced = [0]
    consumed = [0]
    max_lag = [0]

    async def slow_reader(conn: OriginConnection) -> None:
        request = await conn.read_head()
        assert request is not None
        assert request.header("transfer-encoding" if not known_length else "content-length") is not None
        if not known_length:
            body = await conn.read_body(request)  # checks the chunked framing; reads it all
            consumed[0] = len(body)
        else:
            remaining = BODY_SIZE
            while remaining:
                data = await conn.reader.read(min(remaining, 65536))
                assert data
                remaining -= len(data)
                consumed[0] += len(data)
                max_lag[0] = max(max_lag[0], produced[0] - consumed[0])
                if consumed[0] % (4 * MB) < 65536:
                    await asyncio.sleep(0.001)  # slower than the client can produce
        await conn.send(response(b"got %d" % consumed[0]))

    async def producer() -> AsyncIterator[bytes]:
        for _ in range(BODY_SIZE // len(PIECE)):
            produced[0] += len(PIECE)
            yield PIECE

    origin = await origins.start(slow_reader)
    pool = pools.make(origin)
    body = BodySource(producer(), BODY_SIZE if known_length else None)
    async with await pool.request("POST", "/upload", HOST, body, idempotent=False) as resp:
        assert await resp.read() == b"got %d" % BODY_SIZE
    assert consumed[0] == BODY_SIZE
    if known_length:
        assert 0 < max_lag[0] < LAG_BOUND


async def test_upload_stall_is_bounded_in_memory(origins: Origins, pools: Pools) -> None:
    """An origin that stops reading: the producer is not pulled further than the buffers allow."""
    produced = [0]
    release = asyncio.Event()

    async def stops_reading(conn: OriginConnection) -> None:
        request = await conn.read_head()
        assert request is not None
        await release.wait()
        await conn.read_body(request)
        await conn.send(response(b"done"))

    async def producer() -> AsyncIterator[bytes]:
        for _ in range(BODY_SIZE // len(PIECE)):
            produced[0] += len(PIECE)
            yield PIECE

    origin = await origins.start(stops_reading)
    pool = pools.make(origin)
    task = asyncio.create_task(
        pool.request("PUT", "/", HOST, BodySource(producer(), BODY_SIZE), idempotent=True)
    )
    assert await wait_until_stalled(produced) < LAG_BOUND
    release.set()
    async with await task as resp:
        assert await resp.read() == b"done"


@pytest.mark.parametrize("kind", ["stream", "bytes"])
async def test_early_answer_stops_the_request_body(origins: Origins, pools: Pools, kind: str) -> None:
    produced = [0]

    async def rejects(conn: OriginConnection) -> None:
        request = await conn.read_head()
        assert request is not None
        if request.target == "/upload":
            # Answers without reading the body, keeps the connection open (a lenient origin).
            await conn.send(response(b"too large", status="413 Payload Too Large"))
            await conn.wait_closed_by_peer()
        else:
            await conn.send(response(b"fine"))

    async def endless() -> AsyncIterator[bytes]:
        while True:
            produced[0] += len(PIECE)
            yield PIECE

    origin = await origins.start(rejects)
    pool = pools.make(origin)
    body = (
        BodySource(endless()) if kind == "stream" else BodySource(PIECE * 256)
    )  # 16 MiB: more than kernel buffers absorb
    async with await pool.request("POST", "/upload", HOST, body, idempotent=False) as resp:
        assert resp.status == 413
        assert await resp.read() == b"too large"
    if kind == "stream":
        assert produced[0] < LAG_BOUND
    await origin.connection_closed.wait()  # never reused: part of the request is still unread
    async with await pool.request("GET", "/next", HOST, None, idempotent=True) as resp:
        assert await resp.read() == b"fine"
    assert origin.accepted == 2
