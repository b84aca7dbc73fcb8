"""RFC 9111 / 5861 rules as pure functions: storability, freshness, age, reuse, validation, invalidation."""

from __future__ import annotations

import email.utils

import pytest

from wasm_gateway.cache import policy as p
from wasm_gateway.cache.policy import Freshness, RequestDirectives, Reuse, StoreOptions

NOW = 1_800_000_000.0
OPTS = StoreOptions()


def H(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in pairs]


def date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def fresh(status: int = 200, *headers: tuple[str, str], request: RequestDirectives | None = None,
          options: StoreOptions = OPTS, request_time: float = NOW, response_time: float = NOW) -> Freshness | str:  # fmt: skip
    return p.freshness_for(
        status,
        H(*headers),
        request=request or RequestDirectives(),
        request_time=request_time,
        response_time=response_time,
        options=options,
    )


def lifetime(*headers: tuple[str, str], **kw: object) -> float:
    f = fresh(200, *headers, **kw)  # type: ignore[arg-type]
    assert isinstance(f, Freshness), f
    return f.lifetime


# -- storability -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ((("cache-control", "no-store, max-age=60"),), "no-store"),
        ((("cache-control", "private, max-age=60"),), "private"),
        ((("cache-control", 'private="x-user", max-age=60'),), "private"),
        ((("cache-control", "max-age=60"), ("vary", "accept, *")), "vary-star"),
        ((("cache-control", "max-age=60"), ("set-cookie", "sid=1")), "set-cookie"),
        ((("content-type", "text/plain"),), "no-freshness"),
        ((("cache-control", "no-cache, max-age=60"),), "no-cache-without-validator"),
        ((("cache-control", "max-age=0"),), "stale-on-arrival"),
    ],
)
def test_not_stored(headers: tuple[tuple[str, str], ...], reason: str) -> None:
    assert fresh(200, *headers) == reason


def test_statuses() -> None:
    assert fresh(206, ("cache-control", "max-age=60")) == "status"
    assert fresh(304, ("cache-control", "max-age=60")) == "status"
    assert fresh(101, ("cache-control", "max-age=60")) == "status"
    # 404 is heuristically cacheable; 500 only with explicit freshness
    assert isinstance(fresh(500, ("cache-control", "max-age=5")), Freshness)
    lm = ("last-modified", date(NOW - 1000))
    assert isinstance(fresh(404, lm, ("date", date(NOW))), Freshness)
    assert fresh(500, lm, ("date", date(NOW))) == "no-freshness"


def test_request_no_store() -> None:
    assert fresh(200, ("cache-control", "max-age=60"), request=RequestDirectives(no_store=True)) == (
        "request-no-store"
    )


def test_set_cookie_stored_without_cookie_when_configured() -> None:
    opts = StoreOptions(store_set_cookie=True)
    headers = H(("cache-control", "max-age=60"), ("set-cookie", "sid=1"), ("x-a", "1"))
    assert isinstance(fresh(200, *[(k.decode(), v.decode()) for k, v in headers], options=opts), Freshness)
    stored = p.headers_to_store(headers, opts)
    assert (b"set-cookie", b"sid=1") not in stored and (b"x-a", b"1") in stored


def test_headers_to_store_drops_hop_by_hop_and_per_answer_fields() -> None:
    headers = H(
        ("connection", "x-secret"),
        ("x-secret", "1"),
        ("keep-alive", "5"),
        ("transfer-encoding", "chunked"),
        ("date", date(NOW)),
        ("age", "3"),
        ("content-length", "5"),
        ("etag", '"a"'),
    )
    assert p.headers_to_store(headers, OPTS) == [(b"etag", b'"a"')]


# -- Authorization (RFC 9111 3.5) --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cc", "stored"),
    [
        ("max-age=60", False),
        ("public, max-age=60", True),
        ("s-maxage=60", True),
        ("must-revalidate, max-age=60", True),
    ],
)
def test_authorization_rule(cc: str, stored: bool) -> None:
    result = fresh(200, ("cache-control", cc), request=RequestDirectives(authorization=True))
    assert isinstance(result, Freshness) is stored
    if not stored:
        assert result == "authorization"


