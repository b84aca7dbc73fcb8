"""The ASGI entry point: lifespan, reserved endpoints, and the per-request path.

One request, in order::

    raw_path --canonicalize--> canonical path --RouteTable.match--> route
      -> route guards (encoded slashes, required headers, body limit)
      -> target: an upstream (streaming reverse proxy) or the wrapped ASGI app
      -> access log + metrics

The hot path is raw ASGI (no Starlette router): every layer costs measurable throughput at this size.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson

from .cache import CacheStore, Coalescer, Entry, EntryWriter, KeySpec, StoreOptions, open_cache_store
from .cache import policy as cache_policy
from .cache.keys import (
    STRIPPED_ON_CACHED_ROUTES,
    cache_url,
    canonical_target,
    extra_key,
    primary_key,
    secondary_key,
)
from .cache.policy import Freshness, RequestDirectives, Reuse
from .config import FilterConfig, GatewayConfig, RouteConfig, load_config
from .exceptions import ConfigError, GatewayError, StateError, UpstreamError, UpstreamTimeoutError
from .filtering import (
    FilterHeaders,
    from_filter_request,
    from_filter_response,
    local_response_parts,
    sync_runtime_metrics,
    to_filter_request,
    to_filter_response,
    valid_target,
)
from .forwarding import (
    HOP_BY_HOP,
    ForwardingPolicy,
    client_address,
    request_id_for,
    response_headers,
    upstream_request_headers,
)
from .generation import Generation, build_generation, check_app_routes, restart_only_changes
from .generation import RouteFilters as _RouteFilters
from .logs import AccessLog, configure_logging
from .metrics import (
    CONTENT_TYPE_LATEST,
    CacheMetrics,
    cache_metrics,
    exposition,
    gateway_metrics,
    initialize_gateway_series,
    multiprocess_dir,
    reload_metrics,
    state_error_counter,
    use_multiprocess_dir,
)
from .reload import PROCESS_SIGNALS_ENV, ProcessSignals, digest_of, module_paths, read_config, watch_files
from .routing import PathRejected, canonicalize, normalize_host
from .runtime.chain import ChainStream, Decision, DecisionKind, FilterRuntime
from .runtime.context import LocalResponse, RequestInfo
from .state import SharedState, open_state
from .state.base import RateLimitedLog
from .types import ASGIApp, Headers, Message, Receive, Scope, Send
from .upstream import BodySource, RequestBodyError, UpstreamPool, UpstreamResponse

__all__ = ["Gateway", "WasmGateway", "create_app"]

logger = logging.getLogger("wasm_gateway")
# Cache store failures come in bursts (Redis down: every request): one line per kind per 30 s.
_cache_log = RateLimitedLog(logger)

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_SMALL_BODY = 64 * 1024
_JSON = (b"content-type", b"application/json")


class Lifecycle(Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    CLOSED = "closed"


class _RequestEnded(Exception):
    """The request phase stopped before the target was reached (raised out of body iterators too)."""


class _BodyTooLarge(_RequestEnded):
    pass


class _ClientGone(_RequestEnded):
    pass


class Gateway:
    """The gateway as an ASGI app. ``app`` is the wrapped ASGI app (middleware mode), or None."""

    def __init__(self, config: GatewayConfig, app: ASGIApp | None = None) -> None:
        self.config = config
        self.app = app
        self.state = Lifecycle.NEW
        check_app_routes(config, app is not None)
        # Everything derived from config; each request reads it once. startup() builds it whole (pools and
        # filters); reload() builds the next one beside it and swaps the reference.
        self.generation = Generation(config, "", {}, None, {}, None)
        self._start_lock: asyncio.Lock | None = None
        server = config.server
        # Unmatched requests go to the wrapped app in middleware mode unless the config says "404".
        self._fallback: ASGIApp | None = app if server.unmatched != "404" else None
        self._max_body = server.max_request_body_bytes
        self._request_id_header = server.request_id_header.encode()
        self.metrics = gateway_metrics() if config.metrics.enabled else None
        self.access_log = AccessLog(config.log) if config.log.access_log else None
        self._reserved: dict[str, Any] = {server.health_path: self._healthz, server.ready_path: self._readyz}
        if config.metrics.enabled and config.metrics.port is None:
            self._reserved[config.metrics.path] = self._metrics_endpoint
        self._metrics_server: asyncio.AbstractServer | None = None
        self.state_store: SharedState | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._reload_lock: asyncio.Lock | None = None
        self._retiring: dict[asyncio.Task[None], Generation] = {}
        self._signals: ProcessSignals | None = None
        self.last_reload: dict[str, Any] = {"result": "none"}
        # The response cache: only routes that enable it pay for it (one dict lookup per request otherwise).
        # The store is the process's (like the shared-state store); the routes' rules follow reloads.
        self.cache_store: CacheStore | None = None
        self._cache_metrics: CacheMetrics | None = None
        self._cache_routes = _cache_routes_of(config)
        self._coalescer = Coalescer()
        self._refreshes: set[asyncio.Task[None]] = set()
        purge = config.cache.purge
        self._purge_path = purge.path if purge.enabled else None
        self._purge_token = ("Bearer " + purge.token).encode() if purge.enabled and purge.token else None

    @property
    def pools(self) -> dict[str, UpstreamPool]:
        return self.generation.pools

    @property
    def runtime(self) -> FilterRuntime | None:
        return self.generation.runtime

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Open upstream pools (and, with the runtime, filter pools). Idempotent."""
        if self.state is not Lifecycle.NEW:
            return
        self.state = Lifecycle.STARTING
        config = self.config
        try:
            self.generation = await build_generation(
                config, digest_of(config), state=self._state, metrics=config.metrics.enabled
            )
        except BaseException:
            self.state = Lifecycle.NEW
            if self.state_store is not None:
                self.state_store.close()
                self.state_store = None
            raise
        if self._cache_routes or self._purge_path is not None:
            self._open_cache()
        if self.metrics is not None:
            initialize_gateway_series(self.metrics, config.upstreams)
            self.sync_metrics()
            self._tasks.append(asyncio.get_running_loop().create_task(self._sync_metrics_forever()))
        if config.metrics.enabled and config.metrics.port is not None:
            self._metrics_server = await _start_metrics_server(
                config.server.host, config.metrics.port, self.sync_metrics
            )
        if config.metrics.enabled:
            self._count_reload(None, self.generation.digest, "")
        if os.environ.get(PROCESS_SIGNALS_ENV) == "1":
            signals = ProcessSignals(self._reload_soon, self.drain, config.server.timeouts.drain_delay)
            if signals.install():
                self._signals = signals
        if config.server.watch_config:
            self._tasks.append(
                asyncio.get_running_loop().create_task(
                    watch_files(self._watched_paths, config.server.watch_interval, self._reload_if_changed)
                )
            )
        # Start-up objects (modules, pools, config) live as long as the process: keep them out of the
        # collector's generations so its pauses stay short on the request path.
        gc.freeze()
        self.state = Lifecycle.READY

    def _state(self) -> SharedState:
        """The process's shared-state store (opened on first use; outlives generations)."""
        if self.state_store is None:
            on_error = state_error_counter(self.config.state.backend) if self.config.metrics.enabled else None
            self.state_store = open_state(self.config.state, on_error=on_error)
        return self.state_store

    def sync_metrics(self, generation: Generation | None = None) -> None:
        """Copy what the request path, the runtime and the upstream pools count in plain ints into Prometheus
        (every second, before each exposition so a scrape sees this worker's counts up to date, and once more
        for a generation being retired)."""
        metrics = self.metrics
        if metrics is None:
            return
        metrics.flush()
        self._flush_cache_counts()
        gen = generation or self.generation
        seen = gen.metrics_seen  # per generation: a reloaded runtime and its pools count from zero again
        if gen.runtime is not None:
            sync_runtime_metrics(gen.runtime, seen)
        for name, pool in gen.pools.items():
            targets, healthy, ejections = pool.health()
            metrics.upstream_targets.labels(name).set(targets)
            metrics.upstream_healthy_targets.labels(name).set(healthy)
            key = ("ejections", name)
            delta = ejections - seen.get(key, 0)
            if delta > 0:
                metrics.upstream_ejections.labels(name).inc(delta)
                seen[key] = ejections

    def _open_cache(self) -> None:
        c = self.config.cache
        metrics_on = self.config.metrics.enabled
        self.cache_store = store = open_cache_store(
            backend=c.backend,
            max_bytes=c.max_bytes,
            chunk_bytes=c.chunk_bytes,
            max_ttl=c.max_ttl_seconds,
            directory=c.directory,
            redis_url=c.redis_url or self.config.state.redis_url,
            key_prefix=c.key_prefix,
            timeout_ms=c.timeout_ms,
            on_error=state_error_counter(c.backend) if metrics_on else None,
        )
        if metrics_on:
            self._cache_metrics = metrics = cache_metrics(shared=c.backend != "memory")
            for name, rc in self._cache_routes.items():
                rc.bind_metrics(metrics, name)
            self._tasks.append(asyncio.get_running_loop().create_task(_sync_cache_metrics(store, metrics)))

    async def _sync_metrics_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.sync_metrics()
            except Exception:  # metrics must never take the gateway down
                logger.exception("copying metrics failed")

    # -- reload ---------------------------------------------------------------------------------------------------

    async def reload(self, config: GatewayConfig | None = None, *, only_if_changed: bool = False) -> bool:
        """Load the config file again (or take ``config``) and every filter module beside the running ones,
        and switch to them only if all of it loads. Requests in flight finish on the version they started
        with; the old version is closed after its last request. False on failure: the running version keeps
        serving, and the reason is logged, counted and shown in /readyz."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            if self.state is not Lifecycle.READY:
                logger.warning("reload ignored: the gateway is %s", self.state.value)
                return False
            old = self.generation
            try:
                if config is None:
                    config, digest = read_config(Path(self.config.source))
                else:
                    digest = digest_of(config)
                if only_if_changed and digest == old.digest:
                    return True
                changed = restart_only_changes(self.config, config)
                if changed:
                    raise ConfigError(
                        f"{config.source}: {', '.join(changed)} changed, which only a restart applies "
                        "(a reload applies upstreams, filters, routes, trusted_proxies, geo, cache_dir and "
                        "upstream timeouts)"
                    )
                check_app_routes(config, self.app is not None)
                new = await build_generation(
                    config, digest, state=self._state, metrics=config.metrics.enabled, in_thread=True
                )
            except Exception as exc:
                logger.error("reload failed; still serving config %s: %s", old.digest, exc)
                self.last_reload = {"result": "failure", "error": str(exc), "at": time.time()}
                if self.config.metrics.enabled:
                    self._count_reload(None, None, "failure")
                return False
            if self.state is not Lifecycle.READY:  # draining started while the new version loaded
                await new.close()
                return False
            self.generation = new
            self.config = config
            self._swap_cache_routes(config)
            self.last_reload = {"result": "success", "at": time.time()}
            if config.metrics.enabled:
                self._count_reload(old.digest, new.digest, "success")
            logger.info("reloaded: config %s -> %s", old.digest, new.digest)
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring[task] = old
            task.add_done_callback(self._retired)
            return True

    async def _retire(self, old: Generation) -> None:
        """Close ``old`` once the last request that started on it has finished."""
        while old.active:
            await asyncio.sleep(0.05)
        try:
            self.sync_metrics(old)  # what its runtime and pools counted since the last copy
        except Exception:
            logger.exception("copying metrics failed")
        await old.close()
        # Start-up froze the heap (see startup): let the collector see the retired generation's cycles.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    def _count_reload(self, old_digest: str | None, new_digest: str | None, result: str) -> None:
        m = reload_metrics()
        if result:
            m.reloads.labels(result).inc()
        m.last_reload_successful.set(0 if result == "failure" else 1)
        if old_digest is not None and old_digest != new_digest:
            m.config_info.labels(old_digest).set(0)
        if new_digest is not None:
            m.config_info.labels(new_digest).set(1)

    def _reload_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _reload_if_changed(self) -> None:
        await self.reload(only_if_changed=True)

    def _watched_paths(self) -> list[Path]:
        return [Path(self.config.source), *module_paths(self.config).values()]

    async def shutdown(self) -> None:
        if self.state is Lifecycle.CLOSED:
            return
        self.state = Lifecycle.CLOSED
        if self._signals is not None:
            self._signals.restore()
            self._signals = None
        retiring = list(self._retiring.values())  # the server has let their requests finish by now
        tasks = [*self._tasks, *self._retiring]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._flush_cache_counts()
        for refresh in list(self._refreshes):
            refresh.cancel()
        if self.cache_store is not None:
            with contextlib.suppress(Exception):
                await self.cache_store.aclose()
        for generation in (*retiring, self.generation):
            await generation.close()
        if self.state_store is not None:
            await self.state_store.aclose()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self.access_log is not None:
            self.access_log.flush()

    def drain(self) -> None:
        """Turn /readyz to 503 so load balancers stop sending; requests keep being served."""
        if self.state is Lifecycle.READY:
            self.state = Lifecycle.DRAINING

    async def _ensure_started(self) -> None:
        # Servers run without lifespan (or a host app that never forwards it) still get a working gateway.
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            await self.startup()

    # -- ASGI -----------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            state = self.state
            if state is not Lifecycle.READY:
                if state is Lifecycle.DRAINING:
                    send = _closing_connection(send)
                else:
                    await self._ensure_started()
            await self._http(scope, receive, send)
        elif kind == "websocket":
            if self.state is Lifecycle.NEW:
                await self._ensure_started()
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self.startup()
                    except GatewayError as exc:
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            await _LifespanBridge(self, self.app).run(scope, receive, send)

    # -- HTTP -----------------------------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        if b"?" in raw_path:  # some servers put the query into raw_path
            raw_path = raw_path.split(b"?", 1)[0]
        headers: Headers = scope["headers"]
        peer = scope["client"][0] if scope.get("client") else None
        exchange = _Exchange(self, scope, method, started, peer)
        generation = exchange.generation
        try:
            canonical = canonicalize(raw_path)
        except PathRejected as exc:
            await exchange.error(send, 400, "bad_request", f"invalid path: {exc.reason}", "path")
            return
        path = canonical.path
        exchange.path = path
        reserved = self._reserved.get(path)
        if reserved is not None and method in ("GET", "HEAD"):
            await reserved(send)
            return
        if path == self._purge_path:
            await self._purge(exchange, scope, receive, send)
            return
        host: bytes | None = None
        for name, value in headers:
            if name == b"host":
                if host is not None:
                    await exchange.error(send, 400, "bad_request", "duplicate Host header", "host")
                    return
                host = value
        if not host or not _valid_host(host):
            await exchange.error(send, 400, "bad_request", "missing or invalid Host header", "host")
            return
        match = generation.table.match(normalize_host(host.decode("latin-1")), path, method)
        route = match.route
        if route is None:
            if self._fallback is not None:
                await self._fallback(scope, receive, send)
                return
            if match.status == 405:
                exchange.extra_headers = [(b"allow", ", ".join(match.allow).encode())]
                await exchange.error(
                    send, 405, "method_not_allowed", f"method {method} not allowed", "method"
                )
            else:
                await exchange.error(send, 404, "not_found", "no route matches this request", "no_route")
            return
        exchange.route = route.name
        if canonical.has_encoded_slash and not route.keep_encoded_slashes:
            await exchange.error(send, 400, "bad_request", "encoded slash in path", "path")
            return
        if route.require_headers:
            present = {n for n, _ in headers}
            missing = [h for h in route.require_headers if h.encode() not in present]
            if missing:
                exchange.extra_headers = [(b"www-authenticate", b'Bearer realm="wasm-gateway"')]
                await exchange.error(send, 401, "unauthorized", f"missing credentials: {missing[0]}", "auth")
                return
        body_length, chunked, framing_error = _request_framing(headers)
        if framing_error:
            await exchange.error(send, 400, "bad_request", framing_error, "framing")
            return
        if body_length is not None and body_length > self._max_body:
            await exchange.error(
                send,
                413,
                "payload_too_large",
                f"request body exceeds {self._max_body} bytes",
                "body_too_large",
            )
            return
        metrics = self.metrics
        if metrics is not None:
            metrics.requests_in_flight.value += 1
        # Nothing was awaited since the generation was read, so a reload cannot have retired it yet.
        generation.active += 1
        try:
            filters = generation.route_filters.get(route.name) if generation.route_filters else None
            if route.upstream is None and filters is not None:
                await self._to_app_filtered(
                    exchange, route, filters, scope, receive, send, host, path, body_length, chunked
                )
            elif route.upstream is None:
                await self._to_app(exchange, scope, receive, send, path)
            else:
                await self._proxy(exchange, route, scope, receive, send, host, path, body_length, chunked)
        finally:
            generation.active -= 1
            if metrics is not None:
                metrics.requests_in_flight.value -= 1

    async def _proxy(
        self,
        exchange: _Exchange,
        route: RouteConfig,
        scope: Scope,
        receive: Receive,
        send: Send,
        host: bytes,
        path: str,
        body_length: int | None,
        chunked: bool,
    ) -> None:
        assert route.upstream is not None
        upstream_name = route.upstream
        method = exchange.method
        headers: Headers = scope["headers"]
        policy = exchange.generation.policies[upstream_name]
        peer = exchange.peer
        request_id = exchange.identify(headers, policy)
        scheme = scope.get("scheme", "http")
        query: bytes = scope.get("query_string", b"")
        target = path + "?" + query.decode("latin-1") if query else path
        filters = exchange.generation.route_filters.get(route.name)
        cache = self._cache_routes.get(route.name) if self._cache_routes else None
        if cache is not None and filters is None:
            # The hit path builds the upstream headers only when a key part needs them (or never).
            body = await self._cache_body(receive, exchange, send, body_length, chunked)
            if body is None:
                return
            trusted = peer is not None and policy.is_trusted(peer)
            await self._cached(
                _CacheCall(
                    exchange, cache, scope, send, None, None, upstream_name, method, target,
                    None, body, host, scheme, trusted, policy,
                )
            )  # fmt: skip
            return
        out_headers = upstream_request_headers(
            headers,
            peer=peer,
            client=exchange.client,
            scheme=scheme,
            host=host,
            policy=policy,
            request_id=request_id,
        )
        if cache is not None:
            out_headers = [h for h in out_headers if h[0] not in STRIPPED_ON_CACHED_ROUTES]
        stream: ChainStream | None = None
        try:
            try:
                if filters is None:
                    body = await self._request_body(receive, exchange, body_length, chunked)
                else:
                    stream = filters.chain.start(self._request_info(exchange, route, scope, upstream_name))
                    request = await self._filter_request(
                        stream,
                        filters,
                        exchange,
                        receive,
                        method,
                        target,
                        host,
                        scheme,
                        out_headers,
                        body_length,
                        chunked,
                        upstream_headers=True,
                        rewrite_host=policy.rewrite_host,
                    )
                    method, target, out_headers, body = request
            except _RequestEnded as ended:
                await self._request_ended(exchange, send, ended)
                return
            if cache is not None:
                await self._cached(
                    _CacheCall(
                        exchange, cache, scope, send, stream, filters, upstream_name, method, target,
                        out_headers, body, host, scheme, True, policy,
                    )
                )  # fmt: skip
                return
            response = await self._upstream(exchange, upstream_name, send, method, target, out_headers, body)
            if response is None:
                return
            try:
                if stream is None or filters is None or not filters.response_phase:
                    await self._relay_response(exchange, upstream_name, response, send)
                else:
                    await self._relay_filtered_response(
                        exchange, upstream_name, response, send, stream, filters
                    )
            except OSError:
                exchange.aborted = True  # the client went away while we were sending
            finally:
                await response.aclose()
            if not exchange.aborted:
                exchange.log()
        finally:
            if stream is not None:
                stream.finish()

    async def _request_body(
        self, receive: Receive, exchange: _Exchange, body_length: int | None, chunked: bool
    ) -> BodySource:
        if body_length == 0 or (body_length is None and not chunked):
            return BodySource(None)
        if body_length is not None and body_length <= _SMALL_BODY:
            data = await _read_body(receive)
            exchange.request_bytes = len(data)
            return BodySource(data, len(data))
        return BodySource(self._client_chunks(receive, exchange), body_length)

    async def _upstream(
        self,
        exchange: _Exchange,
        upstream_name: str,
        send: Send,
        method: str,
        target: str,
        headers: Headers,
        body: BodySource,
    ) -> UpstreamResponse | None:
        """The upstream response, or None once the client has been answered (error, 413, local answer)."""
        request_id = exchange.request_id or b"-"
        started = time.perf_counter()
        try:
            response = await exchange.generation.pools[upstream_name].request(
                method, target, headers, body, idempotent=method in _IDEMPOTENT
            )
        except _RequestEnded as ended:
            await self._request_ended(exchange, send, ended)
            return None
        except RequestBodyError:
            await self._request_ended(exchange, send, _ClientGone())
            return None
        except UpstreamError as exc:
            self._count_upstream_error(upstream_name, exc)
            status = 504 if isinstance(exc, UpstreamTimeoutError) else 502
            logger.warning("request %s: %s", request_id.decode(), exc)
            await exchange.error(
                send,
                status,
                "gateway_timeout" if status == 504 else "bad_gateway",
                f"upstream {upstream_name!r} {'timed out' if status == 504 else 'failed'}",
                None,
            )
            return None
        exchange.upstream_duration = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.upstream_child(upstream_name).observe(exchange.upstream_duration)
        return response

    async def _relay_response(
        self, exchange: _Exchange, upstream_name: str, response: UpstreamResponse, send: Send
    ) -> None:
        status = response.status
        out = response_headers(
            response.headers, request_id=exchange.request_id, request_id_header=self._request_id_header
        )
        exchange.status = status
        await send({"type": "http.response.start", "status": status, "headers": out})
        whole = response.complete_body()
        if whole is not None:  # small answers: one body message, and one write with the head
            await send({"type": "http.response.body", "body": whole if exchange.method != "HEAD" else b""})
            exchange.bytes_sent = len(whole)
            return
        sent = 0
        if exchange.method != "HEAD":
            try:
                async for chunk in response.body():
                    sent += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except UpstreamError as exc:
                self._abort(exchange, upstream_name, exc, sent)
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        exchange.bytes_sent = sent

    def _abort(self, exchange: _Exchange, upstream_name: str, exc: UpstreamError, sent: int) -> None:
        # Never a silently truncated 200: the response stays incomplete, so the server drops the connection.
        self._count_upstream_error(upstream_name, exc)
        logger.warning("request %s: response aborted: %s", (exchange.request_id or b"-").decode(), exc)
        exchange.bytes_sent = sent
        exchange.aborted = True
        exchange.log()

    async def _client_chunks(self, receive: Receive, exchange: _Exchange) -> AsyncIterator[bytes]:
        async for chunk in _chunks_within(receive, self._max_body):
            exchange.request_bytes += len(chunk)
            yield chunk

    # -- response cache -------------------------------------------------------------------------------------------

    async def _cached(self, call: _CacheCall) -> None:
        """A request on a cached route, after its request filters: answer from the store, or fetch (one
        request per key and process), store and relay. Response filters run on hits as on misses."""
        rc = call.cache
        method = call.method
        if method != "GET" and method != "HEAD":
            await self._cache_write_through(call)
            return
        client_headers: Headers = call.scope["headers"]
        # Without filters the target is the canonical path the route matched (plus the query).
        canonical = call.target if call.stream is None else canonical_target(call.target)
        reason = rc.bypass_reason(call, client_headers, canonical)
        if reason is not None:
            rc.count("bypass")
            await self._cache_forward(call, call.headers, b"wasm-gateway; fwd=bypass; detail=" + reason)
            return
        assert canonical is not None
        store = self.cache_store
        assert store is not None
        if call.has_directives:
            call.directives = cache_policy.request_directives(client_headers, rc.credentials)
        directives = call.directives
        call.url = cache_url(call.scheme, call.host.decode("latin-1"), canonical)
        call.primary = primary = primary_key(call.url)
        if call.forwarded_keys or rc.managed_key_headers:
            call.extra = extra = extra_key(rc.key_spec, call.headers, call.host, call.scheme.encode())
        else:
            # An untrusted peer's forwarding headers are replaced by the gateway's (Host and the scheme):
            # the key parts read from what the client sent are those the upstream would get.
            call.extra = extra = extra_key(
                rc.key_spec, client_headers, call.host, call.scheme.encode(), False
            )
        entry, why = await self._cache_lookup(store, primary, extra, call.vary_headers)
        stale: Entry | None = None
        fwd = why.encode()
        if entry is not None:
            now = time.time()
            d = cache_policy.decide_reuse(entry.freshness, directives, now)
            reuse = d.reuse
            if reuse is Reuse.FRESH:
                rc.count("hit")
                await self._serve_entry(call, entry, d.age, b"wasm-gateway; hit; ttl=%d" % int(d.ttl))
                return
            if reuse is Reuse.STALE_OK or reuse is Reuse.STALE_REVALIDATE:
                rc.count("stale")
                if reuse is Reuse.STALE_REVALIDATE and method == "GET":
                    self._start_refresh(call, entry)
                await self._serve_entry(call, entry, d.age, b"wasm-gateway; hit; ttl=%d" % int(d.ttl))
                return
            stale = entry if reuse is Reuse.VALIDATE else None
            fwd = b"request" if directives.no_cache or directives.max_age is not None else b"stale"
            if reuse is Reuse.MISS:
                fwd = b"request" if directives.no_cache else b"miss"
        if directives.only_if_cached:
            rc.count("miss")
            call.exchange.extra_headers = [
                (b"cache-status", b"wasm-gateway; fwd=miss; detail=only-if-cached")
            ]
            await call.exchange.error(
                call.send, 504, "gateway_timeout", "not in cache (only-if-cached)", None
            )
            return
        if method == "HEAD":
            rc.count("miss")  # a HEAD response has no body to store: forwarded as is
            await self._cache_forward(call, call.headers, b"wasm-gateway; fwd=" + fwd)
            return
        key = primary + extra
        flight = self._coalescer.join(key)
        if flight is not None:
            rc.coalesced_wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flight.wait(), rc.wait_timeout)
            entry = None
            handed = flight.entry
            if handed is not None:
                # The leader's variant, unless the response varies on a header this request sends otherwise.
                vary, variant = handed[1], handed[2]
                if not vary or secondary_key(primary, extra, vary, call.headers) == variant:
                    entry = handed[0]
            if entry is None:
                entry, _ = await self._cache_lookup(store, primary, extra, call.vary_headers)
            if entry is not None:
                d = cache_policy.decide_reuse(entry.freshness, directives, time.time())
                if d.reuse is Reuse.FRESH or d.reuse is Reuse.STALE_OK:
                    rc.count("hit")
                    status = b"wasm-gateway; hit; ttl=%d; collapsed" % int(d.ttl)
                    await self._serve_entry(call, entry, d.age, status)
                    return
            leader = False
        else:
            leader = self._coalescer.leads(key)
        stored = False
        try:
            stored = await self._cache_fetch(call, stale, fwd)
        finally:
            if leader:
                self._coalescer.done(key, stored)

    async def _cache_body(
        self, receive: Receive, exchange: _Exchange, send: Send, body_length: int | None, chunked: bool
    ) -> BodySource | None:
        try:
            return await self._request_body(receive, exchange, body_length, chunked)
        except _RequestEnded as ended:
            await self._request_ended(exchange, send, ended)
            return None

    async def _cache_lookup(
        self, store: CacheStore, primary: bytes, extra: bytes, headers: Callable[[], Headers]
    ) -> tuple[Entry | None, str]:
        try:
            return await store.lookup(primary, extra, headers)
        except (StateError, ValueError) as exc:
            _cache_log.log("lookup", logging.WARNING, "cache lookup failed (treated as a miss): %s", exc)
            return None, "miss"

    async def _serve_entry(self, call: _CacheCall, entry: Entry, age: float, cache_status: bytes) -> None:
        """Answer from a stored entry: Age, Cache-Status, a 304 for a matching conditional request."""
        exchange = call.exchange
        request_id = exchange.request_id or b"-"
        status = entry.status
        not_modified = call.conditional and cache_policy.client_not_modified(
            call.scope["headers"], entry.headers, status
        )
        if not_modified:
            status = 304
            headers = [(n, v) for n, v in entry.headers if n in cache_policy.NOT_MODIFIED_FIELDS]
        else:
            headers = list(entry.headers)
        headers.append((b"age", b"%d" % int(age)))
        headers.append((b"cache-status", cache_status))
        headers.append((self._request_id_header, request_id))
        no_body = not_modified or exchange.method == "HEAD" or status in (204, 304) or status < 200
        body = entry.body
        chunks: AsyncIterator[bytes] | None = None
        if body is None and not no_body:
            assert self.cache_store is not None
            chunks = self.cache_store.body_chunks(entry)
        filters = call.filters
        try:
            if call.stream is not None and filters is not None and filters.response_phase:
                relay = _ResponseRelay(exchange, call.send, call.stream, filters.response_body)
                if status not in (204, 304) and status >= 200:
                    headers.append((b"content-length", b"%d" % entry.body_len))
                if not await relay.start(status, headers, no_body):
                    return
                if no_body:
                    await relay.finish_empty()
                elif body is not None:
                    if not await relay.body(body, True):
                        return
                else:
                    assert chunks is not None
                    async for chunk in chunks:
                        if not await relay.body(chunk, False):
                            return
                    await relay.body(b"", True)
            else:
                if status not in (204, 304) and status >= 200:
                    headers.append((b"content-length", b"%d" % entry.body_len))
                exchange.status = status
                send = call.send
                await send({"type": "http.response.start", "status": status, "headers": headers})
                if no_body:
                    await send({"type": "http.response.body", "body": b""})
                elif body is not None:
                    await send({"type": "http.response.body", "body": body})
                    exchange.bytes_sent = len(body)
                else:
                    assert chunks is not None
                    sent = 0
                    async for chunk in chunks:
                        sent += len(chunk)
                        exchange.bytes_sent = sent
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except StateError as exc:
            # A body chunk was evicted under a response already started: never a silently short body.
            logger.warning("request %s: cached body incomplete: %s", request_id.decode(), exc)
            exchange.aborted = True
            exchange.log()
            return
        except OSError:
            exchange.aborted = True
        if not exchange.aborted:
            exchange.log()

    async def _cache_forward(self, call: _CacheCall, headers: Headers, cache_status: bytes) -> None:
        """Forward without the store (bypass, HEAD miss): the upstream answer plus Cache-Status."""
        response = await self._upstream(
            call.exchange, call.upstream, call.send, call.method, call.target, headers, call.body
        )
        if response is None:
            return
        await self._relay_cache_response(call, response, cache_status, None)

    async def _cache_write_through(self, call: _CacheCall) -> None:
        """Unsafe methods go to the origin; a non-error answer invalidates the target URI and the same-origin
        Location / Content-Location (RFC 9111 4.4)."""
        response = await self._upstream(
            call.exchange, call.upstream, call.send, call.method, call.target, call.headers, call.body
        )
        if response is None:
            return
        host = normalize_host(call.host.decode("latin-1"))
        store = self.cache_store
        assert store is not None
        targets = cache_policy.invalidation_targets(
            call.method, response.status, call.scheme, host, call.target, response.headers
        )
        for target in targets:
            canonical = canonical_target(target)
            if canonical is None:
                continue
            try:
                await store.invalidate(primary_key(cache_url(call.scheme, host, canonical)))
            except (StateError, ValueError) as exc:
                _cache_log.log("invalidate", logging.WARNING, "cache invalidation failed: %s", exc)
        await self._relay_cache_response(call, response, None, None)

    async def _cache_fetch(self, call: _CacheCall, stale: Entry | None, fwd: bytes) -> bool:
        """Fetch (conditionally when ``stale`` has validators), store when allowed, answer. True when an
        entry was stored or refreshed (waiters can then be answered from the store)."""
        rc = call.cache
        exchange = call.exchange
        headers = [h for h in call.headers if h[0] not in _CLIENT_CONDITIONALS]
        if stale is not None:
            headers.extend(cache_policy.conditional_headers(stale.headers))
        request_time = time.time()
        started = time.perf_counter()
        try:
            response = await exchange.generation.pools[call.upstream].request(
                "GET", call.target, headers, call.body, idempotent=True
            )
        except UpstreamError as exc:
            self._count_upstream_error(call.upstream, exc)
            if stale is not None and cache_policy.may_serve_on_error(stale.freshness, time.time()):
                rc.count("stale")
                age = cache_policy.current_age(stale.freshness, time.time())
                ttl = stale.freshness.lifetime - age
                status = b"wasm-gateway; hit; ttl=%d; detail=stale-if-error" % int(ttl)
                await self._serve_entry(call, stale, age, status)
                return False
            status_code = 504 if isinstance(exc, UpstreamTimeoutError) else 502
            logger.warning("request %s: %s", (exchange.request_id or b"-").decode(), exc)
            exchange.extra_headers = [(b"cache-status", b"wasm-gateway; fwd=" + fwd)]
            await exchange.error(
                call.send,
                status_code,
                "gateway_timeout" if status_code == 504 else "bad_gateway",
                f"upstream {call.upstream!r} {'timed out' if status_code == 504 else 'failed'}",
                None,
            )
            return False
        exchange.upstream_duration = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.upstream_child(call.upstream).observe(exchange.upstream_duration)
        response_time = time.time()
        assert self.cache_store is not None
        if stale is not None:
            if response.status == 304:
                await response.aclose()
                entry = await self._merge_304(call, stale, response.headers, request_time, response_time)
                rc.count("revalidated")
                now = time.time()
                age = cache_policy.current_age(entry.freshness, now)
                await self._serve_entry(call, entry, age, b"wasm-gateway; fwd=" + fwd + b"; fwd-status=304")
                return True
            if response.status >= 500 and cache_policy.may_serve_on_error(stale.freshness, response_time):
                await response.aclose()
                rc.count("stale")
                age = cache_policy.current_age(stale.freshness, response_time)
                ttl = stale.freshness.lifetime - age
                await self._serve_entry(
                    call, stale, age, b"wasm-gateway; hit; ttl=%d; detail=stale-if-error" % int(ttl)
                )
                return False
        fresh = call.freshness(response.status, response.headers, request_time, response_time)
        vary = cache_policy.parse_vary(response.headers)
        writer: EntryWriter | None = None
        fwd_status = b"" if stale is None else b"; fwd-status=%d" % response.status
        if isinstance(fresh, Freshness) and vary is not None:
            length = _content_length(response.headers)
            if length is not None and length > rc.max_object_bytes:
                detail = b"; detail=too-large"
            else:
                writer = self.cache_store.writer(rc.max_object_bytes)
                detail = b"; stored"
        else:
            detail = b"; detail=" + (fresh if isinstance(fresh, str) else "too-large").encode()
        rc.count("miss" if writer is not None else "uncacheable")
        cache_status = b"wasm-gateway; fwd=" + fwd + fwd_status + detail
        if writer is None:
            await self._relay_cache_response(call, response, cache_status, None)
            return False
        assert isinstance(fresh, Freshness) and vary is not None
        store = self.cache_store
        published = False

        async def publish() -> None:
            # Before the client sees the end of the body: a client that asks again finds the entry.
            nonlocal published
            if writer.failed:
                return
            try:
                entry = await store.finish(
                    writer,
                    response.status,
                    cache_policy.headers_to_store(response.headers, rc.options),
                    fresh,
                    call.url,
                )
                key = call.primary + call.extra
                if entry.body is not None and self._coalescer.leads(key):
                    variant = secondary_key(call.primary, call.extra, vary, call.headers) if vary else b""
                    self._coalescer.hand_over(key, (entry, vary, variant))
                await store.publish(entry, call.primary, call.extra, vary, call.headers)
                published = True
            except (StateError, ValueError) as exc:
                _cache_log.log("store", logging.WARNING, "cache store failed (response not cached): %s", exc)

        complete = await self._relay_cache_response(call, response, cache_status, writer, publish)
        if not complete and not published and not writer.failed:
            with contextlib.suppress(StateError):
                await writer.abort()
        return published

    async def _merge_304(
        self,
        call: _CacheCall,
        stale: Entry,
        fresh_headers: Headers,
        request_time: float,
        response_time: float,
    ) -> Entry:
        """A 304 from the origin: its headers into the stored entry, freshness recomputed (RFC 9111 4.3.4)."""
        assert self.cache_store is not None
        merged = cache_policy.merge_not_modified(stale.headers, fresh_headers)
        if merged is None:
            return stale
        date = [(n, v) for n, v in fresh_headers if n == b"date" or n == b"age"]
        freshness = call.freshness(stale.status, [*merged, *date], request_time, response_time)
        if not isinstance(freshness, Freshness):
            return Entry(
                stale.key,
                stale.status,
                merged,
                stale.freshness,
                stale.url,
                stale.body,
                stale.body_len,
                stale.chunks,
                stale.body_id,
            )
        try:
            return await self.cache_store.update(stale, merged, freshness)
        except (StateError, ValueError) as exc:
            _cache_log.log("update", logging.WARNING, "cache update after 304 failed: %s", exc)
            return stale

    async def _relay_cache_response(
        self,
        call: _CacheCall,
        response: UpstreamResponse,
        cache_status: bytes | None,
        writer: EntryWriter | None,
        on_complete: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Relay an upstream response (through the response filters when the route has them), feeding
        ``writer`` with the body as received; ``on_complete`` runs once the whole body arrived, before the
        client gets its end. True when the whole body arrived."""
        exchange = call.exchange
        headers = response_headers(
            response.headers, request_id=exchange.request_id, request_id_header=self._request_id_header
        )
        if cache_status is not None:
            headers.append((b"cache-status", cache_status))
        status = response.status
        no_body = exchange.method == "HEAD" or status in (204, 304) or status < 200
        filters = call.filters
        stream = call.stream
        relay = (
            _ResponseRelay(exchange, call.send, stream, filters.response_body)
            if stream is not None and filters is not None and filters.response_phase
            else None
        )
        complete = False
        try:
            try:
                if relay is not None:
                    if not await relay.start(status, headers, no_body):
                        return False
                else:
                    exchange.status = status
                    await call.send({"type": "http.response.start", "status": status, "headers": headers})
                sent = 0
                if not no_body:
                    async for chunk in response.body():
                        if writer is not None and not writer.failed:
                            await _feed(writer, chunk)
                        sent += len(chunk)
                        if relay is not None:
                            if not await relay.body(chunk, False):
                                return False
                        else:
                            await call.send({"type": "http.response.body", "body": chunk, "more_body": True})
                complete = True
                if on_complete is not None:
                    await on_complete()
                if relay is not None:
                    if no_body:
                        await relay.finish_empty()
                    else:
                        await relay.body(b"", True)
                else:
                    await call.send({"type": "http.response.body", "body": b"", "more_body": False})
                    exchange.bytes_sent = sent
            except UpstreamError as exc:
                self._abort(
                    exchange, call.upstream, exc, relay.sent if relay is not None else exchange.bytes_sent
                )
                return False
            except OSError:
                exchange.aborted = True
        finally:
            await response.aclose()
        if not exchange.aborted:
            exchange.log()
        return complete

    def _start_refresh(self, call: _CacheCall, entry: Entry) -> None:
        """stale-while-revalidate: refresh in the background, once per key and process."""
        key = call.primary + call.extra
        if self._coalescer.join(key) is not None:
            return  # a fetch for this key is already under way
        task = asyncio.get_running_loop().create_task(self._refresh(call, entry, key))
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _refresh(self, call: _CacheCall, entry: Entry, key: bytes) -> None:
        store = self.cache_store
        assert store is not None
        rc = call.cache
        try:
            headers = [h for h in call.headers if h[0] not in _CLIENT_CONDITIONALS]
            headers.extend(cache_policy.conditional_headers(entry.headers))
            request_time = time.time()
            pool = self.pools.get(call.upstream)  # the current version's: the request's may be retired
            if pool is None:
                return  # a reload removed the upstream
            response = await pool.request("GET", call.target, headers, BodySource(None), idempotent=True)
            response_time = time.time()
            try:
                if response.status == 304:
                    await self._merge_304(call, entry, response.headers, request_time, response_time)
                    return
                fresh = call.freshness(response.status, response.headers, request_time, response_time)
                vary = cache_policy.parse_vary(response.headers)
                if not isinstance(fresh, Freshness) or vary is None:
                    return
                writer = store.writer(rc.max_object_bytes)
                async for chunk in response.body():
                    if not await writer.feed(chunk):
                        return
                await store.commit(
                    writer,
                    call.primary,
                    call.extra,
                    vary,
                    call.headers,
                    response.status,
                    cache_policy.headers_to_store(response.headers, rc.options),
                    fresh,
                    call.url,
                )
            finally:
                await response.aclose()
        except (UpstreamError, StateError, ValueError) as exc:
            _cache_log.log(
                "refresh", logging.WARNING, "background cache refresh of %s failed: %s", call.url, exc
            )
        finally:
            self._coalescer.done(key, True)  # never "pass": the next miss may fetch and store

    async def _purge(self, exchange: _Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        """POST {"url": ...} or {"prefix": ...} with ``Authorization: Bearer <token>``."""
        token = self._purge_token
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                presented = value
        if token is None or not hmac.compare_digest(presented, token):
            exchange.extra_headers = [(b"www-authenticate", b'Bearer realm="cache-purge"')]
            await exchange.error(send, 401, "unauthorized", "a valid purge token is required", "auth")
            return
        if exchange.method != "POST":
            exchange.extra_headers = [(b"allow", b"POST")]
            await exchange.error(send, 405, "method_not_allowed", "use POST", "method")
            return
        try:
            raw = await _read_limited(receive, 64 * 1024)
            data = orjson.loads(raw) if raw else None
        except (orjson.JSONDecodeError, _BodyTooLarge):
            data = None
        except _ClientGone:
            return
        store = self.cache_store
        url = data.get("url") if isinstance(data, dict) else None
        prefix = data.get("prefix") if isinstance(data, dict) else None
        if store is None or not (isinstance(url, str) ^ isinstance(prefix, str)):
            await exchange.error(
                send, 400, "bad_request", 'expected JSON {"url": "..."} or {"prefix": "..."}', None
            )
            return
        try:
            if isinstance(url, str):
                normalised = _purge_url(url)
                if normalised is None:
                    await exchange.error(send, 400, "bad_request", "url must be http(s)://host/path", None)
                    return
                removed = await store.invalidate(primary_key(normalised))
                result: dict[str, Any] = {"purged": "url", "url": normalised, "removed": removed}
            else:
                assert isinstance(prefix, str)
                normalised = _purge_url(prefix, prefix=True)
                if normalised is None:
                    await exchange.error(send, 400, "bad_request", "prefix must be http(s)://host/...", None)
                    return
                await store.purge_prefix(normalised)
                result = {"purged": "prefix", "prefix": normalised}
        except (StateError, ValueError) as exc:
            await exchange.error(send, 503, "unavailable", f"cache store failed: {exc}", None)
            return
        exchange.status = 200
        await _send_json(send, 200, result)
        exchange.log()

    # -- filters --------------------------------------------------------------------------------------------------

    def _request_info(
        self, exchange: _Exchange, route: RouteConfig, scope: Scope, upstream: str
    ) -> RequestInfo:
        server = scope.get("server") or ("", 0)
        client = scope.get("client") or ("", 0)
        return RequestInfo(
            source_address=exchange.client,
            source_port=client[1] if exchange.client == exchange.peer else 0,
            destination_address=str(server[0] or ""),
            destination_port=int(server[1] or 0),
            request_id=(exchange.request_id or b"").decode("latin-1"),
            protocol="HTTP/" + scope.get("http_version", "1.1"),
            route_name=route.name,
            upstream_address=upstream,
            extra=geo.properties_for(exchange.client) if (geo := exchange.generation.geo) is not None else {},
        )

    async def _filter_request(
        self,
        stream: ChainStream,
        filters: _RouteFilters,
        exchange: _Exchange,
        receive: Receive,
        method: str,
        target: str,
        host: bytes,
        scheme: str,
        headers: Headers,
        body_length: int | None,
        chunked: bool,
        *,
        upstream_headers: bool = False,
        rewrite_host: bytes | None = None,
    ) -> tuple[str, str, Headers, BodySource]:
        """Run the request phase; the request to forward. Raises _LocalAnswer when a filter answers.

        ``upstream_headers``: ``headers`` are already those for the upstream (framing stripped), so when the
        filters leave them as they were they are forwarded as they are. ``rewrite_host`` replaces the Host the
        filters saw (the client's) unless a filter set ``:authority`` itself."""
        has_body = chunked or bool(body_length)
        small = body_length is not None and 0 < body_length <= _SMALL_BODY
        seen = to_filter_request(method, target, host, scheme, headers)
        d = await stream.on_request_headers(seen, not has_body)
        released = _check(d)
        pre_body: list[bytes] = [d.body] if d.body else []
        complete = not has_body
        chunks: AsyncIterator[bytes] | None = None
        if small:
            data = await _read_body(receive)
            exchange.request_bytes = len(data)
            d = await stream.on_request_body(data, True)
            released = _check(d) or released
            if d.body:
                pre_body.append(d.body)
            complete = True
        elif has_body:
            chunks = self._client_chunks(receive, exchange)
            if released is None:  # paused on headers: feed the body until they are released
                async for chunk in _with_end(chunks):
                    d = await stream.on_request_body(chunk[0], chunk[1])
                    released = _check(d) or released
                    if d.body:
                        pre_body.append(d.body)
                    if chunk[1]:
                        complete = True
                    if released is not None:
                        break
        if released is None:
            raise _LocalAnswer(_filter_error_response("filter kept the request paused"))
        if upstream_headers and released == seen:
            out_headers = headers  # untouched by the filters (a list compare is far cheaper than re-encoding)
        else:
            method, target, authority, out_headers = from_filter_request(released)
            if not method or not valid_target(target):
                raise _LocalAnswer(_filter_error_response("filter produced an invalid :method or :path"))
            if rewrite_host is not None and authority == host:
                out_headers[0] = (b"host", rewrite_host)
        if complete:
            data = b"".join(pre_body)
            return method, target, out_headers, BodySource(data or None, len(data) if data else None)
        assert chunks is not None
        if not filters.request_body:
            return method, target, out_headers, BodySource(_prepend(pre_body, chunks), body_length)
        return method, target, out_headers, BodySource(_filtered_chunks(stream, pre_body, chunks), None)

    async def _relay_filtered_response(
        self,
        exchange: _Exchange,
        upstream_name: str,
        response: UpstreamResponse,
        send: Send,
        stream: ChainStream,
        filters: _RouteFilters,
    ) -> None:
        headers = response_headers(
            response.headers, request_id=exchange.request_id, request_id_header=self._request_id_header
        )
        no_body = exchange.method == "HEAD" or response.status in (204, 304) or response.status < 200
        relay = _ResponseRelay(exchange, send, stream, filters.response_body)
        # A small answer arrives whole with its head: body filters then see it in one piece with end of
        # stream (and the client gets its exact length instead of chunks).
        whole = None if no_body or not filters.response_body else response.complete_body()
        if not await relay.start(response.status, headers, no_body, defer=whole is not None):
            return
        if no_body:
            await relay.finish_empty()
            return
        if whole is not None:
            await relay.body(whole, True)
            return
        if relay.started and not filters.response_body:
            # Headers-only filters: a small answer goes out in one body message, as on unfiltered routes.
            whole = response.complete_body()
            if whole is not None:
                relay.sent = exchange.bytes_sent = len(whole)
                await send({"type": "http.response.body", "body": whole})
                return
        try:
            async for chunk in response.body():
                if not await relay.body(chunk, False):
                    return
        except UpstreamError as exc:
            self._abort(exchange, upstream_name, exc, relay.sent)
            return
        await relay.body(b"", True)

    async def _to_app(
        self, exchange: _Exchange, scope: Scope, receive: Receive, send: Send, path: str
    ) -> None:
        assert self.app is not None
        headers: Headers = scope["headers"]
        request_id = exchange.identify(headers, exchange.generation.policy)
        app_scope = dict(scope)
        app_scope["path"] = unquote(path)
        app_scope["raw_path"] = path.encode("ascii")
        if exchange.client != exchange.peer and scope.get("client"):
            app_scope["client"] = (exchange.client, scope["client"][1])
        app_scope["headers"] = [
            *(h for h in headers if h[0] != self._request_id_header),
            (self._request_id_header, request_id),
        ]
        limit = self._max_body
        received = 0
        state = {"started": False, "rejected": False}

        async def limited_receive() -> Message:
            nonlocal received
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    state["rejected"] = True
                    if not state["started"]:
                        await exchange.error(
                            send,
                            413,
                            "payload_too_large",
                            f"request body exceeds {limit} bytes",
                            "body_too_large",
                        )
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            if state["rejected"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
                exchange.status = message["status"]
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), (self._request_id_header, request_id)]
            elif message["type"] == "http.response.body":
                exchange.bytes_sent += len(message.get("body", b""))
            await send(message)

        await self.app(app_scope, limited_receive, tracking_send)
        exchange.request_bytes = received
        if not state["rejected"]:
            exchange.log()

    async def _to_app_filtered(
        self,
        exchange: _Exchange,
        route: RouteConfig,
        filters: _RouteFilters,
        scope: Scope,
        receive: Receive,
        send: Send,
        host: bytes,
        path: str,
        body_length: int | None,
        chunked: bool,
    ) -> None:
        """An ``app = true`` route with filters: request phase, the wrapped app in-process, response phase."""
        assert self.app is not None
        headers: Headers = scope["headers"]
        request_id = exchange.identify(headers, exchange.generation.policy)
        query: bytes = scope.get("query_string", b"")
        target = path + "?" + query.decode("latin-1") if query else path
        app_headers = [
            *(h for h in headers if h[0] != self._request_id_header),
            (self._request_id_header, request_id),
        ]
        stream = filters.chain.start(self._request_info(exchange, route, scope, "app"))
        try:
            try:
                method, target, app_headers, body = await self._filter_request(
                    stream,
                    filters,
                    exchange,
                    receive,
                    exchange.method,
                    target,
                    host,
                    scope.get("scheme", "http"),
                    app_headers,
                    body_length,
                    chunked,
                )
            except _RequestEnded as ended:
                await self._request_ended(exchange, send, ended)
                return
            new_path, _, new_query = target.partition("?")
            app_scope = dict(scope)
            app_scope.update(
                method=method,
                path=unquote(new_path),
                raw_path=new_path.encode("ascii"),
                query_string=new_query.encode("latin-1"),
                headers=app_headers,
            )
            if exchange.client != exchange.peer and scope.get("client"):
                app_scope["client"] = (exchange.client, scope["client"][1])
            relay = (
                _ResponseRelay(exchange, send, stream, filters.response_body)
                if filters.response_phase
                else None
            )
            state = _AppResponseState()
            chunks = body.chunks

            async def app_receive() -> Message:
                nonlocal chunks
                if state.stopped:
                    return {"type": "http.disconnect"}
                if chunks is None or isinstance(chunks, bytes):
                    data, chunks = chunks or b"", None
                    if state.body_sent:
                        return await receive()  # only http.disconnect can come now
                    state.body_sent = True
                    return {"type": "http.request", "body": data, "more_body": False}
                try:
                    data = await anext(chunks)
                    return {"type": "http.request", "body": data, "more_body": True}
                except StopAsyncIteration:
                    chunks = None
                    state.body_sent = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                except _RequestEnded as ended:
                    state.stopped = True
                    await self._request_ended(exchange, send, ended)
                return {"type": "http.disconnect"}

            async def app_send(message: Message) -> None:
                if state.stopped:
                    return
                kind = message["type"]
                if kind == "http.response.start":
                    state.status = message["status"]
                    state.headers = [*message.get("headers", ()), (self._request_id_header, request_id)]
                    if relay is None:
                        exchange.status = state.status
                        await send({**message, "headers": state.headers})
                    return
                if kind != "http.response.body":
                    await send(message)
                    return
                chunk: bytes = message.get("body", b"")
                eos = not message.get("more_body", False)
                if relay is None:
                    exchange.bytes_sent += len(chunk)
                    await send(message)
                    return
                if not state.relay_started:
                    state.relay_started = True
                    no_body = exchange.method == "HEAD" or (eos and not chunk)
                    if not await relay.start(state.status, state.headers, no_body, defer=True):
                        state.stopped = True
                        return
                    if no_body:
                        await relay.finish_empty()
                        return
                if not await relay.body(chunk, eos):
                    state.stopped = True

            await self.app(app_scope, app_receive, app_send)
            if not exchange.aborted and exchange.status and not state.stopped:
                exchange.log()
        finally:
            stream.finish()

    async def _request_ended(self, exchange: _Exchange, send: Send, ended: _RequestEnded) -> None:
        """Answer a request whose request phase stopped: client gone, body too large, or a filter's answer."""
        if isinstance(ended, _LocalAnswer):
            await exchange.local(send, ended.response)
        elif isinstance(ended, _BodyTooLarge):
            await exchange.error(
                send,
                413,
                "payload_too_large",
                f"request body exceeds {self._max_body} bytes",
                "body_too_large",
            )
        else:
            exchange.status = 499  # the client went away mid-request (nginx's code for it)
            exchange.log()

    def _count_upstream_error(self, upstream: str, exc: UpstreamError) -> None:
        if self.metrics is not None:
            self.metrics.upstream_errors.labels(upstream, exc.kind).inc()

    # -- WebSocket ------------------------------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        from .websocket import proxy_websocket

        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        try:
            canonical = canonicalize(raw_path.split(b"?", 1)[0])
        except PathRejected:
            await send({"type": "websocket.close", "code": 1008})
            return
        host = next((v for n, v in scope["headers"] if n == b"host"), b"")
        generation = self.generation
        match = generation.table.match(normalize_host(host.decode("latin-1")), canonical.path, "GET")
        route = match.route
        if route is None:
            if self._fallback is not None:
                await self._fallback(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        present = {n for n, _ in scope["headers"]}
        if (canonical.has_encoded_slash and not route.keep_encoded_slashes) or any(
            h.encode() not in present for h in route.require_headers
        ):
            await send({"type": "websocket.close", "code": 1008})
            return
        if route.upstream is None:
            assert self.app is not None
            await self.app(scope, receive, send)
            return
        upstream = generation.config.upstreams[route.upstream]
        policy = generation.policies[route.upstream]
        peer = scope["client"][0] if scope.get("client") else None
        request_id = request_id_for(scope["headers"], peer, policy)
        client = client_address(peer, _xff(scope["headers"], peer, policy), policy)
        forwarded = upstream_request_headers(
            scope["headers"],
            peer=peer,
            client=client,
            scheme="https" if scope.get("scheme") == "wss" else "http",
            host=host,
            policy=policy,
            request_id=request_id,
        )
        query: bytes = scope.get("query_string", b"")
        target = canonical.path + ("?" + query.decode("latin-1") if query else "")
        await proxy_websocket(
            scope,
            receive,
            send,
            upstream.targets,
            target,
            forwarded,
            generation.config.server.timeouts.upstream_connect,
        )

    # -- reserved endpoints ---------------------------------------------------------------------------------------

    async def _healthz(self, send: Send) -> None:
        await _send_json(send, 200, {"status": "ok"})

    async def _readyz(self, send: Send) -> None:
        ready = self.state is Lifecycle.READY
        generation = self.generation
        body: dict[str, Any] = {"status": "ready" if ready else self.state.value}
        body["config"] = {"hash": generation.digest, "reload": self.last_reload, "worker": os.getpid()}
        body["upstreams"] = {name: pool.stats() for name, pool in generation.pools.items()}
        await _send_json(send, 200 if ready else 503, body)

    def _swap_cache_routes(self, config: GatewayConfig) -> None:
        """The reloaded config's per-route cache rules (the store stays: its settings need a restart)."""
        self._flush_cache_counts()
        routes = _cache_routes_of(config)
        self._cache_routes = routes
        if routes and self.cache_store is None:
            self._open_cache()  # the first route to enable the cache
        elif self._cache_metrics is not None:
            for name, rc in routes.items():
                rc.bind_metrics(self._cache_metrics, name)

    def _flush_cache_counts(self) -> None:
        for rc in self._cache_routes.values():
            rc.flush()

    async def _metrics_endpoint(self, send: Send) -> None:
        self.sync_metrics()
        data = exposition()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE_LATEST.encode()),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


