"""The bundled rate-limit filter (wasm_gateway/filters/rate_limit.wasm) through FilterHarness.

Time comes from the `clock` fixture (the host's clock for proxy_get_current_time_nanoseconds), so windows
are crossed without sleeping; one test uses the real clock with a 1 s window.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.filters.conftest import FakeClock, LoadFilter, config_error, single, values
from wasm_gateway.filters import filter_path
from wasm_gateway.runtime.abi import Status
from wasm_gateway.runtime.chain import DecisionKind, FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import RequestInfo
from wasm_gateway.runtime.shared import LocalSharedData
from wasm_gateway.testing import FilterHarness, HarnessResult


def client(address: str = "203.0.113.7", route: str = "") -> RequestInfo:
    return RequestInfo(source_address=address, source_port=51000, route_name=route)


def per_client(requests: int, per: str = "1m", **rule: Any) -> dict[str, Any]:
    return {"rules": [{"key": ["client_ip"], "limits": [{"requests": requests, "per": per}], **rule}]}


def allowed(r: HarnessResult) -> bool:
    if r.local_response is None:
        assert r.upstream_called and r.response_status == 200
        return True
    assert r.response_status == 429, r.response_status
    return False


def run(h: FilterHarness, n: int, info: RequestInfo | None = None, **kwargs: Any) -> list[bool]:
    return [allowed(h.request(info=info or client(), **kwargs)) for _ in range(n)]


# --- exactness and refill -------------------------------------------------------------------------------


def test_n_plus_first_request_in_a_window_is_refused_then_refills(load: LoadFilter, clock: FakeClock) -> None:
    h = load("rate_limit", per_client(5, "1m"))
    results = [h.request(info=client()) for _ in range(5)]
    assert [allowed(r) for r in results] == [True] * 5
    # Every allowed answer tells the client where it stands (one request refills every 12 s).
    remaining = [int(single(r.response_headers, "x-ratelimit-remaining")) for r in results]
    assert remaining == [4, 3, 2, 1, 0]
    assert [single(r.response_headers, "x-ratelimit-reset") for r in results] == [
        "12",
        "24",
        "36",
        "48",
        "60",
    ]
    last = results[-1].response_headers
    assert single(last, "x-ratelimit-limit") == "5"
    assert single(last, "ratelimit-policy") == '"default";q=5;w=60'
    assert single(last, "ratelimit") == '"default";r=0;t=60'

    refused = h.request(info=client())
    assert not allowed(refused)
    assert refused.upstream_called is False
    headers = refused.response_headers
    assert single(headers, "retry-after") == "12"
    assert single(headers, "content-type") == "application/json"
    assert single(headers, "ratelimit-policy") == '"default";q=5;w=60'
    assert single(headers, "ratelimit") == '"default";r=0;t=12'
    assert single(headers, "x-ratelimit-limit") == "5"
    assert single(headers, "x-ratelimit-remaining") == "0"
    assert single(headers, "x-ratelimit-reset") == "12"
    assert json.loads(refused.response_body) == {
        "error": "rate_limited",
        "status": 429,
        "policy": "default",
        "retry_after": 12,
    }

    clock.advance(11.9)
    refusal = h.request(info=client())
    assert not allowed(refusal)
    assert single(refusal.response_headers, "retry-after") == "1"
    clock.advance(0.1)  # one interval after the window filled: exactly one more request
    assert run(h, 2) == [True, False]
    clock.advance(60)  # a whole window later: the full budget again
    assert run(h, 6) == [True] * 5 + [False]


def test_real_clock_refill(load: LoadFilter) -> None:
    # Untouched host clock: one request per second.
    h = load("rate_limit", per_client(1, "1s"))
    assert run(h, 2) == [True, False]
    time.sleep(1.05)
    assert run(h, 1) == [True]


def test_several_limits_on_one_rule(load: LoadFilter, clock: FakeClock) -> None:
    h = load(
        "rate_limit",
        {
            "rules": [
                {
                    "name": "api",
                    "key": ["client_ip"],
                    "limits": [{"requests": 2, "per": "1s", "name": "burst"}, {"requests": 5, "per": "1m"}],
                }
            ]
        },
    )
    first = h.request(info=client())
    assert allowed(first)
    assert single(first.response_headers, "ratelimit-policy") == '"burst";q=2;w=1, "api-60s";q=5;w=60'
    assert single(first.response_headers, "ratelimit") == '"burst";r=1;t=1, "api-60s";r=4;t=12'
    assert single(first.response_headers, "x-ratelimit-limit") == "2"  # the tightest: fewest left
    assert allowed(h.request(info=client()))
    refused = h.request(info=client())
    assert not allowed(refused)
    assert single(refused.response_headers, "ratelimit") == '"burst";r=0;t=1'
    clock.advance(1)
    assert run(h, 3) == [True, True, False]  # per second again; 4 of 5 per minute used
    clock.advance(1)
    assert run(h, 1) == [True]
    refused = h.request(info=client())
    assert not allowed(refused)  # the per-minute budget is spent, though the per-second one is not
    assert single(refused.response_headers, "ratelimit") == '"api-60s";r=0;t=10'
    assert single(refused.response_headers, "x-ratelimit-limit") == "5"
    assert json.loads(refused.response_body)["policy"] == "api-60s"


# --- keys ------------------------------------------------------------------------------------------------


def test_clients_have_separate_budgets(load: LoadFilter, clock: FakeClock) -> None:
    h = load("rate_limit", per_client(2))
    assert run(h, 3, client("198.51.100.1")) == [True, True, False]
    assert run(h, 3, client("198.51.100.2")) == [True, True, False]
    # The port is not part of the client.
    assert run(h, 1, RequestInfo(source_address="198.51.100.2", source_port=1)) == [False]


def test_ipv6_clients_are_grouped_by_64(load: LoadFilter, clock: FakeClock) -> None:
    h = load("rate_limit", per_client(2))
    assert run(h, 1, client("2001:db8:1:2::1")) == [True]
    assert run(h, 1, client("2001:db8:1:2:ffff:ffff:ffff:ffff")) == [True]
    assert run(h, 1, client("2001:0db8:0001:0002:0:0:0:abcd")) == [False]  # same /64, other spelling
    assert run(h, 2, client("2001:db8:1:3::1")) == [True, True]  # the next /64


def test_ipv6_prefix_is_configurable(load: LoadFilter, clock: FakeClock) -> None:
    h = load("rate_limit", per_client(1, ipv6_prefix=128))
    assert run(h, 1, client("2001:db8::1")) == [True]
    assert run(h, 1, client("2001:db8::2")) == [True]
    assert run(h, 1, client("2001:db8::1")) == [False]


def test_ipv4_mapped_ipv6_is_the_ipv4_client_and_ipv4_prefix_groups(
    load: LoadFilter, clock: FakeClock
) -> None:
    h = load("rate_limit", per_client(2, ipv4_prefix=24))
    assert run(h, 1, client("192.0.2.10")) == [True]
    assert run(h, 1, client("::ffff:192.0.2.200")) == [True]
    assert run(h, 1, client("192.0.2.99")) == [False]
    assert run(h, 1, client("192.0.3.1")) == [True]


def test_header_key_with_missing_values_sharing_one_budget(load: LoadFilter, clock: FakeClock) -> None:
    h = load(
        "rate_limit",
        {"rules": [{"key": [{"header": "X-Consumer"}], "limits": [{"requests": 2, "per": "1h"}]}]},
    )
    assert run(h, 3, headers=[("x-consumer", "alice")]) == [True, True, False]
    assert run(h, 2, headers=[("x-consumer", "bob")]) == [True, True]
    # Values that would collide if the key were joined naively stay apart.
    assert run(h, 1, headers=[("x-consumer", "alice|")]) == [True]
    # Long values are hashed into the key, still one budget per value.
    assert run(h, 3, headers=[("x-consumer", "k" * 500)]) == [True, True, False]
    assert run(h, 1, headers=[("x-consumer", "k" * 499 + "j")]) == [True]
    # Requests without the header share one budget (they cannot escape the limit by omitting it).
    assert run(h, 2, client("192.0.2.1")) == [True, True]
    assert run(h, 1, client("192.0.2.2")) == [False]


def test_header_key_when_missing_skip(load: LoadFilter, clock: FakeClock) -> None:
    h = load(
        "rate_limit",
        {
            "rules": [
                {
                    "key": [{"header": "x-consumer"}],
                    "limits": [{"requests": 1, "per": "1h"}],
                    "when_missing": "skip",
                }
            ]
        },
    )
    assert run(h, 5) == [True] * 5
    r = h.request(info=client())
    assert values(r.response_headers, "ratelimit") == []  # no limit applied, nothing to report
    assert run(h, 2, headers=[("x-consumer", "alice")]) == [True, False]


def test_route_and_combined_keys(load: LoadFilter, clock: FakeClock) -> None:
    h = load(
        "rate_limit",
        {
            "rules": [
                {"name": "route", "key": ["route"], "limits": [{"requests": 3, "per": "1m"}]},
                {
                    "name": "client-route",
                    "key": ["client_ip", "route"],
                    "limits": [{"requests": 2, "per": "1m"}],
                },
            ]
        },
    )
    assert run(h, 3, client("192.0.2.1", "orders")) == [True, True, False]
    assert run(h, 1, client("192.0.2.2", "orders")) == [True]  # the route's 3rd request
    assert run(h, 1, client("192.0.2.3", "orders")) == [False]  # the route's budget is spent
    assert run(h, 2, client("192.0.2.1", "users")) == [True, True]


def test_a_later_rule_refusing_refunds_the_earlier_rules(load: LoadFilter, clock: FakeClock) -> None:
    h = load(
        "rate_limit",
        {
            "rules": [
                {"name": "client", "key": ["client_ip"], "limits": [{"requests": 2, "per": "1m"}]},
                {"name": "user", "key": [{"header": "x-user"}], "limits": [{"requests": 1, "per": "1m"}]},
            ]
        },
    )
    assert run(h, 1, headers=[("x-user", "u1")]) == [True]
    refused = h.request(info=client(), headers=[("x-user", "u1")])
    assert not allowed(refused)
    assert json.loads(refused.response_body)["policy"] == "user"
    # The client's budget was given back: one request left, not zero.
    assert run(h, 1, headers=[("x-user", "u2")]) == [True]
    assert run(h, 1, headers=[("x-user", "u3")]) == [False]


# --- headers options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "present", "absent"),
    [
        (
            "ietf",
            ["ratelimit-policy", "ratelimit"],
            ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"],
        ),
        (
            "legacy",
            ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"],
            ["ratelimit-policy", "ratelimit"],
        ),
        ("none", [], ["ratelimit-policy", "ratelimit", "x-ratelimit-limit"]),
    ],
)
def test_header_styles(
    load: LoadFilter, clock: FakeClock, style: str, present: list[str], absent: list[str]
) -> None:
    h = load("rate_limit", {**per_client(1), "headers": style})
    ok = h.request(info=client())
    refused = h.request(info=client())
    assert allowed(ok) and not allowed(refused)
    for name in present:
        assert len(values(ok.response_headers, name)) == 1
        assert len(values(refused.response_headers, name)) == 1
    for name in absent:
        assert values(ok.response_headers, name) == []
        assert values(refused.response_headers, name) == []
    assert single(refused.response_headers, "retry-after") == "60"


def test_upstream_ratelimit_headers_are_replaced_not_duplicated(load: LoadFilter, clock: FakeClock) -> None:
    h = load("rate_limit", per_client(3))
    r = h.request(info=client(), response=(200, [("x-ratelimit-limit", "999"), ("ratelimit", "bogus")], b""))
    assert values(r.response_headers, "x-ratelimit-limit") == ["3"]
    assert values(r.response_headers, "ratelimit") == ['"default";r=2;t=20']


# --- shared state: instances, processes, failures ---------------------------------------------------------


async def test_exact_across_pooled_instances(clock: FakeClock) -> None:
    spec = FilterSpec(
        name="rl",
        module_path=filter_path("rate_limit"),
        configuration=json.dumps(per_client(5)).encode(),
        pool_min=8,
        pool_max=8,
    )
    runtime = FilterRuntime.load([spec])
    try:
        chain = runtime.chain(["rl"])
        headers = [(":method", "GET"), (":path", "/"), (":authority", "a"), (":scheme", "http")]
        # Eight requests in flight at once, each holding its own instance of the pool.
        streams = [chain.start(client()) for _ in range(8)]
        decisions = [await s.on_request_headers(headers, True) for s in streams]
        assert list(runtime.pools["rl"].idle_instances()) == []  # all eight instances are busy
        for s in streams:
            s.finish()
        kinds = [d.kind for d in decisions]
        assert kinds.count(DecisionKind.CONTINUE) == 5
        assert kinds.count(DecisionKind.RESPOND) == 3
        assert all(d.response is not None and d.response.status == 429 for d in decisions[5:])
    finally:
        runtime.close()


class RacingStore(LocalSharedData):
    """Shared data where another gateway process's update lands between the filter's read and its write.

    The competitor performs the same update the filter is about to make (it admitted a request of its
    own), so the filter's compare-and-swap must fail and be retried on fresh state.
    """

    def __init__(self, races: int) -> None:
        super().__init__()
        self.races = races
        self.raced = 0

    def set(self, key: bytes, value: bytes, cas: int) -> Status:
        if self.races > 0:
            self.races -= 1
            self.raced += 1
            current = self.get(key)
            assert super().set(key, value, current[1] if current else 0) == Status.OK
        return super().set(key, value, cas)


def test_compare_and_swap_conflicts_are_retried(load: LoadFilter, clock: FakeClock) -> None:
    h = load("rate_limit", per_client(4))
    store = RacingStore(races=2)
    h.runtime.shared.shared_data = store
    # First request: a competitor creates the entry first, then updates it again: the filter's write
    # loses twice and lands on the third attempt. Three requests admitted in all (two elsewhere).
    assert run(h, 1) == [True]
    assert store.raced == 2
    assert run(h, 2) == [True, False]


class EnvoySharedData(LocalSharedData):
    """Envoy's semantics for an absent key: any cas creates it (proxy-wasm-cpp-host SharedData::set)."""

    def __init__(self) -> None:
        super().__init__()
        self.unconditional_writes = 0

    def set(self, key: bytes, value: bytes, cas: int) -> Status:
        if cas == 0:
            self.unconditional_writes += 1
        if self.get(key) is None:
            return super().set(key, value, 0)
        return super().set(key, value, cas)