def test_authorized_requests_not_served_unshareable_entries() -> None:
    entry = fresh(200, ("cache-control", "max-age=60"))
    assert isinstance(entry, Freshness)
    assert p.decide_reuse(entry, RequestDirectives(authorization=True), NOW).reuse is Reuse.MISS
    shared = fresh(200, ("cache-control", "public, max-age=60"))
    assert isinstance(shared, Freshness)
    assert p.decide_reuse(shared, RequestDirectives(authorization=True), NOW).reuse is Reuse.FRESH


def test_credential_headers_count_as_authorization() -> None:
    d = p.request_directives(H(("x-api-key", "k")), frozenset({b"authorization", b"x-api-key"}))
    assert d.authorization
    assert not p.request_directives(H(("x-api-key", "k"))).authorization


# -- freshness lifetime (4.2.1) ----------------------------------------------------------------------------------


def test_lifetime_precedence() -> None:
    d = ("date", date(NOW))
    assert lifetime(("cache-control", "s-maxage=10, max-age=20"), ("expires", date(NOW + 30)), d) == 10
    assert lifetime(("cache-control", "max-age=20"), ("expires", date(NOW + 30)), d) == 20
    assert lifetime(("expires", date(NOW + 30)), d) == 30
    assert lifetime(("expires", date(NOW + 30)), ("date", date(NOW - 10))) == 40  # Expires - Date


def test_invalid_expires_is_stale_and_conflicting_max_age_is_stale() -> None:
    assert fresh(200, ("expires", "0"), ("date", date(NOW))) == "stale-on-arrival"
    assert fresh(200, ("cache-control", "max-age=60, max-age=120")) == "stale-on-arrival"
    assert fresh(200, ("cache-control", "max-age=abc")) == "stale-on-arrival"


def test_heuristic_only_with_last_modified_and_cacheable_status() -> None:
    headers = (("date", date(NOW)), ("last-modified", date(NOW - 10_000)))
    assert lifetime(*headers) == pytest.approx(1000)
    assert fresh(200, *headers, options=StoreOptions(heuristic=False)) == "no-freshness"
    assert lifetime(("date", date(NOW)), ("last-modified", date(NOW - 10**8))) == p.HEURISTIC_MAX
    assert fresh(201, *headers) == "no-freshness"


def test_default_ttl_only_when_the_origin_says_nothing() -> None:
    opts = StoreOptions(default_ttl=30)
    assert lifetime(("content-type", "text/plain"), options=opts) == 30
    assert lifetime(("cache-control", "max-age=5"), options=opts) == 5
    assert fresh(200, ("cache-control", "no-store"), options=opts) == "no-store"
    assert fresh(201, ("content-type", "x"), options=opts) == "no-freshness"


# -- age (4.2.3) -------------------------------------------------------------------------------------------------


def test_age_counts_upstream_age_delay_and_residence() -> None:
    f = fresh(200, ("cache-control", "max-age=100"), ("age", "10"), ("date", date(NOW)),
              request_time=NOW - 2, response_time=NOW)  # fmt: skip
    assert isinstance(f, Freshness)
    assert f.initial_age == 12  # age_value + response delay
    assert p.current_age(f, NOW + 5) == 17
    g = fresh(200, ("cache-control", "max-age=100"), ("date", date(NOW - 30)))
    assert isinstance(g, Freshness)
    assert g.initial_age == 30  # apparent age from Date
    h = fresh(200, ("cache-control", "max-age=100"))  # no Date: residence still counts
    assert isinstance(h, Freshness)
    assert p.decide_reuse(h, RequestDirectives(), NOW + 101).reuse is Reuse.MISS


# -- reuse (4, 4.2.4, 5.2.1, RFC 5861) ---------------------------------------------------------------------------


