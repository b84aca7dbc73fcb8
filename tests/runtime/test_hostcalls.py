"""Each host function through the real runtime (inline WAT filters driven by the FilterHarness)."""

from __future__ import annotations

import hashlib
import struct

import pytest
from wat import LOG_IMPORT, STATUS_HELPER, filter_module, imp, statuses

from wasm_gateway.runtime.context import RequestInfo
from wasm_gateway.testing import FilterHarness


def harness(body: str, imports: str = "", **kw: object) -> FilterHarness:
    wasm = filter_module(STATUS_HELPER + body, imports=LOG_IMPORT + imports)
    return FilterHarness.from_bytes(wasm, **kw)  # type: ignore[arg-type]


HEADERS_IMPORTS = "".join(
    imp(n, a)
    for n, a in [
        ("proxy_get_header_map_value", 5),
        ("proxy_add_header_map_value", 5),
        ("proxy_replace_header_map_value", 5),
        ("proxy_remove_header_map_value", 3),
        ("proxy_get_header_map_pairs", 3),
        ("proxy_set_header_map_pairs", 3),
        ("proxy_get_header_map_size", 2),
    ]
)


def test_header_map_functions() -> None:
    body = """
      (data (i32.const 0x400) "x-a")
      (data (i32.const 0x410) "1")
      (data (i32.const 0x420) "user-agent")
      (data (i32.const 0x430) "x-remove")
      (data (i32.const 0x440) "missing")
      (data (i32.const 0x450) "x-served")
      (data (i32.const 0x460) "wasm")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        ;; read user-agent, log it
        (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x420) (i32.const 10)
                                                    (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        ;; missing key -> NOT_FOUND
        (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x440) (i32.const 7)
                                                    (i32.const 0x100) (i32.const 0x104)))
        (call $st (call $proxy_add_header_map_value (i32.const 0) (i32.const 0x400) (i32.const 3)
                                                    (i32.const 0x410) (i32.const 1)))
        ;; replace user-agent with "1"
        (call $st (call $proxy_replace_header_map_value (i32.const 0) (i32.const 0x420) (i32.const 10)
                                                        (i32.const 0x410) (i32.const 1)))
        (call $st (call $proxy_remove_header_map_value (i32.const 0) (i32.const 0x430) (i32.const 8)))
        ;; removing an absent header is OK
        (call $st (call $proxy_remove_header_map_value (i32.const 0) (i32.const 0x440) (i32.const 7)))
        ;; size of the serialized map, then all pairs
        (call $st (call $proxy_get_header_map_size (i32.const 0) (i32.const 0x108)))
        (call $st (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 0x100) (i32.const 0x104)))
        ;; write the pairs back unchanged
        (call $st (call $proxy_set_header_map_pairs (i32.const 0) (i32.load (i32.const 0x100))
                                                    (i32.load (i32.const 0x104))))
        i32.const 0)
      (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
        (call $st (call $proxy_add_header_map_value (i32.const 2) (i32.const 0x450) (i32.const 8)
                                                    (i32.const 0x460) (i32.const 4)))
        i32.const 0)
    """
    with harness(body, HEADERS_IMPORTS) as h:
        r = h.request(
            path="/p?q=1",
            headers=[("Host", "example.com"), ("User-Agent", "curl/8"), ("X-Remove", "gone")],
            response=(201, [("content-type", "text/plain")], b"ok"),
        )
    assert r.request_headers == [("user-agent", "1"), ("x-a", "1")]
    assert (r.method, r.path, r.authority) == ("GET", "/p?q=1", "example.com")
    assert r.response_status == 201
    assert r.response_headers == [("content-type", "text/plain"), ("x-served", "wasm")]
    assert r.response_body == b"ok"
    assert (2, "curl/8") in r.logs
    assert statuses(r.logs) == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]


def test_bad_pointers_answer_invalid_memory_access() -> None:
    body = """
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        ;; message beyond the end of memory (2 pages = 0x20000)
        (call $st (call $proxy_log (i32.const 2) (i32.const 0x1fff0) (i32.const 0x100)))
        (call $st (call $proxy_log (i32.const 2) (i32.const -16) (i32.const 32)))
        ;; out-pointers outside memory
        (call $st (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 0x7ffffff0) (i32.const 0x104)))
        (call $st (call $proxy_get_current_time_nanoseconds (i32.const 0x1fffc)))
        (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x30000) (i32.const 4)
                                                    (i32.const 0x100) (i32.const 0x104)))
        i32.const 0)
    """
    imports = imp("proxy_get_header_map_pairs", 3) + imp("proxy_get_current_time_nanoseconds", 1)
    imports += imp("proxy_get_header_map_value", 5)
    with harness(body, imports) as h:
        r = h.request()
    assert statuses(r.logs) == [6, 6, 6, 6, 6]
    assert r.upstream_called


