"""The systems measured, and how each one is configured, started and checked.

Every system is a server on 127.0.0.1 on a free port, started through the ``ProcessRegistry`` pinned to the
CPU planned for the server under test. Proxies forward to one shared origin (pinned with the load generator).
A system that cannot run here has a skip reason instead of a start (missing binary, missing ``.wasm``, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bodies import BODIES, SMALL_JSON
from benchmarks.procs import (
    ManagedProcess,
    ProcessRegistry,
    StartError,
    free_port,
    pinned,
    wait_until_answers,
)
from benchmarks.tooling import Tools

START_TIMEOUT_SECONDS = 30.0
GATEWAY_START_TIMEOUT_SECONDS = 60.0
UPSTREAM_KEEPALIVE = 512

# Bundled filters the gateway is measured with, in table order (file stems, '-' and '_' ignored).
BUNDLED_FILTERS = ("auth", "transform", "geo", "ratelimit")
BENCH_API_KEY = "bench-key-0123456789"


@dataclass(frozen=True)
class Workload:
    """One load shape: which body the origin answers and how many connections wrk keeps open."""

    body: str
    connections: int

    @property
    def key(self) -> str:
        return f"{self.body}@{self.connections}"

    @property
    def path(self) -> str:
        return BODIES[self.body][0]

    @property
    def expected_length(self) -> int:
        return len(BODIES[self.body][1])


@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs each role is pinned to (``taskset -c`` lists); all None when the machine has one CPU."""

    server: str | None
    load: str | None
    origin: str | None
    both: str | None
    description: str

    @classmethod
    def for_machine(cls, cpu_count: int, taskset_available: bool) -> CpuPlan:
        if cpu_count < 2 or not taskset_available:
            why = "one CPU" if cpu_count < 2 else "taskset missing"
            return cls(None, None, None, None, f"no pinning ({why}): all processes share the CPUs")
        last = str(cpu_count - 1)
        return cls(
            server=last,
            load="0",
            origin="0",
            both=f"0-{last}",
            description=(
                f"server under test on CPU {last}; wrk and the origin share CPU 0 (so the proxy under test has a "
                f"core of its own, like in measurements.md); multi-worker runs may use CPUs 0-{last}"
            ),
        )


@dataclass
class RunContext:
    repo_root: Path
    work_dir: Path
    tools: Tools
    cpus: CpuPlan
    registry: ProcessRegistry
    origin_port: int | None = None
    use_nginx_origin: bool = True

    @property
    def logs_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def origin_url(self) -> str:
        assert self.origin_port is not None, "origin not started"
        return f"http://127.0.0.1:{self.origin_port}"


@dataclass
class Server:
    """A started system: its process tree is what CPU and memory are accounted on."""

    process: ManagedProcess
    port: int
    request_headers: tuple[tuple[str, str], ...] = ()
    # The one CPU the server is pinned to (None: several or unpinned); other work found there is contention.
    pinned_cpu: int | None = None


@dataclass(frozen=True)
class SystemSpec:
    name: str
    title: str
    kind: str  # "origin" | "peer" | "gateway"
    start: Callable[[RunContext], Server]
    unavailable: Callable[[RunContext], str | None]
    description: str = ""


# --------------------------------------------------------------------------------------------------- origins


def _write_www(www: Path) -> None:
    www.mkdir(parents=True, exist_ok=True)
    for name, (path, body) in BODIES.items():
        if name == "small":
            continue
        target = www / path.lstrip("/")
        if not target.exists() or target.stat().st_size != len(body):
            target.write_bytes(body)


