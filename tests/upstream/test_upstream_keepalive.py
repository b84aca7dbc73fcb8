"""Connection reuse: when a connection goes back to the pool, when it must not, idle expiry, stale races."""

from __future__ import annotations

import asyncio

import pytest

from wasm_gateway.exceptions import UpstreamConnectError
from wasm_gateway.upstream import BodySource

from .conftest import Origins, Pools
from .origins import OriginConnection, echo, keep_alive, response

HOST = [(b"host", b"origin.test")]


async def fetch(pool, target: str = "/", method: str = "GET", headers=HOST, idempotent: bool = True) -> bytes:
    async with await pool.request(method, target, list(headers), None, idempotent=idempotent) as resp:
        return await resp.read()


async def test_sequential_requests_reuse_one_connection(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(echo))
    pool = pools.make(origin)
    for i in range(5):
        assert await fetch(pool, f"/{i}") == f"GET /{i} conn=0 body=0".encode()
    assert origin.accepted == 1
    stats = pool.stats()[f"127.0.0.1:{origin.port}"]
    assert stats == {
        "open": 1,
        "connecting": 0,
        "idle": 1,
        "in_use": 0,
        "waiting": 0,
        "ejected": False,
        "consecutive_failures": 0,
    }


async def test_no_reuse_after_connection_close_from_origin(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(lambda r: response(b"bye", headers=[("Connection", "close")])))
    pool = pools.make(origin)
    assert await fetch(pool) == b"bye"
    assert await fetch(pool) == b"bye"
    assert origin.accepted == 2


async def test_no_reuse_after_connection_close_from_client(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(echo))
    pool = pools.make(origin)
    await fetch(pool, headers=[*HOST, (b"connection", b"close")])
    await fetch(pool)
    assert origin.accepted == 2


@pytest.mark.parametrize("consume", [0, 1])
async def test_no_reuse_after_unread_or_partly_read_body(
    origins: Origins, pools: Pools, consume: int
) -> None:
    big = b"x" * (4 * 1024 * 1024)  # more than the client buffers: the answer cannot be complete at aclose

    def answer(request) -> bytes:
        return response(big) if request.target == "/big" else response(b"small")

    origin = await origins.start(keep_alive(answer))
    pool = pools.make(origin)
    resp = await pool.request("GET", "/big", HOST, None, idempotent=True)
    async for _ in resp.body():
        consume -= 1
        if consume < 0:
            break
    await resp.aclose()
    await resp.aclose()  # idempotent
    assert await fetch(pool, "/small") == b"small"
    assert origin.accepted == 2


async def test_fully_received_but_unconsumed_body_still_reuses(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(echo))
    pool = pools.make(origin)
    resp = await pool.request("GET", "/", HOST, None, idempotent=True)
    await resp.aclose()  # the small body arrived with the head: nothing is left on the wire
    await fetch(pool)
    assert origin.accepted == 1


@pytest.mark.parametrize(
    ("headers", "reused"),
    [([], False), ([("Connection", "keep-alive")], True)],
    ids=["plain", "keep-alive"],
)
async def test_http10_response(origins: Origins, pools: Pools, headers, reused: bool) -> None:
    origin = await origins.start(keep_alive(lambda r: response(b"old", headers=headers, version="HTTP/1.0")))
    pool = pools.make(origin)
    assert await fetch(pool) == b"old"
    assert await fetch(pool) == b"old"
    assert origin.accepted == (1 if reused else 2)


async def test_extra_bytes_after_response_prevent_reuse(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(lambda r: response(b"ok") + b"JUNK"))
    pool = pools.make(origin)
    assert await fetch(pool) == b"ok"
    assert await fetch(pool) == b"ok"
    assert origin.accepted == 2


async def test_idle_connections_expire(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(echo))
    pool = pools.make(origin, idle_timeout=0.2)
    await fetch(pool)
    # The sweep closes the idle connection: the origin sees it go without any new request.
    await asyncio.wait_for(origin.connection_closed.wait(), 10)
    assert pool.stats()[f"127.0.0.1:{origin.port}"]["open"] == 0  # type: ignore[index]
    assert await fetch(pool) == b"GET / conn=1 body=0"


async def test_origin_closing_an_idle_connection(origins: Origins, pools: Pools) -> None:
    async def handler(conn: OriginConnection) -> None:
        request = await conn.read_request()
        assert request is not None
        await conn.send(echo(request))  # keep-alive answer, then hang up while the client holds it idle

    origin = await origins.start(handler)
    pool = pools.make(origin)
    await fetch(pool)
    await origin.connection_closed.wait()
    key = f"127.0.0.1:{origin.port}"
    while pool.stats()[key]["open"]:  # type: ignore[index]
        await asyncio.sleep(0.01)  # the FIN takes a loop turn to arrive; then the pool drops the connection
    assert await fetch(pool) == b"GET / conn=1 body=0"
    assert [r.connection for r in origin.requests] == [0, 1]  # no attempt on the dead connection


def race_origin():
    """Answers the first request on each connection; on the second, reads it and hangs up without a byte:
    the keep-alive race (the origin's idle timeout fires just as the client reuses the connection)."""

    async def handler(conn: OriginConnection) -> None:
        request = await conn.read_request()
        assert request is not None
        await conn.send(echo(request))
        await conn.read_request()

    return handler


async def test_keep_alive_race_is_retried_on_a_fresh_connection(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(race_origin())
    pool = pools.make(origin, retries=0)  # the stale-connection retry does not depend on `retries`
    assert await fetch(pool, "/1") == b"GET /1 conn=0 body=0"
    assert await fetch(pool, "/2") == b"GET /2 conn=1 body=0"
    assert [r.target for r in origin.requests] == ["/1", "/2", "/2"]
    assert pool.stats()[f"127.0.0.1:{origin.port}"]["consecutive_failures"] == 0  # type: ignore[index]


async def test_keep_alive_race_with_bytes_body_is_retried(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(race_origin())
    pool = pools.make(origin)
    await fetch(pool, "/1")
    async with await pool.request("PUT", "/2", HOST, BodySource(b"data"), idempotent=True) as resp:
        assert await resp.read() == b"PUT /2 conn=1 body=4"


async def test_keep_alive_race_is_not_retried_for_non_idempotent(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(race_origin())
    pool = pools.make(origin)
    await fetch(pool, "/1")
    with pytest.raises(
        UpstreamConnectError, match=r'upstream "api" 127\.0\.0\.1:\d+: connection .* before any'
    ):
        await fetch(pool, "/2", method="POST", idempotent=False)
    assert [r.target for r in origin.requests] == ["/1", "/2"]
