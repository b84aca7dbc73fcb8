"""Prometheus metrics: definitions (once per process), cached label children, exposition.

Names follow Prometheus conventions (``wasm_gateway_`` prefix, base units, ``_total`` counters) and labels are
bounded: route and upstream names from the config, methods folded to a known set, status as a class (``2xx``).
With several workers, ``PROMETHEUS_MULTIPROC_DIR`` is set by the CLI before workers start and exposition merges
every worker's files (prometheus-client multiprocess mode).
"""

from __future__ import annotations

import os
import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from . import __version__

__all__ = [
    "CONTENT_TYPE_LATEST",
    "CacheMetrics",
    "GatewayMetrics",
    "cache_metrics",
    "exposition",
    "gateway_metrics",
    "method_label",
    "multiprocess_dir",
    "status_class",
    "use_multiprocess_dir",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Bounded label values known in advance: their series start at 0, so a dashboard shows "none" rather than
# "no data", and rate() sees the first increment.
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "protocol", "body")
FILTER_FAULT_KINDS = ("trap", "timeout", "pooltimeout", "protocol")
POLICY_DECISIONS = ("fail_closed", "fail_open")
STATE_ERROR_KINDS = ("timeout", "connection", "error", "unavailable")
REJECT_REASONS = ("path", "host", "framing", "no_route", "method", "auth", "body_too_large")

# Latency buckets for a gateway: sub-millisecond resolution at the low end (Envoy's histogram starts at 0.5 ms).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def method_label(method: str) -> str:
    return method if method in _METHODS else "OTHER"


def status_class(status: int) -> str:
    index = status // 100 - 1
    return _STATUS_CLASSES[index] if 0 <= index < 5 else "5xx"


