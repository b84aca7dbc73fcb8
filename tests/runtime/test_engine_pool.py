"""Module cache, precompilation, pools and the background tick loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from wat import LOG_IMPORT, STATUS_HELPER, write_filter

from wasm_gateway.exceptions import FilterLoadError, FilterPoolTimeout
from wasm_gateway.runtime.chain import DecisionKind, FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import RequestInfo
from wasm_gateway.runtime.engine import EngineSettings, load_module, precompile
from wasm_gateway.runtime.instance import InstanceState

BODY = '(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 0)'


def test_cache_written_then_used(tmp_path: Path) -> None:
    path = write_filter(tmp_path, BODY)
    cache = tmp_path / "cache"
    first = load_module(path, cache)
    assert first.timings.source == "compile"
    entry, meta = sorted(cache.iterdir())  # the artifact alone (wasmtime maps it) and its header
    assert meta.name == entry.name + ".meta"
    second = load_module(path, cache)
    assert second.timings.source == "cache"
    assert second.sha256 == first.sha256
    assert meta.read_bytes().startswith(b"WGCWASM2 " + first.sha256.encode())
    assert meta.read_bytes().endswith(b" %d\n" % entry.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "garbage", "no-header", "old-format"])
def test_corrupt_or_foreign_cache_entry_is_recompiled(tmp_path: Path, damage: str) -> None:
    path = write_filter(tmp_path, BODY)
    cache = tmp_path / "cache"
    load_module(path, cache)
    entry, meta = sorted(cache.iterdir())
    blob, header = entry.read_bytes(), meta.read_bytes()
    if damage == "truncate":
        entry.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        entry.write_bytes(blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:])
    elif damage == "foreign":
        parts = header.split(b" ")
        parts[2] = EngineSettings(consume_fuel=True).key().encode()
        meta.write_bytes(b" ".join(parts))
    elif damage == "garbage":
        meta.write_bytes(b"\x00" * 100)
    elif damage == "no-header":
        meta.unlink()
    else:  # an entry of the previous layout: header and artifact in one file, no sidecar
        entry.write_bytes(header + blob)
        meta.unlink()
    again = load_module(path, cache)
    assert again.timings.source == "compile"
    assert load_module(path, cache).timings.source == "cache"  # replaced by a good entry


def test_precompile_and_load_precompiled(tmp_path: Path) -> None:
    path = write_filter(tmp_path, BODY)
    out = precompile(path, tmp_path / "f.cwasm")
    loaded = load_module(out)
    assert loaded.timings.source == "precompiled"
    with pytest.raises(FilterLoadError, match="another wasmtime version or engine settings"):
        load_module(out, settings=EngineSettings(consume_fuel=True))
    out.write_bytes(out.read_bytes()[:-1])
    with pytest.raises(FilterLoadError, match=r"f\.cwasm: corrupt precompiled module"):
        load_module(out)


def _runtime(tmp_path: Path, **kw: object) -> FilterRuntime:
    path = write_filter(tmp_path, BODY)
    return FilterRuntime.load([FilterSpec(name="f", module_path=path, **kw)])  # type: ignore[arg-type]


async def test_pool_preload_max_and_borrow_timeout(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, pool_min=2, pool_max=2, pool_borrow_timeout=0.05)
    try:
        pool = rt.pools["f"]
        assert pool.stats().size == 2 and pool.stats().idle == 2
        a = await pool.borrow()
        b = await pool.borrow()
        assert a is not b and a.state is InstanceState.BUSY
        with pytest.raises(FilterPoolTimeout, match="no instance free"):
            await pool.borrow()
        waiter = asyncio.ensure_future(pool.borrow())
        await asyncio.sleep(0)
        pool.give_back(a)
        assert await waiter is a
        pool.give_back(a)
        pool.give_back(b)
        assert pool.stats().busy == 0
    finally:
        rt.close()


async def test_pool_timeout_through_chain_applies_policy(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, pool_min=1, pool_max=1, pool_borrow_timeout=0.01)
    try:
        chain = rt.chain(["f"])
        s1 = chain.start(RequestInfo())
        d1 = await s1.on_request_headers([(":method", "GET"), (":path", "/")], True)
        assert d1.kind is DecisionKind.CONTINUE
        s2 = chain.start(RequestInfo())
        d2 = await s2.on_request_headers([(":method", "GET"), (":path", "/")], True)
        assert d2.kind is DecisionKind.RESPOND and d2.response is not None and d2.response.status == 503
        assert isinstance(d2.error, FilterPoolTimeout)
        s2.finish()
        s1.finish()
        assert rt.pools["f"].stats().idle == 1
    finally:
        rt.close()


async def test_recycle_after_and_idle_eviction(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, pool_min=1, pool_max=4, pool_recycle_after=2, pool_idle_seconds=0.0)
    try:
        pool = rt.pools["f"]
        first = await pool.borrow()
        pool.give_back(first)
        assert (await pool.borrow()) is first
        pool.give_back(first)  # second request: recycled
        assert first.state is InstanceState.CLOSED
        insts = [await pool.borrow() for _ in range(3)]
        for inst in insts:
            pool.give_back(inst)
        assert pool.stats().idle == 3
        assert pool.evict_idle() == 2
        assert pool.stats().size == 1
    finally:
        rt.close()


async def test_client_disconnect_runs_done_log_delete(tmp_path: Path) -> None:
    body = (
        STATUS_HELPER
        + """
      (func (export "proxy_on_done") (param i32) (result i32) (call $st (i32.const 11)) i32.const 1)
      (func (export "proxy_on_log") (param i32) (call $st (i32.const 12)))
      (func (export "proxy_on_delete") (param i32) (call $st (i32.const 13)))
    """
    )
    path = write_filter(tmp_path, body, imports=LOG_IMPORT)
    logs: list[tuple[str, int, str]] = []
    rt = FilterRuntime.load([FilterSpec(name="f", module_path=path)], log_sink=lambda *a: logs.append(a))
    try:
        s = rt.chain(["f"]).start(RequestInfo())
        await s.on_request_headers([(":method", "POST"), (":path", "/")], False)
        s.finish()  # the client went away before the body
        assert [m for _, _, m in logs] == ["11", "12", "13"]
    finally:
        rt.close()


async def test_ticks_reach_idle_instances(tmp_path: Path) -> None:
    body = (
        STATUS_HELPER
        + """
      (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
      (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (drop (call $tick (i32.const 1))) i32.const 1)
      (func (export "proxy_on_tick") (param i32) (call $st (i32.const 42)))
    """
    )
    # imports must precede other fields: move the tick import to the import slot
    body_fields = body.replace(
        '(import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))', ""
    )
    imports = (
        LOG_IMPORT
        + '(import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))'
    )
    path = write_filter(tmp_path, body_fields, imports=imports)
    logs: list[tuple[str, int, str]] = []
    rt = FilterRuntime.load([FilterSpec(name="f", module_path=path)], log_sink=lambda *a: logs.append(a))
    try:
        await rt.background_once()
        assert ("f", 2, "42") in logs
    finally:
        rt.close()