def _nginx_main_block(prefix: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    tmp = prefix / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/json;
    keepalive_requests 10000000;
{temp_paths}
"""


def _start_nginx(
    ctx: RunContext, name: str, server_block: str, cpus: str | None, port: int
) -> ManagedProcess:
    nginx = ctx.tools.path("nginx")
    assert nginx is not None
    prefix = ctx.work_dir / "nginx" / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(_nginx_main_block(prefix) + server_block + "}\n")
    command = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    return ctx.registry.start(name, pinned(command, cpus), ctx.logs_dir / f"{name}.log")


def _nginx_origin_block(ctx: RunContext, port: int) -> str:
    www = ctx.work_dir / "www"
    _write_www(www)
    small = SMALL_JSON.decode().replace("'", "\\'")
    return f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /json {{ return 200 '{small}'; }}
        location / {{ root {www}; open_file_cache max=16; }}
    }}
"""


def start_origin_process(ctx: RunContext, name: str, cpus: str | None) -> tuple[ManagedProcess, int]:
    """nginx answering the three bodies, or the raw-ASGI origin when nginx is missing."""
    port = free_port()
    if ctx.use_nginx_origin and ctx.tools.path("nginx") is not None:
        process = _start_nginx(ctx, name, _nginx_origin_block(ctx, port), cpus, port)
    else:
        command = [sys.executable, "-m", "benchmarks.peers.asgi_origin", "--port", str(port)]
        process = ctx.registry.start(
            name, pinned(command, cpus), ctx.logs_dir / f"{name}.log", cwd=ctx.repo_root, env=_python_env(ctx)
        )
    wait_until_answers(process, port, "/json", timeout=START_TIMEOUT_SECONDS)
    return process, port


def origin_kind(ctx: RunContext) -> str:
    if not ctx.use_nginx_origin:
        return "raw ASGI on uvicorn (--origin asgi)"
    return "nginx (1 worker)" if ctx.tools.path("nginx") else "raw ASGI on uvicorn (fallback: nginx missing)"


def _python_env(ctx: RunContext) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ctx.repo_root), env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------------------------------- peers


def _start_origin_direct(ctx: RunContext) -> Server:
    process, port = start_origin_process(ctx, "origin_direct", ctx.cpus.server)
    return Server(process, port, pinned_cpu=single_cpu(ctx.cpus.server))


def _start_nginx_proxy(ctx: RunContext) -> Server:
    port = free_port()
    block = f"""    upstream origin {{
        server 127.0.0.1:{ctx.origin_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
"""
    process = _start_nginx(ctx, "nginx_proxy", block, ctx.cpus.server, port)
    wait_until_answers(process, port, "/json", timeout=START_TIMEOUT_SECONDS)
    return Server(process, port, pinned_cpu=single_cpu(ctx.cpus.server))


def single_cpu(cpus: str | None) -> int | None:
    return int(cpus) if cpus is not None and cpus.isdigit() else None


def _nginx_unavailable(ctx: RunContext) -> str | None:
    if ctx.tools.path("nginx") is None:
        return f"nginx not available: {ctx.tools.missing_reasons.get('nginx', 'not found')}"
    return None


def _start_node_peer(ctx: RunContext, name: str, extra_args: list[str]) -> Server:
    """``benchmarks/peers/<name>.js PORT ORIGIN_URL *extra_args`` under node, pinned like the gateway."""
    port = free_port()
    node = ctx.tools.path("node")
    assert node is not None and ctx.tools.node_modules is not None
    script = ctx.repo_root / "benchmarks" / "peers" / f"{name}.js"
    env = dict(os.environ)
    env["NODE_PATH"] = str(ctx.tools.node_modules)
    env["NODE_ENV"] = "production"
    process = ctx.registry.start(
        name,
        pinned([node, str(script), str(port), ctx.origin_url, *extra_args], ctx.cpus.server),
        ctx.logs_dir / f"{name}.log",
        env=env,
    )
    wait_until_answers(process, port, "/json", timeout=START_TIMEOUT_SECONDS)
    return Server(process, port, pinned_cpu=single_cpu(ctx.cpus.server))


def _start_express_proxy(ctx: RunContext) -> Server:
    return _start_node_peer(ctx, "express_proxy", [])


def _start_express_edge(ctx: RunContext) -> Server:
    return _start_node_peer(ctx, "express_edge", [SMALL_JSON.decode()])


