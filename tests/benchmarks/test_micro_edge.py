"""benchmarks/micro_edge.py runs in quick mode and reports every backend and the SQL query."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_quick_run_reports_every_backend() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/micro_edge.py", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    assert set(data) == {"memory", "local", "redis"}
    for row in data.values():
        assert row["host_kv_get_us"] > 0 and row["zig_request_baseline_us"] > 0
    assert data["memory"]["host_sql_pk_us"] > 0 and "zig_sql_pk_us" in data["memory"]
