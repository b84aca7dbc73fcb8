"""The fast path's moving parts: callback order through the trampoline, lazily built entries, time limits by
epoch-deadline callback (native and Python tickers), the raw host calls' bounds checks, fail_open with held
bodies, queue notifications and proxy_on_done answering false."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import wasmtime
from wat import ALLOCATOR, LOG_IMPORT, STATUS_HELPER, filter_module, imp, statuses

from wasm_gateway.exceptions import FilterTimeoutError, FilterTrapError
from wasm_gateway.runtime import engine
from wasm_gateway.runtime.chain import DecisionKind, FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import RequestInfo
from wasm_gateway.runtime.engine import calls_hold_gil, get_engine, load_module, precompile
from wasm_gateway.testing import FilterHarness

REPO = Path(__file__).resolve().parents[2]


def harness(body: str, imports: str = "", **kw: object) -> FilterHarness:
    wasm = filter_module(STATUS_HELPER + body, imports=LOG_IMPORT + imports)
    return FilterHarness.from_bytes(wasm, **kw)  # type: ignore[arg-type]


def bare_module(body: str, imports: str = "") -> bytes:
    """A filter with only what ``body`` exports (no default callbacks)."""
    return bytes(
        wasmtime.wat2wasm(
            f"""(module {LOG_IMPORT} {imports}
          (memory (export "memory") 2) {ALLOCATOR}
          (func (export "proxy_abi_version_0_2_1"))
          {STATUS_HELPER} {body})"""
        )
    )


EVERY_CALLBACK = """
  (func (export "proxy_on_context_create") (param i32 i32)
    (if (local.get 1) (then (call $st (i32.const 1)))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (call $st (i32.const 2)) i32.const 0)
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) (call $st (i32.const 3)) i32.const 0)
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (call $st (i32.const 4)) i32.const 0)
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) (call $st (i32.const 5)) i32.const 0)
  (func (export "proxy_on_done") (param i32) (result i32) (call $st (i32.const 6)) i32.const 1)
  (func (export "proxy_on_log") (param i32) (call $st (i32.const 7)))
  (func (export "proxy_on_delete") (param i32) (call $st (i32.const 8)))
"""


def test_every_callback_in_envoys_order() -> None:
    with harness(EVERY_CALLBACK) as h:
        r = h.request(method="POST", body=b"in", response=(200, [], b"out"))
        again = h.request()  # the same instance, a new stream context
    assert statuses(r.logs) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert r.request_body == b"in" and r.response_body == b"out"
    assert statuses(again.logs) == [1, 2, 4, 6, 7, 8]


def test_callbacks_a_module_does_not_export_are_skipped() -> None:
    # No context_create, no headers or body callbacks: data flows untouched; done/log/delete still run.
    body = """
      (func (export "proxy_on_done") (param i32) (result i32) (call $st (i32.const 6)) i32.const 1)
      (func (export "proxy_on_delete") (param i32) (call $st (i32.const 8)))
    """
    with FilterHarness.from_bytes(bare_module(body)) as h:
        r = h.request(
            method="POST", headers=[("x-in", "1")], body_chunks=[b"a", b"b"], response=(201, [], b"c")
        )
    assert statuses(r.logs) == [6, 8]
    assert r.request_headers == [("x-in", "1")] and r.request_body == b"ab"
    assert (r.response_status, r.response_body) == (201, b"c")


async def test_response_headers_first_still_create_the_context(tmp_path: Path) -> None:
    # A chain step may reach a filter with response headers first (e.g. added to a chain mid-request).
    path = tmp_path / "f.wasm"
    path.write_bytes(filter_module(STATUS_HELPER + EVERY_CALLBACK, imports=LOG_IMPORT))
    logs: list[tuple[str, int, str]] = []
    rt = FilterRuntime.load([FilterSpec(name="f", module_path=path)], log_sink=lambda *a: logs.append(a))
    try:
        s = rt.chain(["f"]).start(RequestInfo())
        d = await s.on_response_headers([(":status", "200")], True)
        assert d.kind is DecisionKind.CONTINUE
        s.finish()
    finally:
        rt.close()
    assert [int(m) for _, _, m in logs] == [1, 4, 6, 7, 8]


# ---------------------------------------------------------------------------------------------- time limits

SPIN_MS = """
  (func $now (result i64)
    (drop (call $proxy_get_current_time_nanoseconds (i32.const 0x180)))
    (i64.load (i32.const 0x180)))
  ;; busy for $ms milliseconds of wall time
  (func $spin (param $ms i64) (local $end i64)
    (local.set $end (i64.add (call $now) (i64.mul (local.get $ms) (i64.const 1000000))))
    (loop $l (br_if $l (i64.lt_u (call $now) (local.get $end)))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $spin (i64.extend_i32_u (global.get $spin_ms)))
    i32.const 0)