@dataclass(frozen=True)
class GatewayMetrics:
    request_duration: Histogram
    upstream_duration: Histogram
    in_flight: Gauge
    upstream_errors: Counter
    request_bytes: Counter
    response_bytes: Counter
    rejected: Counter
    build_info: Gauge
    upstream_ejections: Counter
    upstream_targets: Gauge
    upstream_healthy_targets: Gauge
    requests_in_flight: HotGauge = field(init=False)  # the hot-path side of ``in_flight``

    def __post_init__(self) -> None:
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_upstream_children", {})
        object.__setattr__(self, "_request_bytes", {})
        object.__setattr__(self, "_response_bytes", {})
        object.__setattr__(self, "requests_in_flight", HotGauge(self.in_flight))

    # Per-request metrics are counted in plain Python objects (no lock, no prometheus-client call) and added to
    # the prometheus-client metrics by `flush`: every second and before each exposition (Gateway.sync_metrics).
    # With several workers a scrape therefore sees the other workers' counts up to a second late.

    def upstream_child(self, upstream: str) -> HotHistogram:
        children: dict[str, HotHistogram] = self._upstream_children  # type: ignore[attr-defined]
        child = children.get(upstream)
        if child is None:
            child = children[upstream] = HotHistogram(self.upstream_duration.labels(upstream))
        return child

    def request_child(self, route: str, method: str, status: int) -> HotHistogram:
        key = (route, method, status // 100)
        children: dict[tuple[str, str, int], HotHistogram] = self._children  # type: ignore[attr-defined]
        child = children.get(key)
        if child is None:
            labels = self.request_duration.labels(route, method_label(method), status_class(status))
            child = children[key] = HotHistogram(labels)
        return child

    def request_bytes_child(self, route: str) -> HotCounter:
        children: dict[str, HotCounter] = self._request_bytes  # type: ignore[attr-defined]
        child = children.get(route)
        if child is None:
            child = children[route] = HotCounter(self.request_bytes.labels(route))
        return child

    def response_bytes_child(self, route: str) -> HotCounter:
        children: dict[str, HotCounter] = self._response_bytes  # type: ignore[attr-defined]
        child = children.get(route)
        if child is None:
            child = children[route] = HotCounter(self.response_bytes.labels(route))
        return child

    def flush(self) -> None:
        """Add what the hot-path objects counted since the last flush to the prometheus-client metrics."""
        for group in (self._children, self._upstream_children):  # type: ignore[attr-defined]
            for histogram in list(group.values()):
                histogram.flush()
        for group in (self._request_bytes, self._response_bytes):  # type: ignore[attr-defined]
            for counter in list(group.values()):
                counter.flush()
        self.requests_in_flight.flush()


class HotHistogram:
    """Observations for one prometheus-client histogram child, counted without locks until `flush`."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)  # the last one is +Inf
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # prometheus-client's rule: the first bucket whose upper bound is >= the value.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        self._counts = [0] * len(counts)
        total, self._sum = self._sum, 0.0
        buckets = self._child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        self._child._sum.inc(total)


class HotCounter:
    """Increments for one prometheus-client counter child, added up without locks until `flush`."""

    __slots__ = ("_child", "value")

    def __init__(self, child: Any) -> None:
        self._child = child
        self.value = 0

    def inc(self, amount: int) -> None:
        self.value += amount

    def flush(self) -> None:
        if self.value:
            amount, self.value = self.value, 0
            self._child.inc(amount)


class HotGauge:
    """A gauge kept as a plain int (inc/dec per request) and copied into prometheus-client by `flush`."""

    __slots__ = ("_gauge", "value")

    def __init__(self, gauge: Any) -> None:
        self._gauge = gauge
        self.value = 0

    def flush(self) -> None:
        self._gauge.set(self.value)


_metrics: GatewayMetrics | None = None


def gateway_metrics() -> GatewayMetrics:
    """The process's metric objects (created on first use; prometheus-client metrics are process-global)."""
    global _metrics
    if _metrics is None:
        _metrics = _define(REGISTRY)
    return _metrics


def _define(registry: CollectorRegistry) -> GatewayMetrics:
    from .runtime.engine import WASMTIME_VERSION  # imports wasmtime: only when metrics are defined

    build_info = Gauge(
        "wasm_gateway_build_info",
        "Versions of the running gateway (value is always 1).",
        ["version", "python", "wasmtime"],
        registry=registry,
        multiprocess_mode="max",
    )
    build_info.labels(__version__, platform.python_version(), WASMTIME_VERSION).set(1)
    return GatewayMetrics(
        request_duration=Histogram(
            "wasm_gateway_request_duration_seconds",
            "Time from request start to the end of the response, by route, method and status class.",
            ["route", "method", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        upstream_duration=Histogram(
            "wasm_gateway_upstream_duration_seconds",
            "Time from sending the upstream request to receiving its response head, by upstream.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        in_flight=Gauge(
            "wasm_gateway_requests_in_flight",
            "Requests being handled right now.",
            registry=registry,
            multiprocess_mode="livesum",
        ),
        upstream_errors=Counter(
            "wasm_gateway_upstream_errors_total",
            "Upstream failures by upstream and kind (connect, timeout, protocol, body).",
            ["upstream", "kind"],
            registry=registry,
        ),
        request_bytes=Counter(
            "wasm_gateway_request_bytes_total",
            "Request body bytes received from clients, by route.",
            ["route"],
            registry=registry,
        ),
        response_bytes=Counter(
            "wasm_gateway_response_bytes_total",
            "Response body bytes sent to clients, by route.",
            ["route"],
            registry=registry,
        ),
        rejected=Counter(
            "wasm_gateway_rejected_requests_total",
            "Requests answered by the gateway itself before any route target, by reason.",
            ["reason"],
            registry=registry,
        ),
        build_info=build_info,
        upstream_ejections=Counter(
            "wasm_gateway_upstream_ejections_total",
            "Times a target of the upstream was taken out of rotation after consecutive failures.",
            ["upstream"],
            registry=registry,
        ),
        upstream_targets=Gauge(
            "wasm_gateway_upstream_targets",
            "Targets configured for the upstream.",
            ["upstream"],
            registry=registry,
            multiprocess_mode="livemax",
        ),
        upstream_healthy_targets=Gauge(
            "wasm_gateway_upstream_healthy_targets",
            "Targets of the upstream in rotation (not ejected); with several workers the lowest any worker sees.",
            ["upstream"],
            registry=registry,
            multiprocess_mode="livemin",
        ),
    )


def initialize_gateway_series(metrics: GatewayMetrics, upstreams: Iterable[str]) -> None:
    """Create the known label combinations at 0 (see ``UPSTREAM_ERROR_KINDS``)."""
    for reason in REJECT_REASONS:
        metrics.rejected.labels(reason)
    for upstream in upstreams:
        for kind in UPSTREAM_ERROR_KINDS:
            metrics.upstream_errors.labels(upstream, kind)
        metrics.upstream_ejections.labels(upstream)


# Wasm callbacks are microseconds; cold starts are (sub)milliseconds.
CALLBACK_BUCKETS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1)
COLD_START_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0)


@dataclass(frozen=True)
class RuntimeMetricSet:
    cold_start: Histogram
    callback: Histogram
    faults: Counter
    policy: Counter
    pool_instances: Gauge
    pool_waiting: Gauge
    filter_counter: Counter
    filter_gauge: Gauge
    filter_histogram: Histogram
    requests: Counter
    local_responses: Counter
    memory: Gauge
    pool_max: Gauge


_runtime: RuntimeMetricSet | None = None


def runtime_metrics() -> RuntimeMetricSet:
    """The Wasm runtime's metrics (created on first use)."""
    global _runtime
    if _runtime is None:
        _runtime = RuntimeMetricSet(
            cold_start=Histogram(
                "wasm_gateway_filter_cold_start_seconds",
                "Filter cold start by phase: compile or deserialize (per module), instantiate, start_configure "
                "(per instance).",
                ["filter", "phase"],
                buckets=COLD_START_BUCKETS,
            ),
            callback=Histogram(
                "wasm_gateway_filter_callback_seconds",
                "Time spent in one filter callback, by filter and phase (request_headers, response_body, ...).",
                ["filter", "phase"],
                buckets=CALLBACK_BUCKETS,
            ),
            faults=Counter(
                "wasm_gateway_filter_faults_total",
                "Filter failures by filter and kind (trap, timeout, pooltimeout, protocol, load, tick).",
                ["filter", "kind"],
            ),
            policy=Counter(
                "wasm_gateway_filter_policy_decisions_total",
                "Failure-policy decisions applied after a filter failure (fail_closed, fail_open).",
                ["filter", "decision"],
            ),
            pool_instances=Gauge(
                "wasm_gateway_filter_pool_instances",
                "Pooled filter instances by state (busy, idle).",
                ["filter", "state"],
                multiprocess_mode="livesum",
            ),
            pool_waiting=Gauge(
                "wasm_gateway_filter_pool_waiting",
                "Requests waiting for a free filter instance.",
                ["filter"],
                multiprocess_mode="livesum",
            ),
            filter_counter=Counter(
                "wasm_gateway_filter_metric_total",
                "Counters defined by filters (proxy_define_metric), by filter and metric name.",
                ["filter", "name"],
            ),
            filter_gauge=Gauge(
                "wasm_gateway_filter_metric_value",
                "Gauges defined by filters (proxy_define_metric), by filter and metric name.",
                ["filter", "name"],
                multiprocess_mode="livesum",
            ),
            filter_histogram=Histogram(
                "wasm_gateway_filter_metric_distribution",
                "Histograms defined by filters (proxy_define_metric), by filter and metric name (raw units).",
                ["filter", "name"],
                buckets=(1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000, 100000, 1000000),
            ),
            requests=Counter(
                "wasm_gateway_filter_requests_total",
                "Requests each filter handled, by what it did with them: continue (passed on), local_response "
                "(answered itself: a denial, a rate limit, a direct answer), failure (its failure policy "
                "decided), unfinished (the request ended while the filter held it).",
                ["filter", "outcome"],
            ),
            local_responses=Counter(
                "wasm_gateway_filter_local_responses_total",
                "Local responses sent by filters (proxy_send_local_response), by filter and HTTP status "
                "(401/403 from auth, 429 from rate limiting, ...).",
                ["filter", "status"],
            ),
            memory=Gauge(
                "wasm_gateway_filter_memory_bytes",
                "Linear memory of the filter's pooled instances, summed over workers.",
                ["filter"],
                multiprocess_mode="livesum",
            ),
            pool_max=Gauge(
                "wasm_gateway_filter_pool_max_instances",
                "Configured pool ceiling (pool.max), summed over workers: busy / max is pool pressure.",
                ["filter"],
                multiprocess_mode="livesum",
            ),
        )
    return _runtime


def initialize_runtime_series(filters: Iterable[str]) -> None:
    """Create the known per-filter label combinations at 0."""
    from .runtime.chain import OUTCOMES

    m = runtime_metrics()
    for name in filters:
        for outcome in OUTCOMES:
            m.requests.labels(name, outcome)
        for kind in FILTER_FAULT_KINDS:
            m.faults.labels(name, kind)
        for decision in POLICY_DECISIONS:
            m.policy.labels(name, decision)


@dataclass(frozen=True)
class CacheMetrics:
    lookups: Counter
    stored_bytes: Gauge
    entries: Gauge
    evictions: Counter
    coalesced_waits: Counter


_cache: CacheMetrics | None = None


def cache_metrics(shared: bool = True) -> CacheMetrics:
    """The response cache's metrics (created on first use). ``shared``: the store is shared by the worker
    processes (LMDB, Redis), so every worker reports the same stored bytes and entries and multiprocess
    exposition takes the maximum; a per-process memory store sums them instead."""
    global _cache
    if _cache is None:
        mode: Literal["livemax", "livesum"] = "livemax" if shared else "livesum"
        _cache = CacheMetrics(
            lookups=Counter(
                "wasm_gateway_cache_lookups_total",
                "Cache lookups by route and result (hit, miss, stale, revalidated, bypass, uncacheable).",
                ["route", "result"],
            ),
            stored_bytes=Gauge(
                "wasm_gateway_cache_stored_bytes",
                "Bytes held by the cache store (keys, values and bookkeeping; as counted for its bound).",
                multiprocess_mode=mode,
            ),
            entries=Gauge(
                "wasm_gateway_cache_entries",
                "Records in the cache store (entries, variant indexes and body chunks of large bodies).",
                multiprocess_mode=mode,
            ),
            evictions=Counter(
                "wasm_gateway_cache_evictions_total",
                "Cache records evicted to stay within cache.max_bytes.",
            ),
            coalesced_waits=Counter(
                "wasm_gateway_cache_coalesced_waits_total",
                "Cache misses that waited for another request's upstream fetch of the same key, by route.",
                ["route"],
            ),
        )
    return _cache


_state_errors: Counter | None = None


def state_error_counter(backend: str) -> Callable[[str, str], None]:
    """The shared-state backends' error hook, counting into ``wasm_gateway_state_errors_total``
    (``backend``'s series start at 0)."""
    global _state_errors
    if _state_errors is None:
        _state_errors = Counter(
            "wasm_gateway_state_errors_total",
            "Shared-state backend failures and calls answered by its failure policy, by backend and kind "
            "(timeout, connection, error, unavailable).",
            ["backend", "kind"],
        )
    counter = _state_errors
    for kind in STATE_ERROR_KINDS:
        counter.labels(backend, kind)

    def count(backend: str, kind: str) -> None:
        counter.labels(backend, kind).inc()

    return count


@dataclass(frozen=True)
class ReloadMetrics:
    reloads: Counter
    config_info: Gauge
    last_reload_successful: Gauge


_reload: ReloadMetrics | None = None


def reload_metrics() -> ReloadMetrics:
    """Config reload outcomes and the running config's hash (created on first use)."""
    global _reload
    if _reload is None:
        _reload = ReloadMetrics(
            reloads=Counter(
                "wasm_gateway_config_reloads_total",
                "Config reloads by result (success, failure); a failed reload leaves the running config serving.",
                ["result"],
            ),
            config_info=Gauge(
                "wasm_gateway_config_info",
                "The running config's hash (value 1; 0 for a hash no longer served).",
                ["hash"],
                multiprocess_mode="livemax",
            ),
            last_reload_successful=Gauge(
                "wasm_gateway_config_last_reload_successful",
                "1 when the last reload (or the start-up load) succeeded, 0 after a failed reload.",
                multiprocess_mode="livemin",
            ),
        )
    return _reload


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def use_multiprocess_dir(path: str) -> None:
    """Switch this process to prometheus-client's multiprocess mode, writing into ``path``.

    prometheus-client picks its value class from the environment when it is imported; metrics created after
    this call (the gateway creates its own on first use) write to ``path``. Live gauges of processes that are
    gone (``gauge_live*_<pid>.db`` with no such process) are removed so they stop counting.
    """
    from prometheus_client import values

    if _metrics is not None or _runtime is not None or _state_errors is not None or _reload is not None:
        if values.ValueClass is not values.MutexValue:
            return  # already writing to the directory (the variable was set before start-up)
        raise RuntimeError("metrics already recorded in memory; set the multiprocess directory first")
    os.makedirs(path, exist_ok=True)
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _remove_dead_live_gauges(path)


def _remove_dead_live_gauges(path: str) -> None:
    from prometheus_client import multiprocess

    for entry in os.scandir(path):
        name = entry.name
        if not (name.startswith("gauge_live") and name.endswith(".db")):
            continue
        pid_text = name[: -len(".db")].rsplit("_", 1)[-1]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            multiprocess.mark_process_dead(int(pid_text), path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exposition() -> bytes:
    """The Prometheus text exposition for this process, or for every worker in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
