"""Prometheus metrics: definitions (once per process), cached label children, exposition.

Names follow Prometheus conventions (``wasm_gateway_`` prefix, base units, ``_total`` counters) and labels are
bounded: route and upstream names from the config, methods folded to a known set, status as a class (``2xx``).
With several workers, ``PROMETHEUS_MULTIPROC_DIR`` is set by the CLI before workers start and exposition merges
every worker's files (prometheus-client multiprocess mode).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
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
    "status_class",
]

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_upstream_children", {})
        object.__setattr__(self, "_response_bytes_children", {})

    def response_bytes_child(self, route: str) -> Any:
        children: dict[str, Any] = self._response_bytes_children  # type: ignore[attr-defined]
        child = children.get(route)
        if child is None:
            child = children[route] = self.response_bytes.labels(route)
        return child

    def upstream_child(self, upstream: str) -> Any:
        children: dict[str, Any] = self._upstream_children  # type: ignore[attr-defined]
        child = children.get(upstream)
        if child is None:
            child = children[upstream] = self.upstream_duration.labels(upstream)
        return child

    def request_child(self, route: str, method: str, status: int) -> Any:
        # labels() costs a lock and a dict lookup per call; cache the child per label tuple.
        key = (route, method, status // 100)
        children: dict[tuple[str, str, int], Any] = self._children  # type: ignore[attr-defined]
        child = children.get(key)
        if child is None:
            child = self.request_duration.labels(route, method_label(method), status_class(status))
            children[key] = child
        return child


_metrics: GatewayMetrics | None = None


def gateway_metrics() -> GatewayMetrics:
    """The process's metric objects (created on first use; prometheus-client metrics are process-global)."""
    global _metrics
    if _metrics is None:
        _metrics = _define(REGISTRY)
    return _metrics


def _define(registry: CollectorRegistry) -> GatewayMetrics:
    import wasmtime  # imported here: its version is only needed for build info

    build_info = Gauge(
        "wasm_gateway_build_info",
        "Versions of the running gateway (value is always 1).",
        ["version", "python", "wasmtime"],
        registry=registry,
        multiprocess_mode="max",
    )
    build_info.labels(
        __version__, platform.python_version(), getattr(wasmtime, "__version__", "unknown")
    ).set(1)
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
    )


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
                "wasm_gateway_filter_counter_total",
                "Counters defined by filters (proxy_define_metric), by filter and metric name.",
                ["filter", "name"],
            ),
            filter_gauge=Gauge(
                "wasm_gateway_filter_gauge",
                "Gauges defined by filters (proxy_define_metric), by filter and metric name.",
                ["filter", "name"],
                multiprocess_mode="livesum",
            ),
            filter_histogram=Histogram(
                "wasm_gateway_filter_histogram",
                "Histograms defined by filters (proxy_define_metric), by filter and metric name (raw units).",
                ["filter", "name"],
                buckets=(1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000, 100000, 1000000),
            ),
        )
    return _runtime


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


def state_error_counter() -> Callable[[str, str], None]:
    """The shared-state backends' error hook, counting into ``wasm_gateway_state_errors_total``."""
    global _state_errors
    if _state_errors is None:
        _state_errors = Counter(
            "wasm_gateway_state_errors_total",
            "Shared-state backend failures and calls answered by its failure policy, by backend and kind "
            "(timeout, connection, error, unavailable).",
            ["backend", "kind"],
        )
    counter = _state_errors

    def count(backend: str, kind: str) -> None:
        counter.labels(backend, kind).inc()

    return count


def exposition() -> bytes:
    """The Prometheus text exposition for this process, or for every worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