"""


def spin_filter(ms: int) -> bytes:
    body = f"(global $spin_ms i32 (i32.const {ms}))" + SPIN_MS
    return filter_module(
        STATUS_HELPER + body, imports=LOG_IMPORT + imp("proxy_get_current_time_nanoseconds", 1)
    )


def test_idle_instance_gets_its_full_time_limit() -> None:
    # The store's deadline went stale while the instance sat idle: the first callback after that still
    # gets the whole limit (the deadline callback extends it), and only a callback that overruns fails.
    with FilterHarness.from_bytes(spin_filter(30), callback_timeout_ms=150) as h:
        h.request()
        time.sleep(0.4)
        r = h.request()
    assert r.error is None and r.upstream_called
    with FilterHarness.from_bytes(spin_filter(400), callback_timeout_ms=50) as h:
        r = h.request()
    assert isinstance(r.error, FilterTimeoutError)


def test_native_ticker_on_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the native ticker is a POSIX timer; elsewhere the Python ticker runs")
    if os.environ.get("WASM_GATEWAY_EPOCH_TICKER", "native") != "native":
        pytest.skip("the Python ticker was forced")
    assert calls_hold_gil(get_engine())


def test_python_ticker_fallback_still_interrupts_loops() -> None:
    # A fresh process: the ticker kind is chosen when the engine is created.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
        from wat import filter_module
        from wasm_gateway.exceptions import FilterTimeoutError
        from wasm_gateway.runtime.engine import calls_hold_gil, get_engine
        from wasm_gateway.testing import FilterHarness
        body = '(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (loop $l (br $l)) i32.const 0)'
        with FilterHarness.from_bytes(filter_module(body), callback_timeout_ms=20) as h:
            r = h.request()
        assert not calls_hold_gil(get_engine())
        assert isinstance(r.error, FilterTimeoutError), r.error
        print("ok")
        """
    )
    env = dict(os.environ, WASM_GATEWAY_EPOCH_TICKER="thread")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------------- host calls


def test_raw_header_calls_check_every_pointer() -> None:
    body = """
      (data (i32.const 0x400) "user-agent")
      (data (i32.const 0x420) "x-a")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        ;; out-pointers past the end of memory (2 pages = 0x20000)
        (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x400) (i32.const 10)
                    (i32.const 0x1fffe) (i32.const 0x104)))
        (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x400) (i32.const 10)
                    (i32.const 0x100) (i32.const -4)))
        ;; value past the end
        (call $st (call $proxy_add_header_map_value (i32.const 0) (i32.const 0x420) (i32.const 3)
                    (i32.const 0x1fff0) (i32.const 0x20)))
        ;; a map that does not exist now (http_call response headers) and an unknown map: BAD_ARGUMENT
        (call $st (call $proxy_get_header_map_value (i32.const 6) (i32.const 0x400) (i32.const 10)
                    (i32.const 0x100) (i32.const 0x104)))
        (call $st (call $proxy_get_header_map_value (i32.const 9) (i32.const 0x400) (i32.const 10)
                    (i32.const 0x100) (i32.const 0x104)))
        (call $st (call $proxy_add_header_map_value (i32.const 9) (i32.const 0x420) (i32.const 3)
                    (i32.const 0x420) (i32.const 1)))
        ;; and the fast path works: repeated headers are joined with a comma
        (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x400) (i32.const 10)
                    (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        i32.const 0)
    """
    imports = imp("proxy_get_header_map_value", 5) + imp("proxy_add_header_map_value", 5)
    with harness(body, imports) as h:
        r = h.request(headers=[("User-Agent", "a"), ("user-agent", "b")])
    assert statuses(r.logs) == [6, 6, 6, 2, 2, 2, 0]
    assert r.logs[-1] == (2, "a,b")
    assert [k for k, _ in r.request_headers].count("x-a") == 0