def test_buffers_configuration_and_body_rewrite() -> None:
    body = """
      (data (i32.const 0x400) "REPLACED")
      (func (export "proxy_on_configure") (param i32 i32) (result i32)
        (call $st (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (local.get 1)
                                                (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        (call $st (call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (i32.const 100)
                                                (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        ;; an unknown buffer type
        (call $st (call $proxy_get_buffer_bytes (i32.const 42) (i32.const 0) (i32.const 1)
                                                (i32.const 0x100) (i32.const 0x104)))
        i32.const 1)
      (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
        (if (i32.eqz (local.get 2)) (then (return (i32.const 1))))   ;; buffer until end of stream
        (call $st (call $proxy_get_buffer_status (i32.const 0) (i32.const 0x108) (i32.const 0x10c)))
        (call $st (i32.load (i32.const 0x10c)))
        (call $st (call $proxy_get_buffer_bytes (i32.const 0) (i32.const 0) (local.get 1)
                                                (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        (call $st (call $proxy_set_buffer_bytes (i32.const 0) (i32.const 0) (local.get 1)
                                                (i32.const 0x400) (i32.const 8)))
        i32.const 0)
    """
    imports = (
        imp("proxy_get_buffer_bytes", 5)
        + imp("proxy_get_buffer_status", 3)
        + imp("proxy_set_buffer_bytes", 5)
    )
    with harness(body, imports, configuration=b"plugin-cfg", vm_configuration=b"vm-cfg") as h:
        startup = h.logs
        r = h.request(method="POST", body_chunks=[b"hello ", b"world"])
    assert (2, "plugin-cfg") in startup and (2, "vm-cfg") in startup
    assert statuses(startup)[-1] == 2
    assert r.request_body == b"REPLACED"
    assert (2, "hello world") in r.logs
    assert statuses(r.logs) == [0, 1, 0, 0]


def test_local_response() -> None:
    body = """
      (data (i32.const 0x400) "denied")
      (data (i32.const 0x410) "no entry")
      ;; pairs: 1 header x-why: policy
      (data (i32.const 0x500) "\\01\\00\\00\\00\\05\\00\\00\\00\\06\\00\\00\\00x-why\\00policy\\00")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $st (call $proxy_send_local_response (i32.const 403) (i32.const 0x400) (i32.const 6)
                    (i32.const 0x410) (i32.const 8) (i32.const 0x500) (i32.const 27) (i32.const -1)))
        i32.const 1)
    """
    with harness(body, imp("proxy_send_local_response", 8)) as h:
        r = h.request()
    assert r.local_response == (403, [("x-why", "policy")], b"no entry")
    assert not r.upstream_called
    assert r.response_status == 403


def test_http_call_pauses_and_resumes() -> None:
    body = """
      (global $ctx (mut i32) (i32.const 0))
      (data (i32.const 0x400) "authz")
      ;; :method GET, :path /check, :authority authz
      (data (i32.const 0x500) "\\03\\00\\00\\00\\07\\00\\00\\00\\03\\00\\00\\00\\05\\00\\00\\00\\06\\00\\00\\00\\0a\\00\\00\\00\\05\\00\\00\\00:method\\00GET\\00:path\\00/check\\00:authority\\00authz\\00")
      (data (i32.const 0x600) "x-verdict")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (global.set $ctx (local.get 0))
        (call $st (call $proxy_http_call (i32.const 0x400) (i32.const 5) (i32.const 0x500) (i32.const 70)
                    (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0x108)))
        i32.const 1)
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (call $st (local.get 2))   ;; number of headers (1 :status + 1)
        (call $st (call $proxy_set_effective_context (global.get $ctx)))
        (call $st (call $proxy_get_buffer_bytes (i32.const 4) (i32.const 0) (local.get 3)
                                                (i32.const 0x100) (i32.const 0x104)))
        (call $st (call $proxy_add_header_map_value (i32.const 0) (i32.const 0x600) (i32.const 9)
                    (i32.load (i32.const 0x100)) (i32.load (i32.const 0x104))))
        (call $st (call $proxy_continue_stream (i32.const 0))))
    """
    imports = "".join(
        imp(n, a)
        for n, a in [
            ("proxy_http_call", 10),
            ("proxy_set_effective_context", 1),
            ("proxy_get_buffer_bytes", 5),
            ("proxy_add_header_map_value", 5),
            ("proxy_continue_stream", 1),
        ]
    )
    seen = []

    def authz(req: object) -> tuple[int, list[tuple[str, str]], bytes]:
        seen.append(req)
        return 200, [("x-auth", "ok")], b"allow"

    with harness(body, imports, http_calls={"authz": authz}) as h:
        r = h.request(headers=[("host", "a")])
    assert len(seen) == 1
    call = seen[0]
    assert (call.method, call.path, call.authority) == ("GET", "/check", "authz")  # type: ignore[attr-defined]
    assert ("x-verdict", "allow") in r.request_headers
    assert statuses(r.logs) == [0, 2, 0, 0, 0, 0]


