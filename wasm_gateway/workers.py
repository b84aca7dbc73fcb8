"""A gunicorn worker class: ``gunicorn -k wasm_gateway.workers.GatewayWorker 'wasm_gateway:create_app()'``.

Needs the ``gunicorn`` extra. Like ``wasm-gateway serve`` it runs uvloop and the gateway's HTTP protocol (header
deadline and size limits from the config in ``WASM_GATEWAY_CONFIG``), leaves client addresses to the gateway's
``trusted_proxies`` and lets the gateway own the Server header. With several workers set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory, as prometheus-client's multiprocess mode requires.
"""

from __future__ import annotations

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker

__all__ = ["GatewayWorker"]


class GatewayWorker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "uvloop",
        "http": "wasm_gateway.server:GatewayHttpProtocol",
        "proxy_headers": False,
        "server_header": False,
        "lifespan": "on",
    }
