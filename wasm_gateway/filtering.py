"""Glue between the request path and the Proxy-Wasm runtime: specs from config, header conversions,
filter-made outbound calls, and the Prometheus observer. Pure conversions; the request flow lives in app.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config import FilterConfig, GatewayConfig
from .exceptions import FilterError, UpstreamError
from .runtime.chain import FilterRuntime, FilterSpec
from .runtime.context import HttpCallRequest, HttpCallResponse, LocalResponse
from .types import Headers
from .upstream import BodySource, UpstreamPool

__all__ = [
    "FilterHeaders",
    "RuntimeMetrics",
    "check_filters",
    "filter_specs",
    "from_filter_request",
    "from_filter_response",
    "local_response_parts",
    "to_filter_request",
    "to_filter_response",
]

FilterHeaders = list[tuple[str, str]]
_HOP_OR_FRAMING = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "te", "upgrade"}
)


def filter_specs(config: GatewayConfig) -> list[FilterSpec]:
    upstreams = frozenset(config.upstreams)
    return [_spec(f, upstreams) for f in config.filters.values()]


def _spec(f: FilterConfig, upstreams: frozenset[str]) -> FilterSpec:
    return FilterSpec(
        name=f.name,
        module_path=f.module,
        configuration=f.configuration,
        root_id=f.root_id,
        vm_configuration=f.vm_configuration,
        failure_policy=f.failure_policy,
        pool_min=f.pool.min,
        pool_max=f.pool.max,
        pool_idle_seconds=f.pool.idle_seconds,
        pool_recycle_after=f.pool.recycle_after,
        pool_borrow_timeout=f.pool.borrow_timeout,
        memory_limit_bytes=f.memory_limit_bytes,
        callback_timeout_ms=float(f.callback_timeout_ms),
        fuel=f.fuel,
        env=dict(f.env),
        allowed_dirs=tuple(str(d) for d in f.allowed_dirs),
        log_level=f.log_level,
        upstreams=upstreams,
        kv=f.kv,
        sql=f.sql,
    )


def check_filters(config: GatewayConfig) -> list[str]:
    """Load every filter once (compile, link, start, configure); the error messages, if any. Also: every
    declared edge-data database exists (it is opened read-only, so it must be there before the gateway)."""
    problems = [
        f"{config.source}: sql.{name}.path: {db.path} does not exist (a database is opened read-only: create it first)"
        for name, db in config.sql.items()
        if not db.path.is_file()
    ]
    for spec in filter_specs(config):
        try:
            # The filter's own log lines are part of the error message: not printed a second time.
            runtime = FilterRuntime.load(
                [spec], cache_dir=config.cache_dir, preload=False, log_sink=_discard_log
            )
        except FilterError as exc:
            problems.append(f"{config.source}: filters.{spec.name}: {exc}")
        else:
            runtime.close()
    return problems


def _discard_log(filter_name: str, level: int, message: str) -> None:
    pass


def to_filter_request(
    method: str, target: str, authority: bytes, scheme: str, headers: Headers
) -> FilterHeaders:
    """Envoy's view: pseudo-headers first, then the (already forwarded) headers without Host."""
    out = [
        (":method", method),
        (":path", target),
        (":authority", authority.decode("latin-1")),
        (":scheme", scheme),
    ]
    out += [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers if n != b"host"]
    return out


def from_filter_request(headers: FilterHeaders) -> tuple[str, str, bytes, Headers]:
    """(method, target, authority, headers incl. host) from what the filters released."""
    method = target = ""
    authority = ""
    out: Headers = []
    for name, value in headers:
        if name.startswith(":"):
            if name == ":method":
                method = value
            elif name == ":path":
                target = value
            elif name == ":authority":
                authority = value
            continue
        if name in _HOP_OR_FRAMING or name == "host":
            continue  # the upstream client frames the body itself
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    host = authority.encode("latin-1")
    out.insert(0, (b"host", host))
    return method, target, host, out


def to_filter_response(status: int, headers: Headers) -> FilterHeaders:
    return [(":status", str(status)), *((n.decode("latin-1"), v.decode("latin-1")) for n, v in headers)]


def from_filter_response(headers: FilterHeaders, fallback_status: int) -> tuple[int, Headers]:
    status = fallback_status
    out: Headers = []
    for name, value in headers:
        if name == ":status":
            if value.isdigit() and 100 <= int(value) <= 599:
                status = int(value)
            continue
        if name.startswith(":") or name in _HOP_OR_FRAMING:
            continue
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    return status, out