def test_http_call_rejects_missing_pseudo_headers_and_failed_call() -> None:
    body = """
      (global $ctx (mut i32) (i32.const 0))
      (data (i32.const 0x400) "authz")
      (data (i32.const 0x500) "\\01\\00\\00\\00\\07\\00\\00\\00\\03\\00\\00\\00:method\\00GET\\00")
      (data (i32.const 0x540) "\\03\\00\\00\\00\\07\\00\\00\\00\\03\\00\\00\\00\\05\\00\\00\\00\\06\\00\\00\\00\\0a\\00\\00\\00\\05\\00\\00\\00:method\\00GET\\00:path\\00/check\\00:authority\\00authz\\00")
      (data (i32.const 0x600) "nope")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (global.set $ctx (local.get 0))
        (call $st (call $proxy_http_call (i32.const 0x400) (i32.const 5) (i32.const 0x500) (i32.const 24)
                    (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0x108)))
        (call $st (call $proxy_http_call (i32.const 0x600) (i32.const 4) (i32.const 0x540) (i32.const 70)
                    (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0x108)))
        i32.const 1)
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
        (call $st (local.get 2))   ;; 0 headers: the call failed
        (drop (call $proxy_set_effective_context (global.get $ctx)))
        (drop (call $proxy_continue_stream (i32.const 0))))
    """
    imports = (
        imp("proxy_http_call", 10) + imp("proxy_set_effective_context", 1) + imp("proxy_continue_stream", 1)
    )
    with harness(body, imports) as h:
        r = h.request()
    assert statuses(r.logs) == [2, 0, 0]
    assert r.upstream_called