def _express_unavailable(ctx: RunContext) -> str | None:
    if ctx.tools.node_modules is None or ctx.tools.path("node") is None:
        return f"Express not available: {ctx.tools.missing_reasons.get('express', 'not installed')}"
    return None


def _start_bare_proxy(ctx: RunContext) -> Server:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "benchmarks.peers.bare_proxy",
        "--port",
        str(port),
        "--upstream",
        ctx.origin_url,
    ]
    process = ctx.registry.start(
        "bare_proxy",
        pinned(command, ctx.cpus.server),
        ctx.logs_dir / "bare_proxy.log",
        cwd=ctx.repo_root,
        env=_python_env(ctx),
    )
    wait_until_answers(process, port, "/json", timeout=START_TIMEOUT_SECONDS)
    return Server(process, port, pinned_cpu=single_cpu(ctx.cpus.server))


def _always_available(ctx: RunContext) -> str | None:
    return None


# --------------------------------------------------------------------------------------------------- gateway


@dataclass(frozen=True)
class FilterSetup:
    """One filter on the benchmark route: its module, the JSON configuration, and headers requests need."""

    name: str
    module: Path
    configuration: str
    request_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FilterBench:
    configuration: dict[str, object]
    request_headers: tuple[tuple[str, str], ...] = ()


# Configurations that let every benchmark request through while still doing each filter's work per request.
# The filters' configuration schemas are theirs (issue 4); keep these in step with the filter docs.
BUNDLED_FILTER_BENCH: dict[str, FilterBench] = {
    "auth": FilterBench(
        configuration={
            "api_keys": {
                "header": "x-api-key",
                "keys": [{"name": "bench", "sha256": hashlib.sha256(BENCH_API_KEY.encode()).hexdigest()}],
            }
        },
        request_headers=(("x-api-key", BENCH_API_KEY),),
    ),
    "transform": FilterBench(
        configuration={
            "request": {"headers": {"set": {"x-bench": "1"}, "remove": ["x-unused"]}},
            "response": {"headers": {"set": {"x-transformed": "1"}}},
        }
    ),
    # No geo database is configured: the filter runs its callbacks and finds the loopback client private.
    "geo": FilterBench(configuration={"headers": {"x-geo-country": "country"}}),
    "ratelimit": FilterBench(
        # A limit the benchmark never reaches: every request still runs the GCRA update in shared data.
        configuration={
            "rules": [{"key": ["client_ip"], "limits": [{"requests": 1_000_000_000, "per": "1s"}]}]
        }
    ),
}


# The JS edge function: answers /json itself with the origin's exact body, passes everything else on.
JS_EDGE_SCRIPT = (
    "const BODY = " + json.dumps(SMALL_JSON.decode()) + ";\n"
    "export function onRequest(request) {\n"
    '  if (request.method === "GET" && request.url.endsWith("/json"))\n'
    '    return new Response(BODY, { headers: { "content-type": "application/json" } });\n'
    "}\n"
)


def _normalised_stem(path: Path) -> str:
    return path.stem.replace("-", "").replace("_", "").lower()


def bundled_filter_modules(repo_root: Path) -> dict[str, Path]:
    """Normalised stem -> .wasm file for what ``wasm_gateway/filters/`` holds right now."""
    directory = repo_root / "wasm_gateway" / "filters"
    return {_normalised_stem(path): path for path in sorted(directory.glob("*.wasm"))}


def assemblyscript_module(repo_root: Path) -> Path | None:
    """An AssemblyScript SDK filter from the runtime's test fixtures; prefer one that only touches headers."""
    modules = sorted((repo_root / "tests" / "fixtures" / "assemblyscript" / "build").glob("*.wasm"))
    for module in modules:
        if "header" in module.stem.lower():
            return module
    return modules[0] if modules else None


