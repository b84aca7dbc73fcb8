"""One gateway configuration with every kind of route, and light traffic through it with the counts it must
produce: shared by the metrics, dashboard and Prometheus tests."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.runtime.wat import filter_module, imp

API_KEY = "obs-test-key"
RATE_LIMIT = 5

# A filter that counts every request in a filter-defined counter ("requests"), records its header count in a
# gauge ("header_count") and a histogram ("headers"), and traps when the request has an x-trap header
# (fail_closed: 503). The metrics are recorded before the trap, so they count both.
COUNTING_FILTER_BODY = """
  (data (i32.const 0x400) "requests")
  (data (i32.const 0x410) "x-trap")
  (data (i32.const 0x420) "header_count")
  (data (i32.const 0x440) "headers")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $proxy_define_metric (i32.const 0) (i32.const 0x400) (i32.const 8) (i32.const 0x114)))
    (drop (call $proxy_increment_metric (i32.load (i32.const 0x114)) (i64.const 1)))
    (drop (call $proxy_define_metric (i32.const 1) (i32.const 0x420) (i32.const 12) (i32.const 0x118)))
    (drop (call $proxy_record_metric (i32.load (i32.const 0x118)) (i64.extend_i32_u (local.get 1))))
    (drop (call $proxy_define_metric (i32.const 2) (i32.const 0x440) (i32.const 7) (i32.const 0x11c)))
    (drop (call $proxy_record_metric (i32.load (i32.const 0x11c)) (i64.extend_i32_u (local.get 1))))
    (if (i32.eqz (call $proxy_get_header_map_value
          (i32.const 0) (i32.const 0x410) (i32.const 6) (i32.const 0x100) (i32.const 0x104)))
      (then unreachable))
    i32.const 0)
"""
COUNTING_FILTER_IMPORTS = (
    imp("proxy_define_metric", 4)
    + imp("proxy_get_header_map_value", 5)
    + '(import "env" "proxy_increment_metric" (func $proxy_increment_metric (param i32 i64) (result i32)))'
    + '(import "env" "proxy_record_metric" (func $proxy_record_metric (param i32 i64) (result i32)))'
)


def write_config(tmp_path: Path, *, port: int, origin_port: int, dead_port: int) -> Path:
    """Routes: proxy (plain), private (builtin:auth), limited (builtin:rate-limit, LMDB state so the limit
    holds across workers), wasm (the counting/trapping WAT filter), broken (an upstream nobody listens on),
    cached (the response cache on LMDB, shared by the workers: one miss, then hits)."""
    module = tmp_path / "counting.wasm"
    module.write_bytes(filter_module(COUNTING_FILTER_BODY, imports=COUNTING_FILTER_IMPORTS))
    key_hash = hashlib.sha256(API_KEY.encode()).hexdigest()
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
port = {port}

[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]

[upstreams.dead]
targets = ["127.0.0.1:{dead_port}"]
retries = 0
eject_after_failures = 1
eject_seconds = 300

[filters.auth]
module = "builtin:auth"
[filters.auth.configuration.api_keys]
header = "x-api-key"
keys = [{{ name = "tests", sha256 = "{key_hash}" }}]

[filters.limits]
module = "builtin:rate-limit"
[[filters.limits.configuration.rules]]
name = "client"
key = ["client_ip"]
limits = [{{ requests = {RATE_LIMIT}, per = "1h" }}]

[filters.counting]
module = "{module}"

[state]
backend = "local"
path = "{tmp_path / "state"}"

[[routes]]
name = "proxy"
path_prefix = "/proxy"
upstream = "origin"

[[routes]]
name = "private"
path_prefix = "/private"
filters = ["auth"]
upstream = "origin"

[[routes]]
name = "limited"
path_prefix = "/limited"
filters = ["limits"]
upstream = "origin"

[[routes]]
name = "wasm"
path_prefix = "/wasm"
filters = ["counting"]
upstream = "origin"

[[routes]]
name = "broken"
path_prefix = "/broken"
upstream = "dead"

[[routes]]
name = "cached"
path_prefix = "/cached"
upstream = "origin"
cache = {{ enabled = true, default_ttl = 3600 }}

[cache]
backend = "local"
path = "{tmp_path / "cache"}"

[log]
access_log = false
"""
    )
    return path


@dataclass
class Traffic:
    """What was sent and answered, in the units the metrics count."""

    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)  # (route, status class) -> requests
    request_bytes: int = 0
    not_found: int = 0
    rounds: int = 0


PROXY_GETS = 24
PROXY_POSTS = 4
POST_BODY = b'{"hello": "world"}'
PRIVATE_OK = 10
PRIVATE_DENIED = 8
LIMITED = 12
WASM_OK = 16
WASM_TRAPS = 4
BROKEN = 4
NOT_FOUND = 3
CACHED = 6  # per round: the first request of the first round misses, every other one is a hit


