"""Cross-check against hishel 2 (RFC 9111, sans-IO) where both caches follow the same rule.

They differ by design elsewhere: this cache does not store `Set-Cookie` responses or `no-cache` responses
without validators, nor `Vary: *` responses (hishel stores them; they can never match), and needs a validator or a stale extension to keep a `max-age=0` response; hishel's age
ignores `Age` and residence time (see wasm_gateway/cache/policy.py)."""

from __future__ import annotations

import email.utils
import time

import pytest

from wasm_gateway.cache import policy as p
from wasm_gateway.cache.policy import Freshness, RequestDirectives, StoreOptions

hishel = pytest.importorskip("hishel")
from hishel._core._spec import get_freshness_lifetime  # noqa: E402

NOW = time.time()
DATE = email.utils.formatdate(NOW, usegmt=True)

CASES: list[tuple[int, dict[str, str]]] = [
    (200, {"cache-control": "max-age=60"}),
    (200, {"cache-control": "s-maxage=30, max-age=60"}),
    (200, {"cache-control": "public, max-age=120"}),
    (200, {"expires": "NOW+90"}),
    (200, {"cache-control": "no-store, max-age=60"}),
    (200, {"cache-control": "private, max-age=60"}),
    (404, {"cache-control": "max-age=60"}),
    (301, {"cache-control": "max-age=600"}),
    (200, {"last-modified": "NOW-10000"}),
    (206, {"cache-control": "max-age=60"}),
]


@pytest.mark.parametrize(("status", "headers"), CASES)
def test_storability_and_lifetime_agree_with_hishel(status: int, headers: dict[str, str]) -> None:
    now = time.time()  # hishel's heuristic reads the clock: both must see the same "now"
    headers = {
        k: email.utils.formatdate(now + int(v[3:]), usegmt=True) if v.startswith("NOW") else v
        for k, v in {"date": "NOW+0", **headers}.items()
    }
    ours = p.freshness_for(
        status,
        [(k.encode(), v.encode()) for k, v in headers.items()],
        request=RequestDirectives(),
        request_time=now,
        response_time=now,
        options=StoreOptions(),
    )
    request = hishel.Request("GET", "http://example.com/x", hishel.Headers({}))
    response = hishel.Response(status, hishel.Headers(headers))
    state = hishel.CacheMiss(request=request, options=hishel.CacheOptions(shared=True)).next(response)
    theirs_stored = isinstance(state, hishel.StoreAndUse)
    assert isinstance(ours, Freshness) == theirs_stored, (ours, state)
    if isinstance(ours, Freshness):
        assert ours.lifetime == pytest.approx(get_freshness_lifetime(response, is_cache_shared=True), abs=1)


def test_authorization_rule_agrees_with_hishel() -> None:
    for cc, shareable in (("max-age=60", False), ("public, max-age=60", True), ("s-maxage=60", True)):
        headers = {"date": DATE, "cache-control": cc}
        request = hishel.Request("GET", "http://e/x", hishel.Headers({"authorization": "Bearer a"}))
        state = hishel.CacheMiss(request=request, options=hishel.CacheOptions(shared=True)).next(
            hishel.Response(200, hishel.Headers(headers))
        )
        ours = p.freshness_for(
            200,
            [(k.encode(), v.encode()) for k, v in headers.items()],
            request=RequestDirectives(authorization=True),
            request_time=NOW,
            response_time=NOW,
            options=StoreOptions(),
        )
        assert isinstance(ours, Freshness) is shareable is isinstance(state, hishel.StoreAndUse), cc
