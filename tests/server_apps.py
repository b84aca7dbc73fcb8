"""A tiny ASGI app and a launcher for tests/test_server.py, which runs ``serve()`` in a subprocess.

``python -c "from tests.server_apps import main; main()" '<json ServeOptions fields>'`` prints
``LISTENING <port>`` once the server listens and exits with serve()'s exit code.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from wasm_gateway.server import ServeOptions, ServerLimits, serve

APP = "tests.server_apps:app"

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Imported after serve() exported the directory: each worker writes gauge_livesum_<pid>.db.
    from prometheus_client import Gauge

    Gauge("test_worker_up", "1 per live worker", multiprocess_mode="livesum").set(1)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await _websocket_echo(receive, send)
        return
    path = scope["path"]
    if path == "/echo":
        body = b""
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more_body = message.get("more_body", False)
        await _respond(send, body)
    elif path == "/stream-echo":
        # Starts the response before reading the body, then echoes each chunk.
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            await send({"type": "http.response.body", "body": message.get("body", b""), "more_body": True})
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/slow":
        # Head first, body after a delay: a client can tell the request is in flight.
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await asyncio.sleep(float(scope["query_string"].decode() or "1"))
        await send({"type": "http.response.body", "body": b"done"})
    elif path == "/info":
        info = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "multiproc_dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
            "mark": os.environ.get("TEST_SERVER_MARK"),
        }
        await _respond(send, json.dumps(info).encode())
    else:
        await _respond(send, b"ok")


async def _respond(send: Send, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _websocket_echo(receive: Receive, send: Send) -> None:
    message: Message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        await send({"type": "websocket.send", "text": message.get("text") or ""})


def main() -> None:
    fields: dict[str, Any] = json.loads(sys.argv[1])
    limits = ServerLimits(**fields.pop("limits", {}))

    def started(host: str, port: int) -> None:
        print(f"LISTENING {port}", flush=True)

    sys.exit(serve(ServeOptions(app=APP, limits=limits, on_started=started, **fields)))
