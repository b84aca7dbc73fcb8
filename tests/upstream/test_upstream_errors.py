"""Failures: refused, timeouts, malformed or oversized heads, bodies cut short. Every message names the
upstream and the target."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from wasm_gateway.exceptions import (
    UpstreamBodyError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from wasm_gateway.upstream import Target

from .conftest import Origins, Pools
from .origins import OriginConnection, unused_port

HOST = [(b"host", b"origin.test")]


async def get(pool):
    return await pool.request("GET", "/", HOST, None, idempotent=True)


def prefix(port: int) -> str:
    return rf'upstream "api" 127\.0\.0\.1:{port}: '


async def test_connect_refused(pools: Pools) -> None:
    port = unused_port()
    pool = pools.make(Target("127.0.0.1", port), retries=0)
    with pytest.raises(UpstreamConnectError, match=prefix(port) + "connection refused") as caught:
        await get(pool)
    assert caught.value.target == f"127.0.0.1:{port}"


async def test_connect_timeout(pools: Pools) -> None:
    # A listener whose accept queue is full and never accepted: further SYNs are dropped, connect hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        pool = pools.make(Target("127.0.0.1", port), connect_timeout=0.3, retries=0)
        with pytest.raises(UpstreamTimeoutError, match=prefix(port) + "connect timed out after 0.3s"):
            await get(pool)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_response_head_timeout(origins: Origins, pools: Pools) -> None:
    async def silent(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.wait_closed_by_peer()

    origin = await origins.start(silent)
    pool = pools.make(origin, read_timeout=0.3)
    with pytest.raises(UpstreamTimeoutError, match=prefix(origin.port) + "no response head for 0.3s"):
        await get(pool)
    await origin.connection_closed.wait()


async def test_body_stall_timeout(origins: Origins, pools: Pools) -> None:
    async def stalls(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst part")
        await conn.wait_closed_by_peer()

    origin = await origins.start(stalls)
    pool = pools.make(origin, read_timeout=0.3)
    resp = await get(pool)
    chunks = []
    with pytest.raises(UpstreamTimeoutError, match=prefix(origin.port) + "no response body bytes for 0.3s"):
        async for chunk in resp.body():
            chunks.append(chunk)
    assert chunks == [b"first part"]  # what arrived is delivered before the error
    await resp.aclose()
    await origin.connection_closed.wait()


async def test_slow_but_steady_body_does_not_time_out(origins: Origins, pools: Pools) -> None:
    # read_timeout is between bytes, not for the whole body.
    async def trickles(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(6):
            await asyncio.sleep(0.1)
            await conn.send(b"1\r\nx\r\n")
        await conn.send(b"0\r\n\r\n")

    origin = await origins.start(trickles)
    pool = pools.make(origin, read_timeout=0.3)
    async with await get(pool) as resp:
        assert await resp.read() == b"xxxxxx"


@pytest.mark.parametrize("slowly", [False, True], ids=["one-write", "dribbled"])
async def test_oversized_response_head(origins: Origins, pools: Pools, slowly: bool) -> None:
    async def huge(conn: OriginConnection) -> None:
        await conn.read_request()
        head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))
        if slowly:
            for offset in range(0, len(head), 4096):
                await conn.send(head[offset : offset + 4096])
                await asyncio.sleep(0)
        else:
            await conn.send(head + b"content-length: 0\r\n\r\n")
        await conn.wait_closed_by_peer()

    origin = await origins.start(huge)
    pool = pools.make(origin, max_response_header_bytes=65536)
    with pytest.raises(UpstreamProtocolError, match=prefix(origin.port) + "response head larger than 65536"):
        await get(pool)


async def test_single_header_growing_past_the_limit(origins: Origins, pools: Pools) -> None:
    async def endless_header(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(40):
            await conn.send(b"a" * 4096)
            await asyncio.sleep(0)
        await conn.wait_closed_by_peer()

    origin = await origins.start(endless_header)
    pool = pools.make(origin, max_response_header_bytes=65536)
    with pytest.raises(UpstreamProtocolError, match="response head larger than 65536"):
        await get(pool)


@pytest.mark.parametrize(
    "head",
    [b"HTTX/1.1 200 OK\r\n\r\n", b"HTTP/1.1 2OO OK\r\n\r\n", b"garbage\r\n\r\n"],
    ids=["protocol", "status", "garbage"],
)
async def test_malformed_status_line(origins: Origins, pools: Pools, head: bytes) -> None:
    async def bad(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(head)
        await conn.wait_closed_by_peer()

    origin = await origins.start(bad)
    pool = pools.make(origin)
    with pytest.raises(UpstreamProtocolError, match=prefix(origin.port) + "malformed response head"):
        await get(pool)


async def test_conflicting_framing_is_refused(origins: Origins, pools: Pools) -> None:
    async def smuggler(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        await conn.wait_closed_by_peer()

    origin = await origins.start(smuggler)
    pool = pools.make(origin)
    with pytest.raises(UpstreamProtocolError):
        await get(pool)


async def test_close_before_any_byte_on_fresh_connection(origins: Origins, pools: Pools) -> None:
    async def hangs_up(conn: OriginConnection) -> None:
        await conn.read_request()

    origin = await origins.start(hangs_up)
    pool = pools.make(origin)
    with pytest.raises(
        UpstreamConnectError, match=prefix(origin.port) + "connection .* before any response byte"
    ):
        await get(pool)
    assert len(origin.requests) == 1  # a fresh connection's failure is not the keep-alive race: no retry


async def test_close_in_the_middle_of_the_head(origins: Origins, pools: Pools) -> None:
    async def half_head(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-le")

    origin = await origins.start(half_head)
    pool = pools.make(origin)
    with pytest.raises(
        UpstreamProtocolError, match=prefix(origin.port) + ".* in the middle of the response head"
    ):
        await get(pool)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\nonly this\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\nonly this\r\n",
    ],
    ids=["content-length", "chunked-mid-chunk", "chunked-no-terminator"],
)
async def test_body_cut_mid_stream(origins: Origins, pools: Pools, answer: bytes) -> None:
    async def cuts(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(answer)
        await asyncio.sleep(0.05)  # let the head go out on its own before the FIN

    origin = await origins.start(cuts)
    pool = pools.make(origin)
    resp = await get(pool)
    assert resp.status == 200
    received = b""
    with pytest.raises(
        UpstreamBodyError, match=prefix(origin.port) + ".* before the end of the response body"
    ):
        async for chunk in resp.body():
            received += chunk
    assert received.startswith(b"only this")
    await resp.aclose()


async def test_body_reset_mid_stream(origins: Origins, pools: Pools) -> None:
    async def resets(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")
        await asyncio.sleep(0.05)
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.writer.transport.abort()  # SO_LINGER 0: RST instead of FIN

    origin = await origins.start(resets)
    pool = pools.make(origin)
    resp = await get(pool)
    with pytest.raises(UpstreamBodyError):
        await resp.read()


async def test_malformed_chunked_body(origins: Origins, pools: Pools) -> None:
    async def bad_chunk(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await asyncio.sleep(0.05)
        await conn.send(b"zz\r\nnope\r\n")
        await conn.wait_closed_by_peer()

    origin = await origins.start(bad_chunk)
    pool = pools.make(origin)
    resp = await get(pool)
    with pytest.raises(UpstreamBodyError, match="malformed response body"):
        await resp.read()
