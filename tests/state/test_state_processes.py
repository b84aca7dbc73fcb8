"""Cross-process exactness: several spawned processes doing CAS increments on one key lose none."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from wasm_gateway.runtime.abi import Status
from wasm_gateway.state import StateConfig, open_state

from . import workers
from .conftest import RedisServer

PROCESSES = 3
INCREMENTS = {"local": 1000, "redis": 150}  # enough for the processes to collide (asserted: retries > 0)


def _config(backend: str, tmp_path: Path, redis_server: RedisServer) -> StateConfig:
    # A generous Redis timeout here: a write that times out may still land, which would make the count
    # ambiguous; this test is about atomicity, the timeout policy has its own tests.
    return StateConfig(
        backend=backend,  # type: ignore[arg-type]
        path=tmp_path / "state",
        redis_url=redis_server.url,
        key_prefix=f"exact-{tmp_path.name}:",
        timeout_ms=5000,
    )


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_cas_increments_from_several_processes_are_exact(
    backend: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    config = _config(backend, tmp_path, redis_server)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=workers.cas_increments, args=(config, b"vm\0counter", INCREMENTS[backend], barrier, out)
        )
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert [errors for _, errors in results] == [0] * PROCESSES
    assert sum(retries for retries, _ in results) > 0  # they did contend
    state = open_state(config)
    try:
        entry = state.shared_data.get(b"vm\0counter")
        assert entry is not None
        assert int(entry[0]) == PROCESSES * INCREMENTS[backend]
    finally:
        state.close()


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_a_queue_registered_here_receives_items_from_another_process(
    backend: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    config = _config(backend, tmp_path, redis_server)
    state = open_state(config)
    try:
        token = state.queues.register("vm", "events", None, lambda t: None)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        items = [b"event-%d" % i for i in range(20)]
        proc = ctx.Process(target=workers.enqueue_items, args=(config, "vm", "events", items, out))
        proc.start()
        their_token, statuses = out.get(timeout=60)
        proc.join(timeout=30)
        assert their_token == token
        assert statuses == [int(Status.OK)] * len(items)
        assert [state.queues.dequeue(token) for _ in range(len(items) + 1)] == [*items, Status.EMPTY]
    finally:
        state.close()


def test_a_forked_child_reopens_the_local_store(tmp_path: Path) -> None:
    """LMDB handles must not cross a fork: a store opened before fork works in the child (it reopens)."""
    state = open_state(StateConfig(backend="local", path=tmp_path / "state"))
    try:
        assert state.shared_data.set(b"k", b"parent", 0) == Status.OK
        pid = os.fork()
        if pid == 0:  # the child: read the parent's value, CAS a new one, exit with the outcome
            code = 1
            try:
                entry = state.shared_data.get(b"k")
                if entry is not None and entry[0] == b"parent":
                    code = 0 if state.shared_data.set(b"k", b"child", entry[1]) == Status.OK else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (state.shared_data.get(b"k") or (b"",))[0] == b"child"
        assert state.shared_data.set(b"k", b"parent again", 0) == Status.OK
    finally:
        state.close()
