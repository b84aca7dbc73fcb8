"""The FilterHarness itself: loading forms, sync/async use, http_call handlers, results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "runtime"))

from wat import LOG_IMPORT, STATUS_HELPER, filter_module, imp, write_filter

from wasm_gateway.exceptions import FilterLoadError
from wasm_gateway.testing import FilterHarness

ECHO_BODY_LEN = (
    STATUS_HELPER
    + """
  (data (i32.const 0x400) "x-body-len")
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (call $st (local.get 1))
    i32.const 0)
"""
)


def test_from_file_and_from_bytes_behave_alike(tmp_path: Path) -> None:
    path = write_filter(tmp_path, ECHO_BODY_LEN, imports=LOG_IMPORT)
    with FilterHarness.from_file(path) as a, FilterHarness.from_bytes(path.read_bytes()) as b:
        ra = a.request(method="POST", body=b"12345")
        rb = b.request(method="POST", body=b"12345")
    assert ra.logs == rb.logs == [(2, "05")]
    assert ra.request_body == rb.request_body == b"12345"
    assert a.spec.name == "f" and b.spec.name == "filter"


def test_streamed_chunks_reach_filter_and_upstream(tmp_path: Path) -> None:
    with FilterHarness.from_bytes(filter_module(ECHO_BODY_LEN, imports=LOG_IMPORT)) as h:
        r = h.request(method="POST", body_chunks=[b"ab", b"cde"], response=(204, [], b""))
    assert [m for _, m in r.logs] == ["02", "03"]  # each chunk as it streams (the filter continues)
    assert r.request_body == b"abcde"
    assert r.response_status == 204 and r.response_body == b""


async def test_request_from_inside_an_event_loop_and_async_handler() -> None:
    body = """
      (global $ctx (mut i32) (i32.const 0))
      (data (i32.const 0x400) "svc")
      (data (i32.const 0x500) "\\03\\00\\00\\00\\07\\00\\00\\00\\04\\00\\00\\00\\05\\00\\00\\00\\02\\00\\00\\00\\0a\\00\\00\\00\\03\\00\\00\\00:method\\00POST\\00:path\\00/x\\00:authority\\00svc\\00")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (global.set $ctx (local.get 0))
        (drop (call $proxy_http_call (i32.const 0x400) (i32.const 3) (i32.const 0x500) (i32.const 67)
                    (i32.const 0x400) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 0x108)))
        i32.const 1)
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (drop (call $proxy_set_effective_context (global.get $ctx)))
        (drop (call $proxy_continue_stream (i32.const 0))))
    """
    imports = (
        imp("proxy_http_call", 10) + imp("proxy_set_effective_context", 1) + imp("proxy_continue_stream", 1)
    )

    async def svc(req: object) -> tuple[int, list[tuple[str, str]], bytes]:
        return 200, [], b""

    with FilterHarness.from_bytes(filter_module(body, imports=imports), http_calls={"svc": svc}) as h:
        r = h.request()  # sync form works inside a running loop
        r2 = await h.arequest()
    for res in (r, r2):
        assert res.upstream_called
        [call] = res.http_calls
        assert (call.method, call.path, call.authority, call.body) == ("POST", "/x", "svc", b"svc")


def test_load_errors_surface_from_the_harness(tmp_path: Path) -> None:
    wasm = filter_module('(func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 0)')
    with pytest.raises(FilterLoadError, match="proxy_on_vm_start returned false"):
        FilterHarness.from_bytes(wasm)
