"""Response framing as parsed, and request framing as the origin sees it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from wasm_gateway.upstream import BodySource, RequestBodyError

from .conftest import Origins, Pools
from .origins import OriginConnection, ReceivedRequest, echo, keep_alive, response

HOST = [(b"host", b"origin.test")]


async def get(pool, target: str = "/", method: str = "GET", body: BodySource | None = None, headers=HOST):
    resp = await pool.request(method, target, list(headers), body, idempotent=method in ("GET", "HEAD"))
    data = await resp.read()
    await resp.aclose()
    return resp, data


async def test_content_length_response(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(
        keep_alive(lambda r: response(b'{"hello": "world"}', headers=[("Content-Type", "application/json")]))
    )
    pool = pools.make(origin)
    resp, data = await get(pool)
    assert (resp.status, resp.reason, resp.http_version) == (200, b"OK", "1.1")
    assert data == b'{"hello": "world"}'
    assert (b"content-type", b"application/json") in resp.headers
    assert (b"content-length", b"18") in resp.headers


async def test_chunked_response_with_trailer(origins: Origins, pools: Pools) -> None:
    async def handler(conn: OriginConnection) -> None:
        while await conn.read_request():
            await conn.send(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n1;ext=1\r\n,\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"
            )

    origin = await origins.start(handler)
    pool = pools.make(origin)
    for _ in range(2):
        _, data = await get(pool)
        assert data == b"hello, world"
    assert origin.accepted == 1  # chunked framing keeps the connection reusable


async def test_read_until_close_response(origins: Origins, pools: Pools) -> None:
    async def handler(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
        await conn.send(b"the end")
        conn.writer.close()

    origin = await origins.start(handler)
    pool = pools.make(origin)
    for _ in range(2):
        _, data = await get(pool)
        assert data == b"until the end"
    assert origin.accepted == 2


async def test_head_response_has_no_body_and_connection_stays_usable(origins: Origins, pools: Pools) -> None:
    def answer(request: ReceivedRequest) -> bytes:
        if request.method == "HEAD":
            # Announces a body it does not send, as HEAD answers do; the parser must not wait for it.
            return b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
        return response(b"body of GET")

    origin = await origins.start(keep_alive(answer))
    pool = pools.make(origin, read_timeout=5)
    resp, data = await get(pool, method="HEAD")
    assert resp.status == 200 and data == b""
    resp, data = await get(pool)
    assert data == b"body of GET"
    resp, data = await get(pool, method="HEAD")
    assert data == b""
    assert origin.accepted == 1


async def test_head_response_to_chunked_resource(origins: Origins, pools: Pools) -> None:
    def answer(request: ReceivedRequest) -> bytes:
        if request.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        return response(b"after")

    origin = await origins.start(keep_alive(answer))
    pool = pools.make(origin)
    _, data = await get(pool, method="HEAD")
    assert data == b""
    _, data = await get(pool)
    assert data == b"after"
    assert origin.accepted == 1


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
async def test_no_body_statuses(origins: Origins, pools: Pools, status: str) -> None:
    def answer(request: ReceivedRequest) -> bytes:
        if request.target == "/empty":
            # A content-length on 304 describes the representation, not this message.
            return f'HTTP/1.1 {status}\r\netag: "x"\r\ncontent-length: 42\r\n\r\n'.encode()
        return response(b"next")

    origin = await origins.start(keep_alive(answer))
    pool = pools.make(origin)
    resp, data = await get(pool, "/empty")
    assert resp.status == int(status[:3]) and data == b""
    _, data = await get(pool, "/next")
    assert data == b"next"
    assert origin.accepted == 1


async def test_interim_responses_are_skipped(origins: Origins, pools: Pools) -> None:
    async def handler(conn: OriginConnection) -> None:
        while await conn.read_request():
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await conn.send(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
            await conn.send(response(b"final", headers=[("x-final", "1")]))

    origin = await origins.start(handler)
    pool = pools.make(origin)
    for _ in range(2):
        resp, data = await get(pool)
        assert resp.status == 200 and data == b"final"
        names = [name for name, _ in resp.headers]
        assert b"x-final" in names and b"link" not in names
    assert origin.accepted == 1


async def test_switching_protocols_is_final_without_body_and_not_reused(
    origins: Origins, pools: Pools
) -> None:
    async def handler(conn: OriginConnection) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x\r\n\r\nxyz")
        await conn.wait_closed_by_peer()

    origin = await origins.start(handler)
    pool = pools.make(origin)
    resp, data = await get(pool)
    assert resp.status == 101 and data == b""
    await origin.connection_closed.wait()  # not kept for reuse
    assert pool.stats()[f"127.0.0.1:{origin.port}"]["open"] == 0  # type: ignore[index]


async def test_request_framing_as_the_origin_sees_it(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(echo))
    pool = pools.make(origin)

    async def stream(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    await get(pool, "/get")
    await get(pool, "/post-none", method="POST")
    await get(pool, "/delete-empty", method="DELETE", body=BodySource(b""))
    await get(pool, "/put-bytes", method="PUT", body=BodySource(b"0123456789"))
    await get(pool, "/post-known", method="POST", body=BodySource(stream(b"abc", b"", b"defg"), 7))
    await get(pool, "/post-unknown", method="POST", body=BodySource(stream(b"abc", b"", b"defg")))
    await get(
        pool,
        "/stripped?q=1",
        method="POST",
        body=BodySource(b"xy"),
        headers=[*HOST, (b"content-length", b"999"), (b"Transfer-Encoding", b"chunked"), (b"x-a", b"1")],
    )
    seen = {request.target: request for request in origin.requests}
    get_ = seen["/get"]
    assert get_.header("content-length") is None and get_.header("transfer-encoding") is None
    assert get_.header("host") == "origin.test" and get_.version == "HTTP/1.1"
    assert seen["/post-none"].header("content-length") == "0"
    assert seen["/delete-empty"].header("content-length") is None
    assert (seen["/put-bytes"].header("content-length"), seen["/put-bytes"].body) == ("10", b"0123456789")
    known = seen["/post-known"]
    assert (known.header("content-length"), known.chunked, known.body) == ("7", False, b"abcdefg")
    unknown = seen["/post-unknown"]
    assert unknown.header("content-length") is None
    assert (unknown.chunked, unknown.body) == (True, b"abcdefg")  # the empty chunk did not end it early
    stripped = seen["/stripped?q=1"]
    assert stripped.header_count("content-length") == 1 and stripped.header("content-length") == "2"
    assert stripped.header("transfer-encoding") is None and stripped.header("x-a") == "1"
    assert origin.accepted == 1


async def test_header_injection_is_refused(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(echo))
    pool = pools.make(origin)
    with pytest.raises(ValueError, match="CR or LF"):
        await pool.request(
            "GET", "/", [*HOST, (b"x-evil", b"a\r\nGET /smuggled HTTP/1.1")], None, idempotent=True
        )
    with pytest.raises(ValueError):
        await pool.request("GET", "/a b", HOST, None, idempotent=True)
    _, data = await get(pool)
    assert data.startswith(b"GET / ")
    assert [r.target for r in origin.requests] == ["/"]


async def test_request_body_length_mismatch(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(echo))
    pool = pools.make(origin)

    async def short() -> AsyncIterator[bytes]:
        yield b"abc"

    with pytest.raises(RequestBodyError, match="ended after 3 of 10 bytes"):
        await pool.request("POST", "/", HOST, BodySource(short(), 10), idempotent=False)
    with pytest.raises(RequestBodyError, match="longer"):
        await pool.request("POST", "/", HOST, BodySource(short(), 2), idempotent=False)
    _, data = await get(pool)  # the pool is still fine
    assert data.startswith(b"GET / ")


async def test_request_body_iterator_error_propagates(origins: Origins, pools: Pools) -> None:
    origin = await origins.start(keep_alive(echo))
    pool = pools.make(origin)

    async def broken() -> AsyncIterator[bytes]:
        yield b"abc"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        await pool.request("POST", "/", HOST, BodySource(broken()), idempotent=False)
    await origin.connection_closed.wait()  # the half-sent request's connection is dropped
    _, data = await get(pool)
    assert data.startswith(b"GET / conn=1")


async def test_complete_body_only_when_it_arrived_with_the_head(origins: Origins, pools: Pools) -> None:
    small = await origins.start(keep_alive(lambda r: response(b"tiny")))
    resp = await pools.make(small).request("GET", "/", list(HOST), None, idempotent=True)
    assert resp.complete_body() == b"tiny"
    await resp.aclose()

    async def slow_body(conn: OriginConnection) -> None:
        while await conn.read_request():
            await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
            await asyncio.sleep(0.2)
            await conn.send(b"56789")

    streamed = await origins.start(slow_body)
    resp = await pools.make(streamed).request("GET", "/", list(HOST), None, idempotent=True)
    assert resp.complete_body() is None  # the body is still arriving: stream it
    assert await resp.read() == b"0123456789"
    await resp.aclose()
