"""A programmable origin that counts what reaches it, and gateway configs for each cache backend."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ThreadServer, gateway_server

Handler = Callable[["Seen"], tuple[int, list[tuple[str, str]], bytes]]


@dataclass
class Seen:
    method: str
    path: str
    raw_path: str
    query: str
    headers: dict[str, str]
    body: bytes
    count: int
    """How many requests this path has had so far, this one included."""


@dataclass
class CacheOrigin:
    """ASGI origin: ``handlers[path]`` answers (default: 200, ``max-age=60``, a body naming the request
    and its count at the origin, so a test sees whether an answer came from the cache)."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    seen: list[Seen] = field(default_factory=list)
    delay: float = 0.0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        raw_path = (scope.get("raw_path") or b"").decode("latin-1")
        self.counts[path] += 1
        seen = Seen(
            scope["method"],
            path,
            raw_path,
            scope["query_string"].decode("latin-1"),
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            body,
            self.counts[path],
        )
        self.seen.append(seen)
        if self.delay:
            await asyncio.sleep(self.delay)
        handler = self.handlers.get(path, default_handler)
        status, headers, payload = handler(seen)
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if not any(k == b"content-length" for k, _ in raw):
            raw.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload if scope["method"] != "HEAD" else b""})

    def reset(self) -> None:
        self.counts.clear()
        self.seen.clear()
        self.handlers.clear()
        self.delay = 0.0


def default_handler(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
    body = f"{seen.method} {seen.path}?{seen.query} #{seen.count}".encode()
    return 200, [("cache-control", "max-age=60"), ("content-type", "text/plain")], body


def respond(
    *headers: tuple[str, str], status: int = 200, body: Callable[[Seen], bytes] | None = None
) -> Handler:
    def handler(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        payload = body(seen) if body is not None else f"{seen.path} #{seen.count}".encode()
        return status, list(headers), payload

    return handler


@pytest.fixture(scope="module")
def origin_server() -> Iterator[tuple[ThreadServer, CacheOrigin]]:
    origin = CacheOrigin()
    with ThreadServer(origin) as server:
        yield server, origin


@pytest.fixture
def origin(origin_server: tuple[ThreadServer, CacheOrigin]) -> Iterator[CacheOrigin]:
    origin_server[1].reset()
    yield origin_server[1]
    origin_server[1].reset()


def cache_section(backend: str, tmp_path: Path) -> str:
    if backend == "memory":
        return '[cache]\nbackend = "memory"\n'
    if backend == "local":
        return f'[cache]\nbackend = "local"\npath = "{tmp_path / "cache-lmdb"}"\n'
    return (
        '[cache]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:6379/0"\n'
        f'key_prefix = "wgtest-{uuid.uuid4().hex}:"\n'
    )


def gateway_config(
    backend: str,
    tmp_path: Path,
    origin_port: int,
    route_cache: str = "enabled = true",
    extra: str = "",
    route_extra: str = "",
    top: str = "",
) -> str:
    return f"""
{top}
{cache_section(backend, tmp_path)}
[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]

{extra}

[[routes]]
name = "cached"
path_prefix = "/"
upstream = "origin"
cache = {{ {route_cache} }}
{route_extra}
"""


@pytest.fixture
def start_gateway(
    origin_server: tuple[ThreadServer, CacheOrigin], tmp_path: Path
) -> Iterator[Callable[..., ThreadServer]]:
    started: list[ThreadServer] = []

    def start(backend: str = "memory", **kw: Any) -> ThreadServer:
        text = gateway_config(backend, tmp_path, origin_server[0].port, **kw)
        server = gateway_server(text, tmp_path).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


BACKENDS = ["memory", "local", "redis"]
