"""Everything derived from one config, in one object that a reload builds beside the running one and swaps whole.

A request reads ``gateway.generation`` once, at its start, and uses nothing else derived from config: a reload
that swaps the reference while the request runs changes nothing for it. A generation owns what it built: its
Wasm runtime (modules, instance pools, background tasks), its upstream connection pools and its geo database.
``close`` frees them all; the gateway calls it once the last request that started on the generation has
finished (``active`` counts those).

Process-wide parts stay with the gateway and outlive generations: the listener and its limits, metrics, the
access log, and the shared-state store (so filters' shared data and rate-limit counters survive a reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import GatewayConfig, RouteConfig, UpstreamConfig
from .edge.functions import edge_data
from .exceptions import ConfigError
from .filtering import RuntimeMetrics, filter_specs, module_exports, perform_http_call
from .forwarding import ForwardingPolicy
from .geo import GeoDatabase
from .metrics import initialize_runtime_series
from .routing import RouteTable
from .runtime.chain import FilterChain, FilterRuntime
from .runtime.services import SharedServices
from .state import SharedState
from .upstream import UpstreamPool, UpstreamSettings

__all__ = [
    "Generation",
    "RouteFilters",
    "build_generation",
    "check_app_routes",
    "config_digest",
    "restart_only_changes",
]


@dataclass(frozen=True, slots=True)
class RouteFilters:
    chain: FilterChain
    request_body: bool
    """Some filter exports ``proxy_on_request_body`` (else the body streams past the chain untouched)."""
    response_phase: bool
    response_body: bool


class Generation:
    """One config's routes, filters, upstream pools and forwarding policies. Read-only once built, except
    ``active``: the requests in flight on it."""

    __slots__ = (
        "active",
        "config",
        "digest",
        "geo",
        "metrics_seen",
        "policies",
        "policy",
        "pools",
        "route_filters",
        "runtime",
        "table",
        "tasks",
    )

    def __init__(
        self,
        config: GatewayConfig,
        digest: str,
        pools: dict[str, UpstreamPool],
        runtime: FilterRuntime | None,
        route_filters: dict[str, RouteFilters],
        geo: GeoDatabase | None,
    ) -> None:
        self.config = config
        self.digest = digest
        self.table = RouteTable(config.routes)
        self.pools = pools
        self.runtime = runtime
        self.route_filters = route_filters
        self.geo = geo
        self.active = 0
        self.tasks: list[asyncio.Task[None]] = []
        # What Gateway.sync_metrics already copied into Prometheus from this generation's runtime and pools.
        self.metrics_seen: dict[object, int] = {}
        server = config.server
        via = f"1.1 {server.via}".encode()
        request_id_header = server.request_id_header.encode()
        self.policies = {
            name: ForwardingPolicy(
                trusted_proxies=config.trusted_proxies,
                via=via,
                request_id_header=request_id_header,
                rewrite_host=upstream.targets[0].authority.encode()
                if upstream.host_header == "rewrite" and upstream.targets
                else None,
            )
            for name, upstream in config.upstreams.items()
        }
        self.policy = ForwardingPolicy(
            trusted_proxies=config.trusted_proxies, via=via, request_id_header=request_id_header
        )

    async def close(self) -> None:
        """Stop its tasks, then free its filter instances and modules, geo database and upstream pools."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        if self.runtime is not None:
            await self.runtime.drain()  # streams whose proxy_on_done answered false
            self.runtime.close()
        if self.geo is not None:
            self.geo.close()
        for pool in self.pools.values():
            await pool.close()