class _LocalAnswer(_RequestEnded):
    """A filter answered the request itself (or failed closed); raised out of body iterators too."""

    def __init__(self, response: LocalResponse) -> None:
        super().__init__(response.status)
        self.response = response


def _check(d: Decision) -> FilterHeaders | None:
    if d.kind is DecisionKind.RESPOND:
        assert d.response is not None
        raise _LocalAnswer(d.response)
    return d.headers


def _filter_error_response(detail: str) -> LocalResponse:
    body = orjson.dumps({"error": "filter_failed", "status": 503, "detail": detail})
    return LocalResponse(503, [("content-type", "application/json")], body, "filter_failed")


async def _with_end(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bool]]:
    async for chunk in chunks:
        yield chunk, False
    yield b"", True


async def _prepend(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


async def _filtered_chunks(
    stream: ChainStream, first: list[bytes], rest: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    async for chunk, eos in _with_end(rest):
        d = await stream.on_request_body(chunk, eos)
        _check(d)
        if d.body:
            yield d.body


class _AppResponseState:
    __slots__ = ("body_sent", "headers", "relay_started", "status", "stopped")

    def __init__(self) -> None:
        self.status = 200
        self.headers: Headers = []
        self.relay_started = False
        self.body_sent = False
        self.stopped = False


class _ResponseRelay:
    """Feeds one response through the response phase of a route's filters and on to the client."""

    __slots__ = (
        "body_filters",
        "exchange",
        "pending",
        "released",
        "send",
        "sent",
        "started",
        "status",
        "stream",
        "upstream_headers",
    )

    def __init__(self, exchange: _Exchange, send: Send, stream: ChainStream, body_filters: bool) -> None:
        self.exchange = exchange
        self.send = send
        self.stream = stream
        self.body_filters = body_filters
        self.started = False
        self.sent = 0
        self.pending: list[bytes] = []
        self.released: FilterHeaders | None = None
        self.status = 0
        self.upstream_headers: Headers = []

    async def start(self, status: int, headers: Headers, no_body: bool, defer: bool = False) -> bool:
        """False when the client has been answered otherwise (a local response). ``defer`` holds the response
        head until the first body chunk (the caller already has it), so a complete body gets its exact length."""
        self.status = status
        self.upstream_headers = headers
        d = await self.stream.on_response_headers(to_filter_response(status, headers), no_body)
        if d.kind is DecisionKind.RESPOND:
            assert d.response is not None
            await self.exchange.local(self.send, d.response)
            return False
        if d.body:
            self.pending.append(d.body)
        if d.headers is not None:
            self.released = d.headers
            if no_body or not defer:
                keep_length = no_body or not self.body_filters
                await self._start(self._upstream_length() if keep_length else None)
        return True

    async def body(self, chunk: bytes, eos: bool) -> bool:
        if self.body_filters or not self.started:
            d = await self.stream.on_response_body(chunk, eos)
            if d.kind is DecisionKind.RESPOND:
                assert d.response is not None
                if not self.started:
                    await self.exchange.local(self.send, d.response)
                else:
                    logger.warning("filter answered after the response started; aborting the response")
                    self.exchange.aborted = True
                    self.exchange.bytes_sent = self.sent
                    self.exchange.log()
                return False
            if d.headers is not None and self.released is None:
                self.released = d.headers
            chunk = d.body
        if not self.started:
            if chunk:
                self.pending.append(chunk)
            if self.released is None:
                return True
            length = (
                sum(map(len, self.pending))
                if eos
                else (None if self.body_filters else self._upstream_length())
            )
            await self._start(length)
        elif chunk:
            self.sent += len(chunk)
            await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        if eos:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            self.exchange.bytes_sent = self.sent
        return True

    async def finish_empty(self) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    def _upstream_length(self) -> int | None:
        for name, value in self.upstream_headers:
            if name == b"content-length" and value.isdigit():
                return int(value)
        return None

    async def _start(self, length: int | None) -> None:
        assert self.released is not None
        status, headers = from_filter_response(self.released, self.status)
        if length is not None and status not in (204, 304) and status >= 200:
            headers.append((b"content-length", str(length).encode()))
        self.started = True
        self.exchange.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        for chunk in self.pending:
            if chunk:
                self.sent += len(chunk)
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        self.pending.clear()


class _Exchange:
    """Per-request bookkeeping for the access log, metrics and error answers."""

    __slots__ = (
        "aborted",
        "bytes_sent",
        "client",
        "extra_headers",
        "gateway",
        "generation",
        "method",
        "path",
        "peer",
        "request_bytes",
        "request_id",
        "route",
        "scope",
        "started",
        "status",
        "upstream_duration",
    )

    def __init__(self, gateway: Gateway, scope: Scope, method: str, started: float, peer: str | None) -> None:
        self.gateway = gateway
        # The one read per request: everything derived from config comes from it.
        self.generation = gateway.generation
        self.scope = scope
        self.method = method
        self.started = started
        self.peer = peer
        self.client = peer or "unknown"
        self.path = scope.get("path", "")
        self.route = "-"
        self.status = 0
        self.bytes_sent = 0
        self.request_bytes = 0
        self.request_id: bytes | None = None
        self.upstream_duration: float | None = None
        self.extra_headers: Headers = []
        self.aborted = False

    async def error(self, send: Send, status: int, error: str, detail: str, reason: str | None) -> None:
        gateway = self.gateway
        if self.request_id is None:
            self.request_id = request_id_for(self.scope["headers"], self.peer, self.generation.policy)
        request_id = self.request_id
        body = orjson.dumps(
            {"error": error, "status": status, "detail": detail, "request_id": request_id.decode()}
        )
        headers = [
            _JSON,
            (b"content-length", str(len(body)).encode()),
            (gateway._request_id_header, request_id),
            *self.extra_headers,
        ]
        if status in (400, 408, 413, 431):
            headers.append((b"connection", b"close"))
        self.status = status
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body if self.method != "HEAD" else b""})
        except OSError:
            self.aborted = True
        self.bytes_sent = len(body)
        if reason is not None and gateway.metrics is not None:
            gateway.metrics.rejected.labels(reason).inc()
        self.log()

    def identify(self, headers: Headers, policy: ForwardingPolicy) -> bytes:
        """Settle the request id and the client address (trusted-proxy aware); the request id."""
        peer = self.peer
        self.request_id = request_id = request_id_for(headers, peer, policy)
        self.client = client_address(peer, _xff(headers, peer, policy), policy)
        return request_id

    async def local(self, send: Send, response: LocalResponse) -> None:
        """Send a filter's local response (or its failure-policy 503)."""
        status, headers, body = local_response_parts(response)
        request_id = self.request_id or b"-"
        headers.append((b"content-length", str(len(body)).encode()))
        headers.append((self.gateway._request_id_header, request_id))
        self.status = status
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body if self.method != "HEAD" else b""})
        except OSError:
            self.aborted = True
        self.bytes_sent = len(body)
        self.log()

    def log(self) -> None:
        gateway = self.gateway
        duration = time.perf_counter() - self.started
        metrics = gateway.metrics
        if metrics is not None:
            status = self.status or 499
            metrics.request_child(self.route, self.method, status).observe(duration)
            if self.request_bytes:
                metrics.request_bytes_child(self.route).inc(self.request_bytes)
            if self.bytes_sent:
                metrics.response_bytes_child(self.route).inc(self.bytes_sent)
        access_log = gateway.access_log
        if access_log is not None:
            access_log.record(
                request_id=self.request_id or b"-",
                client=self.client,
                method=self.method,
                path=self.path,
                route=self.route,
                status=self.status,
                bytes_sent=self.bytes_sent,
                duration=duration,
                upstream_duration=self.upstream_duration,
            )


