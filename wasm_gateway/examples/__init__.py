"""The embedded default config and the demo origin it proxies to."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import orjson

from ..config import GatewayConfig, load_config
from ..types import Receive, Scope, Send

__all__ = ["DEMO_ORIGIN_ENV", "default_config", "default_config_path", "demo_origin"]

DEMO_ORIGIN_ENV = "WASM_GATEWAY_DEMO_ORIGIN"


def default_config_path() -> Path:
    return Path(str(files(__package__).joinpath("default.toml")))


def default_config() -> GatewayConfig:
    return load_config(default_config_path())


async def demo_origin(scope: Scope, receive: Receive, send: Send) -> None:
    """A tiny origin: any path with an ``echo`` segment shows what the gateway forwarded; others greet in JSON."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if "echo" in scope["path"].split("/"):
        data: object = {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"),
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            "body_bytes": len(body),
        }
    else:
        data = {"message": "hello from the demo origin", "path": scope["path"]}
    payload = orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
