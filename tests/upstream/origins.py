"""Raw HTTP/1.1 origins on 127.0.0.1 for the upstream client's tests.

Each accepted connection runs a handler coroutine with an ``OriginConnection`` (reader, writer, request
parsing), so a test states exactly how its origin behaves, including how it misbehaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from wasm_gateway.upstream import Target


@dataclass
class ReceivedRequest:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # names lower-cased
    connection: int  # index of the origin connection it arrived on
    body: bytes = b""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        return values[0] if values else None

    def header_count(self, name: str) -> int:
        return sum(1 for key, _ in self.headers if key == name)


class OriginConnection:
    def __init__(
        self, origin: Origin, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        self.origin = origin
        self.index = index
        self.reader = reader
        self.writer = writer

    async def read_head(self) -> ReceivedRequest | None:
        """The next request head, or None at a clean EOF between requests."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = []
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers.append((name.strip().lower(), value.strip()))
        request = ReceivedRequest(method, target, version, headers, self.index)
        self.origin.requests.append(request)
        return request

    async def read_body(self, request: ReceivedRequest) -> bytes:
        """Read the body as framed; raises AssertionError on a framing violation."""
        encoding = request.header("transfer-encoding")
        if encoding is not None:
            assert encoding == "chunked", encoding
            request.chunked = True
            parts = []
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.strip(), 16)
                if size == 0:
                    assert await self.reader.readexactly(2) == b"\r\n"
                    break
                parts.append(await self.reader.readexactly(size))
                assert await self.reader.readexactly(2) == b"\r\n"
            request.body = b"".join(parts)
        elif request.header("content-length") is not None:
            request.body = await self.reader.readexactly(int(request.header("content-length") or 0))
        return request.body

    async def read_request(self) -> ReceivedRequest | None:
        request = await self.read_head()
        if request is not None:
            await self.read_body(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_closed_by_peer(self) -> None:
        """Read and discard until the client closes its side."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass


Handler = Callable[[OriginConnection], Awaitable[None]]


@dataclass
class Origin:
    handler: Handler
    accepted: int = 0
    closed: int = 0
    open_now: int = 0
    max_open: int = 0
    requests: list[ReceivedRequest] = field(default_factory=list)
    connection_closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None
    port: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self, port: int = 0, ssl: ssl_module.SSLContext | None = None) -> Origin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port, ssl=ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def target(self) -> Target:
        return Target("127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.accepted
        self.accepted += 1
        self.writers.add(writer)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await self.handler(OriginConnection(self, index, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Teardown cancels handlers still waiting; ending normally keeps asyncio's stream callback quiet.
            pass
        finally:
            self.writers.discard(writer)
            self.open_now -= 1
            self.closed += 1
            self.connection_closed.set()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)
            # Let the handlers see their transports go and finish.
            for _ in range(3):
                await asyncio.sleep(0)


def response(
    body: bytes = b"ok",
    status: str = "200 OK",
    headers: list[tuple[str, str]] | None = None,
    version: str = "HTTP/1.1",
    length: bool = True,
) -> bytes:
    lines = [f"{version} {status}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if length:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def keep_alive(answer: Callable[[ReceivedRequest], bytes]) -> Handler:
    """A well-behaved keep-alive origin: read each request whole, write ``answer(request)``."""

    async def handler(conn: OriginConnection) -> None:
        while (request := await conn.read_request()) is not None:
            await conn.send(answer(request))
            if request.header("connection") == "close":
                return

    return handler


def echo(request: ReceivedRequest) -> bytes:
    """Answer with what was asked, as JSON-ish text, so tests can see the request as the origin saw it."""
    text = f"{request.method} {request.target} conn={request.connection} body={len(request.body)}"
    return response(text.encode())


def unused_port() -> int:
    """A port nothing listens on (bound then released; loopback, so collisions are unlikely)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