async def build_generation(
    config: GatewayConfig,
    digest: str,
    *,
    state: Callable[[], SharedState],
    metrics: bool,
    in_thread: bool = False,
) -> Generation:
    """Open upstream pools and load, start and configure every filter for ``config``; FilterLoadError (or any
    GatewayError) with everything built so far closed again. ``state()`` gives the process's shared-state store.

    ``in_thread``: compile and instantiate the filters in a worker thread, so a reload does not stall requests
    being served meanwhile (the start-up load stays on the loop, before any request)."""
    t = config.server.timeouts
    pools = {
        name: UpstreamPool(settings_for(upstream, t.upstream_connect, t.upstream_read))
        for name, upstream in config.upstreams.items()
    }
    runtime: FilterRuntime | None = None
    geo: GeoDatabase | None = None
    generation: Generation | None = None
    try:
        if config.filters:
            geo = GeoDatabase.from_config(config.geo)
            store = state()
            observer = RuntimeMetrics() if metrics else None
            load = functools.partial(
                FilterRuntime.load,
                filter_specs(config),
                cache_dir=config.cache_dir,
                http_call=functools.partial(perform_http_call, pools),
                observer=observer,
                shared=SharedServices(
                    shared_data=store.shared_data, queues=store.queues, edge=edge_data(config, store)
                ),
                max_buffer_bytes=max(f.max_body_bytes for f in config.filters.values()),
                # A Prometheus observe costs ~2 us, a filter callback a few: time one request in eight.
                callback_timing_every=8,
            )
            runtime = await asyncio.to_thread(load) if in_thread else load()
        route_filters: dict[str, RouteFilters] = {}
        if runtime is not None:
            for route in config.routes:
                if route.filters:
                    route_filters[route.name] = route_filters_for(runtime, route)
        generation = Generation(config, digest, pools, runtime, route_filters, geo)
    finally:
        if generation is None:
            if runtime is not None:
                runtime.close()
            if geo is not None:
                geo.close()
            for pool in pools.values():
                await pool.close()
    if runtime is not None:
        generation.tasks.append(asyncio.get_running_loop().create_task(runtime.run_background()))
        if metrics:
            initialize_runtime_series(runtime.pools)
    return generation


def route_filters_for(runtime: FilterRuntime, route: RouteConfig) -> RouteFilters:
    names = route.filters
    response_body = module_exports(runtime, names, "proxy_on_response_body")
    return RouteFilters(
        chain=runtime.chain(names),
        request_body=module_exports(runtime, names, "proxy_on_request_body"),
        response_phase=response_body or module_exports(runtime, names, "proxy_on_response_headers"),
        response_body=response_body,
    )


def settings_for(upstream: UpstreamConfig, connect: float, read: float) -> UpstreamSettings:
    return UpstreamSettings(
        name=upstream.name,
        targets=upstream.targets,
        max_connections_per_target=upstream.keepalive,
        max_idle_per_target=upstream.keepalive,
        connect_timeout=upstream.connect_timeout or connect,
        read_timeout=upstream.read_timeout or read,
        retries=upstream.retries,
        eject_after_failures=upstream.eject_after_failures,
        eject_seconds=upstream.eject_seconds,
    )


def config_digest(config_text: bytes, modules: Mapping[str, Path]) -> str:
    """A short version of a config: sha256 over the file's bytes and every filter module's bytes (a module
    replaced in place under the same path is a new version). Unreadable modules hash as missing; loading them
    reports the error."""
    h = hashlib.sha256()
    h.update(config_text)
    for name in sorted(modules):
        h.update(b"\0" + name.encode() + b"\0")
        try:
            h.update(hashlib.sha256(modules[name].read_bytes()).digest())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()[:16]


# What a reload cannot change: these belong to the listener, the process or its metrics and logs.
_RESTART_ONLY_SERVER = (
    "host",
    "port",
    "workers",
    "max_concurrent_requests",
    "max_request_body_bytes",
    "max_header_bytes",
    "max_header_count",
    "health_path",
    "ready_path",
    "request_id_header",
    "via",
    "unmatched",
    "pid_file",
    "watch_config",
    "watch_interval",
)
_RESTART_ONLY_TIMEOUTS = ("header_read", "body_read", "idle", "graceful_shutdown", "drain_delay")


def restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """Key paths whose new value only a restart can apply (empty: the new config can be reloaded)."""
    changed = [
        f"server.{k}" for k in _RESTART_ONLY_SERVER if getattr(old.server, k) != getattr(new.server, k)
    ]
    changed += [
        f"server.timeouts.{k}"
        for k in _RESTART_ONLY_TIMEOUTS
        if getattr(old.server.timeouts, k) != getattr(new.server.timeouts, k)
    ]
    changed += [
        section
        for section in ("metrics", "log", "state", "cache")  # cache: the store and purge (route rules reload)
        if getattr(old, section) != getattr(new, section)
    ]
    return changed


def check_app_routes(config: GatewayConfig, wrapped_app: bool) -> None:
    """Routes with ``app = true`` need a wrapped ASGI app."""
    if wrapped_app:
        return
    for index, route in enumerate(config.routes):
        if route.target_is_app:
            raise ConfigError(
                f"{config.source}: routes[{index}] ({route.name}): app = true, but no ASGI app is wrapped "
                "(use WasmGateway(app, config=...) or give the route an upstream)"
            )