class _LifespanBridge:
    """Runs the gateway's startup/shutdown around the wrapped app's lifespan (middleware mode)."""

    def __init__(self, gateway: Gateway, app: ASGIApp) -> None:
        self.gateway = gateway
        self.app = app

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        startup_failed: list[str] = []
        app_sent_startup = False

        async def bridged_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await gateway.startup()
                except GatewayError as exc:
                    startup_failed.append(str(exc))
            return message

        async def bridged_send(message: Message) -> None:
            nonlocal app_sent_startup
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                app_sent_startup = True
                if startup_failed:
                    message = {"type": "lifespan.startup.failed", "message": startup_failed[0]}
            elif kind == "lifespan.shutdown.complete":
                await gateway.shutdown()
            await send(message)

        try:
            await self.app(scope, bridged_receive, bridged_send)
        except Exception:
            if app_sent_startup:
                raise
            # The wrapped app does not speak lifespan: run ours alone.
            if gateway.state is Lifecycle.NEW:
                await gateway.startup()
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            await gateway.shutdown()
            await send({"type": "lifespan.shutdown.complete"})


def _xff(headers: Headers, peer: str | None, policy: ForwardingPolicy) -> list[bytes]:
    if not policy.trusted_proxies or peer is None or not policy.is_trusted(peer):
        return []
    return [v for n, v in headers if n == b"x-forwarded-for"]


