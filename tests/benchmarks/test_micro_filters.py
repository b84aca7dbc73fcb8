"""benchmarks/micro_filters.py runs in quick mode and reports what the harness's issue-4 targets read."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_quick_run_reports_every_filter_and_algorithm() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/micro_filters.py", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    for name in ("transform", "geo", "rate_limit", "api_key"):
        row = data["per_request"][name]
        assert row["outcome"] == "continue" and 0 < row["median_us"] <= row["p99_us"], (name, row)
    assert set(data["jwt"]) == {"HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA"}
    assert all(set(v) == {"cold_median_us", "cached_median_us"} for v in data["jwt"].values())