def test_shared_data_cas_queues_and_metrics() -> None:
    body = """
      (data (i32.const 0x400) "counter")
      (data (i32.const 0x410) "v1")
      (data (i32.const 0x420) "q")
      (data (i32.const 0x430) "requests")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $st (call $proxy_get_shared_data (i32.const 0x400) (i32.const 7) (i32.const 0x100)
                    (i32.const 0x104) (i32.const 0x108)))                                  ;; 01 not found
        (call $st (call $proxy_set_shared_data (i32.const 0x400) (i32.const 7) (i32.const 0x410)
                    (i32.const 2) (i32.const 0)))                                          ;; 00
        (call $st (call $proxy_get_shared_data (i32.const 0x400) (i32.const 7) (i32.const 0x100)
                    (i32.const 0x104) (i32.const 0x108)))                                  ;; 00
        (call $log_ret)                                                                     ;; v1
        (call $st (call $proxy_set_shared_data (i32.const 0x400) (i32.const 7) (i32.const 0x410)
                    (i32.const 2) (i32.add (i32.load (i32.const 0x108)) (i32.const 1))))   ;; 08 mismatch
        (call $st (call $proxy_set_shared_data (i32.const 0x400) (i32.const 7) (i32.const 0x410)
                    (i32.const 1) (i32.load (i32.const 0x108))))                           ;; 00
        ;; queues
        (call $st (call $proxy_register_shared_queue (i32.const 0x420) (i32.const 1) (i32.const 0x10c)))
        (call $st (call $proxy_resolve_shared_queue (i32.const 0) (i32.const 0) (i32.const 0x420)
                    (i32.const 1) (i32.const 0x110)))
        (call $st (call $proxy_dequeue_shared_queue (i32.load (i32.const 0x110)) (i32.const 0x100)
                    (i32.const 0x104)))                                                    ;; 07 empty
        (call $st (call $proxy_enqueue_shared_queue (i32.load (i32.const 0x110)) (i32.const 0x410)
                    (i32.const 2)))
        (call $st (call $proxy_dequeue_shared_queue (i32.load (i32.const 0x110)) (i32.const 0x100)
                    (i32.const 0x104)))
        (call $log_ret)
        ;; metrics: counter + 5, read back
        (call $st (call $proxy_define_metric (i32.const 0) (i32.const 0x430) (i32.const 8) (i32.const 0x114)))
        (call $st (call $proxy_increment_metric (i32.load (i32.const 0x114)) (i64.const 5)))
        (call $st (call $proxy_get_metric (i32.load (i32.const 0x114)) (i32.const 0x118)))
        (call $st (i32.load (i32.const 0x118)))
        i32.const 0)
    """
    imports = "".join(
        imp(n, a)
        for n, a in [
            ("proxy_get_shared_data", 5),
            ("proxy_set_shared_data", 5),
            ("proxy_register_shared_queue", 3),
            ("proxy_resolve_shared_queue", 5),
            ("proxy_dequeue_shared_queue", 3),
            ("proxy_enqueue_shared_queue", 3),
            ("proxy_define_metric", 4),
            ("proxy_get_metric", 2),
        ]
    )
    imports += (
        '(import "env" "proxy_increment_metric" (func $proxy_increment_metric (param i32 i64) (result i32)))'
    )
    with harness(body, imports) as h:
        r = h.request()
        metrics = h.runtime.shared.metrics.all()
    assert statuses(r.logs) == [1, 0, 0, 8, 0, 0, 0, 7, 0, 0, 0, 0, 0, 5]
    assert [m for _, m in r.logs if m == "v1"] == ["v1", "v1"]
    assert [(m.filter_name, m.name, m.value) for m in metrics] == [("filter", "requests", 5)]


def test_properties_time_log_level_and_foreign_function() -> None:
    body = """
      (data (i32.const 0x400) "source\\00address")
      (data (i32.const 0x420) "request\\00path")
      (data (i32.const 0x440) "source\\00port")
      (data (i32.const 0x460) "no\\00such")
      (data (i32.const 0x480) "sha256")
      (data (i32.const 0x490) "abc")
      (data (i32.const 0x4a0) "plugin_name")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $st (call $proxy_get_property (i32.const 0x400) (i32.const 14) (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        (call $st (call $proxy_get_property (i32.const 0x420) (i32.const 12) (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        (call $st (call $proxy_get_property (i32.const 0x440) (i32.const 11) (i32.const 0x100) (i32.const 0x104)))
        (call $st (i32.load (i32.const 0x104)))      ;; 8 bytes
        (call $st (call $proxy_get_property (i32.const 0x460) (i32.const 7) (i32.const 0x100) (i32.const 0x104)))
        (call $st (call $proxy_get_property (i32.const 0x4a0) (i32.const 11) (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        (call $st (call $proxy_get_log_level (i32.const 0x108)))
        (call $st (i32.load (i32.const 0x108)))
        (call $st (call $proxy_get_current_time_nanoseconds (i32.const 0x110)))
        (call $st (call $proxy_call_foreign_function (i32.const 0x480) (i32.const 6) (i32.const 0x490)
                    (i32.const 3) (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        (call $st (call $proxy_call_foreign_function (i32.const 0x460) (i32.const 2) (i32.const 0x490)
                    (i32.const 3) (i32.const 0x100) (i32.const 0x104)))
        i32.const 0)
    """
    imports = "".join(
        imp(n, a)
        for n, a in [
            ("proxy_get_property", 4),
            ("proxy_get_log_level", 1),
            ("proxy_get_current_time_nanoseconds", 1),
            ("proxy_call_foreign_function", 6),
        ]
    )
    with harness(body, imports, name="props", log_level="debug") as h:
        r = h.request(path="/x?y", info=RequestInfo(source_address="10.1.2.3", source_port=5555))
    assert statuses(r.logs) == [0, 0, 0, 8, 1, 0, 0, 1, 0, 0, 1]
    messages = [m for _, m in r.logs]
    assert "10.1.2.3:5555" in messages and "/x?y" in messages and "props" in messages
    digest = hashlib.sha256(b"abc").digest().decode("utf-8", "replace")
    assert digest in messages


