"""wasm-gateway as middleware around a Starlette (or FastAPI) app.

Run:  uvicorn examples.middleware_app:app
"""

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from wasm_gateway import WasmGateway


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": request.path_params.get("name", "world")})


api = Starlette(routes=[Route("/hello/{name}", hello), Route("/", hello)])

# Routes in the config with `app = true` run their filters and then this app; unmatched requests reach it too.
app = WasmGateway(api, config=Path(__file__).with_name("middleware.toml"))