# A Host header: visible ASCII without the characters that would let it carry a path, userinfo or quotes.
_VALID_HOST = re.compile(rb"[!$-.0-9:;=A-Z\[\]_a-z~]{1,255}")


def _valid_host(host: bytes) -> bool:
    return _VALID_HOST.fullmatch(host) is not None


def _request_framing(headers: Headers) -> tuple[int | None, bool, str | None]:
    """(content-length, chunked, error). httptools already refuses most smuggling shapes; this is the backstop."""
    length: int | None = None
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                return None, False, "invalid Content-Length"
            length = int(value)
        elif name == b"transfer-encoding":
            codings = [c.strip().lower() for c in value.split(b",")]
            if codings[-1] != b"chunked" or chunked:
                return None, False, "unsupported Transfer-Encoding"
            chunked = True
    if chunked and length is not None:
        return None, False, "both Content-Length and Transfer-Encoding"
    return length, chunked, None


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            parts.append(chunk)
        if not message.get("more_body", False):
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _closing_connection(send: Send) -> Send:
    """While draining: every response asks the client to close its connection (and reconnect elsewhere)."""

    async def closing_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return closing_send


async def _send_json(send: Send, status: int, data: object) -> None:
    body = orjson.dumps(data)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _start_metrics_server(host: str, port: int, before: Callable[[], None]) -> asyncio.AbstractServer:
    """A minimal HTTP/1.0 responder for /metrics on its own port (kept off the proxy listener)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            before()
            data = exposition()
            writer.write(
                b"HTTP/1.0 200 OK\r\ncontent-type: "
                + CONTENT_TYPE_LATEST.encode()
                + b"\r\ncontent-length: "
                + str(len(data)).encode()
                + b"\r\nconnection: close\r\n\r\n"
                + data
            )
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    # Workers of one server each serve the port (the kernel spreads scrapes; each answers with the sum).
    return await asyncio.start_server(handle, host, port, reuse_port=multiprocess_dir() is not None)


def WasmGateway(app: ASGIApp, config: GatewayConfig | str | os.PathLike[str]) -> Gateway:
    """Wrap an ASGI app: routes with ``app = true`` run in-process, other routes proxy, unmatched requests reach the app."""
    if not isinstance(config, GatewayConfig):
        config = load_config(config)
    return Gateway(config, app)


def create_app(config: GatewayConfig | str | os.PathLike[str] | None = None) -> Gateway:
    """ASGI factory: ``uvicorn 'wasm_gateway:create_app' --factory`` reads ``WASM_GATEWAY_CONFIG``."""
    if config is None:
        path = os.environ.get("WASM_GATEWAY_CONFIG")
        if path:
            config = load_config(path)
        else:
            from .examples import default_config

            config = default_config()
    elif not isinstance(config, GatewayConfig):
        config = load_config(config)
    configure_logging(config.log)
    if config.metrics.enabled:
        _factory_metrics_dir()
    return Gateway(config)


def _cache_routes_of(config: GatewayConfig) -> dict[str, _RouteCache]:
    """The cache rules of every route that enables the cache (rebuilt on reload)."""
    return {
        route.name: _RouteCache.build(config, route)
        for route in config.routes
        if route.cache.enabled and route.upstream is not None
    }


def _factory_metrics_dir() -> None:
    """Metrics that add up when a server runs the factory in several worker processes.

    ``wasm-gateway serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before its workers start. Other servers
    (``uvicorn --factory --workers N``, gunicorn) may not: a scrape would then see one worker's counts. A
    worker of such a server (a multiprocessing child, or a gunicorn worker) without the variable shares
    ``$TMPDIR/wasm-gateway-metrics-<supervisor pid>`` with its siblings.
    """
    import multiprocessing
    import sys
    import tempfile

    path = multiprocess_dir()
    if path is None:
        if multiprocessing.parent_process() is None and "gunicorn" not in sys.modules:
            return  # a single process: the in-memory registry is right
        path = os.path.join(tempfile.gettempdir(), f"wasm-gateway-metrics-{os.getppid()}")
    try:
        use_multiprocess_dir(path)
    except (OSError, RuntimeError) as exc:
        logger.warning("metrics directory %s unusable (%s): each worker reports its own metrics", path, exc)


# ------------------------------------------------------------------------------------------------ response cache

# Client conditionals and ranges are answered by the cache itself: never forwarded on a fetch to fill it.
_CLIENT_CONDITIONALS = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range", b"range"}
)
_MANAGED_HEADERS = HOP_BY_HOP | {
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"x-real-ip",
    b"via",
    b"content-length",
    b"x-request-id",
    *STRIPPED_ON_CACHED_ROUTES,
}
_LOOKUP_RESULTS = ("hit", "miss", "stale", "revalidated", "bypass", "uncacheable")


class _RouteCache:
    """A cached route's settings, resolved once at start-up, and its pre-bound metric children."""

    __slots__ = (
        "_coalesced",
        "_counts",
        "_lookups",
        "bypass_headers",
        "bypass_paths",
        "credentials",
        "key_spec",
        "managed_key_headers",
        "max_object_bytes",
        "options",
        "wait_timeout",
    )

    def __init__(
        self,
        key_spec: KeySpec,
        options: StoreOptions,
        max_object_bytes: int,
        bypass_headers: frozenset[bytes],
        bypass_paths: tuple[str, ...],
        credentials: frozenset[bytes],
        wait_timeout: float,
    ) -> None:
        self.key_spec = key_spec
        self.options = options
        self.max_object_bytes = max_object_bytes
        self.bypass_headers = bypass_headers
        self.bypass_paths = bypass_paths
        self.credentials = credentials
        self.wait_timeout = wait_timeout
        # Key headers the gateway sets or drops itself: read from the upstream headers, never the client's.
        self.managed_key_headers = any(h in _MANAGED_HEADERS or h == b"host" for h in key_spec.headers)
        self._lookups: dict[str, Any] = {}
        self._counts: dict[str, int] = dict.fromkeys(_LOOKUP_RESULTS, 0)
        self._coalesced: Any = None

    @classmethod
    def build(cls, config: GatewayConfig, route: RouteConfig) -> _RouteCache:
        c = route.cache
        assert route.upstream is not None
        upstream = config.upstreams[route.upstream]
        return cls(
            key_spec=KeySpec(
                headers=tuple(h.encode() for h in c.key_headers),
                cookie=c.key_cookie.encode() if c.key_cookie else None,
            ),
            options=StoreOptions(
                default_ttl=c.default_ttl,
                heuristic=c.heuristic,
                store_set_cookie=c.store_set_cookie,
                keep_stale=config.cache.keep_stale_seconds,
            ),
            max_object_bytes=c.max_object_bytes
            if c.max_object_bytes is not None
            else config.cache.max_object_bytes,
            bypass_headers=frozenset(h.encode() for h in c.bypass_headers) | {b"range"},
            bypass_paths=c.bypass_paths,
            credentials=_credential_headers(config, route),
            wait_timeout=upstream.read_timeout or config.server.timeouts.upstream_read,
        )

    def bind_metrics(self, metrics: CacheMetrics, route: str) -> None:
        self._lookups = {r: metrics.lookups.labels(route, r) for r in _LOOKUP_RESULTS}
        self._counts = dict.fromkeys(_LOOKUP_RESULTS, 0)
        self._coalesced = metrics.coalesced_waits.labels(route)

    def count(self, result: str) -> None:
        # A dict increment here; the Prometheus counters (a lock and a file write each in multiprocess
        # mode) get the sums at every scrape of this process and every second (`flush`).
        self._counts[result] += 1

    def flush(self) -> None:
        counts = self._counts
        for result, child in self._lookups.items():
            n = counts[result]
            if n:
                counts[result] = 0
                child.inc(n)

    def coalesced_wait(self) -> None:
        if self._coalesced is not None:
            self._coalesced.inc()

    def bypass_reason(self, call: _CacheCall, headers: Headers, canonical: str | None) -> bytes | None:
        """Why this request skips the cache, or None; notes whether it is conditional (one pass)."""
        if canonical is None:
            return b"path"
        if call.body.chunks is not None:
            return b"request-body"  # a "fat GET": its body must not shape what others are served
        bypass = self.bypass_headers
        credentials = self.credentials
        for name, _ in headers:
            if name in bypass:
                return b"header-" + name
            if name == b"if-none-match" or name == b"if-modified-since":
                call.conditional = True
            elif name == b"cache-control" or name == b"pragma" or name in credentials:
                call.has_directives = True  # parsed by the caller: most requests have none
        if self.bypass_paths:
            path = canonical.split("?", 1)[0]
            for prefix in self.bypass_paths:
                if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                    return b"path"
        return None


