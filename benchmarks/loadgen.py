"""Fallback HTTP/1.1 load generator for when wrk cannot be had: N keep-alive connections on asyncio (uvloop
when present), each sending GETs back to back for a fixed time, responses framed by httptools' parser.

It prints one JSON line with the same fields the harness reads from wrk. It is far slower than wrk (a Python
client saturates its own CPU long before a fast server does), so its numbers bound fast systems from below:
read them as "at least", and compare systems measured with the same generator only.

    python -m benchmarks.loadgen --url http://127.0.0.1:8080/json --connections 32 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from functools import partial
from typing import cast
from urllib.parse import urlsplit

import httptools

CONNECT_RETRY_SECONDS = 0.05
DRAIN_GRACE_SECONDS = 5.0


class Stats:
    def __init__(self) -> None:
        self.latencies_ns: list[int] = []
        self.bytes = 0
        self.status_errors = 0
        self.connect_errors = 0
        self.read_errors = 0
        self.timeouts = 0


class LoadConnection(asyncio.Protocol):
    """One keep-alive connection: send, wait for the whole response, record, send again until the deadline."""

    def __init__(self, request: bytes, stats: Stats, deadline: float, finished: asyncio.Future[None]) -> None:
        self._request = request
        self._stats = stats
        self._deadline = deadline
        self._finished = finished
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._sent_at = 0
        self._waiting = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._send_next()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._stats.read_errors += 1
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiting:
            self._stats.read_errors += 1
        self._waiting = False
        if not self._finished.done():
            self._finished.set_result(None)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._stats.bytes += len(body)

    def on_message_complete(self) -> None:
        self._stats.latencies_ns.append(time.perf_counter_ns() - self._sent_at)
        status = self._parser.get_status_code()
        if not 200 <= status < 400:
            self._stats.status_errors += 1
        self._waiting = False
        if not self._parser.should_keep_alive():
            self._close()
            return
        self._send_next()

    def _send_next(self) -> None:
        if time.monotonic() >= self._deadline or self._transport is None:
            self._close()
            return
        self._waiting = True
        self._sent_at = time.perf_counter_ns()
        self._transport.write(self._request)

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


async def _drive_connection(host: str, port: int, request: bytes, stats: Stats, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        finished: asyncio.Future[None] = loop.create_future()
        try:
            await loop.create_connection(
                partial(LoadConnection, request, stats, deadline, finished), host, port
            )
        except OSError:
            stats.connect_errors += 1
            await asyncio.sleep(CONNECT_RETRY_SECONDS)
            continue
        try:
            await asyncio.wait_for(
                finished, timeout=max(0.0, deadline - time.monotonic()) + DRAIN_GRACE_SECONDS
            )
        except TimeoutError:
            stats.timeouts += 1
            return


def _percentile_us(sorted_ns: list[int], percent: float) -> float:
    if not sorted_ns:
        return 0.0
    index = min(len(sorted_ns) - 1, max(0, round(percent / 100 * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1000


async def run_load(
    url: str, connections: int, duration: float, headers: list[tuple[str, str]]
) -> dict[str, float]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    head = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}"]
    head.extend(f"{name}: {value}" for name, value in headers)
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    stats = Stats()
    started = time.monotonic()
    deadline = started + duration
    await asyncio.gather(
        *(_drive_connection(host, port, request, stats, deadline) for _ in range(connections))
    )
    elapsed = time.monotonic() - started
    latencies = sorted(stats.latencies_ns)
    return {
        "requests": len(latencies),
        "duration_us": elapsed * 1e6,
        "bytes": stats.bytes,
        "connect_errors": stats.connect_errors,
        "read_errors": stats.read_errors,
        "write_errors": 0,
        "status_errors": stats.status_errors,
        "timeouts": stats.timeouts,
        "p50_us": _percentile_us(latencies, 50),
        "p90_us": _percentile_us(latencies, 90),
        "p99_us": _percentile_us(latencies, 99),
        "max_us": latencies[-1] / 1000 if latencies else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    args = parser.parse_args(argv)
    headers = [tuple(part.strip() for part in item.split(":", 1)) for item in args.header]
    load = run_load(args.url, args.connections, args.duration, [(h[0], h[1]) for h in headers])
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(load)
    else:
        result = uvloop.run(load)
    print("LOADJSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
