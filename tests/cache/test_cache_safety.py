"""What a shared cache must never do: serve one client's answer to another it was not meant for."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import aiohttp
import httpx
import pytest

from tests.cache.conftest import BACKENDS, CacheOrigin, Seen, respond
from tests.conftest import ThreadServer, raw_request

StartGateway = Callable[..., ThreadServer]


def client(gw: ThreadServer) -> httpx.Client:
    return httpx.Client(base_url=gw.url, timeout=10)


def _personal(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
    """A careless origin: personal data with a shared-looking max-age."""
    who = seen.headers.get("authorization") or seen.headers.get("x-consumer") or "anonymous"
    return 200, [("cache-control", "max-age=60")], f"page of {who}".encode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_authorization_response_not_served_to_anonymous(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/me"] = _personal
    gw = start_gateway(backend)
    with client(gw) as c:
        assert c.get("/me", headers={"authorization": "Bearer alice"}).text == "page of Bearer alice"
        anonymous = c.get("/me")
        bob = c.get("/me", headers={"authorization": "Bearer bob"})
    assert anonymous.text == "page of anonymous"
    assert bob.text == "page of Bearer bob"
    # and an entry stored for anonymous is not served to a request carrying credentials (no public)
    assert origin.counts["/me"] == 3


def test_public_responses_may_answer_authorized_requests(
    start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/pub"] = respond(("cache-control", "public, max-age=60"))
    gw = start_gateway("memory")
    with client(gw) as c:
        c.get("/pub", headers={"authorization": "Bearer alice"})
        assert c.get("/pub").headers["cache-status"].startswith("wasm-gateway; hit")
    assert origin.counts["/pub"] == 1


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


AUTH_FILTER = f"""
[filters.auth]
module = "builtin:auth"

[filters.auth.configuration]
strip_credential = true

