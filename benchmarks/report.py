"""From raw repetitions to what a reader wants: medians with min-max, ratios between systems, each issue's
targets as met / not met, the results JSON and the ``BENCHMARKS.md`` table."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

MAIN_WORKLOAD = "small@32"
PEERS_FOR_RATIOS = (
    ("bare_proxy", "bare aiohttp proxy"),
    ("express_proxy", "Express"),
    ("nginx_proxy", "nginx proxy"),
)

JsonDict = dict[str, Any]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the repetitions."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def aggregate(repetitions: list[JsonDict]) -> JsonDict:
    """Summary of one workload's repetitions (each a dict of numbers)."""
    summary: JsonDict = {}
    for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "cpu_s_per_10k", "cpu_util"):
        summary[key] = spread([float(rep[key]) for rep in repetitions])
    contention = [float(rep["contention"]) for rep in repetitions if rep.get("contention") is not None]
    if contention:
        summary["contention"] = spread(contention)
    summary["peak_rss_mb"] = max(float(rep["peak_rss_mb"]) for rep in repetitions)
    summary["requests"] = sum(int(rep["requests"]) for rep in repetitions)
    summary["socket_errors"] = sum(int(rep["socket_errors"]) for rep in repetitions)
    summary["non_2xx"] = sum(int(rep["non_2xx"]) for rep in repetitions)
    summary["repetitions"] = repetitions
    return summary


def _median(results: JsonDict, system: str, workload: str, metric: str) -> float | None:
    entry = results["systems"].get(system)
    if not entry or entry.get("status") != "ok":
        return None
    run = entry.get("runs", {}).get(workload)
    if not run or "rps" not in run:
        return None
    value = run.get(metric)
    if value is None:
        return None
    return float(value["median"]) if isinstance(value, dict) else float(value)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compute_ratios(results: JsonDict) -> JsonDict:
    """Ratios of every gateway system to each peer (and to the plain gateway), per workload.

    ``vs_<peer>``: requests/s over the peer's. ``cpu_vs_<peer>``: the peer's CPU seconds per request over the
    gateway's (above 1: the gateway does a request on less CPU). The second holds up better when other work on
    the machine takes CPU from the server under test, since it does not depend on how much CPU it was given.
    """
    ratios: JsonDict = {}
    for name, entry in results["systems"].items():
        if entry.get("kind") != "gateway" or entry.get("status") != "ok":
            continue
        per_workload: JsonDict = {}
        for workload in entry.get("runs", {}):
            rps = _median(results, name, workload, "rps")
            against = {
                f"vs_{peer}": _ratio(rps, _median(results, peer, workload, "rps"))
                for peer, _ in PEERS_FOR_RATIOS
            }
            cost = _median(results, name, workload, "cpu_s_per_10k")
            for peer, _ in PEERS_FOR_RATIOS:
                against[f"cpu_vs_{peer}"] = _ratio(_median(results, peer, workload, "cpu_s_per_10k"), cost)
            if name != "gateway":
                against["vs_gateway"] = _ratio(rps, _median(results, "gateway", workload, "rps"))
                against["cpu_vs_gateway"] = _ratio(
                    _median(results, "gateway", workload, "cpu_s_per_10k"), cost
                )
            per_workload[workload] = {key: value for key, value in against.items() if value is not None}
        ratios[name] = per_workload
    return ratios


@dataclass(frozen=True)
class TargetCheck:
    issue: int
    target: str
    measured: str
    met: bool | None  # None: not measured in this run
    detail: str = ""

    @property
    def status(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "not met")


def _ratio_target(
    results: JsonDict, issue: int, target: str, system: str, peer: str, minimum: float
) -> TargetCheck:
    mine = _median(results, system, MAIN_WORKLOAD, "rps")
    theirs = _median(results, peer, MAIN_WORKLOAD, "rps")
    ratio = _ratio(mine, theirs)
    if ratio is None:
        missing = system if mine is None else peer
        return TargetCheck(issue, target, "-", None, f"{missing}: {_why_missing(results, missing)}")
    return TargetCheck(issue, target, f"{ratio:.2f}x ({mine:,.0f} / {theirs:,.0f} req/s)", ratio >= minimum)


def _why_missing(results: JsonDict, system: str) -> str:
    entry = results["systems"].get(system)
    if entry is None:
        return "not selected in this run"
    return str(entry.get("reason") or entry.get("status"))


# ------------------------------------------------------------------------------------ micro-benchmark targets