def _bundled_setup(repo_root: Path, stem: str) -> FilterSetup | None:
    module = bundled_filter_modules(repo_root).get(stem)
    if module is None:
        return None
    bench = BUNDLED_FILTER_BENCH.get(stem, FilterBench(configuration={}))
    return FilterSetup(
        name=stem,
        module=module,
        configuration=json.dumps(bench.configuration, separators=(",", ":")),
        request_headers=bench.request_headers,
    )


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value)


def gateway_config_toml(
    port: int, origin_port: int, workers: int, filters: list[FilterSetup], cache_dir: Path | None = None
) -> str:
    """The generated config: one catch-all route to the origin, the given filters on it, access log off;
    with ``cache_dir``, the response cache on the route (LMDB there; the origin sends no cache headers, so
    ``default_ttl`` makes its answers cacheable)."""
    lines = [
        "# Generated by benchmarks/systems.py for one benchmark run.",
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        f"workers = {workers}",
        "",
        "[upstreams.origin]",
        f'targets = ["127.0.0.1:{origin_port}"]',
        f"keepalive = {UPSTREAM_KEEPALIVE}",
        "",
    ]
    if cache_dir is not None:
        lines += ["[cache]", 'backend = "local"', f"path = {_toml_string(str(cache_dir))}", ""]
    for setup in filters:
        lines += [
            f"[filters.{setup.name}]",
            f"module = {_toml_string(str(setup.module))}",
            f"configuration = {_toml_string(setup.configuration)}",
            "",
        ]
    lines += [
        "[[routes]]",
        'name = "bench"',
        'path_prefix = "/"',
        'upstream = "origin"',
        f"filters = [{', '.join(_toml_string(setup.name) for setup in filters)}]",
        *(["cache = { enabled = true, default_ttl = 3600 }"] if cache_dir is not None else []),
        "",
        "[log]",
        'level = "warning"',
        "access_log = false",
        "",
    ]
    return "\n".join(lines)


def gateway_cli_missing(repo_root: Path) -> str | None:
    package = repo_root / "wasm_gateway"
    missing = [name for name in ("cli.py", "__main__.py") if not (package / name).exists()]
    if missing:
        return f"gateway CLI not present yet (wasm_gateway/{', wasm_gateway/'.join(missing)} missing)"
    return None


@dataclass
class GatewayVariant:
    """How one gateway system is built: which filters (resolved at start) and how many workers."""

    name: str
    workers: int = 1
    filter_stems: tuple[str, ...] = ()
    assemblyscript: bool = False
    js_edge: bool = False
    cache: bool = False
    extra_skip: str | None = None
    setups: list[FilterSetup] = field(default_factory=list)

    def resolve(self, repo_root: Path) -> str | None:
        """Fill ``setups``; return why this variant cannot run, or None."""
        if self.extra_skip:
            return self.extra_skip
        missing_cli = gateway_cli_missing(repo_root)
        if missing_cli:
            return missing_cli
        self.setups = []
        for stem in self.filter_stems:
            setup = _bundled_setup(repo_root, stem)
            if setup is None:
                return f"bundled filter wasm_gateway/filters/{stem}.wasm not built yet"
            self.setups.append(setup)
        if self.assemblyscript:
            module = assemblyscript_module(repo_root)
            if module is None:
                return (
                    "no AssemblyScript filter in tests/fixtures/assemblyscript/build/*.wasm (not built yet)"
                )
            self.setups.append(FilterSetup(name="assemblyscript", module=module, configuration=""))
        if self.js_edge:
            module = bundled_filter_modules(repo_root).get("js")
            if module is None:
                return "bundled filter wasm_gateway/filters/js.wasm not built yet"
            config = json.dumps({"script": JS_EDGE_SCRIPT, "filename": "edge.js"}, separators=(",", ":"))
            self.setups.append(FilterSetup(name="js_edge", module=module, configuration=config))
        return None

    def start(self, ctx: RunContext) -> Server:
        assert ctx.origin_port is not None
        port = free_port()
        config_dir = ctx.work_dir / "gateway"
        config_dir.mkdir(parents=True, exist_ok=True)
        config_path = config_dir / f"{self.name}.toml"
        cache_dir = config_dir / f"{self.name}-cache" if self.cache else None
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)  # cold at every start: its first request fills it
        config_path.write_text(
            gateway_config_toml(port, ctx.origin_port, self.workers, self.setups, cache_dir)
        )
        cpus = ctx.cpus.server if self.workers == 1 else ctx.cpus.both
        command = [sys.executable, "-m", "wasm_gateway", "serve", "--config", str(config_path)]
        process = ctx.registry.start(
            self.name,
            pinned(command, cpus),
            ctx.logs_dir / f"{self.name}.log",
            cwd=ctx.repo_root,
            env=_python_env(ctx),
        )
        headers = tuple(header for setup in self.setups for header in setup.request_headers)
        try:
            wait_until_answers(process, port, "/json", headers, timeout=GATEWAY_START_TIMEOUT_SECONDS)
        except StartError as exc:
            raise StartError(f"{exc}\n(config: {config_path})") from exc
        return Server(process, port, headers, pinned_cpu=single_cpu(cpus))


