"""Load generation: wrk (one thread, pinned) with a Lua ``done`` hook that prints exact percentiles as JSON,
or the in-repo asyncio generator when wrk cannot be had. Both yield the same ``LoadResult``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from benchmarks.procs import BenchmarkError, pinned

# Seconds past the load duration after which a load run is declared hung and killed.
LOAD_OVERRUN_SECONDS = 30

WRK_REPORT_LUA = """\
-- Written by benchmarks/load.py: print exact latency percentiles and error counts as one JSON line.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,\\"connect_errors\\":%d," ..
    "\\"read_errors\\":%d,\\"write_errors\\":%d,\\"status_errors\\":%d,\\"timeouts\\":%d," ..
    "\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"max_us\\":%d}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class LoadSpec:
    url: str
    connections: int
    duration_s: int
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LoadResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int
    non_2xx: int
    bytes: int


class LoadGenerator(Protocol):
    name: str

    def run(self, spec: LoadSpec) -> LoadResult: ...


def _result_from_report(report: dict[str, float]) -> LoadResult:
    duration_s = report["duration_us"] / 1e6
    requests = int(report["requests"])
    return LoadResult(
        requests=requests,
        duration_s=duration_s,
        rps=requests / duration_s if duration_s > 0 else 0.0,
        p50_ms=report["p50_us"] / 1000,
        p90_ms=report["p90_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        max_ms=report["max_us"] / 1000,
        socket_errors=int(
            report["connect_errors"] + report["read_errors"] + report["write_errors"] + report["timeouts"]
        ),
        non_2xx=int(report["status_errors"]),
        bytes=int(report["bytes"]),
    )


def _run_reporting_command(
    command: Sequence[str], marker: str, timeout: float, cwd: Path | None
) -> LoadResult:
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"load generator hung past {timeout:.0f} s: {' '.join(command)}") from exc
    for line in done.stdout.splitlines():
        if line.startswith(marker + " "):
            report: dict[str, float] = json.loads(line[len(marker) + 1 :])
            return _result_from_report(report)
    output = (done.stderr or done.stdout).strip()[-500:]
    raise BenchmarkError(f"load generator gave no report (exit {done.returncode}): {output}")


class Wrk:
    """wrk with one thread (it is pinned to one CPU), ``--latency``, and the JSON report hook."""

    def __init__(self, binary: str, work_dir: Path, cpus: str | None, version: str | None) -> None:
        self.binary = binary
        self.cpus = cpus
        self.name = f"wrk {version}" if version else "wrk"
        self._script = work_dir / "wrk_report.lua"
        work_dir.mkdir(parents=True, exist_ok=True)
        self._script.write_text(WRK_REPORT_LUA)

    def run(self, spec: LoadSpec) -> LoadResult:
        command = [
            self.binary,
            "-t1",
            f"-c{spec.connections}",
            f"-d{spec.duration_s}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(self._script),
        ]
        for name, value in spec.headers:
            command += ["-H", f"{name}: {value}"]
        command.append(spec.url)
        return _run_reporting_command(
            pinned(command, self.cpus), "WRKJSON", spec.duration_s + LOAD_OVERRUN_SECONDS, cwd=None
        )


class PythonLoadGenerator:
    """``benchmarks/loadgen.py`` in a subprocess, pinned like wrk would be."""

    def __init__(self, repo_root: Path, cpus: str | None) -> None:
        self.repo_root = repo_root
        self.cpus = cpus
        self.name = "benchmarks/loadgen.py (asyncio fallback: wrk missing)"

    def run(self, spec: LoadSpec) -> LoadResult:
        command = [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            "--url",
            spec.url,
            "--connections",
            str(spec.connections),
            "--duration",
            str(spec.duration_s),
        ]
        for name, value in spec.headers:
            command += ["--header", f"{name}: {value}"]
        return _run_reporting_command(
            pinned(command, self.cpus), "LOADJSON", spec.duration_s + LOAD_OVERRUN_SECONDS, cwd=self.repo_root
        )
