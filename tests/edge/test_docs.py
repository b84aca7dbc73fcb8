"""The examples in docs/edge-data.md work: the TOML is accepted, and the Zig example compiles against the
bundled binding and does what it says when run."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.edge.conftest import make_products
from tests.edge.probes import ZigUnavailable, require_zig
from wasm_gateway.config import parse_config
from wasm_gateway.edge import EdgeData
from wasm_gateway.filters.build import SOURCES_DIR, ZIG_FLAGS
from wasm_gateway.runtime.chain import FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import RequestInfo
from wasm_gateway.runtime.services import SharedServices
from wasm_gateway.state import StateConfig, open_state

DOC = (ROOT / "docs" / "edge-data.md").read_text()


def block(language: str) -> str:
    found = re.search(rf"```{language}\n(.*?)```", DOC, re.S)
    assert found is not None, language
    return found.group(1)


WRAPPER = """const std = @import("std");
const proxy = @import("proxy_wasm.zig");
pub const panic = std.debug.FullPanic(proxy.panicHandler);
comptime {
    proxy.register(@This());
}
pub const Http = struct {};
pub fn configure(cfg: *proxy.Config, root: std.json.Value) proxy.ConfigError!void {
    _ = cfg;
    _ = root;
}
pub fn onRequestHeaders(h: *Http, headers: u32, end_of_stream: bool) proxy.Action {
    _ = h;
    _ = headers;
    _ = end_of_stream;
%s
    return .@"continue";
}
"""


def test_toml_example_is_accepted(tmp_path: Path) -> None:
    text = block("toml").replace('module = "shop.wasm"', 'module = "builtin:transform"')
    config = parse_config(text, source="edge-data.md", base_dir=tmp_path, env={})
    assert config.filters["shop"].kv == ("flags",) and config.filters["shop"].sql == ("catalogue",)
    assert config.sql["catalogue"].path == tmp_path / "data/catalogue.db"


def test_zig_example_compiles_and_runs(tmp_path: Path) -> None:
    try:
        require_zig()
    except ZigUnavailable as exc:
        pytest.skip(str(exc))
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(SOURCES_DIR / "proxy_wasm.zig", src / "proxy_wasm.zig")
    (src / "example.zig").write_text(WRAPPER % block("zig"))
    out = tmp_path / "example.wasm"
    cmd = [sys.executable, "-m", "ziglang", "build-exe", "example.zig", *ZIG_FLAGS, "-O", "ReleaseSmall"]
    done = subprocess.run([*cmd, f"-femit-bin={out}"], cwd=src, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr

    (tmp_path / "data").mkdir()
    make_products(tmp_path / "data" / "catalogue.db", rows=10)
    config = parse_config(
        block("toml").replace('module = "shop.wasm"', f'module = "{out}"'),
        source="edge-data.md",
        base_dir=tmp_path,
        env={},
    )
    state = open_state(StateConfig(backend="memory"))
    edge = EdgeData(state.edge, config.kv, config.sql)
    logs: list[str] = []
    runtime = FilterRuntime.load(
        [FilterSpec(name="shop", module_path=out, kv=("flags",), sql=("catalogue",), log_level="debug")],
        shared=SharedServices(edge=edge),
        log_sink=lambda name, level, message: logs.append(message),
    )
    request = [(":method", "GET"), (":path", "/"), (":authority", "shop"), (":scheme", "http")]

    async def one() -> None:
        stream = runtime.chain(["shop"]).start(RequestInfo(source_address="10.0.0.1", source_port=1))
        try:
            await stream.on_request_headers(list(request), True)
        finally:
            stream.finish()

    try:
        asyncio.run(one())
        asyncio.run(one())
    finally:
        runtime.close()
        state.close()
    assert logs == [
        "hits = 1",
        "2 keys, more: false",
        "product 7 is product 7",
        "beta = on",
        "hits = 2",
        "2 keys, more: false",
        "product 7 is product 7",
    ]
