"""The Python floor: a raw-ASGI reverse proxy with aiohttp's ``ClientSession`` (keep-alive pool) on uvicorn
(uvloop + httptools). No framework, no routing, no filters: whatever the gateway adds must be paid for out of
the distance between this and the gateway.

    python -m benchmarks.peers.bare_proxy --port 8081 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn
from yarl import URL

from benchmarks.peers.asgi_types import Receive, Scope, Send

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
POOL_LIMIT = 512
CHUNK_BYTES = 64 * 1024
BAD_GATEWAY = b'{"error":"bad gateway"}'


class BareProxy:
    """Forward every request to one upstream, streaming the response body back."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                connector = aiohttp.TCPConnector(limit=POOL_LIMIT, keepalive_timeout=60)
                self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._session is not None:
                    await self._session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._session is not None, "lifespan startup did not run"
        body = bytearray()
        more_body = True
        while more_body:
            message = await receive()
            body += message.get("body", b"")
            more_body = message.get("more_body", False)
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope["headers"]
            if name.decode("latin-1") not in HOP_BY_HOP
        ]
        target = self._upstream + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        try:
            async with self._session.request(
                scope["method"],
                URL(target, encoded=True),
                headers=headers,
                data=bytes(body) if body else None,
                allow_redirects=False,
            ) as response:
                response_headers = [
                    (name, value)
                    for name, value in response.raw_headers
                    if name.decode("latin-1").lower() not in HOP_BY_HOP
                ]
                await send(
                    {"type": "http.response.start", "status": response.status, "headers": response_headers}
                )
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except aiohttp.ClientError:
            await send(
                {
                    "type": "http.response.start",
                    "status": 502,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": BAD_GATEWAY})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port of the origin")
    args = parser.parse_args(argv)
    uvicorn.run(
        BareProxy(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
