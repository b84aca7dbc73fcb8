"""The public API is what __all__ says, and every name in it resolves."""

import wasm_gateway


def test_all_is_curated_and_resolves() -> None:
    assert sorted(wasm_gateway.__all__) == sorted(
        [
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
    )
    for name in wasm_gateway.__all__:
        assert getattr(wasm_gateway, name) is not None
