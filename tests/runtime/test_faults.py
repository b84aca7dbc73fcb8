"""Error paths: load failures, traps, timeouts, memory limits, invalid headers, failure policies."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime
from wat import LOG_IMPORT, STATUS_HELPER, filter_module, imp, statuses, write_filter

from wasm_gateway.exceptions import (
    FilterLoadError,
    FilterProtocolError,
    FilterTimeoutError,
    FilterTrapError,
)
from wasm_gateway.testing import FilterHarness

ADD_THEN = """
  (data (i32.const 0x400) "x-partial")
  (data (i32.const 0x410) "1")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $proxy_add_header_map_value (i32.const 0) (i32.const 0x400) (i32.const 9)
                                            (i32.const 0x410) (i32.const 1)))
    %s
    i32.const 0)
"""
ADD_IMPORT = imp("proxy_add_header_map_value", 5)


def test_trap_fail_closed_answers_503_and_discards_instance() -> None:
    wasm = filter_module(ADD_THEN % "unreachable", imports=ADD_IMPORT)
    with FilterHarness.from_bytes(wasm, name="trappy") as h:
        r = h.request()
        stats = h.runtime.pools["trappy"].stats()
        again = h.request()
    assert r.local_response is not None and r.local_response[0] == 503
    assert b'"filter":"trappy"' in r.local_response[2]
    assert isinstance(r.error, FilterTrapError)
    assert "trappy" in str(r.error) and "unreachable" in str(r.error)
    assert not r.upstream_called
    assert stats.discarded == 1
    assert again.response_status == 503  # a fresh instance, same behaviour: the gateway keeps going


def test_trap_fail_open_passes_original_request() -> None:
    wasm = filter_module(ADD_THEN % "unreachable", imports=ADD_IMPORT)
    with FilterHarness.from_bytes(wasm, failure_policy="fail_open") as h:
        r = h.request(headers=[("x-in", "1")], response=(200, [], b"fine"))
    assert r.upstream_called and r.failed_open
    assert r.request_headers == [("x-in", "1")]  # the partial edit (x-partial) is not applied
    assert r.response_body == b"fine"


def test_infinite_loop_hits_epoch_deadline() -> None:
    wasm = filter_module(ADD_THEN % "(loop $l (br $l))", imports=ADD_IMPORT)
    with FilterHarness.from_bytes(wasm, callback_timeout_ms=20) as h:
        r = h.request()
    assert isinstance(r.error, FilterTimeoutError)
    assert "exceeded its time limit" in str(r.error)


def test_fuel_limit() -> None:
    wasm = filter_module(ADD_THEN % "(loop $l (br $l))", imports=ADD_IMPORT)
    with FilterHarness.from_bytes(wasm, fuel=100_000, callback_timeout_ms=10_000) as h:
        r = h.request()
    assert isinstance(r.error, FilterTimeoutError)
    assert "fuel" in str(r.error)


def test_memory_growth_past_limit_returns_minus_one() -> None:
    body = """
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        ;; 2 pages + 1 is within 192 KiB; +16 more is past it -> -1 (no trap)
        (call $st (i32.add (memory.grow (i32.const 1)) (i32.const 0)))
        (call $st (i32.add (memory.grow (i32.const 16)) (i32.const 2)))
        i32.const 0)
    """
    wasm = filter_module(STATUS_HELPER + body, imports=LOG_IMPORT)
    with FilterHarness.from_bytes(wasm, memory_limit_bytes=3 * 65536) as h:
        r = h.request()
    assert statuses(r.logs) == [2, 1]  # old size 2 pages; then -1 + 2
    assert r.upstream_called


def test_invalid_header_is_a_protocol_error_and_never_injected() -> None:
    body = """
      (data (i32.const 0x400) "x-bad")
      (data (i32.const 0x410) "a\\0d\\0aSet-Cookie: x")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $proxy_add_header_map_value (i32.const 0) (i32.const 0x400) (i32.const 5)
                                                (i32.const 0x410) (i32.const 16)))
        i32.const 0)
    """
    wasm = filter_module(body, imports=ADD_IMPORT)
    with FilterHarness.from_bytes(wasm) as h:
        r = h.request()
    assert isinstance(r.error, FilterProtocolError)
    assert "CR, LF or NUL" in str(r.error)
    with FilterHarness.from_bytes(wasm, failure_policy="fail_open") as h:
        r = h.request(headers=[("x-in", "1")])
    assert r.request_headers == [("x-in", "1")]


def test_invalid_header_name_in_local_response() -> None:
    body = """
      (data (i32.const 0x500) "\\01\\00\\00\\00\\05\\00\\00\\00\\01\\00\\00\\00x y z\\00v\\00")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $proxy_send_local_response (i32.const 200) (i32.const 0) (i32.const 0)
                    (i32.const 0) (i32.const 0) (i32.const 0x500) (i32.const 22) (i32.const -1)))
        i32.const 1)
    """
    with FilterHarness.from_bytes(filter_module(body, imports=imp("proxy_send_local_response", 8))) as h:
        r = h.request()
    assert isinstance(r.error, FilterProtocolError)
    assert r.response_status == 503


def test_proc_exit_is_a_trap_with_exit_code() -> None:
    body = """
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $proc_exit (i32.const 3))
        i32.const 0)
    """
    imports = '(import "wasi_unstable" "proc_exit" (func $proc_exit (param i32)))'
    with FilterHarness.from_bytes(filter_module(body, imports=imports)) as h:
        r = h.request()
    assert isinstance(r.error, FilterTrapError) and "proc_exit(3)" in str(r.error)


def test_paused_at_end_of_stream_without_pending_call() -> None:
    body = '(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 1)'
    with FilterHarness.from_bytes(filter_module(body)) as h:
        r = h.request()
    assert isinstance(r.error, FilterProtocolError)


def test_body_buffer_limit_answers_413() -> None:
    body = '(func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) i32.const 1)'
    with FilterHarness.from_bytes(filter_module(body)) as h:
        h.runtime.max_buffer_bytes = 10
        r = h.request(method="POST", body_chunks=[b"x" * 8, b"y" * 8, b"z"])
    assert r.local_response is not None and r.local_response[0] == 413


# ---------------------------------------------------------------------------------------------- load errors


def test_configure_false_fails_load(tmp_path: Path) -> None:
    body = '(func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 0)'
    path = write_filter(tmp_path, body)
    with pytest.raises(FilterLoadError, match=r"f\.wasm: proxy_on_configure returned false"):
        FilterHarness.from_file(path)


def test_trap_during_start_fails_load(tmp_path: Path) -> None:
    body = '(func (export "_initialize") unreachable)'
    path = write_filter(tmp_path, body)
    with pytest.raises(FilterLoadError, match=r"start-up failed.*_initialize"):
        FilterHarness.from_file(path)


def test_missing_abi_export(tmp_path: Path) -> None:
    path = tmp_path / "plain.wasm"
    path.write_bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1))'))
    with pytest.raises(FilterLoadError, match=r"plain\.wasm: not a Proxy-Wasm filter"):
        FilterHarness.from_file(path)


def test_http_wasm_module_is_named(tmp_path: Path) -> None:
    path = tmp_path / "traefik.wasm"
    path.write_bytes(
        wasmtime.wat2wasm(
            """(module (import "http_handler" "log" (func (param i32 i32 i32)))
                 (memory (export "memory") 1)
                 (func (export "handle_request") (result i64) i64.const 0))"""
        )
    )
    with pytest.raises(FilterLoadError, match=r"traefik\.wasm: this is an http-wasm module"):
        FilterHarness.from_file(path)


def test_unknown_import_names_module_import_and_file(tmp_path: Path) -> None:
    path = write_filter(tmp_path, "", imports='(import "vendor" "magic" (func (param i32)))', name="odd.wasm")
    with pytest.raises(FilterLoadError, match=r"odd\.wasm: imports vendor\.magic"):
        FilterHarness.from_file(path)
    path = write_filter(tmp_path, "", imports=imp("proxy_does_not_exist", 1), name="odd2.wasm")
    with pytest.raises(FilterLoadError, match=r"odd2\.wasm: imports env\.proxy_does_not_exist"):
        FilterHarness.from_file(path)


def test_import_with_wrong_signature(tmp_path: Path) -> None:
    path = write_filter(tmp_path, "", imports=imp("proxy_log", 2))
    with pytest.raises(FilterLoadError, match="cannot link"):
        FilterHarness.from_file(path)


def test_missing_memory_and_allocator(tmp_path: Path) -> None:
    path = tmp_path / "nomem.wasm"
    path.write_bytes(wasmtime.wat2wasm('(module (func (export "proxy_abi_version_0_2_1")))'))
    with pytest.raises(FilterLoadError, match="exports no 'memory'"):
        FilterHarness.from_file(path)
    path = write_filter(tmp_path, "", allocator="", name="noalloc.wasm")
    with pytest.raises(FilterLoadError, match="neither proxy_on_memory_allocate nor malloc"):
        FilterHarness.from_file(path)


def test_wrong_export_signature(tmp_path: Path) -> None:
    body = '(func (export "proxy_on_request_headers") (param i32) (result i32) i32.const 0)'
    path = write_filter(tmp_path, body)
    with pytest.raises(FilterLoadError, match="proxy_on_request_headers has the wrong signature"):
        FilterHarness.from_file(path)


def test_not_wasm(tmp_path: Path) -> None:
    path = tmp_path / "junk.wasm"
    path.write_bytes(b"hello")
    with pytest.raises(FilterLoadError, match=r"junk\.wasm: not a WebAssembly module"):
        FilterHarness.from_file(path)
    with pytest.raises(FilterLoadError, match="cannot read module"):
        FilterHarness.from_file(tmp_path / "absent.wasm")


def test_malloc_allocator_is_supported() -> None:
    alloc = """
      (global $heap (mut i32) (i32.const 0x10000))
      (func (export "malloc") (param i32) (result i32) (local i32)
        global.get $heap local.set 1
        (global.set $heap (i32.add (global.get $heap) (local.get 0)))
        local.get 1)
    """
    body = """
      (data (i32.const 0x420) ":authority")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x420) (i32.const 10)
                                                (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        i32.const 0)
    """
    wasm = filter_module(
        STATUS_HELPER + body, imports=LOG_IMPORT + imp("proxy_get_header_map_value", 5), allocator=alloc
    )
    with FilterHarness.from_bytes(wasm) as h:
        r = h.request(headers=[("host", "ok.example")])
    assert (2, "ok.example") in [(lv, m) for lv, m in r.logs]
