"""Raw ASGI on uvicorn (uvloop + httptools) answering ``/1k`` and ``/64k`` from memory with cacheable headers:
both the origin behind the cached gateway and the "raw uvicorn" it is compared with in micro_cache.py.

    python -m benchmarks.peers.cache_bodies --port 9000
"""

from __future__ import annotations

from benchmarks.peers.asgi_origin import serve
from benchmarks.peers.asgi_types import Receive, Scope, Send

BODIES = {"/1k": b"a" * 1024, "/64k": b"b" * 65536}
HEADERS = [
    (b"content-type", b"application/octet-stream"),
    (b"cache-control", b"public, max-age=3600"),
    (b"etag", b'"bench-v1"'),
]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = BODIES.get(scope["path"])
    if body is None:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [*HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    serve(app, __doc__, argv)


if __name__ == "__main__":
    main()
