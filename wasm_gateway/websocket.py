"""WebSocket pass-through: the ASGI side talks to the client, a ``websockets`` client talks to the upstream.

ASGI hands the gateway decoded messages, not raw frames, so the upstream leg is a second WebSocket connection;
messages, close codes and the negotiated subprotocol are relayed both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from .forwarding import HOP_BY_HOP
from .types import Headers, Receive, Scope, Send
from .upstream import Target

__all__ = ["proxy_websocket"]

logger = logging.getLogger("wasm_gateway")

# The websockets client writes its own handshake and framing headers.
_HANDSHAKE = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
    }
)


async def proxy_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    targets: Sequence[Target],
    path: str,
    headers: Headers,
    connect_timeout: float,
) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    extra = [
        (n.decode("latin-1"), v.decode("latin-1"))
        for n, v in headers
        if n not in _HANDSHAKE and n not in HOP_BY_HOP
    ]
    subprotocols = [Subprotocol(p) for p in scope.get("subprotocols", ())] or None
    upstream: ClientConnection | None = None
    error: Exception | None = None
    for target in targets:
        scheme = "wss" if target.scheme == "https" else "ws"
        try:
            upstream = await connect(
                f"{scheme}://{target.authority}{path}",
                additional_headers=extra,
                subprotocols=subprotocols,
                open_timeout=connect_timeout,
                compression=None,
                user_agent_header=None,
                proxy=None,
                max_size=None,
                ping_interval=None,
            )
            break
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            error = exc
    if upstream is None:
        status = exc_status(error)
        logger.warning("websocket %s: upstream handshake failed: %s", path, error)
        await send({"type": "websocket.close", "code": 1011 if status is None else 1008})
        return
    async with upstream:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        to_upstream = asyncio.ensure_future(_client_to_upstream(receive, upstream))
        to_client = asyncio.ensure_future(_upstream_to_client(upstream, send))
        done, pending = await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in done:
            with contextlib.suppress(Exception):
                task.result()


def exc_status(error: Exception | None) -> int | None:
    if isinstance(error, InvalidStatus):
        return error.response.status_code
    return None


async def _client_to_upstream(receive: Receive, upstream: ClientConnection) -> None:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            if message.get("bytes") is not None:
                await upstream.send(message["bytes"])
            else:
                await upstream.send(message.get("text") or "")
        elif kind == "websocket.disconnect":
            await upstream.close(code=_relayable(message.get("code", 1000)))
            return


async def _upstream_to_client(upstream: ClientConnection, send: Send) -> None:
    try:
        async for data in upstream:
            if isinstance(data, bytes):
                await send({"type": "websocket.send", "bytes": data})
            else:
                await send({"type": "websocket.send", "text": data})
    except ConnectionClosed:
        pass
    code = upstream.close_code or 1000
    await send({"type": "websocket.close", "code": _relayable(code), "reason": upstream.close_reason or ""})


def _relayable(code: int) -> int:
    # 1005/1006/1015 are reserved for "no status"/abnormal and must not be sent on the wire.
    return 1000 if code in (1005, 1006, 1015) else code
