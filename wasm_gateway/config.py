"""Configuration: one TOML file -> typed, validated, immutable objects.

``load_config(path)`` reads the file, interpolates ``${ENV_VAR}`` (and ``${ENV_VAR:-default}``) in strings,
validates every section and raises one :class:`ConfigError` listing every problem, each naming the file, the key
path, the bad value and what is expected::

    gateway.toml: routes[2].upstream: unknown upstream "api2" (known: api, static)

Nothing here opens sockets or loads Wasm; ``app.py`` builds the runtime from these objects.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import orjson

from .edge.config import MAX_KEY_BYTES_LIMIT, KVNamespaceConfig, SqlDatabaseConfig
from .exceptions import ConfigError
from .geo import BUILTIN_COUNTRY, GeoConfig
from .state.config import StateConfig
from .upstream.connection import Target

__all__ = [
    "CacheConfig",
    "CachePurgeConfig",
    "FilterConfig",
    "GatewayConfig",
    "LogConfig",
    "MetricsConfig",
    "RouteCacheConfig",
    "RouteConfig",
    "ServerConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]

APP_TARGET = "app"
"""Route target meaning "the wrapped ASGI app" (middleware mode, or the built-in demo origin)."""

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


@dataclass(frozen=True)
class TimeoutsConfig:
    header_read: float = 10.0
    body_read: float = 60.0
    upstream_connect: float = 5.0
    upstream_read: float = 60.0
    idle: float = 5.0
    graceful_shutdown: float = 30.0
    drain_delay: float = 0.0
    """On SIGTERM, /readyz answers 503 at once while the listener keeps serving this long (so load balancers
    stop sending), then in-flight requests get ``graceful_shutdown`` to finish."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_concurrent_requests: int = 1024
    max_request_body_bytes: int = 10 * 1024 * 1024
    max_header_bytes: int = 60 * 1024
    max_header_count: int = 100
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    health_path: str = "/healthz"
    ready_path: str = "/readyz"
    request_id_header: str = "x-request-id"
    via: str = "wasm-gateway"
    unmatched: Literal["404", "app"] | None = None
    """What a request matching no route gets: "404" (JSON), or "app" (the wrapped ASGI app). Default: the app
    when one is wrapped (middleware mode), else 404."""
    pid_file: Path | None = None
    """Written by ``wasm-gateway serve`` (the process that takes SIGHUP), read by ``wasm-gateway reload``."""
    watch_config: bool = False
    """Reload when the config file or a filter module changes (polled every ``watch_interval`` seconds)."""
    watch_interval: float = 2.0


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    targets: tuple[Target, ...]
    keepalive: int = 64
    retries: int = 1
    host_header: Literal["preserve", "rewrite"] = "preserve"
    eject_after_failures: int = 3
    eject_seconds: float = 10.0
    connect_timeout: float | None = None
    read_timeout: float | None = None


@dataclass(frozen=True)
class FilterPoolConfig:
    min: int = 1
    max: int = 256
    """An instance serves one request from its headers to its end, so ``max`` bounds the requests a filter can
    have in flight (more wait up to ``borrow_timeout``); instances cost ~30 KB plus the module's memory."""
    idle_seconds: float = 60.0
    recycle_after: int = 10_000
    borrow_timeout: float = 1.0


@dataclass(frozen=True)
class FilterConfig:
    name: str
    module: Path
    configuration: bytes = b""
    root_id: str = ""
    vm_configuration: bytes = b""
    failure_policy: Literal["fail_closed", "fail_open"] = "fail_closed"
    pool: FilterPoolConfig = field(default_factory=FilterPoolConfig)
    memory_limit_bytes: int = 64 * 1024 * 1024
    callback_timeout_ms: int = 100
    fuel: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    allowed_dirs: tuple[Path, ...] = ()
    log_level: str = "info"
    max_body_bytes: int = 1024 * 1024
    sources: tuple[Path, ...] = ()
    """Files the configuration was read from (the JS filter's script): watched and digested like the module."""

    kv: tuple[str, ...] = ()  # KV namespaces ([kv.<name>]) the filter may use
    sql: tuple[str, ...] = ()  # SQLite databases ([sql.<name>]) the filter may query


@dataclass(frozen=True)
class RouteCacheConfig:
    """A route's response cache (``cache = { enabled = true, ... }``); see docs/cache.md."""

    enabled: bool = False
    default_ttl: float | None = None
    """Freshness for heuristically cacheable responses that carry none (None: only what the origin says)."""
    heuristic: bool = True
    """RFC 9111 heuristic freshness from Last-Modified (10% of its age, at most a day)."""
    max_object_bytes: int | None = None
    """Larger responses stream through unstored (None: ``[cache].max_object_bytes``)."""
    key_headers: tuple[str, ...] = ()
    """Request headers (as sent upstream, after filters) that key the entry, e.g. a claim set by auth."""
    key_cookie: str | None = None
    """A cookie whose value keys the entry."""
    bypass_headers: tuple[str, ...] = ("cookie",)
    """Requests carrying any of these headers neither read nor fill the cache (default: Cookie, unless
    key_cookie is set)."""
    bypass_paths: tuple[str, ...] = ()
    """Path prefixes never cached on this route."""
    store_set_cookie: bool = False
    """Store responses carrying Set-Cookie without the cookie (default: such responses are not stored)."""


