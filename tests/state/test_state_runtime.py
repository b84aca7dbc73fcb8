"""The backends behind real host calls: a Wasm filter's proxy_get/set_shared_data through the runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.wat import LOG_IMPORT, STATUS_HELPER, filter_module, imp, statuses
from wasm_gateway.state import SharedState, StateConfig, open_state
from wasm_gateway.testing import FilterHarness

from .conftest import RedisServer

# Per request: get "hits" (log the status), then set it with the cas read (0 when absent) (log the status).
COUNTER = """
  (data (i32.const 0x400) "hits")
  (data (i32.const 0x410) "x")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $s i32)
    (local.set $s (call $proxy_get_shared_data (i32.const 0x400) (i32.const 4) (i32.const 0x100)
                                               (i32.const 0x104) (i32.const 0x108)))
    (call $st (local.get $s))
    (call $st (call $proxy_set_shared_data (i32.const 0x400) (i32.const 4) (i32.const 0x410) (i32.const 1)
                    (select (i32.load (i32.const 0x108)) (i32.const 0) (i32.eqz (local.get $s)))))
    i32.const 0)
"""
IMPORTS = LOG_IMPORT + imp("proxy_get_shared_data", 5) + imp("proxy_set_shared_data", 5)


def _harness(state: SharedState) -> FilterHarness:
    h = FilterHarness.from_bytes(filter_module(STATUS_HELPER + COUNTER, imports=IMPORTS))
    # The harness builds its own SharedServices; host calls read it on every call, so swapping the stores
    # in is what the gateway does with SharedServices(shared_data=..., queues=...).
    h.runtime.shared.shared_data = state.shared_data
    h.runtime.shared.queues = state.queues
    return h


@pytest.mark.parametrize("backend", ["memory", "local", "redis"])
def test_a_filter_reads_and_writes_through_the_backend(
    backend: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    config = StateConfig(
        backend=backend,  # type: ignore[arg-type]
        path=tmp_path,
        redis_url=redis_server.url,
        key_prefix=f"rt-{tmp_path.name}:",
    )
    state = open_state(config)
    try:
        with _harness(state) as h:
            assert statuses(h.request().logs) == [1, 0]  # NOT_FOUND, then created
            assert statuses(h.request().logs) == [0, 0]  # found, CAS write OK
        entry = state.shared_data.get(b"\0hits")  # the runtime keys shared data by vm_id ("") + NUL + key
        assert entry is not None and entry[0] == b"x"
    finally:
        state.close()


@pytest.mark.parametrize(("policy", "expected"), [("fail_closed", [10, 10]), ("fail_open", [1, 0])])
def test_the_guest_sees_the_failure_policy(own_redis: RedisServer, policy: str, expected: list[int]) -> None:
    state = open_state(StateConfig(backend="redis", redis_url=own_redis.url, on_error=policy))  # type: ignore[arg-type]
    try:
        with _harness(state) as h:
            assert statuses(h.request().logs) == [1, 0]
            own_redis.kill()
            # fail_closed: INTERNAL_FAILURE (10) for both calls, and the filter decides (a limiter denies);
            # fail_open: the process-local fallback answers: absent, then stored
            assert statuses(h.request().logs) == expected
    finally:
        state.close()