def test_allocator_that_grows_memory() -> None:
    # Each allocation is a fresh page past the old end: the host must see the grown memory.
    grow = """
      (func (export "proxy_on_memory_allocate") (param i32) (result i32)
        (i32.mul (memory.grow (i32.const 1)) (i32.const 65536)))
    """
    body = """
      (data (i32.const 0x400) "user-agent")
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x400) (i32.const 10)
                    (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        (call $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x400) (i32.const 10)
                    (i32.const 0x100) (i32.const 0x104)))
        (call $log_ret)
        i32.const 0)
    """
    wasm = filter_module(
        STATUS_HELPER + body, imports=LOG_IMPORT + imp("proxy_get_header_map_value", 5), allocator=grow
    )
    with FilterHarness.from_bytes(wasm) as h:
        r = h.request(headers=[("user-agent", "grown")])
    assert r.logs == [(2, "00"), (2, "grown"), (2, "00"), (2, "grown")]


# ---------------------------------------------------------------------------------------------- fail_open


def test_fail_open_passes_a_held_body_on_exactly_once() -> None:
    # The filter holds the first chunk (PAUSE) and traps on the last: the upstream gets both, once.
    body = """
      (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
        (if (local.get 2) (then unreachable))
        i32.const 1)
    """
    with harness(body, failure_policy="fail_open") as h:
        r = h.request(method="POST", body_chunks=[b"first-", b"last"])
    assert r.failed_open and r.error is None
    assert r.request_body == b"first-last"
    with harness(body) as h:
        r = h.request(method="POST", body_chunks=[b"first-", b"last"])
    assert isinstance(r.error, FilterTrapError) and r.response_status == 503


def test_fail_open_after_an_http_call_on_a_held_chunk() -> None:
    # The chunk waits for an http_call; the filter traps in the call's answer: passed on once.
    body = """
      (data (i32.const 0x400) "authz")
      (data (i32.const 0x500) "\\03\\00\\00\\00\\07\\00\\00\\00\\03\\00\\00\\00\\05\\00\\00\\00\\06\\00\\00\\00\\0a\\00\\00\\00\\05\\00\\00\\00:method\\00GET\\00:path\\00/check\\00:authority\\00authz\\00")
      (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
        (drop (call $proxy_http_call (i32.const 0x400) (i32.const 5) (i32.const 0x500) (i32.const 70)
                    (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0x108)))
        i32.const 1)
      (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32) unreachable)
    """
    calls = []

    def authz(req: object) -> tuple[int, list[tuple[str, str]], bytes]:
        calls.append(req)
        return 200, [], b""

    with harness(
        body, imp("proxy_http_call", 10), failure_policy="fail_open", http_calls={"authz": authz}
    ) as h:
        r = h.request(method="POST", body=b"payload")
    assert len(calls) == 1
    assert r.failed_open and r.request_body == b"payload"


# ---------------------------------------------------------------------------------------------- cache


