"""Origins for end-to-end tests: a well-behaved ASGI origin and raw-socket ones that misbehave on purpose."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import Callable
from typing import Any

import orjson

slow_in_flight = 0  # requests currently sleeping in /slow (tests wait on it instead of on wall-clock time)


async def echo_origin(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/echo`` describes the request; ``/slow?s=`` sleeps; ``/big?n=`` streams n bytes; ``/upload`` hashes the body."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await _ws_echo(scope, receive, send)
        return
    path: str = scope["path"]
    query = dict(part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part)
    if path.startswith("/big"):
        total = int(query.get("n", "0"))
        chunk = b"x" * 65536
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(total).encode()),
                ],
            }
        )
        sent = 0
        while sent < total:
            piece = chunk[: min(len(chunk), total - sent)]
            sent += len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": sent < total})
        return
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body = message.get("body", b"")
        digest.update(body)
        size += len(body)
        if not message.get("more_body"):
            break
    if path.startswith("/slow"):
        global slow_in_flight
        slow_in_flight += 1
        try:
            await asyncio.sleep(float(query.get("s", "1")))
        finally:
            slow_in_flight -= 1
    status = int(path.split("/")[2]) if path.startswith("/status/") else 200
    data = {
        "method": scope["method"],
        "path": path,
        "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
        "query": scope["query_string"].decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body_size": size,
        "body_sha256": digest.hexdigest(),
    }
    payload = orjson.dumps(data)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if path.startswith("/hop"):
        headers += [
            (b"connection", b"x-origin-secret"),
            (b"x-origin-secret", b"1"),
            (b"keep-alive", b"timeout=9"),
            (b"proxy-authenticate", b"Basic"),
        ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _ws_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    message = await receive()
    assert message["type"] == "websocket.connect"
    subprotocols = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": subprotocols[0] if subprotocols else None})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "close-me":
            await send({"type": "websocket.close", "code": 4001})
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": "echo:" + message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


class RawOrigin:
    """A socket server in a thread: ``handler(conn)`` gets each accepted connection after the request head."""

    def __init__(self, handler: Callable[[socket.socket, bytes], None]) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.connections = 0

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                self.handler(conn, head)
            except OSError:
                pass

    def __enter__(self) -> RawOrigin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