@dataclass(frozen=True)
class RouteConfig:
    name: str
    upstream: str | None
    """Upstream name, or None when the target is the wrapped ASGI app."""
    hosts: tuple[str, ...] = ()
    path: str | None = None
    path_prefix: str | None = None
    path_pattern: str | None = None
    methods: tuple[str, ...] = ()
    filters: tuple[str, ...] = ()
    require_headers: tuple[str, ...] = ()
    """Header names that must be present (401 otherwise): a minimal guard until a filter does real auth."""
    keep_encoded_slashes: bool = False
    strip_prefix: bool = False
    cache: RouteCacheConfig = field(default_factory=RouteCacheConfig)

    @property
    def target_is_app(self) -> bool:
        return self.upstream is None


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    path: str = "/metrics"
    port: int | None = None
    """Serve metrics on a separate port (on server.host) instead of on the main listener."""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: Literal["json", "logfmt"] = "json"
    path: str | None = None
    access_log: bool = True


@dataclass(frozen=True)
class CachePurgeConfig:
    enabled: bool = False
    path: str = "/_gateway/cache/purge"
    """Reserved path on the main listener, like health_path (POST with a bearer token)."""
    token: str | None = None
    """Required when enabled (use ${ENV_VAR}); compared in constant time."""


@dataclass(frozen=True)
class CacheConfig:
    """Where cached responses live and how much room they get; routes opt in with ``cache.enabled``."""

    backend: Literal["memory", "local", "redis"] = "local"
    path: Path | None = None
    """local: LMDB directory (None: ``cache`` next to the default state directory)."""
    redis_url: str | None = None
    """redis: the server (None: ``[state].redis_url``)."""
    key_prefix: str = "wasm-gateway:cache:"
    timeout_ms: int = 250
    max_bytes: int = 256 * 1024 * 1024
    max_object_bytes: int = 8 * 1024 * 1024
    chunk_bytes: int = 256 * 1024
    max_ttl_seconds: float = 86_400.0
    keep_stale_seconds: float = 600.0
    purge: CachePurgeConfig = field(default_factory=CachePurgeConfig)

    @property
    def directory(self) -> Path:
        from .state.config import default_state_dir

        return self.path if self.path is not None else default_state_dir().parent / "cache"


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    filters: Mapping[str, FilterConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<config>"
    """Where the config came from (file path), for messages."""
    cache_dir: Path | None = None
    """Directory for precompiled Wasm modules (None: a per-user cache directory)."""
    geo: GeoConfig = field(default_factory=GeoConfig)
    """Geolocation databases behind the ``geo.*`` properties (off unless a database is set)."""
    state: StateConfig = field(default_factory=StateConfig)
    """Where filters' shared data and queues live (embedded LMDB by default; Redis across nodes)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The response cache's store (used only when a route enables caching)."""
    kv: Mapping[str, KVNamespaceConfig] = field(default_factory=dict)
    """Edge-data KV namespaces (on the state backend), granted per filter (docs/edge-data.md)."""
    sql: Mapping[str, SqlDatabaseConfig] = field(default_factory=dict)
    """Edge-data read-only SQLite databases, granted per filter."""


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a TOML config file; raise :class:`ConfigError` naming every problem."""
    p = Path(path)
    label = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: file not found (pass an existing TOML file with --config)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read: {exc}") from None
    return parse_config(text, source=label, base_dir=p.parent, env=env)


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Validate TOML text; relative module paths resolve against ``base_dir`` (default: cwd)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    v = _Validator(source, base_dir or Path.cwd(), os.environ if env is None else env)
    config = v.gateway(raw)
    if v.errors:
        if len(v.errors) == 1:
            raise ConfigError(v.errors[0], v.errors)
        raise ConfigError(f"{len(v.errors)} errors:\n" + "\n".join(v.errors), v.errors)
    return config


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
T = TypeVar("T")
_NO_STRINGS: tuple[str, ...] = ()


def _filters_dir() -> Path:
    from .filters import FILTERS_DIR

    return FILTERS_DIR


class _Invalid(Exception):
    """Internal: a value failed validation; the message is already recorded."""


class _Validator:
    def __init__(self, source: str, base_dir: Path, env: Mapping[str, str]) -> None:
        self.source = source
        self.base_dir = base_dir
        self.env = env
        self.errors: list[str] = []
        self.declared: dict[str, set[str]] = {"upstreams": set(), "filters": set()}

    # -- primitives -------------------------------------------------------------------------------------------

    def error(self, key: str, message: str) -> _Invalid:
        self.errors.append(f"{self.source}: {key}: {message}")
        return _Invalid()

    def interpolate(self, key: str, value: str) -> str:
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            raise self.error(
                key, f"environment variable {name} is not set (set it, or write ${{{name}:-default}})"
            )

        return _ENV_RE.sub(repl, value) if "${" in value else value

    def table(self, key: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_show(value)}")
        return value

    def unknown_keys(self, key: str, table: Mapping[str, object], known: set[str]) -> None:
        for k in table:
            if k not in known:
                hint = ", ".join(sorted(known))
                self.error(f"{key}.{k}" if key else k, f"unknown key (known: {hint})")

    def get(
        self,
        table: Mapping[str, object],
        key: str,
        name: str,
        check: Callable[[str, object], T],
        default: T,
    ) -> T:
        if name not in table:
            return default
        path = f"{key}.{name}" if key else name
        try:
            return check(path, table[name])
        except _Invalid:
            return default

    def string(self, key: str, value: object) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_show(value)}")
        return self.interpolate(key, value)

    def boolean(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_show(value)}")
        return value

    def int_range(self, lo: int, hi: int | None = None) -> Callable[[str, object], int]:
        def check(key: str, value: object) -> int:
            if isinstance(value, str):
                value = self.interpolate(key, value)
                try:
                    value = int(str(value))
                except ValueError:
                    raise self.error(key, f"expected an integer, got {_show(value)}") from None
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(key, f"expected an integer, got {_show(value)}")
            if value < lo or (hi is not None and value > hi):
                bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
                raise self.error(key, f"{value} is out of range (expected an integer {bound})")
            return value

        return check

    def seconds(self, key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number of seconds, got {_show(value)}")
        if value <= 0:
            raise self.error(key, f"{value} is out of range (expected a number of seconds > 0)")
        return float(value)

    def seconds_or_zero(self, key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number of seconds, got {_show(value)}")
        if value < 0:
            raise self.error(key, f"{value} is out of range (expected a number of seconds >= 0)")
        return float(value)

    def choice(self, *options: str) -> Callable[[str, object], Any]:
        # Any: the caller's field is a Literal of exactly these options.
        def check(key: str, value: object) -> Any:
            s = self.string(key, value)
            if s not in options:
                raise self.error(key, f"{_show(value)} is not one of: {', '.join(options)}")
            return s

        return check

    def string_list(self, key: str, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {_show(value)}")
        out = []
        for i, item in enumerate(value):
            with contextlib.suppress(_Invalid):
                out.append(self.string(f"{key}[{i}]", item))
        return tuple(out)

    def url_path(self, key: str, value: object) -> str:
        s = self.string(key, value)
        if not s.startswith("/"):
            raise self.error(key, f"{_show(s)} must start with '/'")
        if (
            any(c in s for c in "?#%\\")
            or "//" in s
            or "/./" in s
            or "/../" in s
            or s.endswith(("/.", "/.."))
        ):
            raise self.error(
                key,
                f"{_show(s)} must be a canonical path (no '?', '#', '%', '\\', '//', '.' or '..' segments)",
            )
        return s

    # -- sections ---------------------------------------------------------------------------------------------

    def gateway(self, raw: dict[str, Any]) -> GatewayConfig:
        self.unknown_keys(
            "",
            raw,
            {
                "server",
                "upstreams",
                "filters",
                "routes",
                "trusted_proxies",
                "metrics",
                "log",
                "cache_dir",
                "state",
                "geo",
                "cache",
                "kv",
                "sql",
            },
        )
        server = self.server(raw.get("server", {}))
        upstreams = self.upstreams(raw.get("upstreams", {}))
        state = self.state(raw.get("state", {}))
        kv = self.kv_namespaces(raw.get("kv", {}), state)
        sql = self.sql_databases(raw.get("sql", {}))
        # Names of declared tables, valid or not: a table's own errors are reported, references to it are not.
        self.declared = {
            section: set(raw[section]) if isinstance(raw.get(section), dict) else set()
            for section in ("upstreams", "filters", "kv", "sql")
        }
        filters = self.filters(raw.get("filters", {}))
        routes = self.routes(raw.get("routes", []), upstreams, filters)
        trusted = self.trusted_proxies(raw.get("trusted_proxies", []))
        metrics = self.metrics(raw.get("metrics", {}))
        log = self.log(raw.get("log", {}))
        cache_dir = self.get(raw, "", "cache_dir", lambda k, v: self.base_dir / self.string(k, v), None)
        geo = self.geo(raw.get("geo", {}))
        cache = self.cache(raw.get("cache", {}))
        reserved = {server.health_path, server.ready_path}
        if metrics.enabled and metrics.port is None:
            reserved.add(metrics.path)
        if cache.purge.enabled:
            reserved.add(cache.purge.path)
        expected = 2 + (metrics.enabled and metrics.port is None) + cache.purge.enabled
        if len(reserved) < expected:
            self.error(
                "server", "health_path, ready_path, metrics.path and cache.purge.path must be distinct"
            )
        return GatewayConfig(
            server=server,
            upstreams=upstreams,
            filters=filters,
            routes=routes,
            trusted_proxies=trusted,
            metrics=metrics,
            log=log,
            source=self.source,
            cache_dir=cache_dir,
            state=state,
            geo=geo,
            cache=cache,
            kv=kv,
            sql=sql,
        )

    def server(self, raw: object) -> ServerConfig:
        try:
            t = self.table("server", raw)
        except _Invalid:
            return ServerConfig()
        d = ServerConfig()
        self.unknown_keys(
            "server",
            t,
            {
                "host",
                "port",
                "listen",
                "workers",
                "max_concurrent_requests",
                "max_request_body_bytes",
                "max_header_bytes",
                "max_header_count",
                "timeouts",
                "health_path",
                "ready_path",
                "request_id_header",
                "via",
                "unmatched",
                "pid_file",
                "watch_config",
                "watch_interval",
            },
        )
        host, port = d.host, d.port
        if "listen" in t:
            with contextlib.suppress(_Invalid):
                host, port = self.host_port("server.listen", t["listen"])
        host = self.get(t, "server", "host", self.string, host)
        port = self.get(t, "server", "port", self.int_range(0, 65535), port)
        timeouts = self.timeouts(t.get("timeouts", {}))
        header_name = self.get(t, "server", "request_id_header", self.header_name, d.request_id_header)
        return ServerConfig(
            host=host,
            port=port,
            workers=self.get(t, "server", "workers", self.int_range(1, 256), d.workers),
            max_concurrent_requests=self.get(
                t, "server", "max_concurrent_requests", self.int_range(1), d.max_concurrent_requests
            ),
            max_request_body_bytes=self.get(
                t, "server", "max_request_body_bytes", self.int_range(0), d.max_request_body_bytes
            ),
            max_header_bytes=self.get(
                t, "server", "max_header_bytes", self.int_range(1024), d.max_header_bytes
            ),
            max_header_count=self.get(t, "server", "max_header_count", self.int_range(1), d.max_header_count),
            timeouts=timeouts,
            health_path=self.get(t, "server", "health_path", self.url_path, d.health_path),
            ready_path=self.get(t, "server", "ready_path", self.url_path, d.ready_path),
            request_id_header=header_name.lower(),
            via=self.get(t, "server", "via", self.string, d.via),
            unmatched=self.get(t, "server", "unmatched", self.choice("404", "app"), None),
            pid_file=self.get(t, "server", "pid_file", lambda k, v: self.base_dir / self.string(k, v), None),
            watch_config=self.get(t, "server", "watch_config", self.boolean, d.watch_config),
            watch_interval=self.get(t, "server", "watch_interval", self.seconds, d.watch_interval),
        )

    def header_name(self, key: str, value: object) -> str:
        s = self.string(key, value)
        if not _HEADER_NAME_RE.match(s):
            raise self.error(key, f"{_show(s)} is not a valid header name")
        return s

    def timeouts(self, raw: object) -> TimeoutsConfig:
        try:
            t = self.table("server.timeouts", raw)
        except _Invalid:
            return TimeoutsConfig()
        d = TimeoutsConfig()
        names = (
            "header_read",
            "body_read",
            "upstream_connect",
            "upstream_read",
            "idle",
            "graceful_shutdown",
            "drain_delay",
        )
        self.unknown_keys("server.timeouts", t, set(names))
        values = {
            n: self.get(
                t,
                "server.timeouts",
                n,
                self.seconds_or_zero if n == "drain_delay" else self.seconds,
                getattr(d, n),
            )
            for n in names
        }
        return TimeoutsConfig(**values)

    def host_port(self, key: str, value: object) -> tuple[str, int]:
        s = self.string(key, value)
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:/\s\[\]]+):(\d{1,5})", s)
        if not m:
            raise self.error(key, f'{_show(s)} is not host:port (e.g. "127.0.0.1:8080")')
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if port > 65535:
            raise self.error(key, f"port {port} in {_show(s)} is out of range (0-65535)")
        return host, port

    def target(self, key: str, value: object) -> Target:
        s = self.string(key, value)
        scheme = "http"
        m = re.match(r"^([a-z][a-z0-9+.-]*)://", s)
        if m:
            scheme = m.group(1)
            if scheme not in ("http", "https"):
                raise self.error(key, f"{_show(s)}: scheme {scheme!r} is not supported (use http or https)")
            s = s[m.end() :].rstrip("/")
            if "/" in s:
                raise self.error(key, f"{_show(value)}: a target is host:port only, without a path")
        if ":" not in s.replace("[", "").split("]")[-1] and not s.startswith("["):
            s = f"{s}:{443 if scheme == 'https' else 80}"
        host, port = self.host_port(key, s)
        if port == 0:
            raise self.error(key, f"{_show(value)}: port 0 is not a valid target port")
        return Target(host=host, port=port, scheme=scheme)

    def named_tables(self, key: str, raw: object) -> list[tuple[str, str, dict[str, Any]]]:
        try:
            t = self.table(key, raw)
        except _Invalid:
            return []
        out = []
        for name, value in t.items():
            path = f"{key}.{name}"
            if not _NAME_RE.match(name):
                self.error(path, f"name {name!r} must be 1-64 letters, digits, '_', '.', '-'")
                continue
            with contextlib.suppress(_Invalid):
                out.append((name, path, self.table(path, value)))
        return out

    def upstreams(self, raw: object) -> dict[str, UpstreamConfig]:
        out: dict[str, UpstreamConfig] = {}
        for name, key, t in self.named_tables("upstreams", raw):
            self.unknown_keys(
                key,
                t,
                {
                    "targets",
                    "keepalive",
                    "retries",
                    "host_header",
                    "eject_after_failures",
                    "eject_seconds",
                    "connect_timeout",
                    "read_timeout",
                },
            )
            if "targets" not in t:
                self.error(key, 'missing "targets" (e.g. targets = ["127.0.0.1:9000"])')
                continue
            raw_targets = t["targets"]
            if isinstance(raw_targets, str):
                raw_targets = [raw_targets]
            if not isinstance(raw_targets, list) or not raw_targets:
                self.error(
                    f"{key}.targets", f'expected a non-empty list of "host:port", got {_show(raw_targets)}'
                )
                continue
            targets = []
            for i, item in enumerate(raw_targets):
                with contextlib.suppress(_Invalid):
                    targets.append(self.target(f"{key}.targets[{i}]", item))
            d = UpstreamConfig(name=name, targets=())
            out[name] = UpstreamConfig(
                name=name,
                targets=tuple(targets),
                keepalive=self.get(t, key, "keepalive", self.int_range(1, 100_000), d.keepalive),
                retries=self.get(t, key, "retries", self.int_range(0, 10), d.retries),
                host_header=self.get(
                    t, key, "host_header", self.choice("preserve", "rewrite"), d.host_header
                ),
                eject_after_failures=self.get(
                    t, key, "eject_after_failures", self.int_range(1, 1000), d.eject_after_failures
                ),
                eject_seconds=self.get(t, key, "eject_seconds", self.seconds, d.eject_seconds),
                connect_timeout=self.get(t, key, "connect_timeout", self.seconds, None),
                read_timeout=self.get(t, key, "read_timeout", self.seconds, None),
            )
        return out

    def filters(self, raw: object) -> dict[str, FilterConfig]:
        out: dict[str, FilterConfig] = {}
        for name, key, t in self.named_tables("filters", raw):
            self.unknown_keys(
                key,
                t,
                {
                    "module",
                    "configuration",
                    "root_id",
                    "vm_configuration",
                    "failure_policy",
                    "pool",
                    "memory_limit_bytes",
                    "callback_timeout_ms",
                    "fuel",
                    "env",
                    "allowed_dirs",
                    "log_level",
                    "max_body_bytes",
                    "kv",
                    "sql",
                },
            )
            if "module" not in t:
                self.error(key, 'missing "module" (path to a Proxy-Wasm .wasm file)')
                continue
            try:
                module = self.module_path(f"{key}.module", t["module"])
            except _Invalid:
                continue
            d = FilterConfig(name=name, module=module)
            sources: tuple[Path, ...] = ()
            if module.name == "js.wasm" and module.parent == _filters_dir() and "configuration" in t:
                configuration, sources = self.js_configuration(f"{key}.configuration", t["configuration"])
            else:
                configuration = self.get(t, key, "configuration", self.blob, b"")
            out[name] = FilterConfig(
                name=name,
                module=module,
                configuration=configuration,
                root_id=self.get(t, key, "root_id", self.string, ""),
                vm_configuration=self.get(t, key, "vm_configuration", self.blob, b""),
                failure_policy=self.get(
                    t, key, "failure_policy", self.choice("fail_closed", "fail_open"), d.failure_policy
                ),
                pool=self.filter_pool(f"{key}.pool", t.get("pool", {})),
                memory_limit_bytes=self.get(
                    t, key, "memory_limit_bytes", self.int_range(65536, 4 * 1024**3), d.memory_limit_bytes
                ),
                callback_timeout_ms=self.get(
                    t, key, "callback_timeout_ms", self.int_range(1, 60_000), d.callback_timeout_ms
                ),
                fuel=self.get(t, key, "fuel", self.int_range(0), 0),
                env=self.get(t, key, "env", self.string_map, {}),
                allowed_dirs=tuple(
                    self.base_dir / p for p in self.get(t, key, "allowed_dirs", self.string_list, _NO_STRINGS)
                ),
                log_level=self.get(
                    t,
                    key,
                    "log_level",
                    self.choice("trace", "debug", "info", "warn", "error", "critical"),
                    "info",
                ),
                max_body_bytes=self.get(t, key, "max_body_bytes", self.int_range(0), d.max_body_bytes),
                sources=sources,
                kv=self.grants(key, "kv", t),
                sql=self.grants(key, "sql", t),
            )
        return out

    def grants(self, key: str, section: str, t: Mapping[str, object]) -> tuple[str, ...]:
        names = self.get(t, key, section, self.string_list, _NO_STRINGS)
        declared = self.declared.get(section, set())
        for i, name in enumerate(names):
            if name not in declared:
                known = ", ".join(sorted(declared)) or "none declared"
                self.error(
                    f"{key}.{section}[{i}]",
                    f"unknown {section} {_show(name)} (known: {known}; declare [{section}.{name}])",
                )
        return tuple(dict.fromkeys(names))

    def kv_namespaces(self, raw: object, state: StateConfig) -> dict[str, KVNamespaceConfig]:
        out: dict[str, KVNamespaceConfig] = {}
        for name, key, t in self.named_tables("kv", raw):
            d = KVNamespaceConfig(name=name)
            self.unknown_keys(
                key,
                t,
                {
                    "max_keys",
                    "max_key_bytes",
                    "max_value_bytes",
                    "default_ttl_seconds",
                    "max_ttl_seconds",
                    "max_list",
                },
            )
            ns = KVNamespaceConfig(
                name=name,
                max_keys=self.get(t, key, "max_keys", self.int_range(1, 10_000_000), d.max_keys),
                max_key_bytes=self.get(
                    t, key, "max_key_bytes", self.int_range(1, MAX_KEY_BYTES_LIMIT), d.max_key_bytes
                ),
                max_value_bytes=self.get(
                    t, key, "max_value_bytes", self.int_range(1, state.max_value_bytes), d.max_value_bytes
                ),
                default_ttl_seconds=self.get(
                    t, key, "default_ttl_seconds", self.seconds, d.default_ttl_seconds
                ),
                max_ttl_seconds=self.get(t, key, "max_ttl_seconds", self.seconds, d.max_ttl_seconds),
                max_list=self.get(t, key, "max_list", self.int_range(1, 10_000), d.max_list),
            )
            if ns.default_ttl_seconds > ns.max_ttl_seconds:
                self.error(
                    f"{key}.default_ttl_seconds", f"must be at most max_ttl_seconds ({ns.max_ttl_seconds:g})"
                )
            out[name] = ns
        return out

    def sql_databases(self, raw: object) -> dict[str, SqlDatabaseConfig]:
        out: dict[str, SqlDatabaseConfig] = {}
        for name, key, t in self.named_tables("sql", raw):
            self.unknown_keys(key, t, {"path", "max_rows", "max_bytes", "timeout_ms", "statement_cache"})
            if "path" not in t:
                self.error(key, 'missing "path" (the SQLite file, opened read-only)')
                continue
            try:
                path = self.base_dir / self.string(f"{key}.path", t["path"])
            except _Invalid:
                continue
            d = SqlDatabaseConfig(name=name, path=path)
            out[name] = SqlDatabaseConfig(
                name=name,
                path=path,
                max_rows=self.get(t, key, "max_rows", self.int_range(1, 1_000_000), d.max_rows),
                max_bytes=self.get(t, key, "max_bytes", self.int_range(64, 64 * 1024 * 1024), d.max_bytes),
                timeout_ms=self.get(t, key, "timeout_ms", self.int_range(1, 60_000), d.timeout_ms),
                statement_cache=self.get(
                    t, key, "statement_cache", self.int_range(0, 10_000), d.statement_cache
                ),
            )
        return out

    def module_path(self, key: str, value: object) -> Path:
        s = self.string(key, value)
        if s.startswith("builtin:"):
            from .filters import filter_path

            try:
                return filter_path(s.removeprefix("builtin:"))
            except KeyError as exc:
                raise self.error(key, f"{_show(s)}: {exc.args[0]}") from None
        p = Path(s)
        if not p.is_absolute():
            p = self.base_dir / p
        if not p.is_file():
            raise self.error(key, f"module file not found: {p} (path is relative to the config file)")
        return p

    def js_configuration(self, key: str, value: object) -> tuple[bytes, tuple[Path, ...]]:
        """The bundled JS filter's configuration, its script file read here (relative to the config file),
        and the files it was read from."""
        if isinstance(value, str):
            return self.blob(key, value), ()
        try:
            t = self.table(key, value)
        except _Invalid:
            return b"", ()
        self.unknown_keys(
            key,
            t,
            {"script", "source", "env", "buffer_request_body", "buffer_response_body", "fetch_timeout_ms"},
        )
        out: dict[str, object] = {}
        sources: tuple[Path, ...] = ()
        if ("script" in t) == ("source" in t):
            self.error(key, 'give either script = "file.js" (a path) or source = "..." (the code itself)')
            return b"", ()
        if "script" in t:
            try:
                rel = self.string(f"{key}.script", t["script"])
            except _Invalid:
                return b"", ()
            path = Path(rel) if Path(rel).is_absolute() else self.base_dir / rel
            try:
                out["script"] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                self.error(
                    f"{key}.script", f"cannot read {path}: {exc} (path is relative to the config file)"
                )
                return b"", ()
            out["filename"] = path.name
            sources = (path,)
        else:
            source = t["source"]  # not interpolated: ${...} is JavaScript's template syntax
            if not isinstance(source, str):
                self.error(f"{key}.source", f"expected the script as a string, got {_show(source)}")
                return b"", ()
            out["script"] = source
            out["filename"] = "inline.js"
        no_env: dict[str, str] = {}
        out["env"] = self.get(t, key, "env", self.string_map, no_env)
        for flag in ("buffer_request_body", "buffer_response_body"):
            out[flag] = self.get(t, key, flag, self.boolean, False)
        out["fetch_timeout_ms"] = self.get(t, key, "fetch_timeout_ms", self.int_range(1, 600_000), 5000)
        return orjson.dumps(out), sources

    def blob(self, key: str, value: object) -> bytes:
        if isinstance(value, str):
            return self.interpolate(key, value).encode()
        if isinstance(value, dict | list):
            return orjson.dumps(self.interpolate_tree(key, value))
        raise self.error(key, f"expected a string or a table (sent as JSON), got {_show(value)}")

    def interpolate_tree(self, key: str, value: object) -> object:
        if isinstance(value, str):
            return self.interpolate(key, value)
        if isinstance(value, dict):
            return {k: self.interpolate_tree(f"{key}.{k}", v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.interpolate_tree(f"{key}[{i}]", v) for i, v in enumerate(value)]
        return value

    def string_map(self, key: str, value: object) -> dict[str, str]:
        t = self.table(key, value)
        out = {}
        for k, v in t.items():
            with contextlib.suppress(_Invalid):
                out[k] = self.string(f"{key}.{k}", v)
        return out

    def filter_pool(self, key: str, raw: object) -> FilterPoolConfig:
        try:
            t = self.table(key, raw)
        except _Invalid:
            return FilterPoolConfig()
        d = FilterPoolConfig()
        self.unknown_keys(key, t, {"min", "max", "idle_seconds", "recycle_after", "borrow_timeout"})
        pool = FilterPoolConfig(
            min=self.get(t, key, "min", self.int_range(0, 10_000), d.min),
            max=self.get(t, key, "max", self.int_range(1, 10_000), d.max),
            idle_seconds=self.get(t, key, "idle_seconds", self.seconds, d.idle_seconds),
            recycle_after=self.get(t, key, "recycle_after", self.int_range(1), d.recycle_after),
            borrow_timeout=self.get(t, key, "borrow_timeout", self.seconds, d.borrow_timeout),
        )
        if pool.min > pool.max:
            self.error(f"{key}.min", f"{pool.min} is larger than {key}.max = {pool.max}")
        return pool

    def routes(
        self, raw: object, upstreams: Mapping[str, UpstreamConfig], filters: Mapping[str, FilterConfig]
    ) -> tuple[RouteConfig, ...]:
        if not isinstance(raw, list):
            self.error("routes", f"expected an array of tables ([[routes]]), got {_show(raw)}")
            return ()
        out: list[RouteConfig] = []
        names: set[str] = set()
        for i, item in enumerate(raw):
            key = f"routes[{i}]"
            try:
                t = self.table(key, item)
            except _Invalid:
                continue
            self.unknown_keys(
                key,
                t,
                {
                    "name",
                    "host",
                    "hosts",
                    "path",
                    "path_prefix",
                    "path_pattern",
                    "methods",
                    "filters",
                    "upstream",
                    "app",
                    "require_headers",
                    "keep_encoded_slashes",
                    "strip_prefix",
                    "cache",
                },
            )
            try:
                route = self.route(key, i, t, upstreams, filters)
            except _Invalid:
                continue
            if route.name in names:
                self.error(f"{key}.name", f"duplicate route name {route.name!r} (route names must be unique)")
            names.add(route.name)
            out.append(route)
        return tuple(out)

    def route(
        self,
        key: str,
        index: int,
        t: dict[str, Any],
        upstreams: Mapping[str, UpstreamConfig],
        filters: Mapping[str, FilterConfig],
    ) -> RouteConfig:
        name = self.get(t, key, "name", self.string, f"route{index}")
        if not _NAME_RE.match(name):
            self.error(f"{key}.name", f"{name!r} must be 1-64 letters, digits, '_', '.', '-'")
        matchers = [k for k in ("path", "path_prefix", "path_pattern") if k in t]
        if len(matchers) > 1:
            raise self.error(key, f"give one of path, path_prefix, path_pattern (got {', '.join(matchers)})")
        path = self.get(t, key, "path", self.url_path, None)
        prefix = self.get(t, key, "path_prefix", self.url_path, None)
        pattern = self.get(t, key, "path_pattern", self.path_pattern, None)
        if not matchers:
            prefix = "/"
        is_app = self.get(t, key, "app", self.boolean, False)
        upstream: str | None = None
        if "upstream" in t and is_app:
            raise self.error(key, 'give either upstream = "name" or app = true, not both')
        if "upstream" in t:
            upstream = self.get(t, key, "upstream", self.string, None)
            if (
                upstream is not None
                and upstream not in upstreams
                and upstream not in self.declared["upstreams"]
            ):
                known = ", ".join(sorted(upstreams)) or "none defined"
                raise self.error(f"{key}.upstream", f'unknown upstream "{upstream}" (known: {known})')
        elif not is_app:
            raise self.error(key, 'missing target: upstream = "name" (from [upstreams]) or app = true')
        hosts = self.get(t, key, "hosts", self.string_list, _NO_STRINGS)
        if "host" in t:
            hosts = (*hosts, *self.get(t, key, "host", self.string_list, _NO_STRINGS))
        hosts = tuple(h.lower() for h in hosts)
        methods = self.get(t, key, "methods", self.string_list, _NO_STRINGS)
        for j, m in enumerate(methods):
            if m.upper() not in HTTP_METHODS:
                self.error(
                    f"{key}.methods[{j}]", f"{m!r} is not an HTTP method ({', '.join(sorted(HTTP_METHODS))})"
                )
        route_filters = self.get(t, key, "filters", self.string_list, _NO_STRINGS)
        for j, f in enumerate(route_filters):
            if f not in filters and f not in self.declared["filters"]:
                known = ", ".join(sorted(filters)) or "none defined"
                self.error(f"{key}.filters[{j}]", f'unknown filter "{f}" (known: {known})')
        return RouteConfig(
            name=name,
            upstream=upstream,
            hosts=hosts,
            path=path,
            path_prefix=prefix,
            path_pattern=pattern,
            methods=tuple(m.upper() for m in methods),
            filters=route_filters,
            require_headers=tuple(
                h.lower() for h in self.get(t, key, "require_headers", self.string_list, _NO_STRINGS)
            ),
            keep_encoded_slashes=self.get(t, key, "keep_encoded_slashes", self.boolean, False),
            strip_prefix=self.get(t, key, "strip_prefix", self.boolean, False),
            cache=self.route_cache(f"{key}.cache", t.get("cache", {}), upstream is None),
        )

    def route_cache(self, key: str, raw: object, is_app: bool) -> RouteCacheConfig:
        try:
            t = self.table(key, raw)
        except _Invalid:
            return RouteCacheConfig()
        self.unknown_keys(
            key,
            t,
            {
                "enabled",
                "default_ttl",
                "heuristic",
                "max_object_bytes",
                "key_headers",
                "key_cookie",
                "bypass_headers",
                "bypass_paths",
                "store_set_cookie",
            },
        )
        enabled = self.get(t, key, "enabled", self.boolean, False)
        if enabled and is_app:
            self.error(
                f"{key}.enabled", "the cache sits in front of upstreams only (this route has app = true)"
            )
        key_cookie = self.get(t, key, "key_cookie", self.string, None)
        if key_cookie is not None and not _HEADER_NAME_RE.match(key_cookie):
            self.error(f"{key}.key_cookie", f"{_show(key_cookie)} is not a valid cookie name")
        default_bypass: tuple[str, ...] = () if key_cookie is not None else ("cookie",)
        bypass = tuple(
            h.lower() for h in self.get(t, key, "bypass_headers", self.header_list, default_bypass)
        )
        if key_cookie is not None and "cookie" in bypass:
            self.error(
                f"{key}.bypass_headers",
                "lists cookie while key_cookie is set: requests with cookies would never be cached "
                "(drop cookie from bypass_headers)",
            )
        return RouteCacheConfig(
            enabled=enabled,
            default_ttl=self.get(t, key, "default_ttl", self.seconds, None),
            heuristic=self.get(t, key, "heuristic", self.boolean, True),
            max_object_bytes=self.get(t, key, "max_object_bytes", self.int_range(0), None),
            key_headers=tuple(
                h.lower() for h in self.get(t, key, "key_headers", self.header_list, _NO_STRINGS)
            ),
            key_cookie=key_cookie,
            bypass_headers=bypass,
            bypass_paths=tuple(
                self.url_path(f"{key}.bypass_paths[{i}]", p)
                for i, p in enumerate(self.get(t, key, "bypass_paths", self.string_list, _NO_STRINGS))
            ),
            store_set_cookie=self.get(t, key, "store_set_cookie", self.boolean, False),
        )

    def header_list(self, key: str, value: object) -> tuple[str, ...]:
        names = self.string_list(key, value)
        for i, name in enumerate(names):
            if not _HEADER_NAME_RE.match(name):
                self.error(f"{key}[{i}]", f"{_show(name)} is not a valid header name")
        return names

    def cache(self, raw: object) -> CacheConfig:
        try:
            t = self.table("cache", raw)
        except _Invalid:
            return CacheConfig()
        d = CacheConfig()
        self.unknown_keys(
            "cache",
            t,
            {
                "backend",
                "path",
                "redis_url",
                "key_prefix",
                "timeout_ms",
                "max_bytes",
                "max_object_bytes",
                "chunk_bytes",
                "max_ttl_seconds",
                "keep_stale_seconds",
                "purge",
            },
        )
        redis_url = self.get(t, "cache", "redis_url", self.string, None)
        if redis_url is not None and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            self.error("cache.redis_url", f"{_show(redis_url)} is not a redis://, rediss:// or unix:// URL")
        prefix = self.get(t, "cache", "key_prefix", self.string, d.key_prefix)
        if "{" in prefix or "}" in prefix:
            self.error("cache.key_prefix", "braces are reserved (Redis Cluster hash tags)")
        config = CacheConfig(
            backend=self.get(t, "cache", "backend", self.choice("memory", "local", "redis"), d.backend),
            path=self.get(t, "cache", "path", lambda k, v: self.base_dir / self.string(k, v), None),
            redis_url=redis_url,
            key_prefix=prefix,
            timeout_ms=self.get(t, "cache", "timeout_ms", self.int_range(1, 60_000), d.timeout_ms),
            max_bytes=self.get(t, "cache", "max_bytes", self.int_range(1024 * 1024), d.max_bytes),
            max_object_bytes=self.get(t, "cache", "max_object_bytes", self.int_range(0), d.max_object_bytes),
            chunk_bytes=self.get(
                t, "cache", "chunk_bytes", self.int_range(4096, 64 * 1024 * 1024), d.chunk_bytes
            ),
            max_ttl_seconds=self.get(t, "cache", "max_ttl_seconds", self.seconds, d.max_ttl_seconds),
            keep_stale_seconds=self.get(
                t, "cache", "keep_stale_seconds", self.non_negative_seconds, d.keep_stale_seconds
            ),
            purge=self.cache_purge(t.get("purge", {})),
        )
        if config.max_object_bytes > config.max_bytes // 4:
            self.error(
                "cache.max_object_bytes",
                f"{config.max_object_bytes} is more than a quarter of cache.max_bytes ({config.max_bytes}); "
                "raise max_bytes or lower max_object_bytes",
            )
        return config

    def non_negative_seconds(self, key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.error(key, f"expected a number of seconds >= 0, got {_show(value)}")
        return float(value)

    def cache_purge(self, raw: object) -> CachePurgeConfig:
        try:
            t = self.table("cache.purge", raw)
        except _Invalid:
            return CachePurgeConfig()
        d = CachePurgeConfig()
        self.unknown_keys("cache.purge", t, {"enabled", "path", "token"})
        enabled = self.get(t, "cache.purge", "enabled", self.boolean, False)
        token = self.get(t, "cache.purge", "token", self.string, None)
        if enabled and (token is None or len(token) < 16):
            self.error(
                "cache.purge.token",
                "the purge endpoint needs a token of at least 16 characters when enabled "
                '(e.g. token = "${CACHE_PURGE_TOKEN}")',
            )
        return CachePurgeConfig(
            enabled=enabled,
            path=self.get(t, "cache.purge", "path", self.url_path, d.path),
            token=token,
        )

    def path_pattern(self, key: str, value: object) -> str:
        s = self.string(key, value)
        plain = re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*(:path)?\}", "x", s)
        if not plain.startswith("/") or "{" in plain or "}" in plain:
            raise self.error(
                key, f'{_show(s)} is not a path pattern (e.g. "/users/{{id}}" or "/files/{{rest:path}}")'
            )
        self.url_path(key, plain)
        return s

    def trusted_proxies(self, raw: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        out = []
        for i, s in enumerate(
            self.get({"trusted_proxies": raw}, "", "trusted_proxies", self.string_list, _NO_STRINGS)
        ):
            try:
                out.append(ipaddress.ip_network(s, strict=False))
            except ValueError:
                self.error(f"trusted_proxies[{i}]", f'{s!r} is not an IP address or CIDR (e.g. "10.0.0.0/8")')
        return tuple(out)

    def geo(self, raw: object) -> GeoConfig:
        try:
            t = self.table("geo", raw)
        except _Invalid:
            return GeoConfig()
        self.unknown_keys("geo", t, {"database", "asn_database", "cache_size"})

        def db_path(key: str, value: object) -> Path:
            # Existence is checked when the gateway opens the database (start-up and `check`), not here.
            s = self.string(key, value)
            return Path(s) if s == BUILTIN_COUNTRY or Path(s).is_absolute() else self.base_dir / s

        config = GeoConfig(
            database=self.get(t, "geo", "database", db_path, None),
            asn_database=self.get(t, "geo", "asn_database", db_path, None),
            cache_size=self.get(
                t, "geo", "cache_size", self.int_range(0, 10_000_000), GeoConfig().cache_size
            ),
        )
        if config.asn_database is not None and config.database is None:
            self.error(
                "geo.asn_database", "needs geo.database as well (the ASN database only adds asn/as_org)"
            )
        return config

    def state(self, raw: object) -> StateConfig:
        try:
            t = self.table("state", raw)
        except _Invalid:
            return StateConfig()
        t = {k: self.interpolate_tree(f"state.{k}", v) for k, v in t.items()}
        if isinstance(t.get("path"), str):
            t["path"] = str(self.base_dir / t["path"])
        try:
            return StateConfig.from_mapping(t, where="state")
        except ConfigError as exc:
            for error in exc.errors:
                self.errors.append(f"{self.source}: {error}")
            return StateConfig()

    def metrics(self, raw: object) -> MetricsConfig:
        try:
            t = self.table("metrics", raw)
        except _Invalid:
            return MetricsConfig()
        d = MetricsConfig()
        self.unknown_keys("metrics", t, {"enabled", "path", "port"})
        return MetricsConfig(
            enabled=self.get(t, "metrics", "enabled", self.boolean, d.enabled),
            path=self.get(t, "metrics", "path", self.url_path, d.path),
            port=self.get(t, "metrics", "port", self.int_range(1, 65535), None),
        )

    def log(self, raw: object) -> LogConfig:
        try:
            t = self.table("log", raw)
        except _Invalid:
            return LogConfig()
        d = LogConfig()
        self.unknown_keys("log", t, {"level", "format", "path", "access_log"})
        return LogConfig(
            level=self.get(
                t, "log", "level", self.choice("debug", "info", "warning", "error", "critical"), d.level
            ),
            format=self.get(t, "log", "format", self.choice("json", "logfmt"), d.format),
            path=self.get(t, "log", "path", self.string, None),
            access_log=self.get(t, "log", "access_log", self.boolean, d.access_log),
        )


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)
