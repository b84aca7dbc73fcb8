"""The request path end to end: real uvicorn gateway, real origins on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ThreadServer, free_port, gateway_server, raw_request
from tests.origins import RawOrigin, echo_origin


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


def config(origin_port: int, extra: str = "", routes: str | None = None, server: str = "") -> str:
    routes = (
        routes
        if routes is not None
        else """
[[routes]]
name = "admin"
path_prefix = "/admin"
require_headers = ["authorization"]
upstream = "origin"

[[routes]]
name = "files"
path_prefix = "/files"
keep_encoded_slashes = true
upstream = "origin"

[[routes]]
name = "readonly"
path_prefix = "/ro"
methods = ["GET"]
upstream = "origin"

[[routes]]
name = "other-host"
hosts = ["internal.example"]
path_prefix = "/"
upstream = "origin"

[[routes]]
name = "public"
path_prefix = "/"
upstream = "origin"
"""
    )
    return f"""
[server]
max_request_body_bytes = 1000000
{server}
[server.timeouts]
upstream_read = 2.0
upstream_connect = 1.0

[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]
{extra}
{routes}
[log]
access_log = false
"""


@pytest.fixture(scope="module")
def gateway(origin: ThreadServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with gateway_server(config(origin.port), tmp_path_factory.mktemp("gw")) as server:
        yield server


@pytest.fixture
def client(gateway: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        yield c


def seen(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def header(data: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in data["headers"] if k == name]


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


# -- routing and canonical paths ----------------------------------------------------------------------------


def test_proxies_and_forwards_canonical_path(client: httpx.Client) -> None:
    data = seen(client.get("/echo/a?x=1&y=2"))
    assert data["path"] == "/echo/a"
    assert data["query"] == "x=1&y=2"


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/admin/secret",
        b"//admin/secret",
        b"/public/../admin/secret",
        b"/./admin/secret",
        b"/%61dmin/secret",
        b"/x/..//admin/secret",
        b"/public/..%2fadmin/secret",
        b"/public/%2e%2e/admin/secret",
        b"/public/.%2e/admin/secret",
        b"/public%2f..%2fadmin/secret",
        b"/public/..;/admin/secret",
        b"/public/..\\admin/secret",
        b"/admin%00/secret",
        b"/admin/%2e%2e/admin/secret",
    ],
)
def test_bypass_shapes_never_reach_protected_upstream_path(gateway: ThreadServer, raw_path: bytes) -> None:
    """Each shape either hits the auth guard (401) or is rejected (400); none reaches /admin unauthenticated."""
    response = raw_request(
        gateway.port, b"GET " + raw_path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert status_of(response) in (400, 401), response[:300]


def test_authorized_request_reaches_admin_with_canonical_path(
    client: httpx.Client, gateway: ThreadServer
) -> None:
    response = raw_request(
        gateway.port,
        b"GET //%61dmin/./x/../secret HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n",
    )
    assert status_of(response) == 200
    body = orjson.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["raw_path"] == "/admin/secret"  # the upstream saw exactly the path the route was chosen for


def test_encoded_slash_rejected_unless_route_keeps_it(gateway: ThreadServer) -> None:
    assert (
        status_of(raw_request(gateway.port, b"GET /x/a%2Fb HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
        == 400
    )
    response = raw_request(gateway.port, b"GET /files/a%2fb HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert orjson.loads(response.split(b"\r\n\r\n", 1)[1])["raw_path"] == "/files/a%2Fb"


def test_host_rules(gateway: ThreadServer) -> None:
    no_host = raw_request(gateway.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(no_host) == 400
    two_hosts = raw_request(
        gateway.port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"
    )
    assert status_of(two_hosts) == 400
    internal = raw_request(
        gateway.port, b"GET /admin/x HTTP/1.1\r\nHost: INTERNAL.example.\r\nConnection: close\r\n\r\n"
    )
    assert status_of(internal) == 200  # the internal host has its own routes (no admin guard there)


def test_404_and_405(tmp_path: Path, origin: ThreadServer) -> None:
    routes = """