def test_first_cache_format_still_loads(tmp_path: Path) -> None:
    import hashlib

    src = tmp_path / "f.wasm"
    src.write_bytes(filter_module(""))
    out = precompile(src, tmp_path / "f.cwasm")
    head, _, payload = out.read_bytes().partition(b"\n")
    parts = head.split(b" ")
    parts[0] = b"WGCWASM1"
    parts[3] = hashlib.sha256(payload).hexdigest().encode()
    out.write_bytes(b" ".join(parts) + b"\n" + payload)
    assert load_module(out).timings.source == "precompiled"
    out.write_bytes(b" ".join(parts) + b"\n" + payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(Exception, match="corrupt precompiled module"):
        load_module(out)


def test_engine_key_is_memoised() -> None:
    settings = engine.EngineSettings(opt_level="none")
    assert settings.key() == settings._key()
    assert settings.key() is settings.key()


# ---------------------------------------------------------------------------------------------- queue_ready

QUEUE_OWNER = """
  (global $token (mut i32) (i32.const 0))
  (data (i32.const 0x400) "jobs")
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (call $st (call $proxy_register_shared_queue (i32.const 0x400) (i32.const 4) (i32.const 0x108)))
    (global.set $token (i32.load (i32.const 0x108)))
    i32.const 1)
  (func (export "proxy_on_queue_ready") (param i32 i32)
    (call $st (i32.eq (local.get 1) (global.get $token)))
    (call $st (call $proxy_dequeue_shared_queue (local.get 1) (i32.const 0x100) (i32.const 0x104)))
    (call $log_ret))
"""
PRODUCER = """
  (data (i32.const 0x400) "jobs")
  (data (i32.const 0x410) "job-1")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $st (call $proxy_resolve_shared_queue (i32.const 0) (i32.const 0) (i32.const 0x400) (i32.const 4)
                                                (i32.const 0x108)))
    (call $st (call $proxy_enqueue_shared_queue (i32.load (i32.const 0x108)) (i32.const 0x410) (i32.const 5)))
    i32.const 0)
"""


async def test_queue_ready_reaches_the_registering_filter(tmp_path: Path) -> None:
    owner = tmp_path / "owner.wasm"
    owner.write_bytes(
        filter_module(
            STATUS_HELPER + QUEUE_OWNER,
            imports=LOG_IMPORT + imp("proxy_register_shared_queue", 3) + imp("proxy_dequeue_shared_queue", 3),
        )
    )
    producer = tmp_path / "producer.wasm"
    producer.write_bytes(
        filter_module(
            STATUS_HELPER + PRODUCER,
            imports=LOG_IMPORT + imp("proxy_resolve_shared_queue", 5) + imp("proxy_enqueue_shared_queue", 3),
        )
    )
    logs: list[tuple[str, int, str]] = []
    rt = FilterRuntime.load(
        [FilterSpec(name="owner", module_path=owner), FilterSpec(name="producer", module_path=producer)],
        log_sink=lambda *a: logs.append(a),
    )
    background = asyncio.get_running_loop().create_task(rt.run_background(interval=30.0))
    try:
        await asyncio.sleep(0)
        s = rt.chain(["producer"]).start(RequestInfo())
        await s.on_request_headers([(":method", "GET"), (":path", "/")], True)
        s.finish()
        # Delivered by the background task, woken by the enqueue (its polling interval is 30 s).
        for _ in range(200):
            if ("owner", 2, "job-1") in logs:
                break
            await asyncio.sleep(0.01)
        assert [m for n, _, m in logs if n == "producer"] == ["00", "00"]
        assert [m for n, _, m in logs if n == "owner"] == ["00", "01", "00", "job-1"]
    finally:
        background.cancel()
        rt.close()


# ---------------------------------------------------------------------------------------------- proxy_done

DEFERRED_DONE = """
  (global $ctx (mut i32) (i32.const 0))
  (data (i32.const 0x400) "audit")
  (data (i32.const 0x500) "\\03\\00\\00\\00\\07\\00\\00\\00\\03\\00\\00\\00\\05\\00\\00\\00\\06\\00\\00\\00\\0a\\00\\00\\00\\05\\00\\00\\00:method\\00GET\\00:path\\00/audit\\00:authority\\00audit\\00")
  (func (export "proxy_on_done") (param i32) (result i32)
    (global.set $ctx (local.get 0))
    (call $st (i32.const 6))
    ;; ship an audit record, and finish the stream once it is acknowledged
    (drop (call $proxy_http_call (i32.const 0x400) (i32.const 5) (i32.const 0x500) (i32.const 70)
                (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0x108)))
    i32.const 0)
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (call $st (i32.const 9))
    (drop (call $proxy_set_effective_context (global.get $ctx)))
    (if (global.get $call_done) (then (drop (call $proxy_done)))))
  (func (export "proxy_on_log") (param i32) (call $st (i32.const 7)))
  (func (export "proxy_on_delete") (param i32) (call $st (i32.const 8)))
"""
DONE_IMPORTS = imp("proxy_http_call", 10) + imp("proxy_set_effective_context", 1) + imp("proxy_done", 0)


@pytest.mark.parametrize("call_done", [True, False])
def test_proxy_on_done_false_waits_for_proxy_done(call_done: bool) -> None:
    audits = []

    def audit(req: object) -> tuple[int, list[tuple[str, str]], bytes]:
        audits.append(req)
        return 204, [], b""

    body = f"(global $call_done i32 (i32.const {int(call_done)}))" + DEFERRED_DONE
    with harness(body, DONE_IMPORTS, http_calls={"audit": audit}, done_timeout=0.05) as h:
        r = h.request()
        pool = h.runtime.pools[h.spec.name]
        assert pool.stats().busy == 0  # given back once the stream was finished
    assert len(audits) == 1
    # log and delete come after the answer (and, without proxy_done, after done_timeout)
    assert statuses(r.logs) == [6, 9, 7, 8]


# ---------------------------------------------------------------------------------------------- observer


class Recorder:
    def __init__(self) -> None:
        self.callbacks: list[tuple[str, str]] = []

    def cold_start(self, filter_name: str, phase: str, seconds: float) -> None:
        pass

    def callback(self, filter_name: str, phase: str, seconds: float) -> None:
        assert seconds >= 0
        self.callbacks.append((filter_name, phase))

    def fault(self, filter_name: str, kind: str) -> None:
        pass

    def policy(self, filter_name: str, decision: str) -> None:
        pass


@pytest.mark.parametrize("every", [1, 2])
async def test_callback_timing_reaches_the_observer_sampled(tmp_path: Path, every: int) -> None:
    path = tmp_path / "f.wasm"
    path.write_bytes(filter_module(STATUS_HELPER + EVERY_CALLBACK, imports=LOG_IMPORT))
    recorder = Recorder()
    rt = FilterRuntime.load(
        [FilterSpec(name="f", module_path=path)],
        observer=recorder,
        log_sink=lambda *a: None,
        callback_timing_every=every,
    )
    try:
        chain = rt.chain(["f"])
        for _ in range(4):
            s = chain.start(RequestInfo())
            await s.on_request_headers([(":method", "POST"), (":path", "/")], False)
            await s.on_request_body(b"x", True)
            await s.on_response_headers([(":status", "200")], True)
            s.finish()
    finally:
        rt.close()
    per_request = [("f", "request_headers"), ("f", "request_body"), ("f", "response_headers")]
    assert recorder.callbacks == per_request * (4 // every)


# ---------------------------------------------------------------------------------------------- linking


def test_module_summary_agrees_with_wasmtime() -> None:
    from wasm_gateway.runtime.wasmsummary import summarize

    fixtures = sorted((REPO / "tests" / "fixtures" / "assemblyscript" / "build").glob("*.wasm"))
    wasms = [p.read_bytes() for p in fixtures] + [
        filter_module(STATUS_HELPER + EVERY_CALLBACK, imports=LOG_IMPORT)
    ]
    eng = wasmtime.Engine()
    for wasm in wasms:
        module = wasmtime.Module(eng, wasm)
        summary = summarize(wasm)
        assert [(m, n) for m, n, _ in summary.imports] == [(i.module, i.name) for i in module.imports]
        assert set(summary.exports) == {e.name for e in module.exports}
        for export in module.exports:
            ty = export.type
            if isinstance(ty, wasmtime.FuncType):
                sig = summary.exports[export.name][1]
                assert sig is not None
                assert (len(sig.params), len(sig.results)) == (len(ty.params), len(ty.results))
    with pytest.raises(ValueError):
        summarize(b"\0asm\x0d\x00\x01\x00")  # a component, not a core module


def test_precompiled_module_links_without_its_source(tmp_path: Path) -> None:
    src = tmp_path / "f.wasm"
    src.write_bytes(filter_module(STATUS_HELPER + EVERY_CALLBACK, imports=LOG_IMPORT))
    out = precompile(src, tmp_path / "f.cwasm")
    src.unlink()
    with FilterHarness.from_file(out) as h:
        assert statuses(h.request().logs) == [1, 2, 4, 6, 7, 8]
        shapes = h.runtime.modules["f"].shapes
    assert shapes["proxy_on_request_headers"] == (3, 1) and shapes["proxy_on_log"] == (1, 0)
