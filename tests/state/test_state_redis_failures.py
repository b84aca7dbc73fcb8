"""Redis down or slow: the configured policy answers, failures are logged (rate limited) and counted, and the
backend recovers by itself when Redis answers again. Each test runs its own redis-server."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from wasm_gateway.runtime.abi import Status
from wasm_gateway.state import SharedState, StateConfig, StateUnavailableError, open_state
from wasm_gateway.state.redis import FALLBACK_CAS_RANGE, REDIS_MAX_CAS

from .conftest import RedisServer


def _open(server: RedisServer, policy: str, **config: Any) -> tuple[SharedState, list[str]]:
    kinds: list[str] = []
    config.setdefault("timeout_ms", 50)
    state = open_state(
        StateConfig(backend="redis", redis_url=server.url, key_prefix="fail:", on_error=policy, **config),  # type: ignore[arg-type]
        on_error=lambda backend, kind: kinds.append(f"{backend}:{kind}"),
    )
    return state, kinds


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Call ``check`` until it holds: recovery waits for the next probe (backoff at most 2 s)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "did not recover"
        time.sleep(0.05)


def _answers(state: SharedState) -> bool:
    try:
        state.shared_data.get(b"probe")
    except StateUnavailableError:
        return False
    return state.healthy


def test_fail_closed_when_down_then_recovers(own_redis: RedisServer) -> None:
    state, kinds = _open(own_redis, "fail_closed")
    data, queues = state.shared_data, state.queues
    try:
        assert data.set(b"k", b"v", 0) == Status.OK
        token = queues.register("vm", "q", None, lambda t: None)
        own_redis.kill()

        with pytest.raises(StateUnavailableError):
            data.get(b"k")
        assert not state.healthy
        assert kinds == ["redis:connection"]
        # while down, calls do not touch the network: the policy answers and they are counted
        assert data.set(b"k", b"w", 0) == Status.INTERNAL_FAILURE
        with pytest.raises(StateUnavailableError):
            data.get(b"k")
        assert queues.enqueue(token, b"x") == Status.INTERNAL_FAILURE
        assert queues.dequeue(token) == Status.INTERNAL_FAILURE
        assert kinds.count("redis:unavailable") >= 3

        own_redis.start()  # same port, empty (no persistence)
        _eventually(lambda: _answers(state))
        assert data.get(b"k") is None
        assert data.set(b"k", b"again", 0) == Status.OK
        assert (data.get(b"k") or (b"",))[0] == b"again"
        assert queues.enqueue(token, b"x") == Status.OK  # the registration is renewed by its registrant
        assert queues.dequeue(token) == b"x"
    finally:
        state.close()


async def test_the_async_kv_raises_while_down_and_recovers(own_redis: RedisServer) -> None:
    state, _ = _open(own_redis, "fail_open")  # the KV raises whatever the policy: a cache counts a miss
    try:
        assert await state.kv.set(b"page", b"body") > 0
        own_redis.kill()
        with pytest.raises(StateUnavailableError):
            await state.kv.get(b"page")
        with pytest.raises(StateUnavailableError):
            await state.kv.set(b"page", b"other")
        own_redis.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await state.kv.get(b"page") is None
                break
            except StateUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert await state.kv.incr(b"n") == 1
    finally:
        await state.aclose()


def test_fail_open_limits_per_process_while_down(own_redis: RedisServer) -> None:
    state, kinds = _open(own_redis, "fail_open")
    data = state.shared_data
    try:
        assert data.set(b"bucket", b"redis", 0) == Status.OK
        entry = data.get(b"bucket")
        assert entry is not None
        redis_cas = entry[1]
        assert 0 < redis_cas <= REDIS_MAX_CAS
        own_redis.kill()

        # Redis's entries are out of reach: absent, and a cas read from Redis never matches the fallback
        assert data.get(b"bucket") is None
        assert data.set(b"bucket", b"stale", redis_cas) == Status.CAS_MISMATCH
        # the process-local fallback keeps CAS semantics, so a limiter keeps counting (per process)
        assert data.set(b"bucket", b"1", 0) == Status.OK
        for _ in range(5):
            value, cas = data.get(b"bucket") or (b"", 0)
            assert FALLBACK_CAS_RANGE[0] <= cas <= FALLBACK_CAS_RANGE[1]
            assert data.set(b"bucket", b"%d" % (int(value) + 1), cas) == Status.OK
        fallback_value, fallback_cas = data.get(b"bucket") or (b"", 0)
        assert fallback_value == b"6"
        assert kinds[0] == "redis:connection"

        own_redis.start()
        own_redis.client().set(b"fail:d:bucket", (7).to_bytes(4, "big") + b"from redis")
        _eventually(lambda: _answers(state))
        # back on Redis: its value, and the fallback's cas is spent
        assert data.get(b"bucket") == (b"from redis", 7)
        assert data.set(b"bucket", b"x", fallback_cas) == Status.CAS_MISMATCH
        assert data.set(b"bucket", b"x", 7) == Status.OK
    finally:
        state.close()


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_slow_redis_times_out_then_recovers(own_redis: RedisServer, policy: str) -> None:
    state, kinds = _open(own_redis, policy, timeout_ms=50)
    data = state.shared_data
    try:
        assert data.set(b"k", b"v", 0) == Status.OK
        own_redis.stall(0.5)
        if policy == "fail_closed":
            with pytest.raises(StateUnavailableError):
                data.get(b"k")
            assert data.set(b"k", b"w", 0) == Status.INTERNAL_FAILURE
        else:
            assert data.get(b"k") is None
            assert data.set(b"k", b"w", 0) == Status.OK  # into the fallback
        assert kinds[0] == "redis:timeout"
        assert not state.healthy
        _eventually(lambda: _answers(state))
        assert (data.get(b"k") or (b"",))[0] == b"v"
    finally:
        state.close()


def test_down_at_start_then_comes_up(own_redis: RedisServer) -> None:
    own_redis.kill()
    state, kinds = _open(own_redis, "fail_closed")  # opening does not need Redis
    try:
        with pytest.raises(StateUnavailableError):
            state.shared_data.get(b"k")
        assert kinds == ["redis:connection"]
        own_redis.start()
        _eventually(lambda: _answers(state))
        assert state.shared_data.set(b"k", b"v", 0) == Status.OK
    finally:
        state.close()


def test_failures_are_logged_once_per_outage(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    state, kinds = _open(own_redis, "fail_open")
    caplog.set_level(logging.WARNING, logger="wasm_gateway.state")
    try:
        state.shared_data.set(b"k", b"v", 0)
        own_redis.kill()
        for _ in range(200):
            state.shared_data.set(b"k", b"v", 0)
        time.sleep(0.3)  # past a probe or two
        for _ in range(200):
            state.shared_data.get(b"k")
        lines = [r.getMessage() for r in caplog.records if r.name == "wasm_gateway.state"]
        assert len(lines) == 1
        assert "unavailable" in lines[0] and "fail_open" in lines[0]
        assert "127.0.0.1" in lines[0]
        assert len(kinds) == 400  # every call counted: failed attempts and policy answers
        assert sum(state.error_counts.values()) == 400
        assert state.error_counts["unavailable"] >= 390
        own_redis.start()
        _eventually(lambda: _answers(state))
        lines = [r.getMessage() for r in caplog.records if r.name == "wasm_gateway.state"]
        assert len(lines) == 2 and "answers again" in lines[1]
    finally:
        state.close()