def gateway_spec(variant: GatewayVariant, title: str, description: str) -> SystemSpec:
    return SystemSpec(
        name=variant.name,
        title=title,
        kind="gateway",
        start=variant.start,
        unavailable=lambda ctx: variant.resolve(ctx.repo_root),
        description=description,
    )


def all_systems() -> list[SystemSpec]:
    """Every system, in table order."""
    systems = [
        SystemSpec(
            "origin", "origin direct", "origin", _start_origin_direct, _always_available, "the origin alone"
        ),
        SystemSpec(
            "nginx_proxy",
            "nginx reverse proxy",
            "peer",
            _start_nginx_proxy,
            _nginx_unavailable,
            "nginx, 1 worker, upstream keepalive",
        ),
        SystemSpec(
            "express_proxy",
            "Express + http-proxy-middleware",
            "peer",
            _start_express_proxy,
            _express_unavailable,
            "Express 5, http-proxy-middleware 3, keep-alive agent",
        ),
        SystemSpec(
            "bare_proxy",
            "bare aiohttp proxy (Python floor)",
            "peer",
            _start_bare_proxy,
            _always_available,
            "raw ASGI + aiohttp ClientSession on uvicorn (uvloop, httptools)",
        ),
        gateway_spec(GatewayVariant("gateway"), "gateway, no filters", "wasm-gateway serve, 1 worker"),
    ]
    for stem in BUNDLED_FILTERS:
        systems.append(
            gateway_spec(
                GatewayVariant(f"gateway_{stem}", filter_stems=(stem,)),
                f"gateway + {stem}",
                f"bundled {stem} filter alone",
            )
        )
    systems += [
        gateway_spec(
            GatewayVariant("gateway_all_filters", filter_stems=BUNDLED_FILTERS),
            "gateway + all four filters",
            "auth, transform, geo, ratelimit on one route",
        ),
        gateway_spec(
            GatewayVariant("gateway_assemblyscript", assemblyscript=True),
            "gateway + AssemblyScript filter",
            "a filter built with @solo-io/proxy-runtime",
        ),
        SystemSpec(
            "express_edge",
            "Express answering the JSON itself",
            "peer",
            _start_express_edge,
            _express_unavailable,
            "Express 5 answering /json from a route (other paths proxied): the peer of gateway_js_edge",
        ),
        gateway_spec(
            GatewayVariant("gateway_js_edge", js_edge=True),
            "gateway + JS edge function",
            "the bundled js filter answering /json itself (QuickJS); other paths go to the origin",
        ),
        gateway_spec(
            GatewayVariant("gateway_cache_hit", cache=True),
            "gateway, cache hit",
            "answers from the response cache (local LMDB; filled by the pre-load check)",
        ),
        gateway_spec(
            GatewayVariant("gateway_2_workers", workers=2),
            "gateway, no filters, 2 workers",
            "scaling: same config, --workers 2 (unpinned, shares CPUs with wrk and origin)",
        ),
    ]
    return systems
