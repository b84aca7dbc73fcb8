"""Per-request cost of the auth filter through the runtime's request driver (numbers to read, not tests).

    python tests/filters/auth_bench.py [--requests N] [--rounds R]

Each sample is one whole request through `ChainStream`: start, request headers, response headers, finish
(proxy_on_delete), i.e. every callback the gateway makes. Cases: API-key auth; JWT per algorithm "cold"
(token cache disabled, so every request parses and verifies the token) and "cached" (the same token
again: a token-cache hit); a refused request (bad API key, 401 answered locally). Target (issue 4):
<= 10 us median for API-key auth. Run it on a quiet machine; it pins nothing.
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

from tests.filters.auth_tokens import make_keys, sha256_hex
from wasm_gateway.filters import FILTERS_DIR
from wasm_gateway.runtime.chain import DecisionKind, FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import RequestInfo

Headers = list[tuple[str, str]]

REQUEST: Headers = [
    (":method", "GET"),
    (":path", "/api/users/42/orders?page=2"),
    (":authority", "shop.example"),
    (":scheme", "https"),
    ("user-agent", "bench/1.0"),
    ("accept", "application/json"),
    ("x-consumer", "spoofed"),
]
RESPONSE: Headers = [(":status", "200"), ("content-type", "application/json")]
API_KEY = "bench-key-5f1c2e9a7b3d4c6e8f0a1b2c3d4e5f60"
ALGS = ("HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA")


FLOOR = "reference: transform, no-op config"


def cases() -> dict[str, tuple[dict[str, Any], Headers, bool]]:
    """label -> (configuration, extra request headers, expect admitted)."""
    keys = make_keys()
    forward = [{"claim": "sub", "header": "x-user"}, {"claim": "scope", "header": "x-scope"}]
    jwt_keys = [k.config_pem() for k in keys.values()]
    api = {"keys": [{"name": f"consumer-{i}", "sha256": sha256_hex(f"{API_KEY}-{i}")} for i in range(9)]}
    api["keys"].append({"name": "bench", "sha256": sha256_hex(API_KEY)})
    out: dict[str, tuple[dict[str, Any], Headers, bool]] = {
        # The binding's floor on this machine, measured side by side (another bundled filter doing nothing).
        FLOOR: ({}, [], True),
        "api key (10 keys configured), admitted": ({"api_keys": api}, [("x-api-key", API_KEY)], True),
        "api key, wrong (401 answered locally)": ({"api_keys": api}, [("x-api-key", "wrong")], False),
    }
    exp = int(time.time()) + 86400
    for alg in ALGS:
        token = keys[alg].token({"sub": "user-1", "scope": "orders:read", "iss": "bench", "exp": exp})
        auth = [("authorization", f"Bearer {token}")]
        jwt = {"keys": jwt_keys, "forward_claims": forward, "issuers": ["bench"]}
        out[f"jwt {alg}, cold (verify every request)"] = (
            {"jwt": {**jwt, "cache": {"max_entries": 0}}},
            auth,
            True,
        )
        out[f"jwt {alg}, token cache hit"] = ({"jwt": jwt}, auth, True)
    return out


async def one_request(
    runtime: FilterRuntime, headers: Headers, info: RequestInfo | None = None, response: Headers = RESPONSE
) -> DecisionKind:
    """One bodiless request through every callback the gateway makes: start, request headers, response
    headers (unless answered locally), finish."""
    stream = runtime.chain(list(runtime.specs)).start(
        info or RequestInfo(source_address="203.0.113.9", source_port=40000)
    )
    try:
        d = await stream.on_request_headers(list(headers), True)
        if d.kind is DecisionKind.RESPOND:
            return d.kind
        await stream.on_response_headers(list(response), True)
        return d.kind
    finally:
        stream.finish()


async def measure(
    runtime: FilterRuntime,
    headers: Headers,
    n: int,
    info: RequestInfo | None = None,
    response: Headers = RESPONSE,
) -> tuple[list[float], DecisionKind]:
    """Microseconds per request for ``n`` requests (after one unmeasured), and how the requests ended."""
    kind = await one_request(runtime, headers, info, response)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await one_request(runtime, headers, info, response)
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples, kind


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per case per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, cases interleaved (noisy machines)")
    args = parser.parse_args(argv)
    table = cases()
    runtimes: dict[str, tuple[FilterRuntime, Headers, bool]] = {}
    for label, (config, extra, admitted) in table.items():
        module = "transform" if label == FLOOR else "auth"
        spec = FilterSpec(
            name=module,
            module_path=FILTERS_DIR / f"{module}.wasm",
            configuration=json.dumps(config).encode(),
            pool_min=1,
            pool_max=1,
            log_level="info",
        )
        runtimes[label] = (FilterRuntime.load([spec]), [*REQUEST, *extra], admitted)
    medians: dict[str, list[float]] = {label: [] for label in table}
    p99s: dict[str, list[float]] = {label: [] for label in table}
    kinds: dict[str, DecisionKind] = {}
    try:
        for runtime, headers, _ in runtimes.values():  # warm-up
            asyncio.run(measure(runtime, headers, 200))
        for _ in range(args.rounds):
            for label, (runtime, headers, _) in runtimes.items():
                # Slow cases get fewer samples: the median of a few hundred is stable at ~1 ms each.
                n = (
                    args.requests
                    if "cold" not in label or label.startswith("jwt HS")
                    else max(args.requests // 10, 50)
                )
                samples, kinds[label] = asyncio.run(measure(runtime, headers, n))
                samples.sort()
                medians[label].append(statistics.median(samples))
                p99s[label].append(samples[int(len(samples) * 0.99)])
    finally:
        for runtime, _, _ in runtimes.values():
            runtime.close()
    print(f"{'case (per request, all callbacks)':<46} {'best median':>11} {'median':>9} {'p99':>9}  outcome")
    for label, (_, _, admitted) in runtimes.items():
        expected = DecisionKind.CONTINUE if admitted else DecisionKind.RESPOND
        flag = "" if kinds[label] is expected else "  (UNEXPECTED)"
        print(
            f"{label:<46} {min(medians[label]):>9.1f}us {statistics.median(medians[label]):>7.1f}us "
            f"{statistics.median(p99s[label]):>7.1f}us  {kinds[label].value}{flag}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
