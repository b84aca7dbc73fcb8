"""One HTTP/1.1 connection to an origin: an ``asyncio.Protocol`` fed by httptools' response parser.

The hot path is kept flat on purpose (the upstream client sets the proxy's speed): the request head (and a
small body) goes out in one ``transport.write``; the response is parsed in ``data_received`` callbacks without
tasks; the request coroutine awaits one future for the head; a small body that arrives with the head is handed
over whole and the connection goes back to the pool before the caller reads it.

Things httptools does not do for us, and how this module does them:

- It cannot be told that an answer to HEAD has no body (its ``on_headers_complete`` return value is ignored),
  so the message is finished by hand at the head and the parser is replaced before the connection's next use.
- It has no ``feed_eof``: a read-until-close body is recognised at EOF from the response headers (no
  content-length, no chunked transfer coding) and finished by hand; any other EOF mid-message is an error.
- 1xx interim answers (100, 102, 103, ...) are complete messages to llhttp; they are skipped here. A 101 is
  returned as a final answer with no body and the connection is never reused.

Flow control: at most ``READ_BUFFER_LIMIT`` body bytes (plus the read in progress) are buffered before
``pause_reading``; reading resumes when the consumer takes the buffer. Request bodies wait on
``pause_writing``/``resume_writing``.

One watchdog timer per connection enforces ``read_timeout``: it is (re)armed by a timestamp, not rescheduled
per chunk, and counts only while we wait on the origin (response head or body with reading not paused, or a
request body write the origin is not accepting). Time spent waiting on the caller does not count.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, cast

import httptools

from wasm_gateway.exceptions import (
    RequestBodyError,
    UpstreamBodyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)

__all__ = [
    "READ_BUFFER_LIMIT",
    "BodySource",
    "ConnectionOwner",
    "RequestBodyError",
    "Target",
    "UpstreamConnection",
    "UpstreamResponse",
    "encode_request_head",
]

# Body bytes buffered per connection before reading pauses. One read of the transport may add up to its own
# buffer size on top (uvloop reads up to 256 KiB), so a connection holds at most about twice this.
READ_BUFFER_LIMIT = 256 * 1024

_FRAMING_HEADERS = frozenset((b"content-length", b"transfer-encoding"))
_CHUNKED_END = b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Target:
    """One origin address."""

    host: str
    port: int
    scheme: str = "http"

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError(f"target scheme must be http or https, not {self.scheme!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"target port must be 1..65535, not {self.port}")
        if not self.host:
            raise ValueError("target host must not be empty")

    @property
    def authority(self) -> str:
        """``host:port``, with IPv6 literals bracketed."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"


@dataclass(slots=True)
class BodySource:
    """A request body: bytes, an async iterator of bytes, or nothing.

    ``length`` is the total length of an iterator body when known (sent as content-length); None means
    unknown (sent chunked). It is ignored for bytes bodies.
    """

    chunks: AsyncIterator[bytes] | bytes | None
    length: int | None = None


class ConnectionOwner(Protocol):
    """What a connection reports to its pool."""

    def connection_idle(self, conn: UpstreamConnection) -> None: ...

    def connection_closed(self, conn: UpstreamConnection) -> None: ...


class _StopParsing(Exception):
    """Raised from a parser callback to stop llhttp (the reason is recorded on the connection first)."""


def encode_request_head(
    method: str, target: str, headers: Iterable[tuple[bytes, bytes]], framing: bytes
) -> tuple[bytes, bool]:
    """Encode an HTTP/1.1 request head; return it and whether the request allows keep-alive.

    ``framing`` is the complete content-length / transfer-encoding line (or b""); the caller's own framing
    headers are dropped. A CR or LF inside the method, target or any header would let one request smuggle
    another onto the connection, so the line breaks of the result are counted and a mismatch is refused.
    """
    if not target or " " in target:
        raise ValueError(f"invalid request-target {target!r}")
    parts = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    keep_alive = True
    lines = 2 if not framing else 3
    for name, value in headers:
        lower = name.lower()
        if lower in _FRAMING_HEADERS:
            continue
        if lower == b"connection" and b"close" in value.lower():
            keep_alive = False
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    parts.append(framing)
    parts.append(b"\r\n")
    head = b"".join(parts)
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise ValueError("request method, target or a header contains CR or LF")
    return head, keep_alive


