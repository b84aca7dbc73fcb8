"""Micro-benchmarks of the bundled JS filter (QuickJS; not tests: numbers to read, not to assert).

    taskset -c 1 python benchmarks/micro_js.py [--quick] [--json]

Targets (issue 9): cold start (deserialise + instantiate + configure with the script) <= 2 ms median;
per request through a header-editing JS filter <= 60 us median (the whole ChainStream: request headers,
response headers and body, finish). For scale, the same request through an empty Wasm filter is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wasm_gateway.filters import filter_path
from wasm_gateway.runtime.abi import AbiVersion
from wasm_gateway.runtime.chain import DecisionKind, FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import RequestInfo
from wasm_gateway.runtime.engine import get_engine, load_module
from wasm_gateway.runtime.instance import FilterModule, InstanceLimits
from wasm_gateway.runtime.services import FilterServices

HEADER_EDIT = 'export function onRequest(request) { request.headers.set("x-edge", "js"); }'
LOCAL_ANSWER = 'export function onRequest() { return Response.json({ message: "hello from the edge" }); }'
ASYNC_BOTH = """
export async function onRequest(request) { request.headers.set("x-edge", "js"); }
export async function onResponse(response) { response.headers.set("x-served-by", "js"); }
"""
EMPTY_FILTER = """(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 0)
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) i32.const 0))"""

REQUEST = [
    (":method", "GET"),
    (":path", "/api/x"),
    (":authority", "example.com"),
    (":scheme", "http"),
    ("user-agent", "bench/1"),
    ("accept", "*/*"),
]
RESPONSE = [(":status", "200"), ("content-type", "application/json"), ("content-length", "2")]
results: dict[str, float] = {}


def report(label: str, value: float, unit: str, target: str, key: str | None = None) -> None:
    print(f"{label:<62} {value:9.2f} {unit:<3} (target {target})")
    if key:
        results[key] = round(value, 3)


def per_request(module: Path, configuration: bytes, cache: Path, n: int) -> tuple[float, float]:
    """Median and p99 microseconds for one request through the filter (5 rounds of n/5)."""
    spec = FilterSpec(name="f", module_path=module, configuration=configuration, pool_min=1, pool_max=4)
    rt = FilterRuntime.load([spec], cache_dir=cache)
    chain = rt.chain(["f"])
    info = RequestInfo(source_address="127.0.0.1", source_port=1234)

    async def rounds(m: int) -> list[float]:
        out = []
        for _ in range(m):
            t0 = time.perf_counter()
            s = chain.start(info)
            d = await s.on_request_headers(REQUEST, True)
            if d.kind is not DecisionKind.RESPOND:  # a local answer ends the request here
                await s.on_response_headers(RESPONSE, False)
                await s.on_response_body(b"{}", True)
            s.finish()
            out.append((time.perf_counter() - t0) * 1e6)
        return out

    asyncio.run(rounds(300))
    samples = [x for _ in range(5) for x in asyncio.run(rounds(max(1, n // 5)))]
    rt.close()
    return statistics.median(samples), sorted(samples)[int(len(samples) * 0.99)]


def cold_start(configuration: bytes, cache: Path, runs: int) -> tuple[float, float, float]:
    """Median ms: deserialise from the module cache; instantiate + start + configure; their sum."""
    engine = get_engine()
    path = filter_path("js")
    load_module(path, cache)  # fill the cache
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        cm = load_module(path, cache)
        t1 = time.perf_counter()
        services = FilterServices(name="cold", abi=AbiVersion.V0_2_1, configuration=configuration)
        fm = FilterModule(cm, services, InstanceLimits(callback_timeout_ms=1000), engine)
        t2 = time.perf_counter()
        inst = fm.instantiate()
        t3 = time.perf_counter()
        inst.close()
        fm.close()
        out.append(((t1 - t0) * 1e3, (t3 - t2) * 1e3))
    load = statistics.median(r[0] for r in out)
    start = statistics.median(r[1] for r in out)
    return load, start, statistics.median(r[0] + r[1] for r in out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    args = ap.parse_args()
    if args.json:
        sys.stdout = sys.stderr
    n = 2000 if args.quick else 20000
    tmp = Path(tempfile.mkdtemp(prefix="wg-bench-js-"))
    cache = tmp / "cache"
    print(f"js.wasm {filter_path('js').stat().st_size} bytes")

    def cfg(script: str) -> bytes:
        return json.dumps({"script": script, "filename": "bench.js"}).encode()

    load, start, total = cold_start(cfg(HEADER_EDIT), cache, 20 if args.quick else 100)
    report("cold start: deserialise (module cache)", load, "ms", "-")
    report("cold start: instantiate + vm_start + configure (script)", start, "ms", "-")
    report("cold start: deserialise + instantiate + configure", total, "ms", "<= 2 ms", "js_cold_start_ms")

    empty = tmp / "empty.wasm"
    empty.write_bytes(wasmtime.wat2wasm(EMPTY_FILTER))
    med, _ = per_request(empty, b"", cache, n)
    report("per request: empty Wasm filter (for scale)", med, "us", "-", "empty_filter_per_request_us")
    med, p99 = per_request(filter_path("js"), cfg(HEADER_EDIT), cache, n)
    report(
        "per request: JS onRequest setting one header (median)", med, "us", "<= 60 us", "js_header_edit_us"
    )
    report("  same, p99", p99, "us", "-")
    med, _ = per_request(filter_path("js"), cfg(ASYNC_BOTH), cache, n)
    report("per request: async onRequest + onResponse, a header each", med, "us", "-", "js_both_phases_us")
    med, _ = per_request(filter_path("js"), cfg(LOCAL_ANSWER), cache, n)
    report("per request: JS answering Response.json locally", med, "us", "-", "js_local_answer_us")
    if args.json:
        sys.__stdout__.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