def test_creation_is_atomic_on_hosts_with_envoy_semantics(load: LoadFilter, clock: FakeClock) -> None:
    h = load("rate_limit", per_client(3))
    store = EnvoySharedData()
    h.runtime.shared.shared_data = store
    assert run(h, 4) == [True, True, True, False]
    assert run(h, 1, client("192.0.2.50")) == [True]
    # Entries were created with the create-cas and updated with compare-and-swap: never a blind write.
    assert store.unconditional_writes == 0


class BrokenStore(LocalSharedData):
    """A shared-data backend that is down (the host answers the filter with a failure status)."""

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        raise ConnectionError("store unreachable")


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_store_failure_policy(load: LoadFilter, clock: FakeClock, policy: str) -> None:
    h = load("rate_limit", {**per_client(1), "on_store_error": policy})
    h.runtime.shared.shared_data = BrokenStore()
    r = h.request(info=client())
    assert any(level == 4 and "reading shared data failed" in msg for level, msg in r.logs), r.logs
    if policy == "allow":
        assert r.upstream_called and r.response_status == 200
        assert values(r.response_headers, "ratelimit") == []
    else:
        assert r.upstream_called is False
        assert r.response_status == 503
        assert json.loads(r.response_body) == {"error": "rate_limit_unavailable", "status": 503}


