"""One command that measures the gateway side by side with its peers on this machine.

    python -m benchmarks [--quick] [--only SYSTEM ...]
    python benchmarks/run.py [--quick] [--only SYSTEM ...]

Installs or finds nginx and wrk (Debian) and Express (npm), starts one origin, then starts each system in turn,
checks it answers every body correctly, loads it with wrk (warm-up, then repetitions), and writes
``benchmarks/results/latest.json`` and ``BENCHMARKS.md``. Every process it starts is stopped at the end,
also on Ctrl-C and errors. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import fnmatch
import http.client
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python benchmarks/run.py): make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.load import LoadGenerator, LoadSpec, PythonLoadGenerator, Wrk
from benchmarks.procs import (
    BenchmarkError,
    ProcessRegistry,
    cpu_busy_seconds,
    http_get,
    raise_on_termination_signals,
)
from benchmarks.report import aggregate, compute_ratios, render_markdown, target_checks, targets_json
from benchmarks.systems import (
    CpuPlan,
    RunContext,
    Server,
    SystemSpec,
    Workload,
    all_systems,
    origin_kind,
    start_origin_process,
)
from benchmarks.tooling import (
    Tools,
    background_cpu_percent,
    describe_machine,
    ensure_debian_binaries,
    ensure_npm_packages,
    find_binary,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Micro-benchmark scripts written alongside the harness, run as `python benchmarks/<name>.py --json`: these
# two first, then any other benchmarks/micro_*.py found.
NAMED_MICRO_STEPS = ("micro_runtime", "micro_upstream")
MIB = 1024 * 1024
# The micro steps' share of the quick mode's two minutes, used up in order; a step still running when it is
# gone is stopped and recorded, and the steps after it are skipped.
QUICK_MICRO_BUDGET_S = 30
QUIET_CPU_PERCENT = 15.0
# A repetition during which other work took more than this share of the server's CPU is run again.
CONTENTION_RETRY_SHARE = 0.10
QUIET_POLL_SECONDS = 3.0


@dataclass(frozen=True)
class Settings:
    quick: bool
    duration_s: int
    warmup_s: int
    repetitions: int
    retries: int
    micro_timeout_s: int


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def workloads_for(system: SystemSpec, quick: bool) -> list[Workload]:
    """The load shapes each system gets: every system the small JSON at 32 connections; the body sizes and
    the concurrency sweep on the systems whose comparison matters most (all peers too in full mode)."""
    main = Workload("small", 32)
    sweep = [Workload("64k", 32), Workload("1m", 32), Workload("small", 1), Workload("small", 256)]
    if system.name == "gateway" or (system.name == "bare_proxy" and not quick):
        return [main, *sweep]
    if system.name == "bare_proxy":
        return [main, *sweep[:2]]  # quick: the body sizes, to compare with the gateway's
    if system.kind in ("origin", "peer"):
        return [main] if quick else [main, *sweep]
    if system.name == "gateway_2_workers":
        return [main] if quick else [main, Workload("small", 256)]
    return [main]


def measure_workload(
    server: Server, workload: Workload, loadgen: LoadGenerator, settings: Settings
) -> dict[str, object]:
    answer = http_get(server.port, workload.path, server.request_headers)
    if answer.status != 200 or answer.body_length != workload.expected_length:
        raise BenchmarkError(
            f"GET {workload.path} answered {answer.status} with {answer.body_length} bytes "
            f"(expected 200 with {workload.expected_length})"
        )
    spec = LoadSpec(
        url=f"http://127.0.0.1:{server.port}{workload.path}",
        connections=workload.connections,
        duration_s=settings.duration_s,
        headers=server.request_headers,
    )
    if settings.warmup_s > 0:
        loadgen.run(LoadSpec(spec.url, spec.connections, settings.warmup_s, spec.headers))
    repetitions: list[dict[str, object]] = []
    retries_left = settings.retries
    while len(repetitions) < settings.repetitions:
        before = server.process.usage()
        cpu_busy_before = cpu_busy_seconds(server.pinned_cpu) if server.pinned_cpu is not None else 0.0
        started = time.monotonic()
        result = loadgen.run(spec)
        wall = time.monotonic() - started
        cpu_busy = (
            cpu_busy_seconds(server.pinned_cpu) - cpu_busy_before if server.pinned_cpu is not None else 0.0
        )
        after = server.process.usage()
        if server.process.exit_code() is not None:
            raise BenchmarkError(f"server exited during the run:\n{server.process.log_tail()}")
        if result.requests == 0:
            raise BenchmarkError(f"no request completed ({result.socket_errors} socket errors)")
        cpu = after.cpu_seconds - before.cpu_seconds
        # Share of the server's own CPU taken by anything else (other users' jobs, hypervisor steal).
        contention = max(0.0, cpu_busy - cpu) / wall if server.pinned_cpu is not None and wall > 0 else None
        if contention is not None and contention > CONTENTION_RETRY_SHARE and retries_left > 0:
            retries_left -= 1
            log(f"  other work took {contention:.0%} of CPU {server.pinned_cpu} during the run: repeating it")
            continue
        repetitions.append(
            {
                "contention": contention,
                "rps": result.rps,
                "p50_ms": result.p50_ms,
                "p90_ms": result.p90_ms,
                "p99_ms": result.p99_ms,
                "max_ms": result.max_ms,
                "requests": result.requests,
                "duration_s": result.duration_s,
                "socket_errors": result.socket_errors,
                "non_2xx": result.non_2xx,
                "cpu_seconds": cpu,
                "cpu_s_per_10k": cpu / result.requests * 10_000,
                "cpu_util": cpu / wall if wall > 0 else 0.0,
                "peak_rss_mb": after.peak_rss_bytes / MIB,
                "processes": after.process_count,
            }
        )
    return {"body": workload.body, "connections": workload.connections, **aggregate(repetitions)}


def run_system(
    system: SystemSpec, ctx: RunContext, loadgen: LoadGenerator, settings: Settings
) -> dict[str, object]:
    entry: dict[str, object] = {"title": system.title, "kind": system.kind, "description": system.description}
    reason = system.unavailable(ctx)
    if reason is not None:
        log(f"skip {system.name}: {reason}")
        return {**entry, "status": "skipped", "reason": reason}
    log(f"start {system.name}")
    try:
        server = system.start(ctx)
    except (BenchmarkError, OSError) as exc:
        log(f"error {system.name}: {exc}")
        return {**entry, "status": "error", "reason": str(exc)}
    runs: dict[str, object] = {}
    try:
        for workload in workloads_for(system, settings.quick):
            try:
                run = measure_workload(server, workload, loadgen, settings)
            except (BenchmarkError, OSError, http.client.HTTPException) as exc:
                log(f"error {system.name} {workload.key}: {exc}")
                runs[workload.key] = {
                    "body": workload.body,
                    "connections": workload.connections,
                    "error": str(exc),
                }
                continue
            runs[workload.key] = run
            rps = run["rps"]
            p99 = run["p99_ms"]
            assert isinstance(rps, dict) and isinstance(p99, dict)
            log(f"  {system.name} {workload.key}: {rps['median']:,.0f} req/s, p99 {p99['median']:.2f} ms")
    finally:
        ctx.registry.stop(server.process)
    measured = any("rps" in run for run in runs.values() if isinstance(run, dict))
    status = "ok" if measured else "error"
    result = {**entry, "status": status, "runs": runs}
    if not measured:
        result["reason"] = "no workload could be measured: " + "; ".join(
            str(run.get("error")) for run in runs.values() if isinstance(run, dict)
        )
    return result


def _parse_json_output(stdout: str) -> object:
    try:
        return json.loads(stdout)
    except ValueError:
        pass
    # Tolerate log lines around the report: take the last line that is a JSON object.
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("no JSON object on stdout")


def micro_steps() -> list[str]:
    found = sorted(path.stem for path in (REPO_ROOT / "benchmarks").glob("micro_*.py"))
    return [*NAMED_MICRO_STEPS, *(name for name in found if name not in NAMED_MICRO_STEPS)]


def run_micro_step(name: str, settings: Settings, timeout_s: float) -> dict[str, object]:
    script = REPO_ROOT / "benchmarks" / f"{name}.py"
    if not script.exists():
        return {"status": "skipped", "reason": f"benchmarks/{name}.py not present yet"}
    if timeout_s < 1:
        return {
            "status": "skipped",
            "reason": f"quick mode's {QUICK_MICRO_BUDGET_S} s for micro steps used up",
        }
    command = [sys.executable, str(script), "--json"]
    if settings.quick and '"--quick"' in script.read_text(errors="replace"):
        command.append("--quick")  # only where the script declares it: nothing else is agreed with its author
    log(f"run benchmarks/{name}.py {' '.join(command[2:])}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if settings.quick:
        env["BENCH_QUICK"] = "1"
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        budget = (
            f" (what was left of quick mode's {QUICK_MICRO_BUDGET_S} s for micro steps)"
            if settings.quick
            else ""
        )
        return {"status": "error", "reason": f"did not finish within {timeout_s:.0f} s{budget}"}
    seconds = time.monotonic() - started
    if done.returncode != 0:
        tail = " / ".join(line.strip() for line in done.stderr.strip().splitlines()[-3:])
        return {"status": "error", "reason": f"exit code {done.returncode}: {tail}", "seconds": seconds}
    try:
        data = _parse_json_output(done.stdout)
    except ValueError as exc:
        return {"status": "error", "reason": f"{exc}: {done.stdout.strip()[-200:]}", "seconds": seconds}
    return {
        "status": "ok",
        "data": data,
        "seconds": seconds,
        "command": " ".join(["python", f"benchmarks/{name}.py", *command[2:]]),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure wasm-gateway side by side with nginx, Express and a bare Python proxy.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer workloads, 1 repetition, short runs (< 2 min)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SYSTEM",
        help="systems (and micro steps) to run; comma lists and glob patterns allowed, e.g. 'gateway*'",
    )
    parser.add_argument("--list", action="store_true", help="list the systems and exit")
    parser.add_argument("--duration", type=int, help="seconds per measured repetition (default 8, quick 2)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per workload (default 2, quick 1)")
    parser.add_argument("--reps", type=int, help="repetitions per workload (default 3, quick 1)")
    parser.add_argument(
        "--retries",
        type=int,
        help="repetitions re-run per workload when other work takes the server's CPU (default 3, quick 1)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (auto: wrk if it can be had)",
    )
    parser.add_argument(
        "--origin",
        choices=("auto", "nginx", "asgi"),
        default="auto",
        help="origin server (auto: nginx if it can be had, else the raw-ASGI origin)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never apt-get/npm install; skip what is missing"
    )
    parser.add_argument(
        "--wait-quiet",
        type=int,
        default=0,
        metavar="S",
        help=f"wait up to S seconds for other load to drop below {QUIET_CPU_PERCENT:.0f}%% CPU before starting",
    )
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "latest.json")
    parser.add_argument("--markdown", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "benchmarks" / ".work")
    args = parser.parse_args(argv)
    if args.retries is not None and args.retries < 0:
        parser.error("--retries must be >= 0")
    for name in ("duration", "warmup", "reps"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name != "warmup")):
            parser.error(f"--{name} must be {'>= 0' if name == 'warmup' else '>= 1'}")
    return args


def selected(name: str, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def run(args: argparse.Namespace, registry: ProcessRegistry, command: str) -> int:
    started = time.monotonic()
    patterns = [item.strip() for arg in args.only or [] for item in arg.split(",") if item.strip()] or None
    systems = [system for system in all_systems() if selected(system.name, patterns)]
    micro = [name for name in micro_steps() if selected(name, patterns)]
    if args.list:
        for system in all_systems():
            print(f"{system.name:24} {system.title}: {system.description}")
        for name in micro_steps():
            print(f"{name:24} python benchmarks/{name}.py --json")
        return 0
    if not systems and not micro:
        log(f"--only {' '.join(args.only)} selects nothing (see --list)")
        return 2
    settings = Settings(
        quick=args.quick,
        duration_s=args.duration or (2 if args.quick else 8),
        warmup_s=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        repetitions=args.reps or (1 if args.quick else 3),
        retries=args.retries if args.retries is not None else (1 if args.quick else 3),
        micro_timeout_s=QUICK_MICRO_BUDGET_S if args.quick else 600,
    )
    work_dir: Path = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)

    tools = Tools()
    allow_install = not args.no_install
    needed = ["nginx"] + (["wrk"] if args.loadgen != "python" else [])
    if systems:
        ensure_debian_binaries(needed, tools, log, allow_install)
    if any(system.name in ("express_proxy", "express_edge") for system in systems):
        ensure_npm_packages(work_dir, tools, log, allow_install)
    for name, reason in tools.missing_reasons.items():
        log(f"{name} unavailable: {reason}")
    machine = describe_machine(tools, REPO_ROOT)
    background_before = background_cpu_percent()
    wait_started = time.monotonic()
    quiet_deadline = wait_started + args.wait_quiet
    while (
        background_before is not None
        and background_before > QUIET_CPU_PERCENT
        and time.monotonic() < quiet_deadline
    ):
        log(f"machine busy ({background_before:.0f}% CPU used by others): waiting for it to quiet down")
        time.sleep(QUIET_POLL_SECONDS)
        background_before = background_cpu_percent(5.0)
    waited_s = time.monotonic() - wait_started
    started += waited_s  # the elapsed time reported is the run's own
    cpus = CpuPlan.for_machine(os.cpu_count() or 1, find_binary("taskset") is not None)
    wrk = tools.path("wrk")
    loadgen: LoadGenerator
    if wrk is not None and args.loadgen != "python":
        versions = machine["versions"]
        assert isinstance(versions, dict)
        loadgen = Wrk(wrk, work_dir, cpus.load, versions.get("wrk"))
    elif args.loadgen == "wrk":
        log(f"wrk required by --loadgen wrk but unavailable: {tools.missing_reasons.get('wrk')}")
        return 2
    else:
        loadgen = PythonLoadGenerator(REPO_ROOT, cpus.load)
    if args.origin == "nginx" and tools.path("nginx") is None:
        log(f"nginx required by --origin nginx but unavailable: {tools.missing_reasons.get('nginx')}")
        return 2
    ctx = RunContext(
        repo_root=REPO_ROOT,
        work_dir=work_dir,
        tools=tools,
        cpus=cpus,
        registry=registry,
        use_nginx_origin=args.origin != "asgi",
    )

    results: dict[str, object] = {}
    system_results: dict[str, object] = {}
    if systems:
        log(f"load: {loadgen.name}; {cpus.description}")
        origin_process, ctx.origin_port = start_origin_process(ctx, "origin_shared", cpus.origin)
        try:
            for system in systems:
                system_results[system.name] = run_system(system, ctx, loadgen, settings)
        finally:
            registry.stop(origin_process)
    background_after = background_cpu_percent() if systems else None
    micro_results: dict[str, dict[str, object]] = {}
    micro_deadline = time.monotonic() + settings.micro_timeout_s
    for name in micro:
        # Quick mode: one budget shared by all steps. Full mode: the same limit for each step.
        timeout_s = micro_deadline - time.monotonic() if settings.quick else float(settings.micro_timeout_s)
        entry = run_micro_step(name, settings, timeout_s)
        micro_results[name] = entry
        if entry["status"] != "ok":
            log(f"{name}: {entry['status']}: {entry.get('reason')}")

    results = {
        "schema": 1,
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "mode": "quick" if settings.quick else "full",
        "elapsed_s": time.monotonic() - started,
        "waited_for_quiet_s": waited_s,
        "settings": {
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "retries_when_disturbed": settings.retries,
            "repetitions": settings.repetitions,
            "load_generator": loadgen.name + (" (1 thread)" if isinstance(loadgen, Wrk) else ""),
            "pinning": cpus.description,
        },
        "machine": machine,
        "background_cpu_percent": {"before": background_before, "after": background_after},
        "origin": origin_kind(ctx) if systems else "not started",
        "tools_missing": tools.missing_reasons,
        "systems": system_results,
        "micro": micro_results,
    }
    results["ratios"] = compute_ratios(results)
    results["targets"] = targets_json(target_checks(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(markdown)
    log(f"wrote {args.json} and {args.markdown} in {results['elapsed_s']:.0f} s")
    failed = [
        name
        for name, entry in system_results.items()
        if isinstance(entry, dict) and entry["status"] == "error"
    ]
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    arguments = sys.argv[1:] if argv is None else argv
    args = parse_args(arguments)
    command = " ".join([prog, *(shlex.quote(arg) for arg in arguments)])
    raise_on_termination_signals()
    registry = ProcessRegistry()
    try:
        return run(args, registry, command)
    except KeyboardInterrupt:
        log("interrupted: stopping every server started")
        return 130
    except (BenchmarkError, OSError) as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        registry.stop_all()


if __name__ == "__main__":
    raise SystemExit(main(prog="python benchmarks/run.py"))
