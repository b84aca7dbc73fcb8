"""Per-call cost of the edge-data foreign functions: kv.get on each state backend and a primary-key sql.query.

    python benchmarks/micro_edge.py [--quick] [--json]        # taskset -c 1 ... on a shared machine

Two views of each call:

* ``host``: the host function alone (argument decoding, grant and limit checks, the backend, result
  encoding), called from Python with the encoded arguments: what the gateway adds per call;
* ``zig``: from a compiled Zig filter (tests/edge/zig/edge_probe.zig on the bundled binding), one call per
  request through the runtime's request driver, minus the same request answered without the call (op
  ``none``): encoding in the guest, the host call, the copy of the result into the guest and its decoding.

Backends: memory, local (LMDB in a temp dir), redis (127.0.0.1:6379, a key prefix of its own, removed
after). The SQL database is a 10 000-row table; the query reads one row by its INTEGER PRIMARY KEY.
Not a test: no assertion on the numbers. JavaScript (QuickJS) figures come with the JS binding.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.edge import wire
from tests.edge.conftest import drop_prefix, make_products
from tests.edge.probes import build_zig_probe
from wasm_gateway.edge import EdgeData, KVNamespaceConfig, SqlDatabaseConfig
from wasm_gateway.runtime.chain import DecisionKind, FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import RequestInfo
from wasm_gateway.runtime.services import SharedServices
from wasm_gateway.state import SharedState, StateConfig, open_state

REDIS_URL = "redis://127.0.0.1:6379/0"
BACKENDS = ("memory", "local", "redis")
VALUE = b"x" * 100
SQL = "SELECT id, name, price FROM products WHERE id = ?"


def best_median(fn: Callable[[], object], n: int, rounds: int) -> float:
    for _ in range(min(n, 200)):
        fn()
    medians = []
    for _ in range(rounds):
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        medians.append(statistics.median(samples))
    return min(medians)  # the least disturbed round


def request_cost(runtime: FilterRuntime, headers: list[tuple[str, str]], n: int, rounds: int) -> float:
    base = [(":method", "GET"), (":path", "/"), (":authority", "edge.test"), (":scheme", "http")]
    info = RequestInfo(source_address="10.0.0.1", source_port=40000)
    chain = runtime.chain(list(runtime.specs))

    async def run() -> list[float]:
        samples = []
        for i in range(n + 100):
            t0 = time.perf_counter()
            stream = chain.start(info)
            try:
                d = await stream.on_request_headers([*base, *headers], True)
                assert d.kind is DecisionKind.RESPOND, d
            finally:
                stream.finish()
            if i >= 100:
                samples.append((time.perf_counter() - t0) * 1e6)
        return samples

    return min(statistics.median(asyncio.run(run())) for _ in range(rounds))


def measure(n: int, rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="micro-edge-") as tmp:
        root = Path(tmp)
        probe = build_zig_probe(root / "zig")
        db = make_products(root / "products.db", rows=10_000)
        namespaces = {"bench": KVNamespaceConfig(name="bench")}
        databases = {"shop": SqlDatabaseConfig(name="shop", path=db)}
        for backend in BACKENDS:
            prefix = f"bench-edge-{uuid.uuid4().hex[:8]}:"
            state: SharedState = open_state(
                StateConfig(backend=backend, path=root / "state", redis_url=REDIS_URL, key_prefix=prefix)
            )
            edge = EdgeData(state.edge, namespaces, databases)
            try:
                fns = edge.functions("bench", kv=("bench",), sql=("shop",))
                assert wire.result(fns["kv.set"](wire.kv_set("bench", "k", VALUE, 600_000))).ok
                args = wire.kv_get("bench", "k")
                host_get = best_median(functools.partial(fns["kv.get"], args), n, rounds)
                runtime = FilterRuntime.load(
                    [FilterSpec(name="bench", module_path=probe, kv=("bench",), sql=("shop",), pool_max=1)],
                    shared=SharedServices(edge=edge),
                )
                try:
                    none = request_cost(runtime, [("x-op", "none")], n, rounds)
                    get = request_cost(
                        runtime, [("x-op", "get"), ("x-ns", "bench"), ("x-key", "k")], n, rounds
                    )
                    row = {
                        "host_kv_get_us": host_get,
                        "zig_kv_get_us": get - none,
                        "zig_request_baseline_us": none,
                    }
                    if backend == "memory":  # the database does not depend on the backend
                        sql_args = wire.sql_query("shop", SQL, 4321)
                        row["host_sql_pk_us"] = best_median(
                            functools.partial(fns["sql.query"], sql_args), n, rounds
                        )
                        q = [("x-op", "sql"), ("x-db", "shop"), ("x-sql", SQL), ("x-p1", "i:4321")]
                        row["zig_sql_pk_us"] = request_cost(runtime, q, n, rounds) - none
                finally:
                    runtime.close()  # closes the edge data too
                out[backend] = row
            finally:
                state.close()
                if backend == "redis":
                    drop_prefix(prefix)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    args = parser.parse_args()
    out = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    n, rounds = (300, 2) if args.quick else (3000, 5)
    results = measure(n, rounds)
    print(
        f"{'backend':10s} {'kv.get host':>12s} {'kv.get zig':>12s} {'sql pk host':>12s} {'sql pk zig':>12s}"
    )
    for backend, row in results.items():
        sql_host = f"{row['host_sql_pk_us']:10.1f}us" if "host_sql_pk_us" in row else f"{'-':>12s}"
        sql_zig = f"{row['zig_sql_pk_us']:10.1f}us" if "zig_sql_pk_us" in row else f"{'-':>12s}"
        print(
            f"{backend:10s} {row['host_kv_get_us']:10.1f}us {row['zig_kv_get_us']:10.1f}us {sql_host} {sql_zig}"
        )
    print(
        f"(request answered by the probe without a call: {results['memory']['zig_request_baseline_us']:.1f} us)"
    )
    if args.json:
        out.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
