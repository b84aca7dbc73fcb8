"""The CLI as users run it: `python -m wasm_gateway ...` in subprocesses against real origins."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import origins
from tests.conftest import ROOT, Subprocess, ThreadServer, free_port
from tests.origins import echo_origin


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


def write_config(tmp_path: Path, origin_port: int, server: str = "") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
{server}
[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]
[[routes]]
name = "all"
path_prefix = "/"
upstream = "origin"
[log]
access_log = false
"""
    )
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wasm_gateway", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_version() -> None:
    result = run_cli("version")
    assert result.returncode == 0
    assert result.stdout.startswith("wasm-gateway ")
    from wasm_gateway.runtime.engine import WASMTIME_VERSION

    assert f"wasmtime {WASMTIME_VERSION}\n" in result.stdout  # the installed version, not "unknown"


def test_check_ok_and_failing(tmp_path: Path, origin: ThreadServer) -> None:
    good = write_config(tmp_path, origin.port)
    result = run_cli("check", "--config", str(good))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[upstreams.api]\ntargets = ["127.0.0.1:1"]\n[[routes]]\nupstream = "api2"\n')
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == 1
    assert f'{bad}: routes[0].upstream: unknown upstream "api2" (known: api)' in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_embedded_default_shows_the_four_filters(tmp_path: Path) -> None:
    port = free_port()
    # Its own state directory: the demo's rate-limit counts persist (by design) across runs on one machine.
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    with Subprocess("serve", "--port", str(port), port=port, env=env) as gw:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as c:
            assert c.get("/").json()["message"] == "hello from the demo origin"
            assert c.get("/admin/").status_code == 401
            assert c.get("/api/private/echo").status_code == 401
            seen = c.get("/api/private/echo", headers={"x-api-key": "demo-key"}).json()
            assert seen["headers"]["x-consumer"] == "demo-client" and "x-api-key" not in seen["headers"]
            from wasm_gateway.cli import demo_token

            seen = c.get(
                "/api/private/echo",
                headers={"authorization": f"Bearer {demo_token('demo-secret-change-me-0123456789abcdef')}"},
            )
            assert seen.json()["headers"]["x-user-id"] == "demo-user"
            statuses = [c.get("/api/limited").status_code for _ in range(7)]
            assert statuses[:5] == [200] * 5 and statuses[5:] == [429, 429]
            assert c.get("/api/geo").json()["private"] is True
            transformed = c.get("/api/transform/")
            assert transformed.json()["message"] == "HELLO FROM THE DEMO ORIGIN"
            assert transformed.headers["x-transformed"] == "response"
        assert gw.stop() == 0
        output = gw.output()
    assert f"listening on http://127.0.0.1:{port}" in output
    token_line = next(line for line in output.splitlines() if "authorization: Bearer" in line)
    assert "curl" in token_line


def test_graceful_shutdown_finishes_in_flight_requests(tmp_path: Path, origin: ThreadServer) -> None:
    port = free_port()
    config = write_config(tmp_path, origin.port, server=f"port = {port}")
    with Subprocess("serve", "--config", str(config), port=port) as gw:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(httpx.get, f"http://127.0.0.1:{port}/slow?s=2", timeout=20) for _ in range(8)
            ]
            deadline = time.monotonic() + 15
            while origins.slow_in_flight < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert origins.slow_in_flight == 8  # all eight are in flight at the origin
            assert gw.proc is not None
            gw.proc.terminate()
            statuses = [f.result().status_code for f in futures]
        assert statuses == [200] * 8
        assert gw.proc.wait(20) == 0


@pytest.mark.parametrize("own_port", [False, True], ids=["on-the-listener", "on-its-own-port"])
def test_metrics_add_up_across_two_workers(tmp_path: Path, origin: ThreadServer, own_port: bool) -> None:
    port = free_port()
    config = write_config(tmp_path, origin.port, server=f"port = {port}")
    metrics_port = port
    if own_port:  # every worker serves the metrics port (SO_REUSEPORT), each with the summed counts
        metrics_port = free_port()
        config.write_text(config.read_text() + f"[metrics]\nport = {metrics_port}\n")
    with Subprocess("serve", "--config", str(config), "--workers", "2", port=port):
        for i in range(40):
            # A fresh connection per request, so the kernel spreads them over both workers.
            with httpx.Client() as c:
                response = c.get(f"http://127.0.0.1:{port}/echo/{i}")
                assert response.status_code == 200
        # Each worker copies its counts into the shared files every second (and before a scrape it answers).
        deadline = time.monotonic() + 10
        while True:
            with httpx.Client() as c:
                text = c.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            counts = re.findall(
                r'^wasm_gateway_request_duration_seconds_count\{method="GET",route="all",status_class="2xx"\} (\S+)$',
                text,
                re.M,
            )
            if (counts and float(counts[0]) == 40.0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counts and float(counts[0]) == 40.0, text[:2000]


def test_check_loads_filter_modules(tmp_path: Path) -> None:
    import wasmtime

    from tests.runtime.wat import filter_wat

    good = tmp_path / "good.wasm"
    good.write_bytes(wasmtime.wat2wasm(filter_wat("")))
    refusing = tmp_path / "refuses.wasm"
    refusing.write_bytes(
        wasmtime.wat2wasm(
            filter_wat('(func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 0)')
        )
    )
    config = tmp_path / "g.toml"
    base = '[upstreams.o]\ntargets = ["127.0.0.1:1"]\n[[routes]]\nupstream = "o"\nfilters = ["f"]\n'
    config.write_text(f'[filters.f]\nmodule = "{good}"\n' + base)
    assert run_cli("check", "--config", str(config)).returncode == 0
    config.write_text(f'[filters.f]\nmodule = "{refusing}"\n' + base)
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert f"{config}: filters.f:" in result.stderr and "refuses.wasm" in result.stderr
    assert "Traceback" not in result.stderr
    # A bundled filter's own explanation of a bad configuration reaches the message, once.
    config.write_text(
        '[filters.f]\nmodule = "builtin:transform"\nconfiguration = { request = { headers = { sett = {} } } }\n'
        + base
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.count('unknown field "sett"') == 1, result.stderr


def test_compile_precompiles_a_module(tmp_path: Path) -> None:
    import wasmtime

    from tests.runtime.wat import filter_wat

    module = tmp_path / "f.wasm"
    module.write_bytes(wasmtime.wat2wasm(filter_wat("")))
    out = tmp_path / "f.cwasm"
    result = run_cli("compile", str(module), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0
    result = run_cli("compile", str(tmp_path / "missing.wasm"), "-o", str(out))
    assert result.returncode == 1 and "missing.wasm" in result.stderr and "Traceback" not in result.stderr
