"""Hot reload and drain as operators run them: `wasm-gateway serve` in a subprocess (one worker and two), several
clients sending requests the whole time, `wasm-gateway reload` / SIGHUP / SIGTERM sent meanwhile."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import wasmtime

from tests import origins
from tests.conftest import ROOT, Subprocess, ThreadServer, free_port
from tests.origins import echo_origin
from tests.runtime.wat import filter_wat, imp


def module_version(tag: str) -> bytes:
    """A filter adding ``x-module: <tag>`` to responses (one byte tag)."""
    assert len(tag) == 1
    return wasmtime.wat2wasm(
        filter_wat(
            f"""
  (data (i32.const 0x400) "x-module")
  (data (i32.const 0x410) "{tag}")
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $proxy_add_header_map_value
      (i32.const 2) (i32.const 0x400) (i32.const 8) (i32.const 0x410) (i32.const 1)))
    i32.const 0)
""",
            imports=imp("proxy_add_header_map_value", 5),
        )
    )


def config_text(port: int, origin_port: int, pid_file: Path, version: str, extra_server: str = "") -> str:
    return f"""
[server]
port = {port}
pid_file = "{pid_file}"
{extra_server}
[server.timeouts]
graceful_shutdown = 20

[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]

[filters.module]
module = "module.wasm"

[filters.tag]
module = "builtin:transform"
configuration = {{ response = {{ headers = {{ set = {{ "x-config" = "{version}" }} }} }} }}

[[routes]]
name = "all"
path_prefix = "/"
upstream = "origin"
filters = ["module", "tag"]

[log]
access_log = false
"""


def replace_file(path: Path, data: bytes | str) -> None:
    """Write beside, then rename over: readers see the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Outcome:
    started: float
    status: int | None
    versions: tuple[str, str] | None = None
    error: str | None = None


@dataclass
class Load:
    """``clients`` threads sending GETs until stopped; half keep connections alive, half open one per request."""

    port: int
    clients: int = 4
    path: str = "/echo"
    outcomes: list[Outcome] = field(default_factory=list)
    stop_sending: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _run(self, keep_alive: bool) -> None:
        url = f"http://127.0.0.1:{self.port}{self.path}"
        headers = {} if keep_alive else {"connection": "close"}
        with httpx.Client(timeout=30) as client:
            while not self.stop_sending.is_set():
                started = time.monotonic()
                try:
                    r = client.get(url, headers=headers)
                    outcome = Outcome(
                        started,
                        r.status_code,
                        (r.headers.get("x-module", "-"), r.headers.get("x-config", "-")),
                    )
                except httpx.HTTPError as exc:
                    outcome = Outcome(started, None, error=repr(exc))
                self.outcomes.append(outcome)

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.outcomes)
        while len(self.outcomes) < start + count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.outcomes) >= start + count, "the load made no progress"

    def __exit__(self, *exc: object) -> None:
        self.stop_sending.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


@dataclass
class Running:
    gateway: Subprocess
    config: Path
    pid_file: Path
    port: int
    origin_port: int
    workers: int

    def ready(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}/readyz", headers={"connection": "close"}, timeout=10)

    def worker_pids(self) -> set[int]:
        """Every worker's pid (each /readyz answer names the one that answered)."""
        pids: set[int] = set()
        deadline = time.monotonic() + 30
        while len(pids) < self.workers:
            assert time.monotonic() < deadline, f"only saw workers {pids}"
            pids.add(self.ready().json()["config"]["worker"])
        return pids

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text

    def write_config(self, version: str, extra_server: str = "") -> None:
        replace_file(
            self.config, config_text(self.port, self.origin_port, self.pid_file, version, extra_server)
        )


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def running(request: pytest.FixtureRequest, tmp_path: Path, origin: ThreadServer) -> Iterator[Running]:
    port = free_port()
    pid_file = tmp_path / "run" / "gateway.pid"
    config = tmp_path / "gateway.toml"
    (tmp_path / "module.wasm").write_bytes(module_version("a"))
    config.write_text(config_text(port, origin.port, pid_file, "1"))
    with Subprocess("serve", "--config", str(config), "--workers", str(request.param), port=port) as gw:
        try:
            running = Running(gw, config, pid_file, port, origin.port, request.param)
            running.worker_pids()  # every worker is serving (it would start from whatever is on disk)
            yield running
        finally:
            gw.stop()
            print(gw.output())  # shown when the test fails


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "wasm_gateway", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=90,
    )