class _CacheCall:
    """One request on a cached route, as it goes upstream (after the request filters)."""

    __slots__ = (
        "_headers",
        "body",
        "cache",
        "conditional",
        "directives",
        "exchange",
        "extra",
        "filters",
        "forwarded_keys",
        "has_directives",
        "host",
        "method",
        "policy",
        "primary",
        "scheme",
        "scope",
        "send",
        "stream",
        "target",
        "upstream",
        "url",
    )

    def __init__(
        self,
        exchange: _Exchange,
        cache: _RouteCache,
        scope: Scope,
        send: Send,
        stream: ChainStream | None,
        filters: _RouteFilters | None,
        upstream: str,
        method: str,
        target: str,
        headers: Headers | None,
        body: BodySource,
        host: bytes,
        scheme: str,
        forwarded_keys: bool,
        policy: ForwardingPolicy,
    ) -> None:
        self.exchange = exchange
        self.cache = cache
        self.scope = scope
        self.send = send
        self.stream = stream
        self.filters = filters
        self.upstream = upstream
        self.method = method
        self.target = target
        self._headers = headers
        self.forwarded_keys = forwarded_keys
        """Key parts come from the upstream headers (filters ran, or a trusted proxy's forwarding headers)."""
        self.policy = policy
        self.body = body
        self.host = host
        self.scheme = scheme
        self.directives: RequestDirectives = cache_policy.NO_DIRECTIVES
        self.has_directives = False
        self.conditional = False
        self.url = ""
        self.primary = b""
        self.extra = b""

    def freshness(
        self, status: int, headers: Headers, request_time: float, response_time: float
    ) -> Freshness | str:
        """``cache_policy.freshness_for`` a response to this request, under the route's cache options."""
        return cache_policy.freshness_for(
            status,
            headers,
            request=self.directives,
            request_time=request_time,
            response_time=response_time,
            options=self.cache.options,
        )

    @property
    def headers(self) -> Headers:
        """The request headers as they go upstream (built on first use on routes without filters)."""
        headers = self._headers
        if headers is None:
            exchange = self.exchange
            headers = self._headers = [
                h
                for h in upstream_request_headers(
                    self.scope["headers"],
                    peer=exchange.peer,
                    client=exchange.client,
                    scheme=self.scheme,
                    host=self.host,
                    policy=self.policy,
                    request_id=exchange.request_id or b"-",
                )
                if h[0] not in STRIPPED_ON_CACHED_ROUTES
            ]
        return headers

    def vary_headers(self) -> Headers:
        return self.headers


