"""The cache in a running gateway with a real origin, for each backend (memory, LMDB, Redis)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.cache.conftest import BACKENDS, CacheOrigin, Seen, respond
from tests.conftest import ThreadServer, gateway_server
from tests.origins import RawOrigin

pytestmark = pytest.mark.parametrize("backend", BACKENDS)
StartGateway = Callable[..., ThreadServer]


def client(gw: ThreadServer) -> httpx.Client:
    return httpx.Client(base_url=gw.url, timeout=10)


def test_miss_then_hit_with_age_and_cache_status(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    gw = start_gateway(backend)
    with client(gw) as c:
        first = c.get("/a?x=1")
        second = c.get("/a?x=1")
        other_query = c.get("/a?x=2")
    assert first.headers["cache-status"] == "wasm-gateway; fwd=uri-miss; stored"
    assert "age" not in first.headers
    assert second.text == first.text == "GET /a?x=1 #1"
    assert second.headers["cache-status"].startswith("wasm-gateway; hit; ttl=")
    assert int(second.headers["age"]) >= 0
    assert second.headers["content-type"] == "text/plain"
    assert other_query.text == "GET /a?x=2 #2"
    assert origin.counts["/a"] == 2


def test_head_is_answered_from_the_get_entry(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    gw = start_gateway(backend)
    with client(gw) as c:
        c.get("/h")
        head = c.head("/h")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len("GET /h? #1"))
    assert head.headers["cache-status"].startswith("wasm-gateway; hit")
    assert origin.counts["/h"] == 1


def test_client_conditional_answered_304_from_a_fresh_entry(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/c"] = respond(("cache-control", "max-age=60"), ("etag", '"v1"'))
    gw = start_gateway(backend)
    with client(gw) as c:
        c.get("/c")
        r = c.get("/c", headers={"if-none-match": '"v1"'})
        miss = c.get("/c", headers={"if-none-match": '"v0"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == '"v1"'
    assert miss.status_code == 200 and miss.text == "/c #1"
    assert origin.counts["/c"] == 1


def _validating(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [("cache-control", "max-age=0"), ("etag", '"v1"'), ("x-version", str(seen.count))]
    if seen.headers.get("if-none-match") == '"v1"':
        return 304, headers, b""
    return 200, headers, b"validated body"


def test_stale_entry_is_revalidated_and_the_304_merged(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/v"] = _validating
    gw = start_gateway(backend)
    with client(gw) as c:
        first = c.get("/v")
        second = c.get("/v")
        third = c.get("/v")
    assert first.text == second.text == third.text == "validated body"
    assert second.headers["cache-status"] == "wasm-gateway; fwd=stale; fwd-status=304"
    assert second.headers["x-version"] == "2"  # merged from the 304
    assert third.headers["x-version"] == "3"
    assert [s.headers.get("if-none-match") for s in origin.seen] == [None, '"v1"', '"v1"']


def test_request_no_cache_forces_validation(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/n"] = respond(("cache-control", "max-age=60"), ("etag", '"n"'))
    gw = start_gateway(backend)
    with client(gw) as c:
        c.get("/n")
        r = c.get("/n", headers={"cache-control": "no-cache"})
        only = c.get("/not-there", headers={"cache-control": "only-if-cached"})
    assert r.headers["cache-status"].startswith("wasm-gateway; fwd=request")
    assert origin.seen[1].headers.get("if-none-match") == '"n"'
    assert only.status_code == 504 and origin.counts["/not-there"] == 0


def test_stale_while_revalidate_refreshes_in_the_background(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/swr"] = respond(("cache-control", "max-age=0, stale-while-revalidate=60"))
    gw = start_gateway(backend)
    with client(gw) as c:
        c.get("/swr")
        stale = c.get("/swr")
        assert stale.text == "/swr #1"
        assert stale.headers["cache-status"].startswith("wasm-gateway; hit; ttl=")
        deadline = time.monotonic() + 10
        while origin.counts["/swr"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert origin.counts["/swr"] == 2
        time.sleep(0.1)
        assert c.get("/swr").text == "/swr #2"


def test_stale_if_error(backend: str, start_gateway: StartGateway, origin: CacheOrigin) -> None:
    origin.handlers["/sie"] = respond(("cache-control", "max-age=0, stale-if-error=60"))
    gw = start_gateway(backend)
    with client(gw) as c:
        assert c.get("/sie").text == "/sie #1"
        origin.handlers["/sie"] = respond(("cache-control", "no-store"), status=503)
        r = c.get("/sie")
    assert r.status_code == 200 and r.text == "/sie #1"
    assert "stale-if-error" in r.headers["cache-status"]


def test_vary(backend: str, start_gateway: StartGateway, origin: CacheOrigin) -> None:
    origin.handlers["/lang"] = respond(
        ("cache-control", "max-age=60"),
        ("vary", "Accept-Language"),
        body=lambda s: s.headers.get("accept-language", "none").encode(),
    )
    gw = start_gateway(backend)
    with client(gw) as c:
        assert c.get("/lang", headers={"accept-language": "de"}).text == "de"
        assert c.get("/lang", headers={"accept-language": "fr"}).text == "fr"
        assert c.get("/lang", headers={"accept-language": "de"}).text == "de"
        assert (
            c.get("/lang", headers={"accept-language": "fr"})
            .headers["cache-status"]
            .startswith("wasm-gateway; hit")
        )
    assert origin.counts["/lang"] == 2


def test_unsafe_methods_invalidate(backend: str, start_gateway: StartGateway, origin: CacheOrigin) -> None:
    origin.handlers["/items"] = lambda s: (
        (201, [("location", "/items/7")], b"created")
        if s.method == "POST"
        else (200, [("cache-control", "max-age=60")], f"list #{s.count}".encode())
    )
    origin.handlers["/items/7"] = respond(("cache-control", "max-age=60"))
    gw = start_gateway(backend)
    with client(gw) as c:
        c.get("/items")
        c.get("/items/7")
        assert c.get("/items").headers["cache-status"].startswith("wasm-gateway; hit")
        assert c.post("/items", content=b"{}").status_code == 201
        assert c.get("/items").text == "list #3"
        assert c.get("/items/7").text == "/items/7 #2"


def test_no_store_private_and_uncached_responses(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/ns"] = respond(("cache-control", "no-store"))
    origin.handlers["/p"] = respond(("cache-control", "private, max-age=60"))
    origin.handlers["/vs"] = respond(("cache-control", "max-age=60"), ("vary", "*"))
    gw = start_gateway(backend)
    with client(gw) as c:
        for path in ("/ns", "/p", "/vs"):
            c.get(path)
            r = c.get(path)
            assert "#2" in r.text, path
    assert r.headers["cache-status"] == "wasm-gateway; fwd=uri-miss; detail=vary-star"


def test_default_ttl_is_off_unless_configured(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/plain"] = respond(("content-type", "text/plain"))
    gw = start_gateway(backend)
    with client(gw) as c:
        c.get("/plain")
        assert c.get("/plain").text == "/plain #2"
    gw2 = start_gateway(backend, route_cache="enabled = true, default_ttl = 30")
    with client(gw2) as c:
        c.get("/plain")
        assert c.get("/plain").text == "/plain #3"


def test_large_responses_stream_through_unstored(
    backend: str, start_gateway: StartGateway, origin: CacheOrigin
) -> None:
    origin.handlers["/large"] = respond(("cache-control", "max-age=60"), body=lambda s: b"L" * 300_000)
    origin.handlers["/chunky"] = respond(
        ("cache-control", "max-age=60"), body=lambda s: bytes([s.count]) * 700_000
    )
    gw = start_gateway(backend, route_cache="enabled = true, max_object_bytes = 200000")
    with client(gw) as c:
        r = c.get("/large")
        assert len(r.content) == 300_000 and r.headers["cache-status"].endswith("detail=too-large")
        assert len(c.get("/large").content) == 300_000
    assert origin.counts["/large"] == 2
    gw2 = start_gateway(backend)  # 700 KB: stored in chunks (256 KiB)
    with client(gw2) as c:
        assert c.get("/chunky").content == b"\x01" * 700_000
        again = c.get("/chunky")
        assert again.content == b"\x01" * 700_000 and again.headers["cache-status"].startswith(
            "wasm-gateway; hit"
        )


def test_truncated_upstream_body_is_never_stored(backend: str, start_gateway: StartGateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    requests = []

    def truncated(conn, head):  # type: ignore[no-untyped-def]
        requests.append(head)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 100\r\n\r\n" + b"x" * 40
        )

    with RawOrigin(truncated) as raw:
        from tests.cache.conftest import gateway_config

        text = gateway_config(backend, tmp_path, raw.port)
        with gateway_server(text, tmp_path) as gw:
            for _ in range(2):
                with pytest.raises(httpx.HTTPError), client(gw) as c:
                    c.get("/t")
    assert len(requests) >= 2  # the second request went upstream again: nothing was stored


def test_purge_endpoint(backend: str, start_gateway: StartGateway, origin: CacheOrigin) -> None:
    token = "purge-token-0123456789"
    gw = start_gateway(backend, extra=f'[cache.purge]\nenabled = true\ntoken = "{token}"\n')
    host = f"127.0.0.1:{gw.port}"
    auth = {"authorization": f"Bearer {token}"}
    with client(gw) as c:
        for path in ("/docs/a", "/docs/b", "/keep"):
            c.get(path)
        assert c.post("/_gateway/cache/purge", json={"url": f"http://{host}/keep"}).status_code == 401
        bad = {"authorization": "Bearer purge-token-01234567890"}
        assert (
            c.post("/_gateway/cache/purge", json={"url": f"http://{host}/keep"}, headers=bad).status_code
            == 401
        )
        r = c.post("/_gateway/cache/purge", json={"url": f"http://{host}/keep"}, headers=auth)
        assert r.status_code == 200 and r.json()["removed"] is True
        assert c.get("/keep").text == "GET /keep? #2"
        time.sleep(0.01)
        r = c.post("/_gateway/cache/purge", json={"prefix": f"http://{host}/docs/"}, headers=auth)
        assert r.status_code == 200
        assert c.get("/docs/a").text == "GET /docs/a? #2"
        assert c.get("/docs/b").text == "GET /docs/b? #2"
        assert c.get("/keep").headers["cache-status"].startswith("wasm-gateway; hit")
        assert c.post("/_gateway/cache/purge", json={"nope": 1}, headers=auth).status_code == 400
        assert c.get("/_gateway/cache/purge", headers=auth).status_code == 405


def _lookups(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("wasm_gateway_cache_lookups_total{") and 'route="cached"' in line:
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = float(line.rsplit(" ", 1)[1])
    return out


def test_metrics(backend: str, start_gateway: StartGateway, origin: CacheOrigin) -> None:
    origin.handlers["/ns"] = respond(("cache-control", "no-store"))
    gw = start_gateway(backend)
    with client(gw) as c:
        before = _lookups(c.get("/metrics").text)
        c.get("/m")
        c.get("/m")
        c.get("/ns")
        c.get("/m", headers={"cookie": "a=1"})
        text = c.get("/metrics").text
    after = _lookups(text)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta == {
        "hit": 1, "miss": 1, "uncacheable": 1, "bypass": 1, "stale": 0, "revalidated": 0
    }  # fmt: skip
    for name in (
        "wasm_gateway_cache_stored_bytes",
        "wasm_gateway_cache_entries",
        "wasm_gateway_cache_evictions_total",
        "wasm_gateway_cache_coalesced_waits_total",
    ):
        assert name in text


def test_a_store_that_is_down_means_misses_not_errors(
    backend: str, origin_server: tuple[ThreadServer, CacheOrigin], origin: CacheOrigin, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    if backend != "redis":
        pytest.skip("only a remote store can be down")
    from tests.cache.conftest import gateway_config
    from tests.conftest import free_port

    text = gateway_config(backend, tmp_path, origin_server[0].port).replace(
        "redis://127.0.0.1:6379/0", f"redis://127.0.0.1:{free_port()}/0"
    )
    with gateway_server(text, tmp_path) as gw, client(gw) as c:
        answers = [c.get("/down") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.text for r in answers] == ["GET /down? #1", "GET /down? #2", "GET /down? #3"]
