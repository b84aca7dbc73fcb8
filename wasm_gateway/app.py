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
import logging
import os
import time
from collections.abc import AsyncIterator
from enum import Enum
from typing import Any
from urllib.parse import unquote

import orjson

from .config import GatewayConfig, UpstreamConfig, load_config
from .exceptions import ConfigError, GatewayError, UpstreamError, UpstreamTimeoutError
from .forwarding import (
    ForwardingPolicy,
    client_address,
    request_id_for,
    response_headers,
    upstream_request_headers,
)
from .logs import AccessLog, configure_logging
from .metrics import CONTENT_TYPE_LATEST, exposition, gateway_metrics
from .routing import PathRejected, RouteTable, canonicalize, normalize_host
from .types import ASGIApp, Headers, Message, Receive, Scope, Send
from .upstream import BodySource, RequestBodyError, Target, UpstreamPool, UpstreamSettings

__all__ = ["Gateway", "WasmGateway", "create_app"]

logger = logging.getLogger("wasm_gateway")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_SMALL_BODY = 64 * 1024
_JSON = (b"content-type", b"application/json")


class Lifecycle(Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    CLOSED = "closed"


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class Gateway:
    """The gateway as an ASGI app. ``app`` is the wrapped ASGI app (middleware mode), or None."""

    def __init__(self, config: GatewayConfig, app: ASGIApp | None = None) -> None:
        self.config = config
        self.app = app
        self.state = Lifecycle.NEW
        self.table = RouteTable(config.routes)
        self.pools: dict[str, UpstreamPool] = {}
        self._start_lock: asyncio.Lock | None = None
        server = config.server
        # Unmatched requests go to the wrapped app in middleware mode unless the config says "404".
        self._fallback: ASGIApp | None = app if server.unmatched != "404" else None
        if app is None:
            for index, route in enumerate(config.routes):
                if route.target_is_app:
                    raise ConfigError(
                        f"{config.source}: routes[{index}] ({route.name}): app = true, but no ASGI app is wrapped "
                        "(use WasmGateway(app, config=...) or give the route an upstream)"
                    )
        self._max_body = server.max_request_body_bytes
        self._request_id_header = server.request_id_header.encode()
        via = f"1.1 {server.via}".encode()
        self._policies = {
            name: ForwardingPolicy(
                trusted_proxies=config.trusted_proxies,
                via=via,
                request_id_header=self._request_id_header,
                rewrite_host=upstream.targets[0].authority.encode()
                if upstream.host_header == "rewrite" and upstream.targets
                else None,
            )
            for name, upstream in config.upstreams.items()
        }
        self._policy = ForwardingPolicy(
            trusted_proxies=config.trusted_proxies, via=via, request_id_header=self._request_id_header
        )
        self.metrics = gateway_metrics() if config.metrics.enabled else None
        self.access_log = AccessLog(config.log) if config.log.access_log else None
        self._reserved: dict[str, Any] = {server.health_path: self._healthz, server.ready_path: self._readyz}
        if config.metrics.enabled and config.metrics.port is None:
            self._reserved[config.metrics.path] = self._metrics_endpoint
        self._metrics_server: asyncio.AbstractServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Open upstream pools (and, with the runtime, filter pools). Idempotent."""
        if self.state is not Lifecycle.NEW:
            return
        self.state = Lifecycle.STARTING
        t = self.config.server.timeouts
        for name, upstream in self.config.upstreams.items():
            self.pools[name] = UpstreamPool(_settings(upstream, t.upstream_connect, t.upstream_read))
        if self.config.metrics.enabled and self.config.metrics.port is not None:
            self._metrics_server = await _start_metrics_server(
                self.config.server.host, self.config.metrics.port
            )
        self.state = Lifecycle.READY

    async def shutdown(self) -> None:
        if self.state is Lifecycle.CLOSED:
            return
        self.state = Lifecycle.CLOSED
        for pool in self.pools.values():
            await pool.close()
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
            if self.state is not Lifecycle.READY and self.state is not Lifecycle.DRAINING:
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
        match = self.table.match(normalize_host(host.decode("latin-1")), path, method)
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
            metrics.in_flight.inc()
        try:
            if route.upstream is None:
                await self._to_app(exchange, scope, receive, send, path)
            else:
                await self._proxy(
                    exchange, route.upstream, scope, receive, send, host, path, body_length, chunked
                )
        finally:
            if metrics is not None:
                metrics.in_flight.dec()

    async def _proxy(
        self,
        exchange: _Exchange,
        upstream_name: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        host: bytes,
        path: str,
        body_length: int | None,
        chunked: bool,
    ) -> None:
        method = exchange.method
        headers: Headers = scope["headers"]
        policy = self._policies[upstream_name]
        peer = exchange.peer
        request_id = request_id_for(headers, peer, policy)
        exchange.request_id = request_id
        exchange.client = client_address(peer, _xff(headers, peer, policy), policy)
        upgrade = False
        out_headers = upstream_request_headers(
            headers,
            peer=peer,
            client=exchange.client,
            scheme=scope.get("scheme", "http"),
            host=host,
            policy=policy,
            request_id=request_id,
            keep_upgrade=upgrade,
        )
        query: bytes = scope.get("query_string", b"")
        target = path + "?" + query.decode("latin-1") if query else path
        body: BodySource
        if body_length == 0 or (body_length is None and not chunked):
            body = BodySource(None)
        elif body_length is not None and body_length <= _SMALL_BODY:
            try:
                data = await _read_body(receive, body_length)
            except _ClientGone:
                exchange.status = 499
                exchange.log()
                return
            exchange.request_bytes = len(data)
            body = BodySource(data, len(data))
        else:
            body = BodySource(self._stream_body(receive, exchange), body_length)
        pool = self.pools[upstream_name]
        upstream_started = time.perf_counter()
        try:
            response = await pool.request(method, target, out_headers, body, idempotent=method in _IDEMPOTENT)
        except _BodyTooLarge:
            await exchange.error(
                send,
                413,
                "payload_too_large",
                f"request body exceeds {self._max_body} bytes",
                "body_too_large",
            )
            return
        except (_ClientGone, RequestBodyError):
            exchange.status = 499  # the client went away mid-upload (nginx's code for it)
            exchange.log()
            return
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
            return
        exchange.upstream_duration = time.perf_counter() - upstream_started
        if self.metrics is not None:
            self.metrics.upstream_duration.labels(upstream_name).observe(exchange.upstream_duration)
        try:
            status = response.status
            out = response_headers(
                response.headers, request_id=request_id, request_id_header=self._request_id_header
            )
            exchange.status = status
            await send({"type": "http.response.start", "status": status, "headers": out})
            sent = 0
            if method != "HEAD":
                try:
                    async for chunk in response.body():
                        sent += len(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except UpstreamError as exc:
                    # Never a silently truncated 200: leave the response incomplete so the server aborts it.
                    self._count_upstream_error(upstream_name, exc)
                    logger.warning("request %s: response aborted: %s", request_id.decode(), exc)
                    exchange.bytes_sent = sent
                    exchange.aborted = True
                    exchange.log()
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            exchange.bytes_sent = sent
        except OSError:
            exchange.aborted = True  # client went away while we were sending
        finally:
            await response.aclose()
        if not exchange.aborted:
            exchange.log()

    async def _stream_body(self, receive: Receive, exchange: _Exchange) -> AsyncIterator[bytes]:
        limit = self._max_body
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise _BodyTooLarge()
            exchange.request_bytes = total
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def _to_app(
        self, exchange: _Exchange, scope: Scope, receive: Receive, send: Send, path: str
    ) -> None:
        assert self.app is not None
        headers: Headers = scope["headers"]
        request_id = request_id_for(headers, exchange.peer, self._policy)
        exchange.request_id = request_id
        exchange.client = client_address(
            exchange.peer, _xff(headers, exchange.peer, self._policy), self._policy
        )
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
        match = self.table.match(normalize_host(host.decode("latin-1")), canonical.path, "GET")
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
        upstream = self.config.upstreams[route.upstream]
        policy = self._policies[route.upstream]
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
            self.config.server.timeouts.upstream_connect,
        )

    # -- reserved endpoints ---------------------------------------------------------------------------------------

    async def _healthz(self, send: Send) -> None:
        await _send_json(send, 200, {"status": "ok"})

    async def _readyz(self, send: Send) -> None:
        ready = self.state is Lifecycle.READY
        body: dict[str, Any] = {"status": "ready" if ready else self.state.value}
        body["upstreams"] = {name: pool.stats() for name, pool in self.pools.items()}
        await _send_json(send, 200 if ready else 503, body)

    async def _metrics_endpoint(self, send: Send) -> None:
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


class _Exchange:
    """Per-request bookkeeping for the access log, metrics and error answers."""

    __slots__ = (
        "aborted",
        "bytes_sent",
        "client",
        "extra_headers",
        "gateway",
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
            self.request_id = request_id_for(self.scope["headers"], self.peer, gateway._policy)
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

    def log(self) -> None:
        gateway = self.gateway
        duration = time.perf_counter() - self.started
        metrics = gateway.metrics
        if metrics is not None:
            status = self.status or 499
            metrics.request_child(self.route, self.method, status).observe(duration)
            if self.request_bytes:
                metrics.request_bytes.labels(self.route).inc(self.request_bytes)
            if self.bytes_sent:
                metrics.response_bytes.labels(self.route).inc(self.bytes_sent)
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


def _settings(upstream: UpstreamConfig, connect: float, read: float) -> UpstreamSettings:
    return UpstreamSettings(
        name=upstream.name,
        targets=tuple(Target(t.host, t.port, t.scheme) for t in upstream.targets),
        max_connections_per_target=upstream.keepalive,
        max_idle_per_target=upstream.keepalive,
        connect_timeout=upstream.connect_timeout or connect,
        read_timeout=upstream.read_timeout or read,
        retries=upstream.retries,
        eject_after_failures=upstream.eject_after_failures,
        eject_seconds=upstream.eject_seconds,
    )


def _xff(headers: Headers, peer: str | None, policy: ForwardingPolicy) -> list[bytes]:
    if not policy.trusted_proxies or peer is None or not policy.is_trusted(peer):
        return []
    return [v for n, v in headers if n == b"x-forwarded-for"]


def _valid_host(host: bytes) -> bool:
    return len(host) <= 255 and all(33 <= c < 127 and c not in b'/\\?#@"<>{}|^`' for c in host)


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


async def _read_body(receive: Receive, expected: int) -> bytes:
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


async def _start_metrics_server(host: str, port: int) -> asyncio.AbstractServer:
    """A minimal HTTP/1.0 responder for /metrics on its own port (kept off the proxy listener)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
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

    return await asyncio.start_server(handle, host, port)


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
    return Gateway(config)
