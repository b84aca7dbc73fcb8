"""Fallback origin when nginx cannot be had: a raw ASGI app on uvicorn (uvloop + httptools) answering the
benchmark bodies (``/json``, ``/64k``, ``/1m``) and 404 elsewhere.

    python -m benchmarks.peers.asgi_origin --port 9000
"""

from __future__ import annotations

import argparse

import uvicorn

from benchmarks.bodies import BODY_BY_PATH
from benchmarks.peers.asgi_types import ASGIApp, Receive, Scope, Send

NOT_FOUND = b'{"error":"not found"}'


async def origin_app(scope: Scope, receive: Receive, send: Send) -> None:
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
    body = BODY_BY_PATH.get(scope["path"])
    status = 200 if body is not None else 404
    payload = body if body is not None else NOT_FOUND
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def serve(app: ASGIApp, description: str | None, argv: list[str] | None = None) -> None:
    """``--host``/``--port`` from the command line, then ``app`` on uvicorn with uvloop and httptools."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
    )


def main(argv: list[str] | None = None) -> None:
    serve(origin_app, __doc__, argv)


if __name__ == "__main__":
    main()