[filters.auth.configuration.api_keys]
header = "x-api-key"
forward_header = "x-consumer"
keys = [
  {{ name = "alice", sha256 = "{_sha("alice-key-000001")}" }},
  {{ name = "bob", sha256 = "{_sha("bob-key-000000002")}" }},
]
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_key_response_not_served_to_another_consumer_or_anonymous(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    """The auth filter strips the key before the upstream, so the cache must look at what the client sent."""
    origin.handlers["/account"] = _personal
    gw = start_gateway(backend, extra=AUTH_FILTER, route_extra='filters = ["auth"]')
    with client(gw) as c:
        alice = c.get("/account", headers={"x-api-key": "alice-key-000001"})
        bob = c.get("/account", headers={"x-api-key": "bob-key-000000002"})
        anonymous = c.get("/account")
    assert alice.text == "page of alice"
    assert bob.text == "page of bob"
    assert anonymous.status_code == 401 and "alice" not in anonymous.text
    assert all("x-api-key" not in s.headers for s in origin.seen)  # stripped: the cache did not need it


def test_key_on_auth_claim_header_shares_per_consumer(
    start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/shared"] = lambda s: (
        200,
        [("cache-control", "public, max-age=60")],
        f"for {s.headers.get('x-consumer')} #{s.count}".encode(),
    )
    gw = start_gateway(
        "memory",
        extra=AUTH_FILTER,
        route_extra='filters = ["auth"]',
        route_cache='enabled = true, key_headers = ["x-consumer"]',
    )
    with client(gw) as c:
        a1 = c.get("/shared", headers={"x-api-key": "alice-key-000001"}).text
        b1 = c.get("/shared", headers={"x-api-key": "bob-key-000000002"}).text
        a2 = c.get("/shared", headers={"x-api-key": "alice-key-000001"}).text
    assert (a1, b1, a2) == ("for alice #1", "for bob #2", "for alice #1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_cookie_never_reaches_another_client(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/login"] = lambda s: (
        200,
        [("cache-control", "max-age=60"), ("set-cookie", f"sid=secret{s.count}")],
        b"welcome",
    )
    gw = start_gateway(backend)
    first = httpx.get(gw.url + "/login")  # separate clients: no cookie jar shared between them
    second = httpx.get(gw.url + "/login")
    assert first.headers["set-cookie"] == "sid=secret1"
    assert second.headers["set-cookie"] == "sid=secret2"  # not stored: each client gets its own
    assert first.headers["cache-status"].endswith("detail=set-cookie")
    gw2 = start_gateway(backend, route_cache="enabled = true, store_set_cookie = true")
    own = httpx.get(gw2.url + "/login")
    other = httpx.get(gw2.url + "/login")
    assert own.headers["set-cookie"] == "sid=secret3"
    assert "set-cookie" not in other.headers and other.headers["cache-status"].startswith("wasm-gateway; hit")


@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_with_cookies_bypass_by_default(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/c"] = lambda s: (
        200,
        [("cache-control", "max-age=60")],
        s.headers.get("cookie", "").encode(),
    )
    gw = start_gateway(backend)
    with client(gw) as c:
        assert c.get("/c", headers={"cookie": "session=alice"}).text == "session=alice"
        assert c.get("/c").text == ""
        r = c.get("/c", headers={"cookie": "session=bob"})
    assert (
        r.text == "session=bob"
        and r.headers["cache-status"] == "wasm-gateway; fwd=bypass; detail=header-cookie"
    )


def _reflect(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
    body = (
        f"<script src='//{seen.headers.get('x-forwarded-host')}/app.js'> "
        f"scheme={seen.headers.get('x-forwarded-scheme')} original={seen.headers.get('x-original-url')}"
    )
    return 200, [("cache-control", "max-age=60")], body.encode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reflected_forwarding_headers_do_not_poison(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/page"] = _reflect
    gw = start_gateway(backend)
    host = f"127.0.0.1:{gw.port}"
    evil = {"x-forwarded-host": "evil.example", "x-forwarded-scheme": "nothttps", "x-original-url": "/admin"}
    with client(gw) as c:
        poisoned_try = c.get("/page", headers=evil)
        victim = c.get("/page")
    assert (
        "evil" not in poisoned_try.text
        and "nothttps" not in poisoned_try.text
        and "/admin" not in poisoned_try.text
    )
    assert victim.text == poisoned_try.text == f"<script src='//{host}/app.js'> scheme=None original=None"


@pytest.mark.parametrize("backend", BACKENDS)
def test_forwarding_headers_from_a_trusted_proxy_are_keyed(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/page"] = _reflect
    gw = start_gateway(backend, top='trusted_proxies = ["127.0.0.1/32"]')
    with client(gw) as c:
        via_proxy = c.get("/page", headers={"x-forwarded-host": "evil.example"})
        victim = c.get("/page")
        again = c.get("/page", headers={"x-forwarded-host": "evil.example"})
    assert "evil.example" in via_proxy.text
    assert "evil.example" not in victim.text
    assert again.headers["cache-status"].startswith("wasm-gateway; hit") and again.text == via_proxy.text


def _account(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
    """An origin that ignores path parameters (Spring, Tomcat): /account;x.css is /account."""
    path = seen.raw_path.split(";", 1)[0]
    if path.endswith("/account"):
        who = seen.headers.get("authorization") or seen.headers.get("cookie") or "anonymous"
        return 200, [("content-type", "text/html")], f"account of {who}".encode()
    return 200, [("cache-control", "max-age=60")], b"static"


@pytest.mark.parametrize("backend", BACKENDS)
def test_path_tricks_neither_store_nor_serve_private_pages(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    for path in ("/account", "/account;x.css", "/static/..;/account", "/static/%2e%2e/account", "/static/%2E%2E%2Faccount", "/static/.%2e/account"):  # fmt: skip
        origin.handlers[path.split(";")[0]] = _account
    origin.handlers["/account;x.css"] = _account
    gw = start_gateway(backend, route_cache="enabled = true, default_ttl = 60")
    with client(gw) as c:
        alice = c.get("/account;x.css", headers={"authorization": "Bearer alice"})
        cookie = c.get("/account;x.css", headers={"cookie": "sid=alice"})
        anonymous = c.get("/account;x.css")
    assert alice.text == "account of Bearer alice" and cookie.text == "account of sid=alice"
    assert anonymous.text == "account of anonymous"
    for trick in (
        b"/static/%2e%2e/account",
        b"/static/.%2E/account",
        b"/static/..;/account",
        b"/static/%2e%2e%2faccount",
    ):
        reply = raw_request(
            gw.port, b"GET " + trick + b" HTTP/1.1\r\nhost: x\r\nauthorization: Bearer alice\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 400"), trick
    assert all("%2e" not in s.raw_path.lower() for s in origin.seen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fat_get_body_does_not_change_what_others_are_served(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/search"] = lambda s: (
        200,
        [("cache-control", "max-age=60")],
        b"results for " + (s.body or s.query.encode()),
    )
    gw = start_gateway(backend)
    with client(gw) as c:
        fat = c.request("GET", "/search?q=cats", content=b"<script>evil</script>")
        clean = c.get("/search?q=cats")
        again = c.get("/search?q=cats")
    assert fat.headers["cache-status"] == "wasm-gateway; fwd=bypass; detail=request-body"
    assert clean.text == again.text == "results for q=cats"
    assert again.headers["cache-status"].startswith("wasm-gateway; hit")


@pytest.mark.parametrize("backend", BACKENDS)
def test_500_concurrent_misses_make_one_upstream_request(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.delay = 0.3  # long enough for every request to arrive while the first fetch is under way
    gw = start_gateway(backend)

    async def run() -> list[tuple[int, str]]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> tuple[int, str]:
                async with session.get(gw.url + "/cold?key=1") as r:
                    return r.status, await r.text()

            return await asyncio.gather(*(one() for _ in range(500)))

    results = asyncio.run(run())
    assert origin.counts["/cold"] == 1
    assert all(r == (200, "GET /cold?key=1 #1") for r in results)


TRANSFORM = """
[filters.tag]
module = "builtin:transform"

[filters.tag.configuration.response.headers]
set = { x-per-answer = "from-filter" }
remove = ["x-internal"]

[filters.tag.configuration.response.body]
edits = [{ op = "set", pointer = "/filtered", value = true }]
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_response_filters_run_on_hits_and_never_enter_the_cache(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/doc"] = lambda s: (
        200,
        [("cache-control", "max-age=60"), ("content-type", "application/json"), ("x-internal", "secret")],
        b'{"n": %d}' % s.count,
    )
    gw = start_gateway(backend, extra=TRANSFORM, route_extra='filters = ["tag"]')
    with client(gw) as c:
        miss = c.get("/doc")
        hit = c.get("/doc")
        head = c.head("/doc")
    for r in (miss, hit):
        assert r.headers["x-per-answer"] == "from-filter" and "x-internal" not in r.headers
        assert r.json() == {"n": 1, "filtered": True}
    assert hit.headers["cache-status"].startswith("wasm-gateway; hit")
    assert head.headers["x-per-answer"] == "from-filter" and head.content == b""
    assert origin.counts["/doc"] == 1


def test_coalesced_waiters_get_their_own_variant(start_gateway: StartGateway, origin: CacheOrigin) -> None:
    origin.delay = 0.3
    origin.handlers["/hello"] = respond(
        ("cache-control", "max-age=60"),
        ("vary", "accept-language"),
        body=lambda s: s.headers.get("accept-language", "-").encode(),
    )
    gw = start_gateway("memory")

    async def run() -> list[tuple[str, str]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(lang: str) -> tuple[str, str]:
                async with session.get(gw.url + "/hello", headers={"accept-language": lang}) as r:
                    return lang, await r.text()

            return await asyncio.gather(*(one(lang) for lang in ["de", "fr", "it"] * 20))

    assert all(lang == body for lang, body in asyncio.run(run()))


def test_key_headers_without_filters(start_gateway: StartGateway, origin: CacheOrigin) -> None:
    """Key parts read from what the client sent (no filters, untrusted peer) and from what the gateway sends
    (a managed header: X-Forwarded-For is the peer's address, whatever the client claims)."""
    origin.handlers["/t"] = lambda s: (
        200,
        [("cache-control", "max-age=60")],
        f"{s.headers.get('x-tenant')} {s.headers.get('x-forwarded-for')} #{s.count}".encode(),
    )
    gw = start_gateway("memory", route_cache='enabled = true, key_headers = ["x-tenant"]')
    with client(gw) as c:
        a = c.get("/t", headers={"x-tenant": "a"}).text
        b = c.get("/t", headers={"x-tenant": "b"}).text
        assert c.get("/t", headers={"x-tenant": "a"}).text == a == "a 127.0.0.1 #1"
        assert b == "b 127.0.0.1 #2"
    gw2 = start_gateway("memory", route_cache='enabled = true, key_headers = ["x-forwarded-for"]')
    with client(gw2) as c:
        first = c.get("/t", headers={"x-forwarded-for": "6.6.6.6"}).text
        second = c.get("/t", headers={"x-forwarded-for": "7.7.7.7"})
    assert first == "None 127.0.0.1 #3"
    assert second.text == first and second.headers["cache-status"].startswith("wasm-gateway; hit")