@dataclass(frozen=True)
class MicroTarget:
    issue: int
    target: str
    required: str  # regex a key path must match
    preferred: tuple[str, ...]  # regexes that make a matching key a better candidate
    unit: str  # "us" | "ms" | "kb"
    maximum: float
    step: str = "micro_runtime"  # the benchmarks/<step>.py whose JSON holds the number


MICRO_TARGETS = (
    MicroTarget(3, "guest call <= 2 us", r"guest.?call", (r"median|p50", r"fast|unchecked"), "us", 2.0),
    MicroTarget(3, "host call <= 1 us", r"host.?call", (r"median|p50", r"fast|unchecked"), "us", 1.0),
    MicroTarget(
        3,
        "filter (2 header reads + 1 header add) <= 15 us/request",
        r"filter|per.?request",
        (r"per.?request|overhead", r"median|p50", r"total"),
        "us",
        15.0,
    ),
    MicroTarget(
        3,
        "cold start from precompiled cache <= 0.5 ms",
        r"cold",
        (r"cache|precompiled|deserial", r"total|sum|all", r"median|p50"),
        "ms",
        0.5,
    ),
    MicroTarget(3, "pool borrow <= 5 us", r"borrow", (r"median|p50",), "us", 5.0),
    MicroTarget(
        9,
        "JS filter start-up (deserialise + instantiate + configure) <= 2 ms",
        r"js_cold_start",
        (),
        "ms",
        2.0,
        "micro_js",
    ),
    MicroTarget(
        9, "JS header-editing filter <= 60 us/request", r"js_header_edit", (), "us", 60.0, "micro_js"
    ),
    MicroTarget(
        3,
        "memory per pooled instance <= 256 KB",
        r"(per.?instance|instance.?(rss|mem)|rss.?per|memory.?per)",
        (r"rss", r"1000|1k"),
        "kb",
        256.0,
    ),
    *(
        MicroTarget(
            4,
            f"{name} filter through the runtime <= 10 us/request",
            rf"^per_request\.{key}\.median_us$",
            (),
            "us",
            10.0,
            "micro_filters",
        )
        for name, key in (
            ("transform", "transform"),
            ("geo", "geo"),
            ("rate-limit (in-process)", "rate_limit"),
            ("API-key auth", "api_key"),
        )
    ),
)

_UNIT_SCALES = {
    "us": {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6},
    "ms": {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3},
    "kb": {"bytes": 1 / 1024, "b": 1 / 1024, "kb": 1.0, "kib": 1.0, "mb": 1024.0, "mib": 1024.0},
}


