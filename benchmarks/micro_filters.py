"""Per-request cost of each bundled filter through the runtime (issue 4's targets), and JWT verification.

    python benchmarks/micro_filters.py [--quick] [--json]        # taskset -c 1 ... on a shared machine

Each sample is one whole request through the runtime's request driver (`ChainStream`, as in
tests/filters/auth_bench.py, whose driver it shares): start, request
headers, response headers, finish, i.e. every callback the gateway makes for a request without a body. The
filters run with the configurations of the gateway benchmarks (`benchmarks/systems.py`); rate limiting uses
the in-process shared-data backend. Target: <= 10 us median for transform, geo, rate-limit and API-key auth.
JWT verification per algorithm is reported cold (token cache off) and from the token cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.systems import BENCH_API_KEY, BUNDLED_FILTER_BENCH
from tests.filters import auth_bench
from wasm_gateway.filters import filter_path
from wasm_gateway.geo import BUILTIN_COUNTRY, GeoConfig, GeoDatabase
from wasm_gateway.runtime.chain import DecisionKind, FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import RequestInfo

Headers = list[tuple[str, str]]

CLIENT = "8.8.8.8"  # public: the geo filter finds a country (with iptocc installed)
REQUEST: Headers = [
    (":method", "GET"),
    (":path", "/api/orders?page=2"),
    (":authority", "shop.example"),
    (":scheme", "http"),
    ("user-agent", "wrk"),
    ("accept", "*/*"),
    ("x-api-key", BENCH_API_KEY),
    ("x-forwarded-for", "8.8.8.8"),
    ("x-forwarded-proto", "http"),
    ("x-request-id", "0123456789abcdef0123456789abcdef"),
]
RESPONSE: Headers = [
    (":status", "200"),
    ("content-type", "application/json"),
    ("content-length", "1024"),
    ("etag", '"abc-400"'),
]

# label -> (module stem, configuration); the first four are issue 4's targets.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "transform": ("transform", BUNDLED_FILTER_BENCH["transform"].configuration),
    "geo": ("geo", BUNDLED_FILTER_BENCH["geo"].configuration),
    "rate_limit": ("rate_limit", BUNDLED_FILTER_BENCH["ratelimit"].configuration),
    "api_key": ("auth", BUNDLED_FILTER_BENCH["auth"].configuration),
    "rate_limit_no_headers": (
        "rate_limit",
        {**BUNDLED_FILTER_BENCH["ratelimit"].configuration, "headers": "none"},
    ),
    "floor_transform_noop": ("transform", {}),
}


def runtime_for(stem: str, configuration: dict[str, Any]) -> FilterRuntime:
    spec = FilterSpec(
        name=stem,
        module_path=filter_path(stem),
        configuration=json.dumps(configuration).encode(),
        pool_min=1,
        pool_max=1,
    )
    return FilterRuntime.load([spec])


def request_info() -> RequestInfo:
    extra: Any = {}
    try:
        geo = GeoDatabase.from_config(GeoConfig(database=Path(BUILTIN_COUNTRY)))
    except Exception:  # iptocc not installed: the geo filter finds no country
        geo = None
    if geo is not None:
        extra = geo.properties_for(CLIENT)
    return RequestInfo(source_address=CLIENT, source_port=40000, extra=extra)


def per_filter(requests: int, rounds: int) -> dict[str, dict[str, float | str]]:
    info = request_info()
    runtimes = {label: runtime_for(stem, config) for label, (stem, config) in CASES.items()}
    medians: dict[str, list[float]] = {label: [] for label in CASES}
    p99s: dict[str, list[float]] = {label: [] for label in CASES}
    kinds: dict[str, DecisionKind] = {}
    try:
        for runtime in runtimes.values():
            asyncio.run(auth_bench.measure(runtime, REQUEST, 200, info, RESPONSE))
        for _ in range(rounds):  # cases interleaved: a neighbour's burst hits one round of each, not one case
            for label, runtime in runtimes.items():
                samples, kinds[label] = asyncio.run(
                    auth_bench.measure(runtime, REQUEST, requests, info, RESPONSE)
                )
                samples.sort()
                medians[label].append(statistics.median(samples))
                p99s[label].append(samples[int(len(samples) * 0.99)])
    finally:
        for runtime in runtimes.values():
            runtime.close()
    return {
        label: {
            "median_us": min(medians[label]),  # the best round's median: the least disturbed
            "p99_us": statistics.median(p99s[label]),
            "outcome": kinds[label].name.lower(),
        }
        for label in CASES
    }


def jwt(requests: int, rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, (config, extra, _) in auth_bench.cases().items():
        if not label.startswith("jwt "):
            continue
        alg = label.split()[1].rstrip(",")
        runtime = runtime_for("auth", config)
        headers = [*auth_bench.REQUEST, *extra]
        cold = "cold" in label
        n = requests if not cold or alg.startswith("HS") else max(requests // 10, 50)
        try:
            best = min(
                statistics.median(asyncio.run(auth_bench.measure(runtime, headers, n))[0])
                for _ in range(rounds)
            )
        finally:
            runtime.close()
        out.setdefault(alg, {})["cold_median_us" if cold else "cached_median_us"] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    args = parser.parse_args()
    out = sys.stdout
    if args.json:
        sys.stdout = sys.stderr  # the human-readable lines go to stderr, the JSON alone to stdout
    requests, rounds = (500, 2) if args.quick else (3000, 5)
    per_request = per_filter(requests, rounds)
    verification = jwt(requests // 3, rounds)
    print(f"{'filter (per request, all callbacks)':38s} {'median':>9s} {'p99':>9s}  outcome   target")
    for label, row in per_request.items():
        target = "<= 10 us" if label in ("transform", "geo", "rate_limit", "api_key") else "-"
        print(f"{label:38s} {row['median_us']:7.1f}us {row['p99_us']:7.1f}us  {row['outcome']:9s} {target}")
    print(f"\n{'jwt verification':38s} {'cold':>9s} {'cached':>9s}")
    for alg, times in verification.items():
        print(f"{alg:38s} {times.get('cold_median_us', 0):7.1f}us {times.get('cached_median_us', 0):7.1f}us")
    if args.json:
        out.write(json.dumps({"per_request": per_request, "jwt": verification}) + "\n")


if __name__ == "__main__":
    main()
