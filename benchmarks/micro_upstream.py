"""Micro-benchmark: the gateway's upstream client against aiohttp's ClientSession, on loopback, under uvloop.

An origin process (uvloop, a bare asyncio protocol answering a 30-byte JSON with keep-alive) runs pinned to
one CPU; the client runs pinned to the other and sends N GET requests from 32 concurrent coroutines through
(a) ``wasm_gateway.upstream.UpstreamPool`` and (b) ``aiohttp.ClientSession``, alternating rounds so both see the
same machine state. Reported per client: requests/s and latency p50/p99 of the best round, plus the median
requests/s over all rounds.

    python benchmarks/micro_upstream.py                    # 3 rounds of 50,000 requests each
    python benchmarks/micro_upstream.py --requests 20000 --rounds 5 --no-pin
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

BODY = b'{"message":"hello, world!!!!"}'
assert len(BODY) == 30
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
REQUEST_END = b"\r\n\r\n"


# -- origin -------------------------------------------------------------------------------------------------


class _OriginProtocol(asyncio.Protocol):
    """Answers every complete request head (GETs, no bodies) with RESPONSE; keep-alive, pipelining-safe."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        data = self.pending + data if self.pending else data
        count = data.count(REQUEST_END)
        self.pending = data[data.rfind(REQUEST_END) + 4 :] if count else data
        if count and self.transport is not None:
            self.transport.write(RESPONSE * count)


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_OriginProtocol, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# -- clients ----------------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    client: str
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    cpu_seconds: float  # client process CPU time: robust to other load on a shared machine

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / self.requests * 1e6

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000


Fetch = Callable[[], Awaitable[None]]


async def _run_round(name: str, fetch: Fetch, requests: int, concurrency: int) -> RoundResult:
    remaining = requests
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            start = clock()
            try:
                await fetch()
            except Exception:
                errors += 1
                continue
            latencies.append(clock() - start)

    began, cpu_began = clock(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return RoundResult(name, requests, clock() - began, latencies, errors, time.process_time() - cpu_began)


async def _clients(port: int, args: argparse.Namespace) -> list[RoundResult]:
    import aiohttp

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from wasm_gateway.upstream import Target, UpstreamPool, UpstreamSettings

    authority = f"127.0.0.1:{port}"
    headers = [(b"host", authority.encode()), (b"accept", b"*/*"), (b"user-agent", b"micro-upstream")]
    pool = UpstreamPool(
        UpstreamSettings(name="bench", targets=(Target("127.0.0.1", port),), max_connections_per_target=64)
    )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, limit_per_host=64), auto_decompress=False
    )
    url = f"http://{authority}/"

    async def via_pool() -> None:
        response = await pool.request("GET", "/", headers, None, idempotent=True)
        body = await response.read()
        await response.aclose()
        if len(body) != 30:
            raise RuntimeError("short body")

    async def via_aiohttp() -> None:
        async with session.get(url, headers={"user-agent": "micro-upstream"}) as response:
            body = await response.read()
        if len(body) != 30:
            raise RuntimeError("short body")

    clients: dict[str, Fetch] = {"UpstreamPool": via_pool, "aiohttp": via_aiohttp}
    results: list[RoundResult] = []
    try:
        for name, fetch in clients.items():  # warm up: connections opened, code paths hot
            await _run_round(name, fetch, args.warmup, args.concurrency)
        for round_index in range(args.rounds):
            order = list(clients.items())
            if round_index % 2:
                order.reverse()
            for name, fetch in order:
                result = await _run_round(name, fetch, args.requests, args.concurrency)
                results.append(result)
                print(
                    f"  round {round_index + 1} {name:>12}: {result.rps:>9,.0f} req/s  "
                    f"p50 {result.percentile(0.50):.2f} ms  p99 {result.percentile(0.99):.2f} ms  "
                    f"client CPU {result.cpu_us_per_request:.1f} us/req  errors {result.errors}",
                    flush=True,
                )
    finally:
        await session.close()
        await pool.close()
    return results


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=50_000, help="requests per round and client")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3_000)
    parser.add_argument("--no-pin", action="store_true", help="do not pin origin and client to CPUs 1 and 0")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the origin on this port
    parser.add_argument("--quick", action="store_true", help="1 round of 10,000 requests per client")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.warmup = 10_000, 1, 1_000
    if args.json:
        sys.stdout = sys.stderr  # human-readable progress goes to stderr; the JSON alone to stdout

    if args.serve is not None:
        if not args.no_pin:
            _pin(1)
        uvloop.run(_serve(args.serve))
        return

    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, __file__, "--serve", str(port)] + (["--no-pin"] if args.no_pin else [])
    origin = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert origin.stdout is not None
        if origin.stdout.readline().strip() != "ready":
            raise SystemExit("origin did not start")
        if not args.no_pin:
            _pin(0)
        print(
            f"{args.rounds} rounds x {args.requests:,} GETs, {args.concurrency} concurrent, uvloop "
            f"{uvloop.__version__}, origin pid {origin.pid}",
            flush=True,
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(_clients(port, args))
    finally:
        origin.terminate()
        origin.wait(timeout=5)

    print("\nsummary (best round by req/s; medians over all rounds):")
    for name in ("UpstreamPool", "aiohttp"):
        rounds = [r for r in results if r.client == name]
        best = max(rounds, key=lambda r: r.rps)
        median = statistics.median(r.rps for r in rounds)
        cpu = statistics.median(r.cpu_us_per_request for r in rounds)
        print(
            f"  {name:>12}: {best.rps:>9,.0f} req/s (median {median:,.0f})  "
            f"p50 {best.percentile(0.50):.2f} ms  p99 {best.percentile(0.99):.2f} ms  "
            f"client CPU {cpu:.1f} us/req (median)  errors {sum(r.errors for r in rounds)}"
        )
    ours = statistics.median(r.rps for r in results if r.client == "UpstreamPool")
    theirs = statistics.median(r.rps for r in results if r.client == "aiohttp")
    ours_cpu = statistics.median(r.cpu_us_per_request for r in results if r.client == "UpstreamPool")
    theirs_cpu = statistics.median(r.cpu_us_per_request for r in results if r.client == "aiohttp")
    print(
        f"  UpstreamPool vs aiohttp: {ours / theirs:.2f}x median req/s, "
        f"{theirs_cpu / ours_cpu:.2f}x less client CPU per request"
    )
    if args.json:
        summary = {
            "upstream_pool_rps": ours,
            "aiohttp_rps": theirs,
            "rps_ratio": ours / theirs,
            "upstream_pool_cpu_us_per_request": ours_cpu,
            "aiohttp_cpu_us_per_request": theirs_cpu,
            "cpu_ratio": theirs_cpu / ours_cpu,
        }
        sys.__stdout__.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