def flatten_numbers(data: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every numeric leaf of a JSON document as (dotted.key.path, value)."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from flatten_numbers(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from flatten_numbers(value, f"{prefix}[{index}]")
    elif isinstance(data, int | float) and not isinstance(data, bool):
        yield prefix, float(data)


def _unit_of(path: str) -> str | None:
    for part in reversed(re.split(r"[._\[\]]", path.lower())):
        if part in ("ns", "us", "ms", "s", "bytes", "b", "kb", "kib", "mb", "mib"):
            return part
    return None


def find_micro_value(data: Any, target: MicroTarget) -> tuple[str, float] | None:
    """The best-matching key for a target in a micro-benchmark report, converted to the target's unit.

    The micro-benchmark scripts are written separately and agree no schema with this harness, so keys are found
    by name (e.g. ``guest_call.median_us``); the key used is shown next to each number so a reader can check it.
    """
    best: tuple[int, str, float] | None = None
    for path, value in flatten_numbers(data):
        lowered = path.lower()
        if not re.search(target.required, lowered):
            continue
        unit = _unit_of(lowered)
        scale = _UNIT_SCALES[target.unit].get(unit) if unit else None
        if scale is None:
            continue
        score = sum(1 for pattern in target.preferred if re.search(pattern, lowered))
        if best is None or score > best[0]:
            best = (score, path, value * scale)
    return None if best is None else (best[1], best[2])


def micro_targets(results: JsonDict) -> list[TargetCheck]:
    checks = []
    for target in MICRO_TARGETS:
        micro = results.get("micro", {}).get(target.step)
        if not micro or micro.get("status") != "ok":
            reason = f"benchmarks/{target.step}.py " + (
                "not run" if not micro else f"{micro.get('status')} (see Micro-benchmarks)"
            )
            checks.append(TargetCheck(target.issue, target.target, "-", None, reason))
            continue
        found = find_micro_value(micro.get("data"), target)
        if found is None:
            checks.append(TargetCheck(target.issue, target.target, "-", None, "no matching key in its JSON"))
            continue
        path, value = found
        checks.append(
            TargetCheck(
                target.issue,
                target.target,
                f"{value:,.2f} {target.unit}",
                value <= target.maximum,
                f"key `{path}`",
            )
        )
    return checks


def target_checks(results: JsonDict) -> list[TargetCheck]:
    checks = [
        _ratio_target(
            results,
            2,
            "gateway (no filters) >= 1.8x bare aiohttp proxy req/s (small JSON, 32 conn.)",
            "gateway",
            "bare_proxy",
            1.8,
        )
    ]
    p99 = _median(results, "gateway", MAIN_WORKLOAD, "p99_ms")
    if p99 is None:
        checks.append(
            TargetCheck(
                2, "gateway (no filters) p99 < 3 ms at 32 conn.", "-", None, _why_missing(results, "gateway")
            )
        )
    else:
        checks.append(
            TargetCheck(2, "gateway (no filters) p99 < 3 ms at 32 conn.", f"{p99:.2f} ms", p99 < 3.0)
        )
    checks += micro_targets(results)
    checks.append(
        _ratio_target(
            results,
            4,
            "gateway + all four filters >= 2x Express + http-proxy-middleware req/s",
            "gateway_all_filters",
            "express_proxy",
            2.0,
        )
    )
    checks.append(
        _ratio_target(
            results,
            4,
            "gateway + all four filters >= 0.5x gateway without filters",
            "gateway_all_filters",
            "gateway",
            0.5,
        )
    )
    checks.append(
        _ratio_target(
            results,
            9,
            "gateway + JS edge function answering /json >= 1.5x Express answering it (small JSON, 32 conn.)",
            "gateway_js_edge",
            "express_edge",
            1.5,
        )
    )
    return checks


def targets_json(checks: list[TargetCheck]) -> list[JsonDict]:
    return [{**asdict(check), "status": check.status} for check in checks]


# ---------------------------------------------------------------------------------------------------- markdown


def _fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _cell(run: JsonDict, metric: str, digits: int) -> str:
    value = run[metric]
    if not isinstance(value, dict):
        return _fmt(float(value), digits)
    text = _fmt(value["median"], digits)
    if len(run.get("repetitions", ())) > 1:
        text += f" ({_fmt(value['min'], digits)}-{_fmt(value['max'], digits)})"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    lines = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [line(row) for row in rows]
    return lines


def _errors_note(run: JsonDict) -> str:
    problems = []
    if run.get("socket_errors"):
        problems.append(f"{run['socket_errors']} socket errors")
    if run.get("non_2xx"):
        problems.append(f"{run['non_2xx']} non-2xx")
    return f" ⚠ {', '.join(problems)}" if problems else ""


def _ok_runs(results: JsonDict) -> Iterator[tuple[str, JsonDict]]:
    for name, entry in results["systems"].items():
        if entry.get("status") == "ok":
            yield name, entry


def render_markdown(results: JsonDict) -> str:
    machine = results["machine"]
    settings = results["settings"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    out = [
        "# Benchmarks",
        "",
        "Generated by the harness in `benchmarks/` (see `benchmarks/README.md`); do not edit by hand.",
        "Numbers are from one machine and one run: compare the ratios between systems measured side by side,",
        "not the absolute figures.",
        "",
        f"Command: `{results['command']}` ({results['mode']} mode, {results['generated_at']}, "
        f"git {machine.get('git_revision') or 'unknown'}, {results['elapsed_s']:.0f} s"
        + (
            f" after waiting {waited:.0f} s for other load to drop"
            if (waited := results.get("waited_for_quiet_s") or 0) >= 1
            else ""
        )
        + ")",
        "",
        "## Machine",
        "",
        *_table(
            ["", ""],
            [
                ["CPU", f"{machine['cpu_model']}, {machine['cores']} cores"],
                ["memory", machine["memory"]],
                ["OS / kernel", f"{machine['os']} / {machine['kernel']}"],
                ["versions", versions],
                ["pinning", settings["pinning"]],
                [
                    "load",
                    f"{settings['load_generator']}; {settings['warmup_s']} s warm-up, then "
                    f"{settings['repetitions']} x {settings['duration_s']} s; medians with (min-max) when repeated",
                ],
                ["origin", results["origin"]],
                ["other load", _background_note(results)],
            ],
        ),
        "",
        "## Targets",
        "",
        *_table(
            ["issue", "target", "measured", "status", "note"],
            [
                [f"#{t['issue']}", t["target"], t["measured"], f"**{t['status']}**", t["detail"]]
                for t in results["targets"]
            ],
        ),
        "",
    ]
    out += _main_table(results)
    out += _bodies_table(results)
    out += _concurrency_table(results)
    out += _ratios_table(results)
    out += _micro_section(results)
    problems = [
        f"- `{name}` ({entry['status']}): {_reason_summary(str(entry.get('reason', '')))}"
        for name, entry in results["systems"].items()
        if entry.get("status") != "ok"
    ]
    problems += [
        f"- `{name}` {workload} (error): {_reason_summary(str(run['error']))}"
        for name, entry in _ok_runs(results)
        for workload, run in entry.get("runs", {}).items()
        if "error" in run
    ]
    if problems:
        out += ["## Skipped or failed", "", *problems, ""]
    out += [
        "## How to read",
        "",
        "- req/s: responses completed per second (wrk). p50/p99: latency percentiles at that concurrency.",
        "- CPU s / 10k: user+system CPU seconds of the server's whole process tree per 10,000 requests (/proc);",
        "  CPU use: the same as a share of one core over the run (near 1.0 = the server's core is saturated;",
        "  well below 1.0 = the bottleneck is elsewhere, e.g. wrk or the origin on the other CPU).",
        "- others on its CPU: the largest share, over the repetitions, of the server's (pinned) CPU that other",
        "  processes or the hypervisor took during a measurement. A repetition above 10% is run again (a few",
        "  times at most); ⚠ marks a number measured while the server did not have its core to itself.",
        "- peak RSS: VmHWM summed over the server's process tree, since it started.",
        "",
    ]
    return "\n".join(out)


def _reason_summary(reason: str) -> str:
    """First line of a reason, plus the last line of the log tail it quotes (usually the exception)."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    details = [line for line in lines[1:] if not line.startswith("(config:")]
    # Prefer the exception line of a quoted traceback ("pkg.mod.SomeError: ...") over trailing log lines.
    exceptions = [line for line in details if re.match(r"[A-Za-z_][\w.]*[a-z][\w.]*: ", line)]
    summary = lines[0].rstrip(":")
    detail = (exceptions or details or [""])[-1]
    return f"{summary}: `{detail}`" if detail else summary


BUSY_MACHINE_PERCENT = 10.0


def _background_note(results: JsonDict) -> str:
    """CPU used by other processes just before and after the run (idle machine: close to 0%)."""
    background = results.get("background_cpu_percent") or {}
    parts = [
        f"{value:.0f}% {moment}"
        for moment in ("before", "after")
        if (value := background.get(moment)) is not None
    ]
    if not parts:
        return "not measured"
    text = "CPU busy across all cores, outside the run: " + ", ".join(parts)
    if any((background.get(moment) or 0) > BUSY_MACHINE_PERCENT for moment in ("before", "after")):
        text += " (**machine was busy: numbers are disturbed, compare ratios only**)"
    return text


def _contention_cell(run: JsonDict) -> str:
    contention = run.get("contention")
    if not contention:
        return "-"
    worst = float(contention["max"])
    return f"{worst:.0%}" + (" ⚠" if worst > DISTURBED_SHARE else "")


DISTURBED_SHARE = 0.10


def _main_table(results: JsonDict) -> list[str]:
    nginx_rps = _median(results, "nginx_proxy", MAIN_WORKLOAD, "rps")
    rows = []
    for _, entry in _ok_runs(results):
        run = entry["runs"].get(MAIN_WORKLOAD)
        if not run or "rps" not in run:
            continue
        ratio = _ratio(run["rps"]["median"], nginx_rps)
        rows.append(
            [
                entry["title"],
                _cell(run, "rps", 0) + _errors_note(run),
                _cell(run, "p50_ms", 2),
                _cell(run, "p99_ms", 2),
                _cell(run, "cpu_s_per_10k", 3),
                _cell(run, "cpu_util", 2),
                _contention_cell(run),
                f"{run['peak_rss_mb']:.1f}",
                f"{ratio:.2f}" if ratio is not None else "-",
            ]
        )
    if not rows:
        return []
    return [
        "## Throughput, latency and cost (small JSON, 32 connections)",
        "",
        *_table(
            [
                "system",
                "req/s",
                "p50 ms",
                "p99 ms",
                "CPU s / 10k req",
                "CPU use",
                "others on its CPU",
                "peak RSS MB",
                "vs nginx proxy",
            ],
            rows,
        ),
        "",
    ]


def _bodies_table(results: JsonDict) -> list[str]:
    rows = []
    for _, entry in _ok_runs(results):
        runs = entry["runs"]
        if not any(f"{body}@32" in runs for body in ("64k", "1m")):
            continue
        row = [entry["title"]]
        for body in ("small", "64k", "1m"):
            run = runs.get(f"{body}@32")
            row.append(f"{_cell(run, 'rps', 0)} / {_cell(run, 'p99_ms', 2)}" if run and "rps" in run else "-")
        rows.append(row)
    if not rows:
        return []
    return [
        "## Response size (32 connections): req/s / p99 ms",
        "",
        *_table(["system", "small JSON", "64 KB", "1 MB"], rows),
        "",
    ]


def _concurrency_table(results: JsonDict) -> list[str]:
    rows = []
    for _, entry in _ok_runs(results):
        runs = entry["runs"]
        if not any(f"small@{c}" in runs for c in (1, 256)):
            continue
        row = [entry["title"]]
        for connections in (1, 32, 256):
            run = runs.get(f"small@{connections}")
            row.append(
                f"{_cell(run, 'rps', 0)} / {_cell(run, 'p50_ms', 2)} / {_cell(run, 'p99_ms', 2)}"
                if run and "rps" in run
                else "-"
            )
        rows.append(row)
    if not rows:
        return []
    return [
        "## Latency vs concurrency (small JSON): req/s / p50 ms / p99 ms",
        "",
        *_table(["system", "1 connection", "32 connections", "256 connections"], rows),
        "",
    ]


def _ratio_rows(results: JsonDict, prefix: str) -> list[list[str]]:
    rows = []
    for name, per_workload in results["ratios"].items():
        ratios = per_workload.get(MAIN_WORKLOAD)
        if not ratios:
            continue
        title = results["systems"][name]["title"]
        keys = [f"{prefix}vs_{peer}" for peer, _ in PEERS_FOR_RATIOS] + [f"{prefix}vs_gateway"]
        rows.append([title, *(f"{ratios[key]:.2f}x" if ratios.get(key) is not None else "-" for key in keys)])
    return rows


def _ratios_table(results: JsonDict) -> list[str]:
    header = ["system", *(f"vs {label}" for _, label in PEERS_FOR_RATIOS), "vs gateway (no filters)"]
    rows = _ratio_rows(results, "")
    if not rows:
        return []
    return [
        "## Ratios (small JSON, 32 connections)",
        "",
        "Requests/s of each gateway system over the other's:",
        "",
        *_table(header, rows),
        "",
        "CPU cost: the other's CPU seconds per request over the gateway system's (above 1: the gateway needs less",
        "CPU per request). Less sensitive than requests/s to other work on the machine:",
        "",
        *_table(header, _ratio_rows(results, "cpu_")),
        "",
    ]


MICRO_ROWS_SHOWN = 60


def _scalar_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _is_row_list(value: Any) -> bool:
    """A list of flat records (e.g. ``[{"store": "lmdb", "op": "get", "ops_per_s": 1e5}, ...]``)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(row, dict) and not any(isinstance(v, dict | list) for v in row.values())
            for row in value
        )
    )