[[routes]]
name = "only"
path = "/only"
upstream = "origin"
[[routes]]
name = "readonly"
path_prefix = "/ro"
methods = ["GET"]
upstream = "origin"
"""
    with gateway_server(config(origin.port, routes=routes), tmp_path) as server:
        response = httpx.post(server.url + "/ro/x", content=b"")
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"
        assert response.json()["error"] == "method_not_allowed"
        response = httpx.get(server.url + "/other")
        assert response.status_code == 404
        body = response.json()
        assert body["error"] == "not_found" and body["request_id"] == response.headers["x-request-id"]


def test_method_mismatch_falls_to_next_route_like_envoy(client: httpx.Client) -> None:
    # /ro allows GET only; a POST is matched by the next route ("public"), as Envoy and Kong do.
    assert seen(client.post("/ro/x", content=b""))["method"] == "POST"


# -- headers across the proxy -------------------------------------------------------------------------------


def test_hop_by_hop_stripped_both_ways(client: httpx.Client) -> None:
    response = client.get(
        "/hop",
        headers={
            "Connection": "keep-alive, X-Client-Secret",
            "X-Client-Secret": "s",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "Proxy-Connection": "keep-alive",
            "X-Kept": "yes",
        },
    )
    data = seen(response)
    names = {k for k, _ in data["headers"]}
    for name in ("x-client-secret", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert name not in names, name
    assert header(data, "connection") in ([], ["keep-alive"])  # the client's Connection header never passes
    assert header(data, "x-kept") == ["yes"]
    for name in ("x-origin-secret", "keep-alive", "proxy-authenticate"):
        assert name not in response.headers, name


def test_forwarding_headers_without_trusted_proxies(client: httpx.Client) -> None:
    data = seen(
        client.get(
            "/echo",
            headers={
                "X-Forwarded-For": "1.2.3.4",
                "X-Real-IP": "1.2.3.4",
                "X-Forwarded-Host": "evil",
                "X-Request-Id": "mine",
            },
        )
    )
    assert header(data, "x-forwarded-for") == ["127.0.0.1"]
    assert header(data, "x-real-ip") == ["127.0.0.1"]
    assert header(data, "x-forwarded-host") == [f"127.0.0.1:{client.base_url.port}"]
    assert header(data, "x-forwarded-proto") == ["http"]
    assert header(data, "via") == ["1.1 wasm-gateway"]
    request_id = header(data, "x-request-id")
    assert len(request_id) == 1 and request_id != ["mine"]


def test_client_address_through_trusted_proxy(origin: ThreadServer, tmp_path: Path) -> None:
    text = 'trusted_proxies = ["127.0.0.0/8"]\n' + config(origin.port)
    with gateway_server(text, tmp_path) as server:
        response = httpx.get(
            server.url + "/echo",
            headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.7", "X-Request-Id": "abc-1"},
        )
        data = seen(response)
        assert header(data, "x-real-ip") == ["198.51.100.7"]
        assert header(data, "x-forwarded-for") == ["6.6.6.6, 198.51.100.7, 127.0.0.1"]
        assert header(data, "x-request-id") == ["abc-1"]
        assert response.headers["x-request-id"] == "abc-1"


def test_host_preserved_or_rewritten(origin: ThreadServer, tmp_path: Path, client: httpx.Client) -> None:
    assert header(seen(client.get("/echo", headers={"Host": "site.example"})), "host") == ["site.example"]
    with gateway_server(config(origin.port, extra='host_header = "rewrite"'), tmp_path) as server:
        data = seen(httpx.get(server.url + "/echo", headers={"Host": "site.example"}))
        assert header(data, "host") == [f"127.0.0.1:{origin.port}"]
        assert header(data, "x-forwarded-host") == ["site.example"]


# -- bodies -------------------------------------------------------------------------------------------------


def test_request_bodies_framed_and_forwarded(client: httpx.Client) -> None:
    payload = bytes(range(256)) * 1000  # 256 KB: streamed, not the small-body path
    data = seen(client.post("/upload", content=payload))
    assert data["body_size"] == len(payload)
    data = seen(client.post("/upload", content=iter([b"a" * 70000, b"b" * 5])))  # chunked from the client
    assert data["body_size"] == 70005
    assert header(data, "transfer-encoding") == ["chunked"]
    data = seen(client.post("/upload", content=b"small"))
    assert header(data, "content-length") == ["5"]


def test_413_for_content_length_before_100_continue(gateway: ThreadServer) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = sock.recv(65536)
    assert status_of(answer) == 413, answer
    assert b"100 Continue" not in answer


def test_413_for_chunked_body_over_limit(gateway: ThreadServer) -> None:
    chunk = b"%x\r\n%s\r\n" % (100000, b"z" * 100000)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = b""
        try:
            for _ in range(15):  # 1.5 MB against a 1 MB limit
                sock.sendall(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        try:
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
    assert status_of(answer) == 413, answer[:200]


@pytest.mark.parametrize(
    "request_head",
    [
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nxx",
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ],
)
def test_smuggling_shaped_framing_rejected(gateway: ThreadServer, request_head: bytes) -> None:
    answer = raw_request(gateway.port, request_head, timeout=3)
    assert status_of(answer) in (0, 400), answer[:200]  # 0: the server dropped the connection
    assert b'"body_size"' not in answer  # never reached the origin as a request


# -- upstream failures --------------------------------------------------------------------------------------


def test_502_when_upstream_refuses(tmp_path: Path) -> None:
    dead = free_port()
    with gateway_server(config(dead), tmp_path) as server:
        response = httpx.get(server.url + "/x")
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "bad_gateway" and body["request_id"]
    assert "Traceback" not in response.text


def test_504_when_upstream_is_slow(client: httpx.Client) -> None:
    response = client.get("/slow?s=4")
    assert response.status_code == 504
    assert response.json()["error"] == "gateway_timeout"


def test_upstream_dying_mid_body_aborts_client_response(tmp_path: Path) -> None:
    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.1)
        conn.shutdown(socket.SHUT_RDWR)

    with (
        RawOrigin(handler) as origin,
        gateway_server(config(origin.port), tmp_path) as server,
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client() as c,
    ):
        c.get(server.url + "/x").read()

    def chunked_handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.1)
        conn.shutdown(socket.SHUT_RDWR)

    with (
        RawOrigin(chunked_handler) as origin,
        gateway_server(config(origin.port), tmp_path) as server,
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client() as c,
    ):
        c.get(server.url + "/x").read()


def test_oversized_upstream_head_is_502(tmp_path: Path) -> None:
    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200000 + b"\r\nContent-Length: 0\r\n\r\n")

    with RawOrigin(handler) as origin, gateway_server(config(origin.port), tmp_path) as server:
        assert httpx.get(server.url + "/x").status_code == 502


# -- websocket ----------------------------------------------------------------------------------------------


def test_websocket_pass_through(gateway: ThreadServer) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{gateway.port}/ws", subprotocols=["chat"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        ws.send("hi")
        assert ws.recv() == "echo:hi"
        ws.send(b"\x01\x02\x03")
        assert ws.recv() == b"\x03\x02\x01"
        ws.send("close-me")
        with pytest.raises(ConnectionClosed):
            ws.recv()
        assert ws.close_code == 4001


# -- health and metrics -------------------------------------------------------------------------------------


def test_health_ready_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    client.get("/echo")
    text = client.get("/metrics").text
    assert (
        'wasm_gateway_request_duration_seconds_count{method="GET",route="public",status_class="2xx"}' in text
    )
    assert "wasm_gateway_requests_in_flight" in text
    assert 'wasm_gateway_upstream_duration_seconds_count{upstream="origin"}' in text


def test_concurrent_requests_all_succeed(gateway: ThreadServer) -> None:
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(base_url=gateway.url, timeout=10) as c:
            for i in range(30):
                r = c.get(f"/echo/{i}")
                if r.status_code != 200 or r.json()["path"] != f"/echo/{i}":
                    errors.append(r.text)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_one_date_header_and_request_id_on_proxied_response(gateway: ThreadServer) -> None:
    answer = raw_request(gateway.port, b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.count(b"\r\ndate: ") == 1
    assert head.count(b"\r\nx-request-id: ") == 1


def test_response_head_is_not_held_back_when_the_body_waits(tmp_path: Path) -> None:
    """SSE-style: the origin sends its head, then waits for the client to have seen it before any body."""
    client_saw_head = threading.Event()

    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        if client_saw_head.wait(10):
            conn.sendall(b"7\r\ndata: 1\r\n0\r\n\r\n")

    with (
        RawOrigin(handler) as origin,
        gateway_server(config(origin.port), tmp_path) as server,
        httpx.Client(timeout=5) as c,
        c.stream("GET", server.url + "/events") as response,
    ):
        assert response.status_code == 200
        client_saw_head.set()
        assert response.read() == b"data: 1"


def test_small_empty_and_bodiless_answers_on_one_keep_alive_connection(client: httpx.Client) -> None:
    # Small answers leave head and body in one write (the head is held for the body write that follows at
    # once); answers with no body bytes on the wire must never leave a head waiting for a write.
    for _ in range(3):
        small = client.get("/echo", timeout=5)
        assert small.status_code == 200 and small.json()["path"] == "/echo"
        head = client.head("/echo", timeout=5)
        assert head.status_code == 200 and head.content == b""
        empty = client.get("/big?n=0", timeout=5)
        assert empty.status_code == 200 and empty.content == b"" and empty.headers["content-length"] == "0"
        assert client.get("/big?n=300000", timeout=5).content == b"x" * 300_000
