"""Per-request cost of the bundled filters through the runtime's request driver (numbers to read, not tests).

    python tests/filters/bench_filters.py [--requests N]

Each sample is one whole request through `ChainStream`: start, request headers (and body), response
headers (and body), finish (proxy_on_delete), i.e. every callback the gateway makes. Target: <= 10 us
median for transform and rate-limit. Run it on a quiet machine; it pins nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wasm_gateway.filters import filter_path
from wasm_gateway.runtime.chain import DecisionKind, FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import RequestInfo

Headers = list[tuple[str, str]]

REQUEST: Headers = [
    (":method", "GET"),
    (":path", "/api/users/42/orders?debug=1&page=2"),
    (":authority", "shop.example"),
    (":scheme", "https"),
    ("user-agent", "bench/1.0"),
    ("accept", "application/json"),
    ("x-internal", "secret"),
    ("x-consumer", "alice"),
]
RESPONSE: Headers = [(":status", "200"), ("content-type", "application/json"), ("server", "origin")]
JSON_BODY = json.dumps({"user": {"name": "ada lovelace", "password": "x"}, "items": list(range(20))}).encode()

CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "transform: no-op configuration (binding floor)": ("transform", {}, False),
    "transform: headers + path template + query": (
        "transform",
        {
            "request": {
                "headers": {"remove": ["x-internal"], "set": {"x-gateway": "1"}, "add": {"x-tag": "bench"}},
                "path": [{"template": "/api/users/{id}/{rest*}", "to": "/v2/{rest}?user={id}"}],
                "query": {"remove": ["debug"]},
            },
            "response": {"headers": {"remove": ["server"], "set": {"cache-control": "no-store"}}},
        },
        False,
    ),
    "transform: write-only header edits (req + resp)": (
        "transform",
        {
            "request": {"headers": {"remove": ["x-internal"], "set": {"x-gateway": "1"}}},
            "response": {"headers": {"set": {"cache-control": "no-store"}}},
        },
        False,
    ),
    "transform: JSON request body edits (~130 B)": (
        "transform",
        {
            "request": {
                "body": {
                    "edits": [
                        {"op": "remove", "pointer": "/user/password"},
                        {"op": "uppercase", "pointer": "/user/name"},
                        {"op": "set", "pointer": "/meta/via", "value": "gateway"},
                    ]
                }
            }
        },
        True,
    ),
    "rate-limit: client_ip, 2 limits, all headers": (
        "rate_limit",
        {
            "rules": [
                {
                    "key": ["client_ip"],
                    "limits": [
                        {"requests": 1_000_000, "per": "1s"},
                        {"requests": 1_000_000_000, "per": "1d"},
                    ],
                }
            ]
        },
        False,
    ),
    "rate-limit: client_ip, 1 limit, no headers": (
        "rate_limit",
        {
            "rules": [{"key": ["client_ip"], "limits": [{"requests": 1_000_000, "per": "1s"}]}],
            "headers": "none",
        },
        False,
    ),
    "rate-limit: refused (429 answered locally)": (
        "rate_limit",
        {"rules": [{"key": [{"header": "x-consumer"}], "limits": [{"requests": 1, "per": "1d"}]}]},
        False,
    ),
}


async def one_request(runtime: FilterRuntime, name: str, body: bool) -> DecisionKind:
    stream = runtime.chain([name]).start(RequestInfo(source_address="203.0.113.9", source_port=40000))
    try:
        if body:
            headers = [
                *REQUEST,
                ("content-type", "application/json"),
                ("content-length", str(len(JSON_BODY))),
            ]
            headers[0] = (":method", "POST")
            await stream.on_request_headers(headers, False)
            d = await stream.on_request_body(JSON_BODY, True)
        else:
            d = await stream.on_request_headers(list(REQUEST), True)
        if d.kind is DecisionKind.RESPOND:
            return d.kind
        await stream.on_response_headers(list(RESPONSE), True)
        return d.kind
    finally:
        stream.finish()


async def measure(runtime: FilterRuntime, name: str, body: bool, n: int) -> tuple[list[float], DecisionKind]:
    kind = await one_request(runtime, name, body)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await one_request(runtime, name, body)
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples, kind


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5_000, help="requests per case per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, cases interleaved (noisy machines)")
    args = parser.parse_args(argv)
    runtimes: dict[str, tuple[FilterRuntime, str, bool]] = {}
    for label, (module, config, body) in CASES.items():
        spec = FilterSpec(
            name=module,
            module_path=filter_path(module),
            configuration=json.dumps(config).encode(),
            pool_min=1,
            pool_max=1,
            log_level="info",
        )
        runtimes[label] = (FilterRuntime.load([spec]), module, body)
    medians: dict[str, list[float]] = {label: [] for label in CASES}
    p99s: dict[str, list[float]] = {label: [] for label in CASES}
    kinds: dict[str, DecisionKind] = {}
    try:
        for runtime, module, body in runtimes.values():  # warm-up
            asyncio.run(measure(runtime, module, body, 2000))
        for _ in range(args.rounds):
            for label, (runtime, module, body) in runtimes.items():
                samples, kinds[label] = asyncio.run(measure(runtime, module, body, args.requests))
                samples.sort()
                medians[label].append(statistics.median(samples))
                p99s[label].append(samples[int(len(samples) * 0.99)])
    finally:
        for runtime, _, _ in runtimes.values():
            runtime.close()
    print(f"{'case (per request, all callbacks)':<50} {'best median':>11} {'median':>8} {'p99':>8}  outcome")
    for label in CASES:
        print(
            f"{label:<50} {min(medians[label]):>9.1f}us {statistics.median(medians[label]):>6.1f}us "
            f"{statistics.median(p99s[label]):>6.1f}us  {kinds[label].value}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
