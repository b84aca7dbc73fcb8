"""The benchmark harness runs end to end and cleans up after itself (its numbers are not asserted: speed
belongs in BENCHMARKS.md, not in tests).

The end-to-end runs start real servers (nginx origin, the bare aiohttp proxy on uvicorn) and real wrk; when
nginx or wrk are missing the harness installs them with apt-get (as root) or falls back to its raw-ASGI origin
and asyncio load generator, so these tests pass either way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.report import (
    MICRO_TARGETS,
    compute_ratios,
    find_micro_value,
    render_markdown,
    target_checks,
)

ROOT = Path(__file__).resolve().parents[2]
# A run may have to apt-get install nginx and wrk first.
END_TO_END_TIMEOUT = 300


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose command line contains ``text`` (the run's private work dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks", *args]


def _assert_measured(run: dict[str, Any]) -> None:
    assert "error" not in run, run.get("error")
    assert run["requests"] > 0
    for metric in ("rps", "p50_ms", "p99_ms", "cpu_s_per_10k"):
        summary = run[metric]
        assert summary["min"] <= summary["median"] <= summary["max"], (metric, summary)
        assert summary["median"] > 0, (metric, summary)
    assert run["peak_rss_mb"] > 0
    assert run["repetitions"], run


@pytest.mark.timeout(END_TO_END_TIMEOUT)
def test_quick_run_measures_origin_and_bare_proxy(tmp_path: Path) -> None:
    json_path = tmp_path / "latest.json"
    markdown_path = tmp_path / "BENCHMARKS.md"
    work_dir = tmp_path / "work"
    done = subprocess.run(
        _harness(
            "--quick",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--retries",
            "0",
            "--only",
            "origin,bare_proxy",
            "--json",
            str(json_path),
            "--markdown",
            str(markdown_path),
            "--work-dir",
            str(work_dir),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=END_TO_END_TIMEOUT - 10,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads(json_path.read_text())
    assert set(results["systems"]) == {"origin", "bare_proxy"}
    for name in ("origin", "bare_proxy"):
        entry = results["systems"][name]
        assert entry["status"] == "ok", entry
        _assert_measured(entry["runs"]["small@32"])
    # The Python floor gets the body sizes even in quick mode (to compare with the gateway's).
    bare_runs = results["systems"]["bare_proxy"]["runs"]
    assert set(bare_runs) == {"small@32", "64k@32", "1m@32"}
    for run in bare_runs.values():
        _assert_measured(run)
    assert results["machine"]["cores"] >= 1
    assert results["machine"]["versions"]["python"]
    assert results["mode"] == "quick"
    statuses = {target["target"]: target["status"] for target in results["targets"]}
    assert all(status == "not measured" for status in statuses.values()), statuses  # no gateway was selected

    markdown = markdown_path.read_text()
    assert "## Machine" in markdown
    assert "| origin direct |" in markdown
    assert "| bare aiohttp proxy (Python floor) |" in markdown
    assert results["command"] in markdown

    assert _processes_mentioning(str(work_dir)) == []


@pytest.mark.timeout(END_TO_END_TIMEOUT)
def test_interrupted_run_stops_every_server(tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    harness = subprocess.Popen(
        _harness(
            "--quick",
            "--duration",
            "30",
            "--only",
            "bare_proxy",
            "--json",
            str(tmp_path / "latest.json"),
            "--markdown",
            str(tmp_path / "BENCHMARKS.md"),
            "--work-dir",
            str(work_dir),
        ),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until the bare proxy (started after the shared origin) is up, both found by their work dir.
        deadline = time.monotonic() + END_TO_END_TIMEOUT - 30
        log = work_dir / "logs" / "bare_proxy.log"
        while time.monotonic() < deadline and not log.exists():
            assert harness.poll() is None, harness.communicate()[1]
            time.sleep(0.1)
        assert log.exists(), "the harness never started the bare proxy"
        time.sleep(1.0)
        assert _processes_mentioning(str(work_dir)), "no server of the run found while it runs"
        harness.send_signal(signal.SIGINT)
        _, stderr = harness.communicate(timeout=60)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
    assert harness.returncode == 130, stderr[-2000:]
    assert _processes_mentioning(str(work_dir)) == []
    assert not (tmp_path / "latest.json").exists()  # an interrupted run writes no results


# ---------------------------------------------------------------------------------------- report, no servers


def _fake_results(rps: dict[str, float], p99_ms: float, micro: Any = None) -> dict[str, Any]:
    systems = {}
    for name, value in rps.items():
        systems[name] = {
            "title": name,
            "kind": "gateway" if name.startswith("gateway") else "peer",
            "status": "ok",
            "runs": {
                "small@32": {
                    "rps": {"median": value, "min": value, "max": value},
                    "p99_ms": {"median": p99_ms, "min": p99_ms, "max": p99_ms},
                }
            },
        }
    results: dict[str, Any] = {"systems": systems, "micro": {}}
    if micro is not None:
        results["micro"]["micro_runtime"] = {"status": "ok", "data": micro}
    return results


def _status_of(results: dict[str, Any], fragment: str) -> str:
    matches = [check for check in target_checks(results) if fragment in check.target]
    assert len(matches) == 1, [check.target for check in target_checks(results)]
    return matches[0].status


def test_targets_are_met_or_not_by_the_ratios_measured() -> None:
    fast = _fake_results({"gateway": 20_000, "bare_proxy": 10_000}, p99_ms=2.0)
    assert _status_of(fast, ">= 1.8x bare") == "met"
    assert _status_of(fast, "p99 < 3 ms") == "met"
    slow = _fake_results({"gateway": 17_000, "bare_proxy": 10_000}, p99_ms=3.5)
    assert _status_of(slow, ">= 1.8x bare") == "not met"
    assert _status_of(slow, "p99 < 3 ms") == "not met"
    missing = _fake_results({"bare_proxy": 10_000}, p99_ms=1.0)
    assert _status_of(missing, ">= 1.8x bare") == "not measured"

    filters = _fake_results(
        {"gateway": 20_000, "gateway_all_filters": 9_000, "express_proxy": 4_000}, p99_ms=1.0
    )
    assert _status_of(filters, ">= 2x Express") == "met"
    assert _status_of(filters, ">= 0.5x gateway") == "not met"
    ratios = compute_ratios(filters)
    assert ratios["gateway_all_filters"]["small@32"]["vs_gateway"] == pytest.approx(0.45)
    assert ratios["gateway_all_filters"]["small@32"]["vs_express_proxy"] == pytest.approx(2.25)


def test_micro_targets_are_read_from_micro_runtime_json_with_units() -> None:
    micro = {
        "guest_call": {"median_ns": 1500, "p99_ns": 4000},
        "host_call": {"median_us": 1.4},
        "filter_per_request": {"median_us": 12.0},
        "cold_start": {"precompiled": {"total_median_ms": 0.31}, "compile": {"total_median_ms": 3.0}},
        "pool_borrow": {"median_us": 2.0},
        "memory_per_instance": {"rss_bytes": 300 * 1024},
    }
    by_issue_target = {target.target: target for target in MICRO_TARGETS}
    guest = find_micro_value(micro, by_issue_target["guest call <= 2 us"])
    assert guest is not None
    assert guest[0] == "guest_call.median_ns"
    assert guest[1] == pytest.approx(1.5)
    cold = find_micro_value(micro, by_issue_target["cold start from precompiled cache <= 0.5 ms"])
    assert cold is not None and cold[0] == "cold_start.precompiled.total_median_ms"

    results = _fake_results({}, p99_ms=1.0, micro=micro)
    assert _status_of(results, "guest call") == "met"
    assert _status_of(results, "host call") == "not met"
    assert _status_of(results, "filter (2 header reads") == "met"
    assert _status_of(results, "cold start") == "met"
    assert _status_of(results, "pool borrow") == "met"
    assert _status_of(results, "memory per pooled instance") == "not met"
    assert _status_of(_fake_results({}, p99_ms=1.0), "guest call") == "not measured"


def test_per_filter_targets_are_read_from_micro_filters_json() -> None:
    results = _fake_results({}, p99_ms=1.0)
    per_request = {
        name: {"median_us": us, "p99_us": 2 * us, "outcome": "continue"}
        for name, us in (("transform", 9.0), ("geo", 7.5), ("rate_limit", 19.0), ("api_key", 10.0))
    }
    per_request["rate_limit_no_headers"] = {"median_us": 1.0, "p99_us": 1.0, "outcome": "continue"}
    assert _status_of(results, "transform filter through the runtime") == "not measured"
    results["micro"]["micro_filters"] = {"status": "ok", "data": {"per_request": per_request, "jwt": {}}}
    assert _status_of(results, "transform filter through the runtime") == "met"
    assert _status_of(results, "geo filter through the runtime") == "met"
    assert _status_of(results, "rate-limit (in-process) filter through the runtime") == "not met"
    assert _status_of(results, "API-key auth filter through the runtime") == "met"  # <= 10 us


def test_markdown_shows_the_command_machine_and_every_target() -> None:
    results = _fake_results({"gateway": 20_000, "bare_proxy": 10_000}, p99_ms=2.0)
    for entry in results["systems"].values():
        run = entry["runs"]["small@32"]
        for metric in ("p50_ms", "cpu_s_per_10k", "cpu_util"):
            run[metric] = {"median": 1.0, "min": 1.0, "max": 1.0}
        run.update(peak_rss_mb=40.0, requests=1000, socket_errors=0, non_2xx=0, repetitions=[{}])
    results.update(
        command="python -m benchmarks --quick",
        mode="quick",
        generated_at="2025-01-01 00:00 UTC",
        elapsed_s=90.0,
        settings={
            "load_generator": "wrk 4.1.0",
            "warmup_s": 1,
            "repetitions": 1,
            "duration_s": 2,
            "pinning": "server on CPU 1",
        },
        machine={
            "cpu_model": "Test CPU",
            "cores": 2,
            "memory": "1 GiB",
            "os": "Debian",
            "kernel": "6.1",
            "versions": {"python": "3.11"},
        },
        origin="nginx (1 worker)",
        ratios=compute_ratios(results),
    )
    results["targets"] = [
        {"issue": c.issue, "target": c.target, "measured": c.measured, "status": c.status, "detail": c.detail}
        for c in target_checks(results)
    ]
    markdown = render_markdown(results)
    assert "`python -m benchmarks --quick`" in markdown
    assert "Test CPU, 2 cores" in markdown
    for check in target_checks(results):
        assert check.target in markdown
    assert "| gateway | 20,000 |" in markdown
    assert "2.00x" in markdown  # gateway / bare proxy


@pytest.mark.timeout(END_TO_END_TIMEOUT)
def test_fallback_origin_and_load_generator(tmp_path: Path) -> None:
    """Where nginx or wrk cannot be had, the raw-ASGI origin and the asyncio load generator stand in."""
    json_path = tmp_path / "latest.json"
    done = subprocess.run(
        _harness(
            "--quick",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--retries",
            "0",
            "--origin",
            "asgi",
            "--loadgen",
            "python",
            "--only",
            "origin",
            "--json",
            str(json_path),
            "--markdown",
            str(tmp_path / "BENCHMARKS.md"),
            "--work-dir",
            str(tmp_path / "work"),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=END_TO_END_TIMEOUT - 10,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(json_path.read_text())
    assert results["origin"].startswith("raw ASGI")
    assert "loadgen.py" in results["settings"]["load_generator"]
    _assert_measured(results["systems"]["origin"]["runs"]["small@32"])
    assert _processes_mentioning(str(tmp_path / "work")) == []


def test_js_filter_targets_come_from_micro_js_and_the_edge_systems() -> None:
    results = _fake_results({"gateway_js_edge": 9_000, "express_edge": 5_000}, p99_ms=1.0)
    results["micro"]["micro_js"] = {
        "status": "ok",
        "data": {"js_cold_start_ms": 3.0, "js_header_edit_us": 44.0},
    }
    assert _status_of(results, "JS filter start-up") == "not met"
    assert _status_of(results, "JS header-editing filter") == "met"
    assert _status_of(results, "JS edge function answering /json >= 1.5x Express") == "met"
    assert _status_of(_fake_results({}, p99_ms=1.0), "JS filter start-up") == "not measured"
