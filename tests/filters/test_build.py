"""The shipped filter modules: what they import and export, and that they are what the sources build.

The rebuild tests need the pinned Zig compiler (``ziglang``, in the dev extra); without it they are
skipped, saying so. (CI also runs ``python -m wasm_gateway.filters.build --check`` itself.)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from wasm_gateway.filters import BUNDLED_FILTERS, FILTERS_DIR, filter_path
from wasm_gateway.filters.build import ZIG_VERSION, FilterBuildError, build_all, stale_modules, zig_version

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Every bundled filter built from its sources now (once for this module)."""
    try:
        version = zig_version()
    except FilterBuildError as exc:
        pytest.skip(f"the Zig compiler (pip package ziglang=={ZIG_VERSION}) is not installed: {exc}")
    if version != ZIG_VERSION:
        pytest.skip(f"ziglang {version} is installed; the shipped modules are built with {ZIG_VERSION}")
    yield build_all(tmp_path_factory.mktemp("fresh"))


def test_shipped_modules_match_a_fresh_build(fresh_build: dict[str, Path]) -> None:
    assert set(fresh_build) == set(BUNDLED_FILTERS)
    assert stale_modules(fresh_build) == [], "run `python -m wasm_gateway.filters.build` and ship the result"


def test_stale_or_missing_modules_are_reported(fresh_build: dict[str, Path], tmp_path: Path) -> None:
    stale = bytearray(fresh_build["rate_limit"].read_bytes())
    stale[-1] ^= 0xFF
    (tmp_path / "rate_limit.wasm").write_bytes(bytes(stale))
    (tmp_path / "transform.wasm").write_bytes(fresh_build["transform"].read_bytes())
    assert [n for n in stale_modules(fresh_build, tmp_path) if n in ("transform", "rate_limit")] == [
        "rate_limit"
    ]
    (tmp_path / "transform.wasm").unlink()
    assert "transform" in stale_modules(fresh_build, tmp_path)


def test_build_command_rejects_unknown_filters() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wasm_gateway.filters.build", "--check", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown filter(s): nope" in result.stderr


# Each module exports only the callbacks it implements (the host calls every exported one per request).
EXPORTS = {
    "transform": {
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_response_headers",
        "proxy_on_response_body",
    },
    "rate_limit": {"proxy_on_request_headers", "proxy_on_response_headers"},
    "auth": {"proxy_on_request_headers", "proxy_on_http_call_response", "proxy_on_tick"},
}
COMMON_EXPORTS = {
    "memory",
    "proxy_abi_version_0_2_1",
    "proxy_on_memory_allocate",
    "proxy_on_configure",
    "proxy_on_delete",
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_module_shape(name: str) -> None:
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(filter_path(name)))
    assert {e.name for e in module.exports} == COMMON_EXPORTS | EXPORTS[name]
    imports = {(i.module, i.name) for i in module.imports}
    assert {m for m, _ in imports} == {"env"}  # no WASI: freestanding
    assert all(str(n).startswith("proxy_") for _, n in imports)


def test_filter_path_names() -> None:
    assert {"transform", "rate_limit"} <= set(BUNDLED_FILTERS)
    assert filter_path("rate-limit") == filter_path("rate_limit") == FILTERS_DIR / "rate_limit.wasm"
    assert filter_path("transform").is_file()
    with pytest.raises(KeyError, match="no bundled filter 'nope'"):
        filter_path("nope")


def test_js_module_shape() -> None:
    """QuickJS needs WASI (clock, randomness, environment for ctx.env); nothing beyond what the runtime links."""
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(filter_path("js")))
    assert {e.name for e in module.exports} == COMMON_EXPORTS | {
        "_initialize",
        "proxy_on_vm_start",
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_http_call_response",
    }
    imports = {(i.module, str(i.name)) for i in module.imports}
    assert {m for m, _ in imports} == {"env", "wasi_snapshot_preview1"}
    assert all(n.startswith("proxy_") for m, n in imports if m == "env")
    assert {n for m, n in imports if m == "wasi_snapshot_preview1"} <= {
        "clock_time_get",
        "environ_get",
        "environ_sizes_get",
        "fd_close",
        "fd_fdstat_get",
        "fd_seek",
        "fd_write",
        "proc_exit",
        "random_get",
    }


def test_quickjs_patches_fail_loudly_on_other_sources(tmp_path: Path) -> None:
    from wasm_gateway.filters import build

    source = tmp_path / "quickjs.c"
    source.write_text("/* not the QuickJS we pinned */\n")
    with pytest.raises(FilterBuildError, match=r"QuickJS patch no longer applies to quickjs\.c"):
        build._apply_patches(tmp_path)