def entry(*headers: tuple[str, str]) -> Freshness:
    f = fresh(200, *headers)
    assert isinstance(f, Freshness), f
    return f


def test_fresh_then_stale() -> None:
    f = entry(("cache-control", "max-age=60"))
    d = p.decide_reuse(f, RequestDirectives(), NOW + 10)
    assert (d.reuse, d.age, d.ttl) == (Reuse.FRESH, 10, 50)
    assert p.decide_reuse(f, RequestDirectives(), NOW + 61).reuse is Reuse.MISS


def test_stale_with_validator_revalidates() -> None:
    f = entry(("cache-control", "max-age=60"), ("etag", '"v1"'))
    assert p.decide_reuse(f, RequestDirectives(), NOW + 61).reuse is Reuse.VALIDATE


def test_request_directives() -> None:
    f = entry(("cache-control", "max-age=60"), ("etag", '"v1"'))
    at = NOW + 30
    assert (
        p.decide_reuse(f, p.request_directives(H(("cache-control", "no-cache"))), at).reuse is Reuse.VALIDATE
    )
    assert p.decide_reuse(f, p.request_directives(H(("pragma", "no-cache"))), at).reuse is Reuse.VALIDATE
    assert (
        p.decide_reuse(f, p.request_directives(H(("cache-control", "max-age=10"))), at).reuse
        is Reuse.VALIDATE
    )
    assert (
        p.decide_reuse(f, p.request_directives(H(("cache-control", "max-age=40"))), at).reuse is Reuse.FRESH
    )
    assert (
        p.decide_reuse(f, p.request_directives(H(("cache-control", "min-fresh=40"))), at).reuse
        is Reuse.VALIDATE
    )
    assert (
        p.decide_reuse(f, p.request_directives(H(("cache-control", "min-fresh=20"))), at).reuse is Reuse.FRESH
    )
    late = NOW + 70
    assert (
        p.decide_reuse(f, p.request_directives(H(("cache-control", "max-stale=20"))), late).reuse
        is Reuse.STALE_OK
    )
    assert (
        p.decide_reuse(f, p.request_directives(H(("cache-control", "max-stale=5"))), late).reuse
        is Reuse.VALIDATE
    )
    assert p.decide_reuse(f, p.request_directives(H(("cache-control", "max-stale"))), late + 9999).reuse is (
        Reuse.STALE_OK
    )
    assert p.request_directives(H(("cache-control", "only-if-cached"))).only_if_cached
    # Pragma counts only without Cache-Control (RFC 9111 5.4)
    assert not p.request_directives(H(("pragma", "no-cache"), ("cache-control", "max-stale=1"))).no_cache


def test_no_cache_response_always_validates() -> None:
    f = entry(("cache-control", "no-cache, max-age=60"), ("etag", '"v1"'))
    assert p.decide_reuse(f, RequestDirectives(), NOW).reuse is Reuse.VALIDATE


def test_must_revalidate_forbids_stale() -> None:
    for cc in ("must-revalidate", "proxy-revalidate", "s-maxage=60"):
        f = entry(("cache-control", f"max-age=60, {cc}, stale-while-revalidate=100"), ("etag", '"a"'))
        d = p.decide_reuse(f, p.request_directives(H(("cache-control", "max-stale=1000"))), NOW + 70)
        assert d.reuse is Reuse.VALIDATE, cc


def test_stale_while_revalidate_and_stale_if_error() -> None:
    f = entry(("cache-control", "max-age=60, stale-while-revalidate=30, stale-if-error=300"))
    assert p.decide_reuse(f, RequestDirectives(), NOW + 80).reuse is Reuse.STALE_REVALIDATE
    assert (
        p.decide_reuse(f, RequestDirectives(), NOW + 100).reuse is Reuse.VALIDATE
    )  # sie keeps it for errors
    assert p.may_serve_on_error(f, NOW + 300)
    assert not p.may_serve_on_error(f, NOW + 400)
    assert f.keep_for == 60 + 300