def local_response_parts(lr: LocalResponse) -> tuple[int, Headers, bytes]:
    headers = [
        (n.encode("latin-1"), v.encode("latin-1"))
        for n, v in lr.headers
        if not n.startswith(":") and n not in _HOP_OR_FRAMING
    ]
    status = lr.status if 100 <= lr.status <= 599 else 500
    return status, headers, lr.body


def valid_target(target: str) -> bool:
    """A request-target a filter may set: origin-form, visible ASCII, no spaces."""
    return target.startswith("/") and target.isascii() and target.isprintable() and " " not in target


async def perform_http_call(pools: Mapping[str, UpstreamPool], request: HttpCallRequest) -> HttpCallResponse:
    """A filter's ``proxy_http_call`` through the named upstream's pool (raises on failure)."""
    pool = pools.get(request.upstream)
    if pool is None:
        raise UpstreamError(f"http_call: unknown upstream {request.upstream!r} (known: {', '.join(pools)})")
    headers = [(b"host", request.authority.encode("latin-1"))]
    headers += [
        (n.encode("latin-1"), v.encode("latin-1"))
        for n, v in request.headers
        if not n.startswith(":") and n not in _HOP_OR_FRAMING and n != "host"
    ]
    body = BodySource(request.body or None, len(request.body) if request.body else None)
    response = await pool.request(
        request.method, request.path, headers, body, idempotent=request.method in ("GET", "HEAD")
    )
    try:
        data = await response.read()
    finally:
        await response.aclose()
    return HttpCallResponse(
        status=response.status,
        headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in response.headers],
        body=data,
    )


class RuntimeMetrics:
    """The runtime's observer, recording into Prometheus (see metrics.py for the definitions)."""

    def __init__(self) -> None:
        from .metrics import runtime_metrics

        self._m = runtime_metrics()
        self._callbacks: dict[tuple[str, str], object] = {}

    def cold_start(self, filter_name: str, phase: str, seconds: float) -> None:
        self._m.cold_start.labels(filter_name, phase).observe(seconds)

    def callback(self, filter_name: str, phase: str, seconds: float) -> None:
        key = (filter_name, phase)
        child = self._callbacks.get(key)
        if child is None:
            child = self._m.callback.labels(filter_name, phase)
            self._callbacks[key] = child
        child.observe(seconds)  # type: ignore[attr-defined]

    def fault(self, filter_name: str, kind: str) -> None:
        self._m.faults.labels(filter_name, kind).inc()

    def policy(self, filter_name: str, decision: str) -> None:
        self._m.policy.labels(filter_name, decision).inc()


def module_exports(runtime: FilterRuntime, names: Sequence[str], export: str) -> bool:
    return any(export in runtime.modules[name].shapes for name in names)


def sync_runtime_metrics(runtime: FilterRuntime, seen: dict[object, int]) -> None:
    """Copy pool gauges, per-filter request outcomes and filter-defined metrics into Prometheus (``seen``
    carries what was already copied between calls: counters move by their delta)."""
    from .metrics import runtime_metrics
    from .runtime.abi import MetricType

    m = runtime_metrics()
    for name, pool in runtime.pools.items():
        stats = pool.stats()
        m.pool_instances.labels(name, "busy").set(stats.busy)
        m.pool_instances.labels(name, "idle").set(stats.idle)
        m.pool_waiting.labels(name).set(stats.waiting)
        m.pool_max.labels(name).set(stats.max_size)
        m.memory.labels(name).set(stats.memory_bytes)
    for (name, outcome), count in list(runtime.outcomes.items()):
        key: object = ("outcome", name, outcome)
        delta = count - seen.get(key, 0)
        if delta > 0:
            m.requests.labels(name, outcome).inc(delta)
            seen[key] = count
    for (name, status), count in list(runtime.local_responses.items()):
        key = ("local", name, status)
        delta = count - seen.get(key, 0)
        if delta > 0:
            m.local_responses.labels(name, str(status)).inc(delta)
            seen[key] = count
    for metric in runtime.shared.metrics.all():
        key = (metric.filter_name, metric.name, metric.type)
        if metric.type == MetricType.COUNTER:
            delta = metric.value - seen.get(key, 0)
            if delta > 0:
                m.filter_counter.labels(metric.filter_name, metric.name).inc(delta)
            seen[key] = metric.value
        elif metric.type == MetricType.GAUGE:
            m.filter_gauge.labels(metric.filter_name, metric.name).set(metric.value)
        else:
            new = metric.count - seen.get(key, 0)
            child = m.filter_histogram.labels(metric.filter_name, metric.name)
            for value in list(metric.samples)[-new:] if new > 0 else ():
                child.observe(value)
            seen[key] = metric.count