def wait_for_slow_requests(count: int) -> None:
    deadline = time.monotonic() + 20
    while origins.slow_in_flight < count:
        assert time.monotonic() < deadline, "the slow requests did not reach the origin"
        time.sleep(0.01)


def counter(metrics: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, metrics, re.M))


def test_reload_swaps_module_and_configuration_under_load_without_a_failed_request(running: Running) -> None:
    first = running.ready().json()["config"]
    assert first["reload"] == {"result": "none"}
    workers_before = running.worker_pids()
    assert running.pid_file.read_text().strip() == str(running.gateway.proc.pid)  # type: ignore[union-attr]
    with Load(running.port) as load, Load(running.port, clients=2, path="/slow?s=0.5") as slow:
        load.wait_for(50)
        assert {o.versions for o in load.outcomes} == {("a", "1")}
        wait_for_slow_requests(2)  # requests in flight at the origin while the gateway switches
        reload_sent = time.monotonic()
        replace_file(running.config.parent / "module.wasm", module_version("b"))
        running.write_config("2")
        result = run_cli("reload", "--config", str(running.config))
        assert result.returncode == 0, result.stderr
        switched_at = time.monotonic()
        load.wait_for(50)
        slow.wait_for(2)
    assert load.failures() == [] and slow.failures() == []
    # Every request saw one whole version: never the new configuration with the old module or the reverse.
    outcomes = load.outcomes + slow.outcomes
    assert {o.versions for o in outcomes} <= {("a", "1"), ("b", "2")}
    after = [o.versions for o in outcomes if o.started > switched_at]
    assert after and set(after) == {("b", "2")}
    # The slow requests in flight during the switch finished on the version they started with.
    assert ("a", "1") in {o.versions for o in slow.outcomes if o.started < reload_sent}
    now = running.ready().json()["config"]
    assert now["hash"] != first["hash"] and now["hash"] in result.stdout
    assert running.worker_pids() == workers_before  # reloaded in place, not by replacing workers
    assert now["reload"]["result"] == "success"
    metrics = running.metrics()
    assert counter(metrics, "wasm_gateway_config_reloads_total", '{result="success"}') >= 1
    assert counter(metrics, "wasm_gateway_config_info", f'{{hash="{now["hash"]}"}}') == 1
    assert counter(metrics, "wasm_gateway_config_info", f'{{hash="{first["hash"]}"}}') == 0


def test_broken_reloads_fail_and_the_running_version_keeps_serving(running: Running) -> None:
    first = running.ready().json()["config"]["hash"]
    module = running.config.parent / "module.wasm"
    pid = int(running.pid_file.read_text())
    broken = [
        # a module that is not WebAssembly
        lambda: replace_file(module, b"\0asm but not really"),
        # invalid TOML
        lambda: replace_file(running.config, "[server\n"),
        # a change only a restart can apply
        lambda: running.write_config("2", extra_server="max_header_count = 50"),
    ]
    with Load(running.port) as load:
        load.wait_for(30)
        for step, breaking in enumerate(broken, start=1):
            breaking()
            os.kill(pid, signal.SIGHUP)
            deadline = time.monotonic() + 30
            failures = '{result="failure"}'
            # Every worker has failed this step before the files are put back.
            while (
                counter(running.metrics(), "wasm_gateway_config_reloads_total", failures)
                < step * running.workers
            ):
                assert time.monotonic() < deadline, "the failed reload was not counted"
                time.sleep(0.1)
            load.wait_for(20)
            replace_file(module, module_version("a"))
            running.write_config("1")
    assert load.failures() == []
    assert {o.versions for o in load.outcomes} == {("a", "1")}
    state = running.ready().json()["config"]
    assert state["hash"] == first
    assert state["reload"]["result"] == "failure"
    assert "max_header_count" in state["reload"]["error"]
    metrics = running.metrics()
    assert counter(metrics, "wasm_gateway_config_reloads_total", '{result="success"}') == 0
    assert "wasm_gateway_config_last_reload_successful 0.0" in metrics


