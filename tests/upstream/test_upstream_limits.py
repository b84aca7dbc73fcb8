"""The per-target connection bound, waiting in line, and closing the pool."""

from __future__ import annotations

import asyncio

import pytest

from wasm_gateway.exceptions import UpstreamBodyError, UpstreamConnectError

from .conftest import Origins, Pools
from .origins import OriginConnection, echo, keep_alive

HOST = [(b"host", b"origin.test")]


def gated(gate: asyncio.Event):
    """Holds every answer until `gate` is set, so requests pile up."""

    async def handler(conn: OriginConnection) -> None:
        while (request := await conn.read_request()) is not None:
            await gate.wait()
            await conn.send(echo(request))

    return handler


async def fetch(pool, target: str = "/") -> bytes:
    async with await pool.request("GET", target, HOST, None, idempotent=True) as resp:
        return await resp.read()


async def test_concurrent_requests_respect_max_connections(origins: Origins, pools: Pools) -> None:
    gate = asyncio.Event()
    origin = await origins.start(gated(gate))
    pool = pools.make(origin, max_connections_per_target=3)
    tasks = [asyncio.create_task(fetch(pool, f"/{i}")) for i in range(10)]
    while len(origin.requests) < 3:
        await asyncio.sleep(0.01)
    stats = pool.stats()[f"127.0.0.1:{origin.port}"]
    assert (stats["open"], stats["in_use"], stats["waiting"]) == (3, 3, 7)  # type: ignore[index]
    gate.set()
    answers = await asyncio.gather(*tasks)
    assert [answer.split(b" conn=")[0] for answer in answers] == [f"GET /{i}".encode() for i in range(10)]
    assert origin.accepted == 3 and origin.max_open == 3
    # Waiters were served in arrival order by the released connections.
    assert [r.target for r in origin.requests[3:]] == [f"/{i}" for i in range(3, 10)]


async def test_waiting_for_a_connection_times_out(origins: Origins, pools: Pools) -> None:
    gate = asyncio.Event()
    origin = await origins.start(gated(gate))
    pool = pools.make(origin, max_connections_per_target=1, connect_timeout=0.2)
    first = asyncio.create_task(fetch(pool))
    while not origin.requests:
        await asyncio.sleep(0.01)
    with pytest.raises(UpstreamConnectError, match="all 1 connections stayed busy"):
        await fetch(pool)
    gate.set()
    assert await first == b"GET / conn=0 body=0"
    assert pool.stats()[f"127.0.0.1:{origin.port}"]["consecutive_failures"] == 0  # type: ignore[index]


async def test_cancelled_waiter_does_not_leak_its_turn(origins: Origins, pools: Pools) -> None:
    gate = asyncio.Event()
    origin = await origins.start(gated(gate))
    pool = pools.make(origin, max_connections_per_target=1)
    first = asyncio.create_task(fetch(pool, "/first"))
    while not origin.requests:
        await asyncio.sleep(0.01)
    cancelled = asyncio.create_task(fetch(pool, "/cancelled"))
    third = asyncio.create_task(fetch(pool, "/third"))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    gate.set()
    assert await first == b"GET /first conn=0 body=0"
    assert await third == b"GET /third conn=0 body=0"
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert origin.accepted == 1


async def test_failed_connect_frees_its_slot(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(echo))
    pool = pools.make(origin, max_connections_per_target=1)
    await fetch(pool)
    await origin.close()
    await asyncio.sleep(0.05)
    for _ in range(3):
        with pytest.raises(UpstreamConnectError):
            await fetch(pool)
    assert pool.stats()[f"127.0.0.1:{origin.port}"]["open"] == 0  # type: ignore[index]


async def test_close_fails_waiters_and_in_flight_requests(origins: Origins, pools: Pools) -> None:
    gate = asyncio.Event()
    origin = await origins.start(gated(gate))
    pool = pools.make(origin, max_connections_per_target=1)
    in_flight = asyncio.create_task(fetch(pool, "/in-flight"))
    while not origin.requests:
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(fetch(pool, "/waiting"))
    await asyncio.sleep(0.01)
    await pool.close()
    for task in (in_flight, waiting):
        with pytest.raises(UpstreamConnectError, match="pool is closed"):
            await task
    with pytest.raises(UpstreamConnectError, match="pool is closed"):
        await fetch(pool)
    gate.set()
    await origin.connection_closed.wait()


async def test_close_breaks_a_streaming_body(origins: Origins, pools: Pools) -> None:
    async def endless(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await conn.wait_closed_by_peer()

    origin = await origins.start(endless)
    pool = pools.make(origin)
    resp = await pool.request("GET", "/", HOST, None, idempotent=True)
    await pool.close()
    with pytest.raises(UpstreamBodyError, match="pool is closed"):
        await resp.read()


async def test_cancelled_request_closes_its_connection(origins: Origins, pools: Pools) -> None:
    gate = asyncio.Event()
    origin = await origins.start(gated(gate))
    pool = pools.make(origin, max_connections_per_target=1)
    task = asyncio.create_task(fetch(pool, "/slow"))
    while not origin.requests:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Its answer may still come; the connection cannot be reused, and its slot is free again.
    stats = pool.stats()[f"127.0.0.1:{origin.port}"]
    assert (stats["open"], stats["in_use"]) == (0, 0)  # type: ignore[index]
    gate.set()
    assert await fetch(pool, "/next") == b"GET /next conn=1 body=0"


async def test_stats_while_streaming(origins: Origins, pools: Pools) -> None:
    async def two_parts(conn: OriginConnection) -> None:
        while await conn.read_request():
            await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
            await asyncio.sleep(0.05)
            await conn.send(b"-last")

    origin = await origins.start(two_parts)
    pool = pools.make(origin)
    key = f"127.0.0.1:{origin.port}"
    resp = await pool.request("GET", "/", HOST, None, idempotent=True)
    assert (pool.stats()[key]["in_use"], pool.stats()[key]["idle"]) == (1, 0)  # type: ignore[index]
    assert await resp.read() == b"first-last"
    # Fully read: back in the pool even before aclose().
    assert (pool.stats()[key]["in_use"], pool.stats()[key]["idle"]) == (0, 1)  # type: ignore[index]
    await resp.aclose()