def _credential_headers(config: GatewayConfig, route: RouteConfig) -> frozenset[bytes]:
    """Headers that carry a credential on this route: Authorization, and the headers the route's bundled
    auth filter reads keys and tokens from (it may strip them before the upstream, so the cache looks at
    what the client sent)."""
    names = {b"authorization", b"proxy-authorization"}
    for filter_name in route.filters:
        spec = config.filters.get(filter_name)
        if spec is not None:
            names |= _auth_filter_headers(spec)
    return frozenset(names)


def _auth_filter_headers(spec: FilterConfig) -> set[bytes]:
    from .filters import filter_path

    if spec.module != filter_path("auth"):
        return set()
    try:
        conf = orjson.loads(spec.configuration) if spec.configuration else {}
    except orjson.JSONDecodeError:
        return set()
    out: set[bytes] = set()
    if not isinstance(conf, dict):
        return out
    keys = conf.get("api_keys")
    if isinstance(keys, dict):
        header = keys.get("header", None if "query_param" in keys else "x-api-key")
        if isinstance(header, str):
            out.add(header.lower().encode())
    jwt = conf.get("jwt")
    if isinstance(jwt, dict):
        header = jwt.get("header", "authorization")
        if isinstance(header, str):
            out.add(header.lower().encode())
    return out