def drive(port: int, traffic: Traffic | None = None, *, first: bool = True) -> Traffic:
    """Light traffic over every route, a fresh connection per request so both workers take a share.

    Counts add up in ``traffic``; ``first`` is False for later rounds (the rate limit is used up by then)."""
    traffic = traffic or Traffic()
    base = f"http://127.0.0.1:{port}"

    def send(route: str, method: str, path: str, expect: int, **kw: object) -> None:
        with httpx.Client(timeout=10) as client:
            response = client.request(method, base + path, **kw)  # type: ignore[arg-type]
        assert response.status_code == expect, (path, response.status_code, response.text[:300])
        if route:
            traffic.statuses[(route, f"{expect // 100}xx")] += 1

    for i in range(PROXY_GETS):
        send("proxy", "GET", f"/proxy/{i}", 200)
    for _ in range(PROXY_POSTS):
        send("proxy", "POST", "/proxy/post", 200, content=POST_BODY)
        traffic.request_bytes += len(POST_BODY)
    for _ in range(PRIVATE_OK):
        send("private", "GET", "/private/x", 200, headers={"x-api-key": API_KEY})
    for _ in range(PRIVATE_DENIED):
        send("private", "GET", "/private/x", 401)
    for i in range(LIMITED):
        send("limited", "GET", "/limited/x", 200 if first and i < RATE_LIMIT else 429)
    for _ in range(WASM_OK):
        send("wasm", "GET", "/wasm/x", 200)
    for _ in range(WASM_TRAPS):
        send("wasm", "GET", "/wasm/x", 503, headers={"x-trap": "1"})
    for _ in range(BROKEN):
        send("broken", "GET", "/broken/x", 502)
    for _ in range(NOT_FOUND):
        send("-", "GET", "/nowhere", 404)
        traffic.not_found += 1
    for _ in range(CACHED):
        send("cached", "GET", "/cached/page", 200)
    traffic.rounds += 1
    return traffic


def expected_counts(traffic: Traffic) -> dict[str, float]:
    """PromQL (each one series, summed over workers) -> the value the traffic sent must have produced."""
    n = traffic.rounds
    allowed = RATE_LIMIT  # the limit is per hour: only the first round's first requests pass
    limited = LIMITED * n - allowed
    upstream_answers = (PROXY_GETS + PROXY_POSTS + PRIVATE_OK + WASM_OK) * n + allowed + 1  # + the cache miss
    wasm_requests = (WASM_OK + WASM_TRAPS) * n
    out: dict[str, float] = {
        f'sum(wasm_gateway_request_duration_seconds_count{{route="{route}",status_class="{sc}"}})': float(
            count
        )
        for (route, sc), count in traffic.statuses.items()
    }
    out["sum(wasm_gateway_request_duration_seconds_count)"] = float(sum(traffic.statuses.values()))
    out['sum(wasm_gateway_request_bytes_total{route="proxy"})'] = float(traffic.request_bytes)
    out['sum(wasm_gateway_rejected_requests_total{reason="no_route"})'] = float(traffic.not_found)
    out["sum(wasm_gateway_rejected_requests_total)"] = float(traffic.not_found)
    out['sum(wasm_gateway_upstream_duration_seconds_count{upstream="origin"})'] = float(upstream_answers)
    out['sum(wasm_gateway_upstream_errors_total{upstream="dead",kind="connect"})'] = float(BROKEN * n)
    out["sum(wasm_gateway_upstream_errors_total)"] = float(BROKEN * n)
    outcomes = {
        ("auth", "continue"): PRIVATE_OK * n,
        ("auth", "local_response"): PRIVATE_DENIED * n,
        ("limits", "continue"): allowed,
        ("limits", "local_response"): limited,
        ("counting", "continue"): WASM_OK * n,
        ("counting", "failure"): WASM_TRAPS * n,
    }
    for (name, outcome), count in outcomes.items():
        out[f'sum(wasm_gateway_filter_requests_total{{filter="{name}",outcome="{outcome}"}})'] = float(count)
    out["sum(wasm_gateway_filter_requests_total)"] = float(sum(outcomes.values()))
    out['sum(wasm_gateway_filter_local_responses_total{filter="auth",status="401"})'] = float(
        PRIVATE_DENIED * n
    )
    out['sum(wasm_gateway_filter_local_responses_total{filter="limits",status="429"})'] = float(limited)
    out["sum(wasm_gateway_filter_local_responses_total)"] = float(PRIVATE_DENIED * n + limited)
    out['sum(wasm_gateway_filter_faults_total{filter="counting",kind="trap"})'] = float(WASM_TRAPS * n)
    out["sum(wasm_gateway_filter_faults_total)"] = float(WASM_TRAPS * n)
    out['sum(wasm_gateway_filter_policy_decisions_total{filter="counting",decision="fail_closed"})'] = float(
        WASM_TRAPS * n
    )
    # Filter-defined metrics, each worker's counts added up.
    out['sum(wasm_gateway_filter_metric_total{filter="counting",name="requests"})'] = float(wasm_requests)
    out['sum(wasm_gateway_filter_metric_distribution_count{filter="counting",name="headers"})'] = float(
        wasm_requests
    )
    out['min(wasm_gateway_upstream_healthy_targets{upstream="dead"})'] = 0.0
    out['min(wasm_gateway_upstream_healthy_targets{upstream="origin"})'] = 1.0
    out['max(wasm_gateway_upstream_targets{upstream="dead"})'] = 1.0
    out["sum(wasm_gateway_requests_in_flight)"] = 0.0
    out['sum(wasm_gateway_cache_lookups_total{route="cached",result="miss"})'] = 1.0
    out['sum(wasm_gateway_cache_lookups_total{route="cached",result="hit"})'] = float(CACHED * n - 1)
    out["sum(wasm_gateway_cache_lookups_total)"] = float(CACHED * n)
    out['sum(wasm_gateway_cache_coalesced_waits_total{route="cached"})'] = 0.0
    return out