def test_property_encodings_and_time() -> None:
    from wasm_gateway.runtime.context import HostState, StreamContext
    from wasm_gateway.runtime.properties import get_property
    from wasm_gateway.runtime.services import AbiVersion, FilterServices

    st = HostState(FilterServices(name="f", abi=AbiVersion.V0_2_1, root_id="root"))
    s = StreamContext(2, RequestInfo(source_address="1.2.3.4", source_port=80, start_time_ns=7))
    s.request_headers = [(":path", "/a?b=c"), (":method", "GET"), ("user-agent", "ua")]
    st.current = s
    assert get_property(st, b"source\0port") == struct.pack("<q", 80)
    assert get_property(st, b"source\0address") == b"1.2.3.4:80"
    assert get_property(st, b"request\0time\0") == struct.pack("<q", 7)
    assert get_property(st, b"request\0url_path") == b"/a"
    assert get_property(st, b"request\0query") == b"b=c"
    assert get_property(st, b"request\0headers\0user-agent") == b"ua"
    assert get_property(st, b"plugin_root_id") == b"root"
    assert get_property(st, b"response\0code") is None


def test_wasi_stdout_env_and_clock() -> None:
    body = """
      (data (i32.const 0x400) "hello from stdout\\n")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        ;; iovec at 0x300: ptr 0x400, len 18
        (i32.store (i32.const 0x300) (i32.const 0x400))
        (i32.store (i32.const 0x304) (i32.const 18))
        (call $st (call $fd_write (i32.const 1) (i32.const 0x300) (i32.const 1) (i32.const 0x108)))
        (call $st (call $fd_write (i32.const 9) (i32.const 0x300) (i32.const 1) (i32.const 0x108)))   ;; EBADF 8
        (call $st (call $environ_sizes_get (i32.const 0x110) (i32.const 0x114)))
        (call $st (i32.load (i32.const 0x110)))
        (call $st (call $environ_get (i32.const 0x120) (i32.const 0x140)))
        (drop (call $proxy_log (i32.const 2) (i32.load (i32.const 0x120)) (i32.const 3)))
        (call $st (call $clock_time_get (i32.const 1) (i64.const 1) (i32.const 0x180)))
        (call $st (call $random_get (i32.const 0x190) (i32.const 16)))
        i32.const 0)
    """
    w = "wasi_snapshot_preview1"
    imports = imp("fd_write", 4, module=w) + imp("environ_sizes_get", 2, module=w)
    imports += imp("environ_get", 2, module="wasi_unstable") + imp("random_get", 2, module=w)
    imports += f'(import "{w}" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))'
    with harness(body, imports, env={"A": "1"}) as h:
        r = h.request()
    assert (2, "hello from stdout") in r.logs
    assert (2, "A=1") in r.logs
    assert statuses(r.logs) == [0, 8, 0, 1, 0, 0, 0]


@pytest.mark.parametrize("abi", ["0_2_0", "0_1_0"])
def test_older_abi_versions(abi: str) -> None:
    params = "(param i32 i32 i32)" if abi == "0_2_0" else "(param i32 i32)"
    body = f"""
      (data (i32.const 0x400) "missing")
      (func (export "proxy_on_request_headers") {params} (result i32)
        (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x400) (i32.const 7)
                    (i32.const 0x100) (i32.const 0x104)))
        i32.const 0)
    """
    wasm = filter_module(
        STATUS_HELPER + body, imports=LOG_IMPORT + imp("proxy_get_header_map_value", 5), abi=abi
    )
    with FilterHarness.from_bytes(wasm) as h:
        r = h.request()
        assert h.runtime.modules["filter"].abi.value == abi.replace("_", ".")
    # 0.1.0 answered OK with an empty value for a missing header; 0.2.x answers NOT_FOUND
    assert statuses(r.logs) == ([1] if abi == "0_2_0" else [0])


def test_abi_0_1_0_configuration_and_continue_request() -> None:
    body = """
      (func (export "proxy_on_configure") (param i32 i32) (result i32)
        (call $st (call $proxy_get_configuration (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        i32.const 1)
    """
    imports = imp("proxy_get_configuration", 2) + imp("proxy_continue_request", 0)
    wasm = filter_module(STATUS_HELPER + body, imports=LOG_IMPORT + imports, abi="0_1_0")
    with FilterHarness.from_bytes(wasm, configuration=b"old-style") as h:
        assert (2, "old-style") in h.logs
