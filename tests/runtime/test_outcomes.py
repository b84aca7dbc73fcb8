"""What each filter did with each request, as the runtime counts it for the metrics (FilterRuntime.outcomes and
FilterRuntime.local_responses): continue, local_response (with its status), failure, unfinished."""

from __future__ import annotations

import asyncio

from wat import filter_module, imp

from wasm_gateway.runtime.chain import OUTCOMES
from wasm_gateway.runtime.context import RequestInfo
from wasm_gateway.testing import FilterHarness

# x-deny: 429 local response; x-trap: trap; x-hold: pause (waits for a body that never comes); else continue.
DECIDING = """
  (data (i32.const 0x400) "x-deny")
  (data (i32.const 0x410) "x-trap")
  (data (i32.const 0x420) "x-hold")
  (func $has (param $k i32) (result i32)
    (i32.eqz (call $proxy_get_header_map_value
      (i32.const 0) (local.get $k) (i32.const 6) (i32.const 0x100) (i32.const 0x104))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (call $has (i32.const 0x410)) (then unreachable))
    (if (call $has (i32.const 0x420)) (then (return (i32.const 1))))
    (if (call $has (i32.const 0x400)) (then
      (drop (call $proxy_send_local_response (i32.const 429) (i32.const 0) (i32.const 0)
                  (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
      (return (i32.const 1))))
    i32.const 0)
"""
IMPORTS = imp("proxy_get_header_map_value", 5) + imp("proxy_send_local_response", 8)


def test_outcomes_and_local_response_statuses_per_filter() -> None:
    with FilterHarness.from_bytes(filter_module(DECIDING, imports=IMPORTS), name="decider") as h:
        for _ in range(3):
            assert h.request().response_status == 200
        for _ in range(2):
            assert h.request(headers=[("x-deny", "1")]).response_status == 429
        assert h.request(headers=[("x-trap", "1")]).response_status == 503

        async def client_leaves_while_held() -> None:
            stream = h.runtime.chain(["decider"]).start(RequestInfo())
            headers = [(":method", "POST"), (":path", "/"), (":authority", "a"), ("x-hold", "1")]
            decision = await stream.on_request_headers(headers, False)
            assert decision.headers is None  # held: waiting for the body
            stream.finish()

        asyncio.run(client_leaves_while_held())
        outcomes = dict(h.runtime.outcomes)
        local = dict(h.runtime.local_responses)
    assert outcomes == {
        ("decider", "continue"): 3,
        ("decider", "local_response"): 2,
        ("decider", "failure"): 1,
        ("decider", "unfinished"): 1,
    }
    assert set(OUTCOMES) == {outcome for _, outcome in outcomes}
    assert local == {("decider", 429): 2}  # the fail_closed 503 is a failure, not the filter's answer
