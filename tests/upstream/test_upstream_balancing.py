"""Round robin, passive ejection and recovery, panic mode, retries to the next target."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from wasm_gateway.exceptions import UpstreamConnectError
from wasm_gateway.upstream import BodySource, RoundRobinBalancer, Target

from .conftest import Origins, Pools
from .origins import Origin, echo, keep_alive, response, unused_port

HOST = [(b"host", b"origin.test")]


async def fetch(pool, method: str = "GET", body: BodySource | None = None, idempotent: bool = True) -> bytes:
    async with await pool.request(method, "/", HOST, body, idempotent=idempotent) as resp:
        return await resp.read()


def named(name: str):
    return keep_alive(lambda r: response(name.encode()))


async def test_round_robin_distribution(origins: Origins, pools: Pools) -> None:
    started = [await origins.start(named(name)) for name in "abc"]
    pool = pools.make(*started)
    answers = [await fetch(pool) for _ in range(30)]
    assert answers[:6] == [b"a", b"b", b"c", b"a", b"b", b"c"]
    assert [len(o.requests) for o in started] == [10, 10, 10]
    assert [o.accepted for o in started] == [1, 1, 1]


async def test_retry_goes_to_the_next_target(origins: Origins, pools: Pools) -> None:
    live = await origins.start(named("live"))
    dead = Target("127.0.0.1", unused_port())
    pool = pools.make(dead, live, retries=1)
    assert await fetch(pool) == b"live"
    assert pool.stats()[dead.authority]["consecutive_failures"] == 1  # type: ignore[index]


async def test_iterator_body_not_yet_started_is_retried(origins: Origins, pools: Pools) -> None:
    live = await origins.start(keep_alive(echo))
    pool = pools.make(Target("127.0.0.1", unused_port()), live, retries=1)

    async def stream() -> AsyncIterator[bytes]:
        yield b"abc"

    assert await fetch(pool, "PUT", BodySource(stream(), 3)) == b"PUT / conn=0 body=3"


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_no_retry_for_non_idempotent(origins: Origins, pools: Pools, method: str) -> None:
    live = await origins.start(named("live"))
    dead = Target("127.0.0.1", unused_port())
    pool = pools.make(dead, live, retries=3)
    with pytest.raises(UpstreamConnectError, match="connection refused"):
        await fetch(pool, method, idempotent=False)
    assert live.requests == []


async def test_retries_exhausted(pools: Pools) -> None:
    dead = [Target("127.0.0.1", unused_port()) for _ in range(3)]
    pool = pools.make(*dead, retries=1, eject_after_failures=0)
    with pytest.raises(UpstreamConnectError, match="connection refused"):
        await fetch(pool)
    failures = [entry["consecutive_failures"] for entry in pool.stats().values()]  # type: ignore[index]
    assert sorted(failures) == [0, 1, 1]  # two attempts, on two different targets


async def test_ejection_and_recovery(origins: Origins, pools: Pools) -> None:
    live = await origins.start(named("live"))
    port = unused_port()
    flaky = Target("127.0.0.1", port)
    pool = pools.make(flaky, live, retries=0, eject_after_failures=2, eject_seconds=0.3)

    results = []
    for _ in range(8):
        try:
            results.append(await fetch(pool))
        except UpstreamConnectError:
            results.append(b"refused")
    # Round robin alternates until the second failure ejects `flaky`; then only `live` is used.
    assert results == [b"refused", b"live", b"refused", b"live", b"live", b"live", b"live", b"live"]
    assert pool.stats()[flaky.authority]["ejected"] is True  # type: ignore[index]

    recovered = await Origin(named("back")).start(port)
    try:
        while pool.stats()[flaky.authority]["ejected"]:  # type: ignore[index]
            await asyncio.sleep(0.05)
        answers = {await fetch(pool) for _ in range(4)}
        assert answers == {b"back", b"live"}
        stats = pool.stats()[flaky.authority]
        assert stats["consecutive_failures"] == 0 and stats["ejected"] is False  # type: ignore[index]
    finally:
        await pool.close()
        await recovered.close()


async def test_panic_mode_tries_ejected_targets(origins: Origins, pools: Pools) -> None:
    port = unused_port()
    pool = pools.make(Target("127.0.0.1", port), retries=0, eject_after_failures=1, eject_seconds=60)
    with pytest.raises(UpstreamConnectError):
        await fetch(pool)
    assert pool.stats()[f"127.0.0.1:{port}"]["ejected"] is True  # type: ignore[index]
    # Every target is ejected: they are tried anyway, so a target that came back is used at once.
    await origins.start(named("back"), port)
    assert await fetch(pool) == b"back"
    assert pool.stats()[f"127.0.0.1:{port}"]["ejected"] is False  # type: ignore[index]


def test_balancer_unit() -> None:
    now = [0.0]
    balancer = RoundRobinBalancer(3, eject_after_failures=2, eject_seconds=10, clock=lambda: now[0])
    assert [balancer.pick() for _ in range(4)] == [0, 1, 2, 0]
    assert balancer.pick(exclude=[1]) == 2
    balancer.record_failure(0)
    assert not balancer.is_ejected(0)
    assert (balancer.healthy(), balancer.ejections) == (3, 0)
    balancer.record_failure(0)
    assert balancer.is_ejected(0)
    assert (balancer.healthy(), balancer.ejections) == (2, 1)
    balancer.record_failure(0)  # already out: not a second ejection
    assert (balancer.healthy(), balancer.ejections) == (2, 1)
    assert [balancer.pick() for _ in range(4)] == [1, 2, 1, 2]
    assert balancer.pick(exclude=[1, 2]) == 0  # panic: only ejected candidates left
    now[0] = 10.0
    assert balancer.healthy() == 3  # the ejection ran out
    assert not balancer.is_ejected(0)
    assert sorted(balancer.pick() for _ in range(3)) == [0, 1, 2]
    balancer.record_failure(0)  # on probation: one more failure ejects again
    assert balancer.is_ejected(0)
    assert (balancer.healthy(), balancer.ejections) == (2, 2)
    balancer.record_success(0)
    assert not balancer.is_ejected(0) and balancer.failures(0) == 0
    assert balancer.pick(exclude=[0, 1, 2]) in (0, 1, 2)


def test_balancer_ejection_disabled() -> None:
    balancer = RoundRobinBalancer(2, eject_after_failures=0, eject_seconds=10, clock=lambda: 0.0)
    for _ in range(10):
        balancer.record_failure(0)
    assert not balancer.is_ejected(0)
    assert [balancer.pick() for _ in range(2)] == [0, 1]