def _micro_tables(data: Any) -> list[str]:
    """Lists of records as tables (one column per field), every other number as a key/value row."""
    out: list[str] = []
    rest = data
    if isinstance(data, dict):
        rest = {}
        for key, value in data.items():
            if not _is_row_list(value):
                rest[key] = value
                continue
            columns = list(dict.fromkeys(column for row in value for column in row))
            rows = [
                [_scalar_text(row.get(column, "")) for column in columns] for row in value[:MICRO_ROWS_SHOWN]
            ]
            out += [f"`{key}`:", "", *_table(columns, rows), ""]
            if len(value) > MICRO_ROWS_SHOWN:
                out += [
                    f"({len(value) - MICRO_ROWS_SHOWN} more rows in `benchmarks/results/latest.json`)",
                    "",
                ]
    numbers = list(flatten_numbers(rest))
    if numbers:
        rows = [[f"`{path}`", _scalar_text(value)] for path, value in numbers[:MICRO_ROWS_SHOWN]]
        out += [*_table(["key", "value"], rows), ""]
        if len(numbers) > MICRO_ROWS_SHOWN:
            out += [f"({len(numbers) - MICRO_ROWS_SHOWN} more in `benchmarks/results/latest.json`)", ""]
    return out


def _micro_section(results: JsonDict) -> list[str]:
    micro = results.get("micro", {})
    if not micro:
        return []
    out = ["## Micro-benchmarks", ""]
    for name, entry in micro.items():
        if entry.get("status") != "ok":
            out += [f"- `benchmarks/{name}.py`: {entry.get('status')}: {entry.get('reason', '')}", ""]
            continue
        command = entry.get("command", f"python benchmarks/{name}.py --json")
        out += [f"### {name}", "", f"`{command}` ({entry.get('seconds', 0):.0f} s):", ""]
        out += _micro_tables(entry.get("data"))
    return out