async def test_scope_separates_or_shares_budgets_between_filters(clock: FakeClock) -> None:
    def spec(name: str, scope: str | None) -> FilterSpec:
        config: dict[str, Any] = per_client(2)
        if scope is not None:
            config["scope"] = scope
        return FilterSpec(
            name=name, module_path=filter_path("rate_limit"), configuration=json.dumps(config).encode()
        )

    runtime = FilterRuntime.load([spec("a", None), spec("b", None), spec("c", "shared"), spec("d", "shared")])
    headers = [(":method", "GET"), (":path", "/"), (":authority", "a"), (":scheme", "http")]

    async def admitted(name: str, n: int) -> list[bool]:
        out = []
        for _ in range(n):
            s = runtime.chain([name]).start(client())
            try:
                out.append((await s.on_request_headers(headers, True)).kind is DecisionKind.CONTINUE)
            finally:
                s.finish()
        return out

    try:
        # By default each configured filter (its name) has its own budget...
        assert await admitted("a", 3) == [True, True, False]
        assert await admitted("b", 2) == [True, True]
        # ...and a common "scope" shares one.
        assert await admitted("c", 1) == [True]
        assert await admitted("d", 2) == [True, False]
    finally:
        runtime.close()


def test_concurrent_requests_through_the_harness(load: LoadFilter, clock: FakeClock) -> None:
    h = load("rate_limit", per_client(10), pool_min=4, pool_max=4)

    async def burst() -> list[HarnessResult]:
        return await asyncio.gather(*(h.arequest(info=client()) for _ in range(25)))

    results = asyncio.run(burst())
    assert sum(allowed(r) for r in results) == 10