def test_reload_cli_refuses_a_broken_config_without_signalling(running: Running) -> None:
    replace_file(running.config.parent / "broken.wasm", b"not wasm")
    text = running.config.read_text().replace('module = "module.wasm"', 'module = "broken.wasm"')
    broken = running.config.parent / "broken.toml"
    broken.write_text(text)
    result = run_cli("reload", "--config", str(broken))
    assert result.returncode == 1
    assert "broken.wasm" in result.stderr and "not reloading" in result.stderr
    assert "Traceback" not in result.stderr
    assert running.ready().json()["config"]["reload"] == {"result": "none"}  # no signal was sent
    missing = run_cli("reload", "--pid-file", str(running.pid_file.parent / "nope.pid"))
    assert missing.returncode == 1 and "nope.pid" in missing.stderr


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
def test_sigterm_drains_then_finishes_every_accepted_request(
    workers: int, tmp_path: Path, origin: ThreadServer
) -> None:
    port = free_port()
    pid_file = tmp_path / "gateway.pid"
    (tmp_path / "module.wasm").write_bytes(module_version("a"))
    config = tmp_path / "gateway.toml"
    text = config_text(port, origin.port, pid_file, "1")
    config.write_text(text.replace("graceful_shutdown = 20", "graceful_shutdown = 20\ndrain_delay = 3"))
    with Subprocess("serve", "--config", str(config), "--workers", str(workers), port=port) as gw:
        assert gw.proc is not None
        with Load(port, clients=4) as load, Load(port, clients=2, path="/slow?s=4") as slow:
            load.wait_for(40)
            wait_for_slow_requests(2)
            gw.proc.send_signal(signal.SIGTERM)
            # Like a load balancer: poll readiness on fresh connections, stop sending once it turns 503.
            deadline = time.monotonic() + 20
            while True:
                assert time.monotonic() < deadline, "readiness never turned 503"
                ready = httpx.get(
                    f"http://127.0.0.1:{port}/readyz", headers={"connection": "close"}, timeout=10
                )
                if ready.status_code == 503:
                    break
                time.sleep(0.05)
            assert ready.json()["status"] == "draining"
            noticed = time.monotonic()
            # The listener still serves after readiness turned: requests sent now are answered.
            late = httpx.get(f"http://127.0.0.1:{port}/echo", headers={"connection": "close"}, timeout=10)
            assert late.status_code == 200
            assert late.headers["connection"] == "close"  # keep-alive clients are asked to go elsewhere
            load.stop_sending.set()
            slow.stop_sending.set()
        assert gw.proc.wait(30) == 0
    assert not pid_file.exists()  # removed at exit
    assert load.failures() == [] and slow.failures() == []
    slow_done = [o for o in slow.outcomes if o.status == 200]
    assert slow_done and any(o.started < noticed for o in slow_done)


def test_watch_config_reloads_when_the_file_or_a_module_changes(tmp_path: Path, origin: ThreadServer) -> None:
    port = free_port()
    pid_file = tmp_path / "gateway.pid"
    module = tmp_path / "module.wasm"
    module.write_bytes(module_version("a"))
    config = tmp_path / "gateway.toml"
    watch = "watch_config = true\nwatch_interval = 0.2"
    config.write_text(config_text(port, origin.port, pid_file, "1", watch))
    url = f"http://127.0.0.1:{port}/echo"

    def versions_become(expected: tuple[str, str]) -> None:
        deadline = time.monotonic() + 30
        while True:
            r = httpx.get(url, timeout=10)
            assert r.status_code == 200
            if (r.headers["x-module"], r.headers["x-config"]) == expected:
                return
            assert time.monotonic() < deadline, f"still {r.headers}"
            time.sleep(0.1)

    with Subprocess("serve", "--config", str(config), port=port):
        versions_become(("a", "1"))
        replace_file(config, config_text(port, origin.port, pid_file, "2", watch))
        versions_become(("a", "2"))
        replace_file(module, module_version("b"))  # the config file is unchanged: the module is watched too
        versions_become(("b", "2"))
