"""A real Prometheus scraping a real gateway (``wasm-gateway serve`` with 2 workers) under light traffic over
every kind of route; then every PromQL expression of the dashboard and of the alert rules, through Prometheus'
HTTP API.

What it proves: the counters Prometheus stores agree exactly with the traffic sent, summed over both workers
(filter-defined metrics included); every dashboard query returns data with the labels its legend names; every
variable query finds values; the alert rules evaluate without error, and those the traffic should trip
(5xx ratio, traps, an upstream with no healthy target) are pending; the 2-worker output passes
``promtool check metrics``.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.conftest import Subprocess, ThreadServer, free_port, wait_port
from tests.grafana import scenario
from tests.grafana.promql import (
    ALERTS,
    BUILTIN_VARIABLES,
    alert_rules,
    dashboard,
    label_values,
    legend_labels,
    panel_queries,
    substitute,
    tool,
    variable_query,
    variables,
)
from tests.origins import echo_origin
from wasm_gateway import __version__
from wasm_gateway.runtime.engine import WASMTIME_VERSION

JOB = "wasm-gateway"  # the job name the alert rules expect
T = TypeVar("T")


@dataclass
class Prometheus:
    url: str
    client: httpx.Client

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self.client.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def series(self, selector: str) -> list[dict[str, str]]:
        body = self.client.get(f"{self.url}/api/v1/series", params={"match[]": selector}).json()
        assert body["status"] == "success", f"{selector}: {body}"
        data: list[dict[str, str]] = body["data"]
        return data

    def rules(self) -> list[dict[str, Any]]:
        body = self.client.get(f"{self.url}/api/v1/rules").json()
        assert body["status"] == "success", body
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None


def poll(check: Callable[[], T | None], timeout: float = 30.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """Starts Prometheus scraping 127.0.0.1:<port> every second, with the alert rules loaded."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(gateway_port: int) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}]}
            ],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        wait_port(port, timeout=20)
        prometheus = Prometheus(f"http://127.0.0.1:{port}", httpx.Client(timeout=10))

        def ready() -> bool | None:
            try:
                return prometheus.client.get(f"{prometheus.url}/-/ready").status_code == 200 or None
            except httpx.HTTPError:
                return None

        poll(ready, what="Prometheus ready")
        return prometheus

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dashboard_and_alerts_against_prometheus_scraping_two_workers(
    origin: ThreadServer, tmp_path: Path, prometheus_for: Callable[[int], Prometheus]
) -> None:
    port = free_port()
    config = scenario.write_config(tmp_path, port=port, origin_port=origin.port, dead_port=free_port())
    with Subprocess("serve", "--config", str(config), "--workers", "2", port=port):
        prometheus = prometheus_for(port)
        poll(lambda: prometheus.value(f'up{{job="{JOB}"}}') == 1.0 or None, what="the first scrape")

        # Two rounds, a scrape between them: every series exists before the second round increments it,
        # so rate() over the window sees the traffic (not just a first sample that already holds it all).
        traffic = scenario.drive(port)
        requests = float(sum(traffic.statuses.values()))
        poll(
            lambda: prometheus.value("sum(wasm_gateway_request_duration_seconds_count)") == requests or None,
            what="the first round in Prometheus",
        )
        scenario.drive(port, traffic, first=False)

        # Counters agree with the traffic, summed over both workers.
        expected = scenario.expected_counts(traffic)

        def counts_agree() -> dict[str, float | None] | None:
            got = {expr: prometheus.value(expr) for expr in expected}
            return got if got == expected else None

        try:
            poll(counts_agree, what="counters to agree with the traffic")
        except AssertionError:
            got = {expr: prometheus.value(expr) for expr in expected}
            wrong = {expr: (got[expr], value) for expr, value in expected.items() if got[expr] != value}
            raise AssertionError(f"(got, expected) per query: {wrong}") from None
        ejections = prometheus.value('sum(wasm_gateway_upstream_ejections_total{upstream="dead"})')
        assert ejections in (1.0, 2.0)  # once per worker that saw the dead upstream fail (ejected for 300 s)
        (info,) = prometheus.query("wasm_gateway_build_info")
        assert info["metric"]["version"] == __version__
        assert info["metric"]["wasmtime"] == WASMTIME_VERSION

        check_dashboard_queries(prometheus, port)
        check_alert_rules(prometheus)

        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        lint = subprocess.run(
            [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr


def check_dashboard_queries(prometheus: Prometheus, port: int) -> None:
    board = dashboard()
    values = {name: ".*" for name in variables(board)} | BUILTIN_VARIABLES
    for name, variable in variables(board).items():
        if variable["type"] != "query":
            continue
        selector, label = label_values(substitute(variable_query(variable), values))
        found = {series.get(label) for series in prometheus.series(selector)} - {None}
        assert found, f"variable {name}: {selector} has no {label} values"
    for query in panel_queries(board):
        expr = substitute(query.expr, values)
        result = prometheus.query(expr)
        assert result, f"{query.where}: no data for {expr}"
        assert any(not math.isnan(float(r["value"][1])) for r in result), f"{query.where}: only NaN: {result}"
        for series in result:
            missing = legend_labels(query.legend) - set(series["metric"])
            assert not missing, f"{query.where}: legend labels {missing} not in {series['metric']}"


# What the scenario's traffic must trip (pending: their `for` has not run out) and what it must not.
TRIPPED = {"WasmGatewayHighErrorRatio", "WasmGatewayFilterTraps", "WasmGatewayUpstreamAllTargetsEjected"}


def check_alert_rules(prometheus: Prometheus) -> None:
    for rule in alert_rules():
        prometheus.query(rule["expr"])  # evaluates without error (raises otherwise)
    names = {rule["alert"] for rule in alert_rules()}
    started = time.time()

    def evaluated() -> list[dict[str, Any]] | None:
        rules = prometheus.rules()
        fresh = [r for r in rules if r.get("lastEvaluation", "").startswith("20")]
        if {r["name"] for r in fresh} != names:
            return None
        # Evaluated after the traffic (the rules run every second), with their states settled.
        states = {r["name"]: r["state"] for r in rules}
        if any(states[name] == "inactive" for name in TRIPPED) and time.time() - started < 20:
            return None
        return rules

    rules = poll(evaluated, what="the alert rules to be evaluated")
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    states = {rule["name"]: rule["state"] for rule in rules}
    assert all(states[name] in ("pending", "firing") for name in TRIPPED), states
    # HighLatency is left out: a loaded CI machine may legitimately make a few requests slow.
    calm = names - TRIPPED - {"WasmGatewayHighLatency"}
    assert all(states[name] == "inactive" for name in calm), states
