"""The bundled Proxy-Wasm filters: Zig sources in ``zig/``, the JS filter's in ``js/`` (QuickJS, C glue and a
JS prelude), prebuilt modules shipped next to this file.

Users need no toolchain: the ``.wasm`` files are package data. Rebuild them with
``python -m wasm_gateway.filters.build`` (see that module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["BUNDLED_FILTERS", "FILTERS_DIR", "filter_path"]

FILTERS_DIR: Final = Path(__file__).resolve().parent
BUNDLED_FILTERS: Final = ("transform", "rate_limit", "auth", "geo", "js")


def filter_path(name: str) -> Path:
    """The prebuilt module of bundled filter ``name`` ("transform", "rate-limit" or "rate_limit")."""
    key = name.replace("-", "_")
    if key not in BUNDLED_FILTERS:
        raise KeyError(f"no bundled filter {name!r} (bundled: {', '.join(BUNDLED_FILTERS)})")
    return FILTERS_DIR / f"{key}.wasm"