# --- configuration errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("", "rules: missing (a list of rules, each with a key and limits)"),
        ("[1]", "configuration: expected an object, got an array"),
        ({"rules": []}, "rules: at least one rule is needed"),
        (
            {"rulez": []},
            'configuration: unknown field "rulez" (expected one of: rules, scope, headers, on_store_error)',
        ),
        (
            {"rules": [{"limits": [{"requests": 1, "per": "1s"}]}]},
            'rules[0].key: missing (e.g. ["client_ip"])',
        ),
        (
            {"rules": [{"key": [], "limits": [{"requests": 1, "per": "1s"}]}]},
            "rules[0].key: at least one key part is needed",
        ),
        (
            {"rules": [{"key": ["ip"], "limits": [{"requests": 1, "per": "1s"}]}]},
            'rules[0].key[0]: unknown key part "ip" (expected "client_ip", "route" or {"header": "name"})',
        ),
        (
            {"rules": [{"key": [{"header": "bad name"}], "limits": [{"requests": 1, "per": "1s"}]}]},
            'rules[0].key[0].header: "bad name" is not a valid header name',
        ),
        ({"rules": [{"key": ["route"]}]}, 'rules[0].limits: missing (e.g. [{"requests": 10, "per": "1s"}])'),
        (
            {"rules": [{"key": ["route"], "limits": [{"per": "1s"}]}]},
            'rules[0].limits[0]: missing "requests"',
        ),
        (
            {"rules": [{"key": ["route"], "limits": [{"requests": 0, "per": "1s"}]}]},
            "rules[0].limits[0].requests: expected an integer between 1 and 1000000000",
        ),
        (
            {"rules": [{"key": ["route"], "limits": [{"requests": 1.5, "per": "1s"}]}]},
            "rules[0].limits[0].requests: expected an integer between 1 and 1000000000, got 1.5",
        ),
        (
            {"rules": [{"key": ["route"], "limits": [{"requests": 1, "per": "1w"}]}]},
            'rules[0].limits[0].per: expected a duration like "1s", "30s", "1m", "1h" or "1d" (whole seconds, at most 366d), got "1w"',
        ),
        (
            {"rules": [{"key": ["route"], "limits": [{"requests": 1, "per": 0}]}]},
            "rules[0].limits[0].per: expected an integer between 1 and 31622400",
        ),
        (
            {"rules": [{"key": ["route"], "limits": [{"requests": 1, "per": "1s", "name": "a b"}]}]},
            "rules[0].limits[0].name: \"a b\" must be 1-64 letters, digits, '-', '_' or '.'",
        ),
        (
            {
                "rules": [
                    {
                        "key": ["route"],
                        "limits": [
                            {"requests": 1, "per": "1s", "name": "x"},
                            {"requests": 2, "per": "1m", "name": "x"},
                        ],
                    }
                ]
            },
            'rules: two limits are called "x" (give them distinct "name"s)',
        ),
        (
            {"rules": [{"name": "r", "key": ["route"], "limits": [{"requests": 1, "per": "1s"}]}] * 2},
            'rules[1].name: "r" is used by another rule',
        ),
        (
            {"rules": [{"key": ["route"], "limits": [{"requests": 1, "per": "1s"}] * 9}]},
            "rules[0].limits: at most 8 limits over all rules",
        ),
        (
            {"rules": [{"key": ["client_ip"], "limits": [{"requests": 1, "per": "1s"}], "ipv6_prefix": 129}]},
            "rules[0].ipv6_prefix: expected an integer between 1 and 128",
        ),
        (
            {"rules": [{"key": ["route"], "limits": [{"requests": 1, "per": "1s"}], "when_missing": "deny"}]},
            'rules[0].when_missing: expected one of "share", "skip", got "deny"',
        ),
        (
            {**per_client(1), "headers": "x"},
            'headers: expected one of "all", "ietf", "legacy", "none", got "x"',
        ),
        (
            {**per_client(1), "on_store_error": "open"},
            'on_store_error: expected one of "allow", "deny", got "open"',
        ),
        ({**per_client(1), "scope": 7}, "scope: expected a string, got a number"),
    ],
)
def test_bad_configuration_is_rejected_with_the_reason(config: Any, message: str) -> None:
    assert config_error("rate_limit", config) == message
