"""Keep-alive connection pools for one named upstream, and the request entry point.

``UpstreamPool`` (one per upstream per worker, created and used inside one running loop) balances over its
targets (``balancer.RoundRobinBalancer``) and keeps one ``_TargetPool`` per target:

- at most ``max_connections_per_target`` open (connecting included); further requests wait FIFO for a
  released connection or a freed slot, up to ``connect_timeout``, then fail with UpstreamConnectError;
- idle connections are reused LIFO (the warmest socket), at most ``max_idle_per_target`` are kept, and none
  older than ``idle_timeout`` is handed out; one timer per target closes expired ones. A connection the origin
  closes or writes to while idle is dropped at once (``eof_received`` / ``data_received``).

Retries (only for requests the caller marks idempotent): a connect failure or connect timeout moves on to the
next target in turn, up to ``retries`` times, if the body was not started (bytes bodies, no body, or an
iterator not yet read). Separately, a reused keep-alive connection that dies before any response byte (the
origin closed it as we sent: the classic keep-alive race) is retried once on a fresh connection to the same
target, if the body is replayable; that retry does not count against ``retries`` nor as a target failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from wasm_gateway.exceptions import UpstreamConnectError, UpstreamError, UpstreamTimeoutError
from wasm_gateway.upstream.balancer import RoundRobinBalancer
from wasm_gateway.upstream.connection import (
    BodySource,
    Target,
    UpstreamConnection,
    UpstreamResponse,
    encode_request_head,
)

__all__ = ["UpstreamPool", "UpstreamSettings"]

# Methods whose requests normally carry content: they get `content-length: 0` when the body is empty.
_METHODS_WITH_BODY = frozenset(("POST", "PUT", "PATCH"))
# A bytes body up to this size goes out in the same write as the head.
_COALESCE_BODY_LIMIT = 64 * 1024
_CHUNKED = b"transfer-encoding: chunked\r\n"
_EMPTY_LENGTH = b"content-length: 0\r\n"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    name: str  # upstream name, for errors and metrics
    targets: tuple[Target, ...]
    max_connections_per_target: int = 64
    max_idle_per_target: int = 64
    idle_timeout: float = 30.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0  # for the response head, between body bytes, and for a stalled request body
    retries: int = 1  # extra attempts on connect failure, idempotent requests with an unstarted body only
    eject_after_failures: int = 3  # consecutive failures => target ejected (<= 0: never)
    eject_seconds: float = 10.0
    max_response_header_bytes: int = 65536

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f'upstream "{self.name}" has no targets')
        if self.max_connections_per_target < 1:
            raise ValueError("max_connections_per_target must be at least 1")
        if self.max_idle_per_target < 0 or self.retries < 0:
            raise ValueError("max_idle_per_target and retries must not be negative")
        for field in ("idle_timeout", "connect_timeout", "read_timeout", "eject_seconds"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be positive")
        if self.max_response_header_bytes < 256:
            raise ValueError("max_response_header_bytes must be at least 256")


class _NotRetryable(UpstreamConnectError):
    """Pool closed or every connection busy: retrying elsewhere or counting a target failure is wrong."""


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc})"
    return f"connect failed ({exc.strerror or exc or type(exc).__name__})"


class _TargetPool:
    """Connections to one target: idle LIFO stack, open-connection bound, FIFO waiters."""

    __slots__ = (
        "_connect_timeout",
        "_idle_timeout",
        "_loop",
        "_max_header_bytes",
        "_max_idle",
        "_max_open",
        "_read_timeout",
        "_ssl",
        "_sweep_handle",
        "authority",
        "closed",
        "connecting",
        "connections",
        "idle",
        "label",
        "reserved",
        "target",
        "waiters",
    )

    def __init__(self, settings: UpstreamSettings, target: Target, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.target = target
        self.authority = target.authority
        self.label = f'upstream "{settings.name}" {self.authority}'
        self._max_open = settings.max_connections_per_target
        self._max_idle = settings.max_idle_per_target
        self._idle_timeout = settings.idle_timeout
        self._connect_timeout = settings.connect_timeout
        self._read_timeout = settings.read_timeout
        self._max_header_bytes = settings.max_response_header_bytes
        self._ssl = ssl.create_default_context() if target.scheme == "https" else None
        self.connections: set[UpstreamConnection] = set()  # open or connecting
        self.connecting = 0
        # Slots freed for a waiter that has not run yet: counted as taken so nobody jumps the queue.
        self.reserved = 0
        self.idle: deque[UpstreamConnection] = deque()  # oldest left, newest right
        self.waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self.closed = False

    async def acquire(self, fresh: bool) -> UpstreamConnection:
        """A connection for one exchange: a live idle one (unless ``fresh``), a new one, or a waited-for one."""
        while True:
            if self.closed:
                raise _NotRetryable(f"{self.label}: pool is closed", self.authority)
            if not fresh and self.idle:
                conn = self.take_idle()
                if conn is not None:
                    return conn
            if len(self.connections) + self.reserved < self._max_open:
                return await self._open()
            got = await self._wait()
            if got is None:
                self.reserved -= 1
                return await self._open()
            if not got.closed:
                return got
            # It died between hand-over and now: try again.

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        now = self._loop.time()
        while idle:
            conn = idle.pop()
            conn.in_idle = False
            if not conn.closed and now - conn.idle_since < self._idle_timeout:
                return conn
            conn.close()
        return None

    async def _open(self) -> UpstreamConnection:
        target = self.target
        conn = UpstreamConnection(
            self,
            self.label,
            self.authority,
            read_timeout=self._read_timeout,
            max_header_bytes=self._max_header_bytes,
        )
        self.connections.add(conn)
        self.connecting += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._loop.create_connection(
                    lambda: conn,
                    target.host,
                    target.port,
                    ssl=self._ssl,
                    server_hostname=target.host if self._ssl is not None else None,
                )
        except BaseException as exc:
            self.connecting -= 1
            conn.close()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeoutError(
                    f"{self.label}: connect timed out after {self._connect_timeout:g}s", self.authority
                ) from None
            if isinstance(exc, OSError):
                raise UpstreamConnectError(
                    f"{self.label}: {_describe_os_error(exc)}", self.authority
                ) from exc
            raise
        self.connecting -= 1
        if self.closed:
            conn.close()
            raise _NotRetryable(f"{self.label}: pool is closed", self.authority)
        return conn

    async def _wait(self) -> UpstreamConnection | None:
        """Wait in line; the result is a released connection, or None for a freed (reserved) slot."""
        waiter: asyncio.Future[UpstreamConnection | None] = self._loop.create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await waiter
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                raise _NotRetryable(
                    f"{self.label}: all {self._max_open} connections stayed busy for "
                    f"{self._connect_timeout:g}s (connect_timeout)",
                    self.authority,
                ) from None
            raise

    def _abandon(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        """A waiter gave up (timeout, cancellation): pass on whatever it was given."""
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
            return
        if waiter.cancelled() or waiter.exception() is not None:
            return
        conn = waiter.result()
        if conn is None:
            self.reserved -= 1
            self._grant_slot()
        elif not conn.closed:
            self.connection_idle(conn)

    def _grant_slot(self) -> None:
        while self.waiters and len(self.connections) + self.reserved < self._max_open:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.reserved += 1
                waiter.set_result(None)

    # -- ConnectionOwner ---------------------------------------------------------------------------------

    def connection_idle(self, conn: UpstreamConnection) -> None:
        if self.closed:
            conn.close()
            return
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if len(self.idle) >= self._max_idle:
            conn.close()
            return
        conn.in_idle = True
        self.idle.append(conn)
        if self._sweep_handle is None:
            self._sweep_handle = self._loop.call_at(conn.idle_since + self._idle_timeout, self._sweep)

    def connection_closed(self, conn: UpstreamConnection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        if conn.in_idle:
            conn.in_idle = False
            self.idle.remove(conn)
        if self.waiters:
            self._grant_slot()

    # -- housekeeping -----------------------------------------------------------------------------------

    def _sweep(self) -> None:
        self._sweep_handle = None
        idle = self.idle
        expired_before = self._loop.time() - self._idle_timeout
        while idle and idle[0].idle_since <= expired_before:
            conn = idle.popleft()
            conn.in_idle = False
            conn.close()
        if idle and not self.closed:
            self._sweep_handle = self._loop.call_at(idle[0].idle_since + self._idle_timeout, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_NotRetryable(f"{self.label}: pool is closed", self.authority))
        for conn in list(self.connections):
            conn.abort("pool is closed")
        self.idle.clear()

    def stats(self) -> dict[str, int]:
        open_count = len(self.connections) - self.connecting
        return {
            "open": open_count,
            "connecting": self.connecting,
            "idle": len(self.idle),
            "in_use": open_count - len(self.idle),
            "waiting": sum(1 for waiter in self.waiters if not waiter.done()),
        }


class UpstreamPool:
    """HTTP/1.1 client for one named upstream: round robin over its targets, keep-alive pools, retries."""

    __slots__ = ("_balancer", "_closed", "_pools", "_retries", "settings")

    def __init__(self, settings: UpstreamSettings) -> None:
        loop = asyncio.get_running_loop()
        self.settings = settings
        self._pools = tuple(_TargetPool(settings, target, loop) for target in settings.targets)
        self._balancer = RoundRobinBalancer(
            len(self._pools),
            eject_after_failures=settings.eject_after_failures,
            eject_seconds=settings.eject_seconds,
            clock=loop.time,
        )
        self._retries = settings.retries
        self._closed = False

    @property
    def name(self) -> str:
        return self.settings.name

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: BodySource | None,
        *,
        idempotent: bool,
    ) -> UpstreamResponse:
        """Send one request and return the response once its head arrived.

        ``target`` is the request-target (path and query); ``headers`` the final list to send (incl. host),
        without framing headers: content-length or chunked transfer coding is added here from ``body``.
        Raises UpstreamConnectError, UpstreamTimeoutError or UpstreamProtocolError; exceptions raised by the
        body iterator, RequestBodyError (length mismatch) and ValueError (CR/LF in the head) also propagate.
        """
        if self._closed:
            raise UpstreamConnectError(f'upstream "{self.settings.name}": pool is closed')
        stream: AsyncIterator[bytes] | None = None
        length: int | None = None
        payload = b""
        chunks = body.chunks if body is not None else None
        if chunks is None:
            framing = _EMPTY_LENGTH if method in _METHODS_WITH_BODY else b""
        elif isinstance(chunks, bytes | bytearray | memoryview):
            payload = bytes(chunks)
            if payload:
                framing = b"content-length: %d\r\n" % len(payload)
            else:
                framing = _EMPTY_LENGTH if method in _METHODS_WITH_BODY else b""
        else:
            assert body is not None
            length = body.length
            if length is None:
                framing = _CHUNKED
                stream = chunks
            elif length > 0:
                framing = b"content-length: %d\r\n" % length
                stream = chunks
            else:
                framing = _EMPTY_LENGTH if method in _METHODS_WITH_BODY else b""
        head, keep_alive = encode_request_head(method, target, headers, framing)
        if payload and len(payload) <= _COALESCE_BODY_LIMIT:
            head += payload
            payload = b""
        head_request = method == "HEAD"

        balancer = self._balancer
        pools = self._pools
        retries_left = self._retries if idempotent else 0
        stale_retry = idempotent
        tried: list[int] = []
        index = -1
        fresh = False
        while True:
            if index < 0:
                index = balancer.pick(tried)
            tpool = pools[index]
            try:
                # Fast path without a coroutine: a live idle connection.
                conn_or_none = tpool.take_idle() if tpool.idle and not fresh else None
                conn = conn_or_none if conn_or_none is not None else await tpool.acquire(fresh)
            except _NotRetryable:
                raise
            except UpstreamError:
                balancer.record_failure(index)
                if retries_left:
                    retries_left -= 1
                    tried.append(index)
                    index = -1
                    fresh = False
                    continue
                raise

            try:
                waiter = conn.begin(head_request, keep_alive)
                conn.write(head)
                if payload:
                    conn.write(payload)
                if stream is None:
                    conn.request_done(True)
                else:
                    stale_retry = False  # the iterator is being consumed: no replay from here on
                    conn.request_done(await conn.send_body(stream, length))
                if not waiter.done():
                    await waiter
                error = conn.error
                if error is None and not conn.head_received:
                    error = UpstreamConnectError(f"{conn.label}: connection closed", conn.authority)
                if error is not None:
                    raise error
            except UpstreamConnectError:
                # Closed or reset before any response byte.
                stale = conn.reused and not conn.received_any
                conn.release()
                if stale and stale_retry:
                    stale_retry = False
                    fresh = True
                    continue
                if not stale:
                    balancer.record_failure(index)
                raise
            except UpstreamTimeoutError:
                conn.release()
                balancer.record_failure(index)
                raise
            except BaseException:
                conn.release()
                raise
            balancer.record_success(index)
            return conn.response()

    async def close(self) -> None:
        """Close every connection; waiting and in-flight requests fail with UpstreamConnectError."""
        self._closed = True
        for tpool in self._pools:
            tpool.close()

    def health(self) -> tuple[int, int, int]:
        """(targets, targets in rotation, ejections so far): what the metrics report."""
        balancer = self._balancer
        return balancer.size, balancer.healthy(), balancer.ejections

    def stats(self) -> dict[str, object]:
        """Per target (keyed by ``host:port``): open, connecting, idle, in_use, waiting, ejected, failures."""
        result: dict[str, object] = {}
        for index, tpool in enumerate(self._pools):
            entry: dict[str, object] = dict(tpool.stats())
            entry["ejected"] = self._balancer.is_ejected(index)
            entry["consecutive_failures"] = self._balancer.failures(index)
            key = tpool.authority if tpool.authority not in result else f"{tpool.authority}#{index}"
            result[key] = entry
        return result