# -- Vary ---------------------------------------------------------------------------------------------------------


def test_vary_parsing_and_normalisation() -> None:
    assert p.parse_vary(H(("vary", "Accept-Encoding, accept"), ("vary", "X-A"))) == (
        b"accept",
        b"accept-encoding",
        b"x-a",
    )
    assert p.parse_vary(H(("vary", "accept, *"))) is None
    assert p.normalise_vary_value(b"accept-encoding", [b"GZIP,br"]) == p.normalise_vary_value(
        b"accept-encoding", [b"gzip", b" br "]
    )
    assert p.normalise_vary_value(b"x-a", [b"A"]) != p.normalise_vary_value(b"x-a", [b"a"])


# -- validation ----------------------------------------------------------------------------------------------------


def test_conditional_headers_and_client_conditionals() -> None:
    stored = H(("etag", 'W/"v1"'), ("last-modified", date(NOW - 100)))
    assert p.conditional_headers(stored) == [
        (b"if-none-match", b'W/"v1"'),
        (b"if-modified-since", date(NOW - 100).encode()),
    ]
    assert p.client_not_modified(H(("if-none-match", '"x", "v1"')), stored, 200)
    assert p.client_not_modified(H(("if-none-match", "*")), stored, 200)
    assert not p.client_not_modified(H(("if-none-match", '"v2"')), stored, 200)
    # If-None-Match wins over If-Modified-Since
    assert not p.client_not_modified(
        H(("if-none-match", '"v2"'), ("if-modified-since", date(NOW))), stored, 200
    )
    assert p.client_not_modified(H(("if-modified-since", date(NOW))), stored, 200)
    assert not p.client_not_modified(H(("if-modified-since", date(NOW - 200))), stored, 200)
    assert not p.client_not_modified(H(("if-none-match", "*")), stored, 404)


def test_304_merge() -> None:
    stored = H(("etag", '"v1"'), ("cache-control", "max-age=10"), ("content-length", "5"), ("x-a", "old"),
               ("content-type", "text/plain"))  # fmt: skip
    merged = p.merge_not_modified(
        stored, H(("cache-control", "max-age=99"), ("x-a", "new"), ("content-length", "0"), ("date", "x"))
    )
    assert merged is not None
    assert (b"cache-control", b"max-age=99") in merged and (b"x-a", b"new") in merged
    assert (b"content-length", b"5") in merged and (b"content-type", b"text/plain") in merged
    assert all(n != b"date" for n, _ in merged)
    assert p.merge_not_modified(H(("etag", '"v1"')), H(("etag", '"v2"'))) is None
    assert p.merge_not_modified(H(("etag", 'W/"v1"')), H(("etag", 'W/"v2"'))) is not None


# -- invalidation (4.4) ------------------------------------------------------------------------------------------


def test_invalidation_targets() -> None:
    response = H(("location", "/items/7"), ("content-location", "http://other.example/x"))
    assert p.invalidation_targets("POST", 201, "http", "api.example", "/items", response) == [
        "/items",
        "/items/7",
    ]
    same = H(("content-location", "http://API.example/items/8#frag"))
    assert p.invalidation_targets("PUT", 200, "http", "api.example", "/items/8", same) == ["/items/8"]
    assert p.invalidation_targets("DELETE", 500, "http", "api.example", "/items/8", []) == []
    assert p.invalidation_targets("GET", 200, "http", "api.example", "/items/8", []) == []
    assert p.invalidation_targets("POST", 302, "https", "a", "/x", H(("location", "//a/evil"))) == ["/x"]


def test_http_dates() -> None:
    assert p.parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == 784111777
    assert p.parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == 784111777
    assert p.parse_http_date(b"Sun Nov  6 08:49:37 1994") == 784111777
    assert p.parse_http_date(b"garbage") is None
    assert p.parse_http_date(b"") is None