async def _feed(writer: EntryWriter, chunk: bytes) -> None:
    try:
        await writer.feed(chunk)
    except (StateError, ValueError) as exc:
        _cache_log.log(
            "store", logging.WARNING, "cache store failed while streaming (response not cached): %s", exc
        )
        writer.failed = True
        with contextlib.suppress(StateError):
            await writer.abort()


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


def _purge_url(url: str, prefix: bool = False) -> str | None:
    """A purge URL in the form entries are filed under (canonical host and path), or None."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    authority, slash, target = rest.partition("/")
    if not authority or not _valid_host(authority.encode("latin-1", "replace")):
        return None
    target = "/" + target if slash else "/"
    if prefix:
        canonical: str | None = target  # a prefix may end mid-segment: compared as a string
    else:
        canonical = canonical_target(target)
    if canonical is None:
        return None
    return cache_url(scheme.lower(), authority, canonical)


async def _chunks_within(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """The request body's non-empty chunks; _BodyTooLarge past ``limit`` bytes, _ClientGone on disconnect."""
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise _BodyTooLarge()
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _read_limited(receive: Receive, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _chunks_within(receive, limit)])


async def _sync_cache_metrics(store: CacheStore, metrics: CacheMetrics, interval: float = 1.0) -> None:
    """Stored bytes and records from the engine (shared stores: every process reports the same numbers),
    evictions as this process's delta. (Lookup counts are copied by Gateway.sync_metrics.)"""
    evictions = 0
    while True:
        try:
            stats = store.stats()
        except StateError:
            stats = None
        if stats is not None:
            metrics.stored_bytes.set(stats.bytes)
            metrics.entries.set(stats.records)
            if stats.evictions > evictions:
                metrics.evictions.inc(stats.evictions - evictions)
                evictions = stats.evictions
        await asyncio.sleep(interval)
