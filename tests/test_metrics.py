"""metrics.py: counts that add up across the workers of servers other than ``wasm-gateway serve`` (the
``create_app`` factory under uvicorn and gunicorn), filter-defined metrics included; stale live gauges."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ThreadServer, free_port, wait_port
from tests.grafana import scenario
from tests.origins import echo_origin
from wasm_gateway import metrics


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


def sample(text: str, name: str, labels: str) -> float | None:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_factory_workers_add_up_without_a_multiprocess_dir(
    server: str, origin: ThreadServer, tmp_path: Path
) -> None:
    port = free_port()
    config = scenario.write_config(tmp_path, port=port, origin_port=origin.port, dead_port=free_port())
    if server == "uvicorn":
        args = ["-m", "uvicorn", "wasm_gateway:create_app", "--factory", "--workers", "2"]
        args += ["--port", str(port)]
    else:
        args = ["-m", "gunicorn", "-k", "wasm_gateway.workers.GatewayWorker", "-w", "2"]
        args += ["-b", f"127.0.0.1:{port}", "wasm_gateway:create_app()"]
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    env |= {"PYTHONPATH": str(ROOT), "WASM_GATEWAY_CONFIG": str(config), "TMPDIR": str(temp)}
    proc = subprocess.Popen(
        [sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_port(port, timeout=30)
        for _ in range(20):
            with httpx.Client() as client:  # a fresh connection each: the kernel spreads them over workers
                assert client.get(f"http://127.0.0.1:{port}/wasm/x").status_code == 200
        # Every scrape, whichever worker answers it, reports both workers' requests. Counts reach the files
        # just after each answer, and filter-defined counters within a second (each worker copies its own):
        # wait for the totals once, then every further scrape (fresh connections: either worker) must agree.
        request_labels = 'method="GET",route="wasm",status_class="2xx"'
        counter_labels = 'filter="counting",name="requests"'

        def scrape() -> tuple[float | None, float | None]:
            with httpx.Client() as client:
                text = client.get(f"http://127.0.0.1:{port}/metrics").text
            return (
                sample(text, "wasm_gateway_request_duration_seconds_count", request_labels),
                sample(text, "wasm_gateway_filter_metric_total", counter_labels),
            )

        deadline = time.monotonic() + 15
        while scrape() != (20.0, 20.0):
            assert time.monotonic() < deadline, scrape()
            time.sleep(0.1)
        assert [scrape() for _ in range(10)] == [(20.0, 20.0)] * 10
        # The workers shared one directory, named after their supervisor.
        assert [p.name for p in temp.iterdir()] == [f"wasm-gateway-metrics-{proc.pid}"]
    finally:
        proc.terminate()
        try:
            output = proc.communicate(timeout=20)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0].decode(errors="replace")
    assert "Traceback" not in output, output


def test_live_gauges_of_gone_processes_are_removed(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid in (gone.pid, os.getpid()):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"")
    metrics._remove_dead_live_gauges(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{gone.pid}.db", f"counter_{os.getpid()}.db", f"gauge_livesum_{os.getpid()}.db"]
    )  # a gone worker's counts stay in the totals; its live gauges stop counting


def test_hot_path_objects_flush_exactly_what_prometheus_client_would_record() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    values = [0.0, 0.0005, 0.0004999, 0.001, 0.003, 0.7, 10.0, 30.0, 31.0, 1e9]

    def exposition(hot: bool) -> bytes:
        registry = CollectorRegistry()
        histogram = Histogram("h_seconds", "h", ["route"], buckets=metrics.LATENCY_BUCKETS, registry=registry)
        counter = Counter("c_bytes", "c", ["route"], registry=registry)
        gauge = Gauge("g", "g", registry=registry)
        if hot:
            h, c, g = (
                metrics.HotHistogram(histogram.labels("r")),
                metrics.HotCounter(counter.labels("r")),
                metrics.HotGauge(gauge),
            )
            for v in values[:5]:
                h.observe(v)
            c.inc(7)
            g.value += 3
            h.flush(), c.flush(), g.flush()
            for v in values[5:]:
                h.observe(v)
            c.inc(5)
            g.value -= 1
            h.flush(), c.flush(), g.flush()
            h.flush(), c.flush()  # nothing new: adds nothing
        else:
            for v in values:
                histogram.labels("r").observe(v)
            counter.labels("r").inc(12)
            gauge.set(2)
        return b"\n".join(line for line in generate_latest(registry).splitlines() if b"_created" not in line)

    assert exposition(hot=True) == exposition(hot=False)