def _not_connected(data: bytes) -> None:
    raise RuntimeError("connection is not established")


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection. Used by one request at a time (no pipelining).

    An exchange: ``begin()`` -> ``write()`` the head (and body, or ``send_body()``) -> ``request_done()`` ->
    await the head future -> ``response()``. ``release()`` ends it: back to the owner when reusable, else closed.
    """

    __slots__ = (
        "_active",
        "_body_waiter",
        "_buffered",
        "_chunks",
        "_complete",
        "_drain_waiter",
        "_error",
        "_head_done",
        "_head_request",
        "_head_size",
        "_head_waiter",
        "_header_bytes",
        "_headers",
        "_interim",
        "_keep_alive",
        "_last_activity",
        "_loop",
        "_max_header_bytes",
        "_owner",
        "_parser",
        "_parser_clean",
        "_read_timeout",
        "_reading_paused",
        "_reason",
        "_received_any",
        "_request_sent",
        "_status",
        "_timer",
        "_upgraded",
        "_watch",
        "_write_paused",
        "authority",
        "closed",
        "idle_since",
        "in_idle",
        "label",
        "reused",
        "transport",
        "write",
    )

    def __init__(
        self,
        owner: ConnectionOwner,
        label: str,
        authority: str,
        *,
        read_timeout: float,
        max_header_bytes: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._owner = owner
        self.label = label  # 'upstream "api" 127.0.0.1:9001', the prefix of every error message
        self.authority = authority
        self._read_timeout = read_timeout
        self._max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.write: Callable[[bytes], None] = _not_connected
        self.closed = False
        self.reused = False  # True once the connection has served an exchange (stale keep-alive race)
        self.in_idle = False  # pool bookkeeping: currently on the owner's idle list
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._parser_clean = True
        self._timer: asyncio.TimerHandle | None = None
        self._watch = False
        self._last_activity = 0.0
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._active = False
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._error: UpstreamError | None = None
        self._reset_exchange(False, True)

    def _reset_exchange(self, head_request: bool, keep_alive: bool) -> None:
        self._head_request = head_request
        self._keep_alive = keep_alive
        self._status = 0
        self._reason = b""
        self._header_bytes = 0
        self._head_size = 0
        self._received_any = False
        self._head_done = False
        self._interim = False
        self._complete = False
        self._upgraded = False
        self._request_sent = False
        self._chunks.clear()
        self._buffered = 0
        self._error = None

    # -- state the pool reads -------------------------------------------------------------------------------

    @property
    def error(self) -> UpstreamError | None:
        return self._error

    @property
    def received_any(self) -> bool:
        """Whether any response byte arrived in the current exchange."""
        return self._received_any

    @property
    def head_received(self) -> bool:
        return self._head_done

    # -- asyncio.Protocol --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write

    def data_received(self, data: bytes) -> None:
        if not self._active:
            # An idle keep-alive connection must stay silent: whatever it says, it is unusable now.
            self.close()
            return
        self._received_any = True
        self._last_activity = self._loop.time()
        if not self._head_done:
            self._head_size += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._keep_alive = False  # after a 101 the bytes belong to another protocol
        except httptools.HttpParserError as exc:
            self._parser_failed(exc)
            return
        if not self._head_done and self._head_size > self._max_header_bytes and self._error is None:
            # One header still growing (on_header only sees complete ones): bound the raw bytes too.
            self._fail_head_too_large()

    def eof_received(self) -> bool:
        self._disconnected(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._disconnected(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_activity = self._loop.time()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head_done:
            # A second message after the answer: the origin sent more than it framed.
            raise _StopParsing
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes:
            self._fail_head_too_large()
            raise _StopParsing

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200 and status != 101:
            self._interim = True  # 100 Continue, 103 Early Hints, ...: the final answer follows
            return
        self._status = status
        self._head_done = True
        if not parser.should_keep_alive():
            self._keep_alive = False
        elif not self._request_sent or self._unsent_bytes():
            # Answered before taking the whole request: what it has not read yet would be parsed as the
            # next request. Never reuse.
            self._keep_alive = False
        if status == 101 or self._head_request:
            if status == 101:
                self._upgraded = True
                self._keep_alive = False
            # llhttp would now wait for a body this answer does not have: finish here, new parser next time.
            self._parser_clean = False
            self._finish_message()
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # an early answer stops the request-body sender

    def on_body(self, body: bytes) -> None:
        if self._complete:
            raise _StopParsing  # body bytes after a HEAD answer or a 101
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_BUFFER_LIMIT and not self._reading_paused and not self.closed:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self._complete:
            self._finish_message()

    # -- exchange ------------------------------------------------------------------------------------------------

    def begin(self, head_request: bool, keep_alive: bool) -> asyncio.Future[None]:
        """Start an exchange; return the future resolved when the final response head arrives or it fails."""
        if not self._parser_clean:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_clean = True
        self._active = True
        self._reset_exchange(head_request, keep_alive)
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._head_waiter = waiter
        return waiter

    def request_done(self, complete: bool) -> None:
        """The request is sent (``complete``) or its sending stopped early; start waiting on the origin."""
        self._request_sent = complete
        if not self._complete and not self.closed:
            self._arm_watch()

    async def send_body(self, stream: AsyncIterator[bytes], length: int | None) -> bool:
        """Stream a request body (content-length when ``length`` is known, else chunked).

        Returns whether the whole request was handed to the transport: False when sending stopped because
        the origin answered or the connection failed first. Exceptions from ``stream`` propagate; the caller
        closes the connection.
        """
        transport = self.transport
        assert transport is not None
        write = self.write
        sent = 0
        async for chunk in stream:
            if not chunk:
                continue  # an empty chunk would end a chunked body early
            if self._head_done or self.closed:
                return self._request_sent
            size = len(chunk)
            if length is None:
                transport.writelines((b"%x\r\n" % size, chunk, b"\r\n"))
            else:
                sent += size
                if sent > length:
                    raise RequestBodyError(f"{self.label}: request body is longer than its length {length}")
                write(chunk)
                if sent == length:
                    self._request_sent = True  # all handed over; an answer from now on is not early
            if self._write_paused and not self._request_sent:
                await self._drain()
        if length is None:
            if self._head_done or self.closed:
                return False
            write(_CHUNKED_END)
        elif sent != length:
            raise RequestBodyError(f"{self.label}: request body ended after {sent} of {length} bytes")
        return True

    async def _drain(self) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiter = waiter
        self._arm_watch()  # an origin that stops reading our body times out like one that stops answering
        try:
            await waiter
        finally:
            self._drain_waiter = None
            self._watch = False

    def response(self) -> UpstreamResponse:
        """The response for the head just received. A body already complete is detached and the connection
        released at once (the common small answer); otherwise the response streams from this connection."""
        version = self._parser.get_http_version()
        if self._complete:
            chunks = self._chunks
            rest = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            response = UpstreamResponse(self._status, self._reason, self._headers, version, None, rest)
            self.release()
            return response
        return UpstreamResponse(self._status, self._reason, self._headers, version, self, b"")

    def take_body(self) -> bytes:
        """Everything buffered so far (b"" when nothing is); raises the connection's error once drained."""
        chunks = self._chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            if self._reading_paused:
                self._resume_reading()
            return data
        if self._error is not None:
            raise self._error
        if self.closed and not self._complete:
            raise UpstreamBodyError(f"{self.label}: connection closed before the end of the response body")
        return b""

    def body_waiter(self) -> asyncio.Future[None]:
        """A future resolved when more body arrives, the body ends, or the connection fails."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._body_waiter = waiter
        return waiter

    @property
    def body_complete(self) -> bool:
        return self._complete

    def release(self) -> None:
        """End the exchange. Reusable only when the whole answer was received, both sides allow keep-alive,
        the request went out whole and nothing failed; otherwise the connection is closed. Idempotent."""
        if not self._active:
            return
        self._active = False
        self._head_waiter = None
        self._watch = False
        if self._complete and self._keep_alive and self._request_sent and not self.closed:
            self._chunks.clear()
            if self._reading_paused:
                self._resume_reading()
            self.reused = True
            self.idle_since = self._loop.time()
            self._owner.connection_idle(self)
        else:
            self.close()

    def abort(self, reason: str) -> None:
        """Close now; a pending exchange fails with ``reason``."""
        if self._active and not self._complete and self._error is None:
            message = f"{self.label}: {reason}"
            if self._head_done:
                self._fail(UpstreamBodyError(message, self.authority))
            else:
                self._fail(UpstreamConnectError(message, self.authority))
        self.close()

    def close(self) -> None:
        """Close the transport (abort: no flushing to an origin that may not read) and tell the owner once."""
        if self.closed:
            return
        self.closed = True
        self._keep_alive = False
        self._watch = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()
        self._wake_all()
        self._owner.connection_closed(self)

    # -- internals -------------------------------------------------------------------------------------------

    def _finish_message(self) -> None:
        self._complete = True
        self._watch = False
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self.close()

    def _fail_head_too_large(self) -> None:
        self._fail(
            UpstreamProtocolError(
                f"{self.label}: response head larger than {self._max_header_bytes} bytes", self.authority
            )
        )

    def _parser_failed(self, exc: httptools.HttpParserError) -> None:
        if self._error is not None:
            return  # one of our callbacks already recorded why it stopped the parser
        if self._complete:
            # The answer is whole; what followed is junk (or extra bytes after HEAD / 101): never reuse.
            self._keep_alive = False
            if not self._active:
                self.close()
            return
        cause = exc.args[0] if exc.args else type(exc).__name__
        if self._head_done:
            self._fail(UpstreamBodyError(f"{self.label}: malformed response body ({cause})", self.authority))
        else:
            self._fail(
                UpstreamProtocolError(f"{self.label}: malformed response head ({cause})", self.authority)
            )

    def _disconnected(self, exc: Exception | None) -> None:
        if self._active and not self._complete and self._error is None:
            how = "reset" if exc is not None else "closed by the origin"
            if not self._head_done:
                if self._received_any:
                    self._fail(
                        UpstreamProtocolError(
                            f"{self.label}: connection {how} in the middle of the response head",
                            self.authority,
                        )
                    )
                else:
                    self._fail(
                        UpstreamConnectError(
                            f"{self.label}: connection {how} before any response byte", self.authority
                        )
                    )
            elif exc is None and self._reads_until_close():
                self._keep_alive = False
                self._finish_message()
            else:
                self._fail(
                    UpstreamBodyError(
                        f"{self.label}: connection {how} before the end of the response body", self.authority
                    )
                )
        self.close()

    def _reads_until_close(self) -> bool:
        """No content-length and no chunked coding: the body is whatever comes until EOF (RFC 9112 6.3)."""
        length = False
        for name, value in self._headers:
            if name == b"transfer-encoding":
                return not value.rstrip().lower().endswith(b"chunked")
            if name == b"content-length":
                length = True
        return not length

    def _unsent_bytes(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def _wake_all(self) -> None:
        for waiter in (self._head_waiter, self._body_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._body_waiter = None

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if not self.closed:
            assert self.transport is not None
            self.transport.resume_reading()
            if self._watch:
                self._arm_watch()

    def _arm_watch(self) -> None:
        self._watch = True
        self._last_activity = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_later(self._read_timeout, self._on_watch_timer)

    def _on_watch_timer(self) -> None:
        self._timer = None
        if not self._watch or self.closed or self._reading_paused:
            return  # idle, finished, or paused by us (resuming re-arms)
        remaining = self._last_activity + self._read_timeout - self._loop.time()
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._on_watch_timer)
            return
        if self._drain_waiter is not None:
            what = "the origin accepted no request body bytes"
        elif self._head_done:
            what = "no response body bytes"
        else:
            what = "no response head"
        self._fail(
            UpstreamTimeoutError(
                f"{self.label}: {what} for {self._read_timeout:g}s (read_timeout)", self.authority
            )
        )


class UpstreamResponse:
    """A response from an origin: head fields, then the body as a stream.

    ``body()`` / ``async for`` yield the body in chunks (as buffered, joined); ``read()`` returns it whole.
    ``aclose()`` ends the exchange: the connection is reused only if the whole answer was received. Use it as
    ``async with await pool.request(...) as response:``.
    """

    __slots__ = ("_conn", "_rest", "headers", "http_version", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        http_version: str,
        conn: UpstreamConnection | None,
        rest: bytes,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # as received, names lower-cased, hop-by-hop included
        self.http_version = http_version
        self._conn = conn  # None once the body is detached or the exchange ended
        self._rest = rest  # detached body not yet handed out

    def body(self) -> AsyncIterator[bytes]:
        """Stream the body. Raises UpstreamBodyError if it breaks off, UpstreamTimeoutError if it stalls."""
        return self

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            rest = self._rest
            if rest:
                self._rest = b""
                return rest
            raise StopAsyncIteration
        while True:
            try:
                chunk = conn.take_body()
            except UpstreamError:
                self._conn = None
                conn.release()
                raise
            if chunk:
                return chunk
            if conn._complete:
                self._conn = None
                conn.release()
                raise StopAsyncIteration
            await conn.body_waiter()

    def complete_body(self) -> bytes | None:
        """The whole body when it arrived with the head (already detached from the connection), else None.

        Lets the caller answer a small response in one piece instead of streaming it."""
        if self._conn is not None:
            return None
        rest = self._rest
        self._rest = b""
        return rest

    async def read(self) -> bytes:
        """The whole (remaining) body."""
        if self._conn is None:
            rest = self._rest
            self._rest = b""
            return rest
        parts = [chunk async for chunk in self]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Synchronous ``aclose()``."""
        conn = self._conn
        self._rest = b""
        if conn is not None:
            self._conn = None
            conn.release()

    async def aclose(self) -> None:
        """Release the connection: back to the pool if the whole answer was received, else closed."""
        self.close()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason.decode('latin-1')!r}>"
