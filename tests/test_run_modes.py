"""The ways users run the gateway besides the CLI: uvicorn --factory, gunicorn workers; plus the access log and a
separate metrics port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import ROOT, ThreadServer, free_port, wait_port
from tests.origins import echo_origin


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


def write_config(tmp_path: Path, origin_port: int, extra: str = "") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
max_header_bytes = 4096
[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]
[[routes]]
name = "all"
path_prefix = "/"
upstream = "origin"
{extra}
"""
    )
    return path


def run_server(args: list[str], config: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WASM_GATEWAY_CONFIG": str(config)}
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port, timeout=30)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(proc.communicate()[0].decode(errors="replace")) from None
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("mode", ["uvicorn", "gunicorn"])
def test_factory_under_uvicorn_and_gunicorn(mode: str, origin: ThreadServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, origin.port, "[log]\naccess_log = false\n")
    port = free_port()
    if mode == "uvicorn":
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "wasm_gateway:create_app",
            "--factory",
            "--port",
            str(port),
            "--http",
            "wasm_gateway.server:GatewayHttpProtocol",
            "--no-proxy-headers",
        ]
    else:
        args = [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "wasm_gateway.workers.GatewayWorker",
            "-w",
            "1",
            "-b",
            f"127.0.0.1:{port}",
            "wasm_gateway:create_app()",
        ]
    proc = run_server(args, config, port)
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/echo", headers={"x-forwarded-for": "6.6.6.6"})
        assert response.status_code == 200
        forwarded = [v for k, v in response.json()["headers"] if k == "x-forwarded-for"]
        assert forwarded == ["127.0.0.1"]  # the gateway, not the server, decided the client address
        # The config's header limit reached the protocol: 431 past 4 KiB.
        big = httpx.get(f"http://127.0.0.1:{port}/echo", headers={"x-big": "a" * 5000})
        assert big.status_code == 431
    finally:
        stop(proc)


@pytest.mark.parametrize("fmt", ["json", "logfmt"])
def test_access_log_lines(fmt: str, origin: ThreadServer, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    port = free_port()
    config = write_config(tmp_path, origin.port, f'[log]\nformat = "{fmt}"\npath = "{log}"\n')
    proc = run_server(
        [sys.executable, "-m", "wasm_gateway", "serve", "--config", str(config), "--port", str(port)],
        config,
        port,
    )
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/echo//x/../y?q=1")
        request_id = response.headers["x-request-id"]
        httpx.get(f"http://127.0.0.1:{port}/%2e%2e/secret")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and log.exists() and log.read_text().count(request_id) == 0:
            time.sleep(0.05)
        lines = [line for line in log.read_text().splitlines() if "request_id" in line]
    finally:
        stop(proc)
    assert len(lines) >= 2, lines
    if fmt == "json":
        first = orjson.loads(lines[0])
        assert first["request_id"] == request_id
        assert (first["method"], first["path"], first["route"], first["status"]) == (
            "GET",
            "/echo/y",
            "all",
            200,
        )
        assert first["client"] == "127.0.0.1" and first["duration_ms"] > 0 and first["upstream_ms"] > 0
        assert orjson.loads(lines[1])["status"] == 400
    else:
        assert f"request_id={request_id}" in lines[0]
        for field in (
            "method=GET",
            "path=/echo/y",
            "route=all",
            "status=200",
            "client=127.0.0.1",
            "duration_ms=",
        ):
            assert field in lines[0]
        assert "status=400" in lines[1]


def test_metrics_on_their_own_port(origin: ThreadServer, tmp_path: Path) -> None:
    metrics_port = free_port()
    port = free_port()
    config = write_config(
        tmp_path, origin.port, f"[metrics]\nport = {metrics_port}\n[log]\naccess_log = false\n"
    )
    proc = run_server(
        [sys.executable, "-m", "wasm_gateway", "serve", "--config", str(config), "--port", str(port)],
        config,
        port,
    )
    try:
        wait_port(metrics_port)
        httpx.get(f"http://127.0.0.1:{port}/echo")
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert (
            'wasm_gateway_request_duration_seconds_count{method="GET",route="all",status_class="2xx"} 1.0'
            in text
        )
        # ... and not on the proxy listener, where /metrics is an ordinary path routed to the origin.
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").json()["path"] == "/metrics"
    finally:
        stop(proc)
