"""wasm-gateway: an ASGI gateway running Proxy-Wasm filters in front of your origins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .app import Gateway, WasmGateway, create_app
    from .config import GatewayConfig, load_config
    from .exceptions import ConfigError, FilterError, FilterLoadError, GatewayError, UpstreamError

__all__ = [
    "ConfigError",
    "FilterError",
    "FilterLoadError",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "UpstreamError",
    "WasmGateway",
    "__version__",
    "create_app",
    "load_config",
]

# Imported on first use, so `import wasm_gateway.runtime` or `.config` does not pull in the whole server stack.
_LAZY = {
    "Gateway": "app",
    "WasmGateway": "app",
    "create_app": "app",
    "GatewayConfig": "config",
    "load_config": "config",
    "ConfigError": "exceptions",
    "FilterError": "exceptions",
    "FilterLoadError": "exceptions",
    "GatewayError": "exceptions",
    "UpstreamError": "exceptions",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wasm_gateway' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
