"""uvicorn wiring: the HTTP protocol with the limits uvicorn does not enforce, workers, metrics dir, signals.

uvicorn's httptools protocol has no header-read deadline, no bound on header size or count, no body-read
deadline, and never closes a freshly opened connection that stays silent. ``protocol_class(limits)`` builds a
small subclass of ``HttpToolsProtocol`` that adds them around ``data_received`` and the message-begin and
headers-complete parser callbacks, calling ``super()`` in each, so it follows uvicorn's own request handling:

* header deadline: from the first byte of each request (first or keep-alive) to the end of its headers;
  trickled bytes do not extend it. Past it: ``408`` and the connection is closed.
* header size and count: request line + header lines (counted as ``name: value\\r\\n``) and the number of
  header fields; past either: ``431`` and close. A single header line that never ends is bounded by the raw
  bytes received, so httptools cannot buffer it without limit.
* idle connections: a fresh connection gets ``header_read_timeout`` to send its first byte; bytes that begin
  no request (stray CRLFs) do not restart the idle or keep-alive timer.
* body deadline: while the app waits in ``receive()`` for body bytes and none arrive for
  ``body_read_timeout``: ``408`` and close, or only close when the response has already started.

An error response is followed by a half-close (``write_eof``) and a short lingering read that discards input,
so a client that is still sending reads the answer instead of losing it to a TCP reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar

import orjson
from starlette.types import ASGIApp
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import Server
from uvicorn.supervisors.multiprocess import Multiprocess

from wasm_gateway.config import ServerConfig, load_config
from wasm_gateway.exceptions import ConfigError
from wasm_gateway.reload import sighup_blocked

__all__ = [
    "GatewayHttpProtocol",
    "ServeOptions",
    "ServerLimits",
    "limits_for",
    "protocol_class",
    "serve",
]

logger = logging.getLogger("wasm_gateway.server")

PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# " " between method and target, " HTTP/1.1\r\n" after it; the method is added where it is known.
_REQUEST_LINE_OVERHEAD = 1 + len(b" HTTP/1.1\r\n")
# ": " and "\r\n" around each header value.
_HEADER_LINE_OVERHEAD = 4
# How long an error response waits for the client to stop sending before the socket is closed.
_LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class ServerLimits:
    """Per-connection limits enforced by the protocol returned by ``protocol_class``."""

    max_header_bytes: int = 61440
    max_header_count: int = 100
    header_read_timeout: float = 10.0
    body_read_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_header_count", "header_read_timeout", "body_read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"server limits: {name}: {value!r} is invalid (expected a number > 0)")


class _HeaderLimitExceeded(Exception):
    """Raised inside a parser callback to stop httptools; the answer has already been written."""


class _LimitedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus header/body deadlines and header bounds; ``limits`` is set per subclass.

    Header bounds are checked where headers end and at the end of each chunk still inside a header section,
    not per header: per-header hooks cost more than the rest of this class on every request. A chunk is at
    most the transport's read size, so that is all one chunk can add before the check.
    """

    limits: ClassVar[ServerLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_header_bytes = self.limits.max_header_bytes
        self._max_header_count = self.limits.max_header_count
        self._in_headers = False
        self._chunk_size = 0
        # Raw bytes fed since the current request began, counting its first chunk whole: an upper bound of
        # its header bytes. Minus that first chunk, while headers are unfinished: a lower bound.
        self._header_upper_bound = 0
        self._header_first_chunk = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._rejected = False
        self._watched_cycle: RequestResponseCycle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.timeout_keep_alive_task is None:
            # uvicorn arms no timer before the first byte: a silent connection would stay open forever.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.limits.header_read_timeout, self.timeout_keep_alive_handler
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # lingering after an error response: discard what the client still sends
        idle_timer = self.timeout_keep_alive_task
        idle_deadline = idle_timer.when() if idle_timer is not None else None
        self._chunk_size = len(data)
        if self._in_headers:
            self._header_upper_bound += len(data)

        super().data_received(data)

        if self._rejected or self.transport.is_closing():
            return
        if self._in_headers:
            if len(self.headers) > self._max_header_count:
                self._reject_too_many_headers()
            elif (
                self._header_upper_bound > self._max_header_bytes
                and self._unfinished_header_bytes() > self._max_header_bytes
            ):
                self._reject_headers_too_large()
            elif self._header_timer is None:
                # The request began in this chunk; its deadline runs from now whatever arrives later.
                self._header_timer = self.loop.call_later(
                    self.limits.header_read_timeout, self._header_deadline_passed
                )
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            if (
                idle_deadline is not None
                and self.timeout_keep_alive_task is None
                and self.transport.get_protocol() is self  # not upgraded to WebSocket
            ):
                # The chunk began no request (e.g. stray CRLF): keep the idle deadline where it was.
                self.timeout_keep_alive_task = self.loop.call_at(
                    idle_deadline, self.timeout_keep_alive_handler
                )
        elif cycle.more_body and cycle is not self._watched_cycle:
            # Only the last request of a chunk can have an unfinished body, and its ASGI task has not run yet.
            self._watched_cycle = cycle
            self._watch_body(cycle)

    # httptools parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_upper_bound = self._header_first_chunk = self._chunk_size

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if len(self.headers) > self._max_header_count:
            self._reject_too_many_headers()
            raise _HeaderLimitExceeded
        if self._header_upper_bound > self._max_header_bytes:
            size = self._parsed_header_bytes() + len(self.parser.get_method())
            if size > self._max_header_bytes:
                self._reject_headers_too_large()
                raise _HeaderLimitExceeded
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = _HeadCoalescingTransport(cycle, self.transport, self.loop)  # type: ignore[assignment]

    def send_400_response(self, msg: str) -> None:
        if self._rejected:
            return  # the parser stopped because of our own _HeaderLimitExceeded; the answer is written
        super().send_400_response(msg)

    # limits

    def _parsed_header_bytes(self) -> int:
        """Request line without the method, plus the header lines parsed so far (as ``name: value\\r\\n``)."""
        headers = self.headers
        return (
            _REQUEST_LINE_OVERHEAD
            + len(self.url)
            + sum(len(name) + len(value) for name, value in headers)
            + _HEADER_LINE_OVERHEAD * len(headers)
        )

    def _unfinished_header_bytes(self) -> int:
        """At least this many header bytes, including an unfinished line httptools is still buffering."""
        return max(self._parsed_header_bytes(), self._header_upper_bound - self._header_first_chunk)

    def _reject_headers_too_large(self) -> None:
        self._reject_request(
            431,
            "request_header_fields_too_large",
            f"request headers exceed {self._max_header_bytes} bytes",
        )

    def _reject_too_many_headers(self) -> None:
        self._reject_request(
            431,
            "request_header_fields_too_large",
            f"request has more than {self._max_header_count} header fields",
        )

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self._in_headers and not self._rejected and not self.transport.is_closing():
            self._reject_request(
                408,
                "request_timeout",
                f"request headers not received within {self.limits.header_read_timeout:g} s",
            )

    def _reject_request(self, status: int, error: str, detail: str) -> None:
        """Answer a request still in its header phase, unless an earlier response is on the wire."""
        logger.info("%s %s: %s", self._client_label(), status, detail)
        previous = self.cycle
        if previous is not None and not previous.response_complete:
            # A pipelined request's answer cannot be interleaved with the previous response.
            self._rejected = True
            self.transport.close()
        else:
            self._send_error_and_close(status, error, detail)

    def _watch_body(self, cycle: RequestResponseCycle) -> None:
        receive = cycle.receive
        timeout = self.limits.body_read_timeout
        loop = self.loop

        async def receive_with_deadline() -> Any:  # uvicorn's ASGIReceiveEvent lives in a private module
            if cycle.more_body and not cycle.body and not cycle.disconnected and not cycle.response_complete:
                timer = loop.call_later(timeout, self._body_stalled, cycle)
                try:
                    return await receive()
                finally:
                    timer.cancel()
            return await receive()

        # run_asgi() looks up cycle.receive when the task first runs, which is after this data_received.
        cycle.receive = receive_with_deadline  # type: ignore[method-assign]

    def _body_stalled(self, cycle: RequestResponseCycle) -> None:
        if cycle.response_complete or cycle.disconnected or self.transport.is_closing():
            return
        detail = f"no request body bytes received for {self.limits.body_read_timeout:g} s"
        logger.info("%s 408: %s", self._client_label(), detail)
        response_started = cycle.response_started
        # The app's pending receive() returns http.disconnect and its later sends become no-ops.
        cycle.disconnected = True
        cycle.message_event.set()
        if response_started:
            self._rejected = True
            self.transport.close()
        else:
            self._send_error_and_close(408, "request_timeout", detail)

    def _send_error_and_close(self, status: int, error: str, detail: str) -> None:
        self._rejected = True
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        body = orjson.dumps({"error": error, "status": status, "detail": detail})
        head = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode("ascii"))]
        for name, value in self.server_state.default_headers:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        transport = self.transport
        transport.write(b"".join(head) + body)
        if not transport.can_write_eof():
            transport.close()
            return
        # Half-close and keep reading (discarding) briefly: closing with unread input would send a reset
        # that can destroy the response before the client reads it.
        transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(_LINGER_SECONDS, transport.close)

    def _client_label(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"


class _HeadCoalescingTransport:
    """Holds a response head until the first body write, so a small response leaves in one ``write`` (one
    syscall, one TCP segment) instead of two. A head with no body write in the same loop iteration is flushed on
    its own (``call_soon``), so streamed responses (SSE) are not delayed. After the first flush the cycle talks to
    the real transport again."""

    __slots__ = ("_cycle", "_head", "_loop", "_transport")

    def __init__(
        self, cycle: RequestResponseCycle, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop
    ):
        self._cycle = cycle
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is None:
            self._head = data
            self._loop.call_soon(self._flush)
            return
        head, self._head = self._head, b""
        self._cycle.transport = self._transport
        self._transport.write(head + data if data else head)

    def _flush(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            self._cycle.transport = self._transport
            self._transport.write(head)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@functools.cache
def protocol_class(limits: ServerLimits) -> type[HttpToolsProtocol]:
    """The ``HttpToolsProtocol`` subclass enforcing ``limits`` (one class per distinct limits value)."""
    return type("LimitedHttpToolsProtocol", (_LimitedHttpToolsProtocol,), {"limits": limits})


def limits_for(server: ServerConfig) -> ServerLimits:
    """The protocol limits a ``[server]`` config section asks for."""
    return ServerLimits(
        max_header_bytes=server.max_header_bytes,
        max_header_count=server.max_header_count,
        header_read_timeout=server.timeouts.header_read,
        body_read_timeout=server.timeouts.body_read,
    )


def _limits_from_environment() -> ServerLimits:
    path = os.environ.get("WASM_GATEWAY_CONFIG")
    return limits_for(load_config(path).server) if path else ServerLimits()


# For `uvicorn --http wasm_gateway.server:GatewayHttpProtocol` (and the gunicorn worker) outside the CLI: the
# limits of the config named by WASM_GATEWAY_CONFIG, else the defaults.
GatewayHttpProtocol = protocol_class(_limits_from_environment())


@dataclass(frozen=True)
class ServeOptions:
    app: str | ASGIApp
    factory: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    limits: ServerLimits = field(default_factory=ServerLimits)
    max_concurrent_requests: int | None = None
    keepalive_timeout: float = 5.0
    graceful_shutdown_timeout: float = 30.0
    log_level: str = "info"
    access_log: bool = False
    metrics_multiproc_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    on_started: Callable[[str, int], None] | None = None
    pid_file: str | None = None
    """Written with this process's id (the one to send SIGHUP to) while serving; removed at exit."""


class _GatewayConfig(Config):
    """uvicorn ``Config`` carrying the limits: it is pickled to spawned workers, which build the class."""

    def __init__(self, app: Any, *, limits: ServerLimits, **kwargs: Any) -> None:
        self.limits = limits
        super().__init__(app, http="httptools", **kwargs)

    def load(self) -> None:
        super().load()
        self.http_protocol_class = protocol_class(self.limits)


class _Server(Server):
    """Calls ``on_started`` once lifespan startup is done and the socket listens."""

    def __init__(self, config: Config, host: str, on_started: Callable[[str, int], None] | None) -> None:
        super().__init__(config)
        self._host = host
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            port: int = self.servers[0].sockets[0].getsockname()[1]
            self._on_started(self._host, port)


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, marking replaced or removed workers dead for prometheus-client.

    SIGHUP is forwarded to every worker, each of which reloads in place (uvicorn's own SIGHUP handling would
    replace the workers instead). Workers are spawned with SIGHUP blocked: one that has not installed its
    handler yet keeps the signal pending instead of dying of it."""

    def __init__(self, config: Config, sockets: list[socket.socket], metrics_dir: str | None) -> None:
        super().__init__(config, sockets)
        self._metrics_dir = metrics_dir

    def init_processes(self) -> None:
        with sighup_blocked():
            super().init_processes()

    def keep_subprocess_alive(self) -> None:
        with sighup_blocked():
            self._marking_gone_workers(super().keep_subprocess_alive)

    def handle_signals(self) -> None:
        with sighup_blocked():
            self._marking_gone_workers(super().handle_signals)

    def handle_hup(self) -> None:
        logger.info("Received SIGHUP, reloading the config in every worker.")
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)

    def _marking_gone_workers(self, step: Callable[[], None]) -> None:
        before = {process.pid for process in self.processes}
        step()
        if self._metrics_dir is None:
            return
        gone = before - {process.pid for process in self.processes}
        if gone:
            from prometheus_client import multiprocess

            for pid in gone:
                if pid is not None:
                    multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]


def serve(options: ServeOptions) -> int:
    """Run the gateway until SIGTERM/SIGINT (then drain up to the grace period); return an exit code."""
    if options.workers < 1:
        raise ConfigError(f"server.workers: {options.workers} is invalid (expected an integer >= 1)")
    if options.workers > 1 and not isinstance(options.app, str):
        raise ConfigError(
            f"server.workers: {options.workers} workers need the app as an import string "
            '(e.g. "wasm_gateway.app:create_app"), got an app object'
        )
    with (
        _worker_environment(options) as metrics_dir,
        _signal_handlers_restored(),
        sighup_blocked(),
        _pid_file(options.pid_file),
    ):
        config = _GatewayConfig(
            options.app,
            limits=options.limits,
            factory=options.factory,
            host=options.host,
            port=options.port,
            workers=options.workers,
            loop="uvloop",
            ws="auto",  # the sans-I/O websockets implementation; "websockets" is the deprecated legacy API
            lifespan="on",
            proxy_headers=False,  # client addresses come from trusted_proxies in the gateway itself
            server_header=False,
            date_header=True,
            limit_concurrency=options.max_concurrent_requests,
            # uvicorn annotates these as int, but only hands them to call_later()/wait_for().
            timeout_keep_alive=options.keepalive_timeout,
            timeout_graceful_shutdown=options.graceful_shutdown_timeout,
            log_level=options.log_level,
            access_log=options.access_log,
        )
        try:
            if options.workers == 1:
                return _serve_single(config, options)
            return _serve_workers(config, options, metrics_dir)
        except SystemExit as exc:  # uvicorn exits on bind or startup failures
            return exc.code if isinstance(exc.code, int) else STARTUP_FAILURE


def _serve_single(config: Config, options: ServeOptions) -> int:
    server = _Server(config, options.host, options.on_started)

    def request_exit(signum: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal it handled once it has shut down: land here, not in SIG_DFL.
        server.should_exit = True

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, request_exit)
    server.run()
    return 0 if server.started else STARTUP_FAILURE


def _serve_workers(config: Config, options: ServeOptions, metrics_dir: str | None) -> int:
    sock = config.bind_socket()
    with sock:
        # Listen before spawning: connections queue in the backlog until a worker is ready.
        sock.listen(config.backlog)
        supervisor = _Supervisor(config, [sock], metrics_dir)
        if options.on_started is not None:
            options.on_started(options.host, sock.getsockname()[1])
        supervisor.run()
    failed = any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
    return STARTUP_FAILURE if failed else 0


@contextlib.contextmanager
def _pid_file(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    pid = str(os.getpid())
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(pid + "\n")
    except OSError as exc:
        raise ConfigError(f"server.pid_file: cannot write {path!r}: {exc.strerror or exc}") from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            with open(path) as f:
                mine = f.read().strip() == pid
            if mine:
                os.unlink(path)


@contextlib.contextmanager
def _worker_environment(options: ServeOptions) -> Iterator[str | None]:
    """Set ``options.env`` and the prometheus multiprocess dir in os.environ (spawned workers inherit it)."""
    saved = {name: os.environ.get(name) for name in (*options.env, PROMETHEUS_MULTIPROC_ENV)}
    created_dir: str | None = None
    metrics_dir: str | None = None
    try:
        os.environ.update(options.env)
        if options.workers > 1 or options.metrics_multiproc_dir is not None:
            metrics_dir = options.metrics_multiproc_dir or os.environ.get(PROMETHEUS_MULTIPROC_ENV)
            if not metrics_dir:
                metrics_dir = created_dir = tempfile.mkdtemp(prefix="wasm-gateway-metrics-")
            _clean_metrics_dir(metrics_dir)
            os.environ[PROMETHEUS_MULTIPROC_ENV] = metrics_dir
        yield metrics_dir
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if created_dir is not None:
            shutil.rmtree(created_dir, ignore_errors=True)


def _clean_metrics_dir(path: str) -> None:
    """Create the directory, removing metric files left by an earlier run (they would be summed in)."""
    try:
        os.makedirs(path, exist_ok=True)
        for entry in os.scandir(path):
            if entry.name.endswith(".db") and entry.is_file():
                os.unlink(entry.path)
    except OSError as exc:
        raise ConfigError(f"metrics multiprocess directory {path!r}: {exc.strerror or exc}") from exc


_SIGNAL_NAMES = (
    "SIGINT",
    "SIGTERM",
    "SIGBREAK",
    "SIGHUP",
    "SIGQUIT",
    "SIGTTIN",
    "SIGTTOU",
    "SIGUSR1",
    "SIGUSR2",
)
_SUPERVISOR_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in (*_SIGNAL_NAMES, "SIGWINCH") if hasattr(signal, name)
)


@contextlib.contextmanager
def _signal_handlers_restored() -> Iterator[None]:
    """uvicorn's supervisor and our exit handler replace signal handlers; put the caller's back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in _SUPERVISOR_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)
