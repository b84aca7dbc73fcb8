"""Middleware mode: WasmGateway(app, config=...) around a Starlette app, served by uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from tests.conftest import ThreadServer
from tests.origins import echo_origin
from wasm_gateway import WasmGateway
from wasm_gateway.config import parse_config

events: list[str] = []


async def home(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "path": request.url.path,
            "client": request.client.host if request.client else None,
            "request_id": request.headers.get("x-request-id"),
            "started": request.app.state.started,
        }
    )


async def upload(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(len(await request.body())))


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("from-app:" + await websocket.receive_text())
    await websocket.close()


def make_app() -> Starlette:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        app.state.started = True
        events.append("startup")
        yield
        events.append("shutdown")

    return Starlette(
        routes=[
            Route("/private/upload", upload, methods=["POST"]),
            WebSocketRoute("/ws", ws),
            Route("/{path:path}", home),
        ],
        lifespan=lifespan,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as origin:
        config = parse_config(
            f"""
[server]
max_request_body_bytes = 1000
[upstreams.origin]
targets = ["127.0.0.1:{origin.port}"]
[[routes]]
name = "proxied"
path_prefix = "/proxied"
upstream = "origin"
[[routes]]
name = "guarded-app"
path_prefix = "/private"
require_headers = ["authorization"]
app = true
[log]
access_log = false
""",
            env={},
        )
        with ThreadServer(WasmGateway(make_app(), config=config)) as server:
            yield server


def test_unmatched_requests_reach_the_app_with_its_lifespan(served: ThreadServer) -> None:
    data = httpx.get(served.url + "/hello").json()
    assert data == {"path": "/hello", "client": "127.0.0.1", "request_id": None, "started": True}
    assert "startup" in events


def test_proxied_route(served: ThreadServer) -> None:
    data = httpx.get(served.url + "/proxied/x").json()
    assert data["path"] == "/proxied/x"


def test_app_route_runs_guards_and_gets_canonical_path(served: ThreadServer) -> None:
    assert httpx.get(served.url + "/private/x").status_code == 401
    r = httpx.get(served.url + "/private//a/../x", headers={"authorization": "t"})
    data = r.json()
    assert data["path"] == "/private/x"
    assert data["request_id"] == r.headers["x-request-id"]


def test_app_route_body_limit(served: ThreadServer) -> None:
    r = httpx.post(served.url + "/private/upload", content=b"x" * 5000, headers={"authorization": "t"})
    assert r.status_code == 413


def test_websocket_falls_through_to_app(served: ThreadServer) -> None:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{served.port}/ws") as conn:
        conn.send("hi")
        assert conn.recv() == "from-app:hi"


def test_config_path_accepted(tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text('[[routes]]\npath_prefix = "/x"\napp = true\n')
    gateway = WasmGateway(make_app(), config=tmp_path / "g.toml")
    assert gateway.config.routes[0].target_is_app


def test_shipped_middleware_example_runs() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "middleware_app", Path(__file__).parent.parent / "examples" / "middleware_app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with ThreadServer(module.app) as server:
        assert httpx.get(server.url + "/").json() == {"hello": "world"}
        assert httpx.get(server.url + "/hello/ada").status_code == 401
        assert httpx.get(server.url + "/hello/ada", headers={"authorization": "x"}).json() == {"hello": "ada"}
