"""Functions run in spawned processes by the cross-process tests (importable, small imports)."""

from __future__ import annotations

from multiprocessing.synchronize import Barrier
from typing import Any

from wasm_gateway.runtime.abi import Status
from wasm_gateway.state import CAS_CREATE, StateConfig, StateError, open_state


def cas_increments(config: StateConfig, key: bytes, count: int, barrier: Barrier, out: Any) -> None:
    """``count`` compare-and-swap increments of the decimal counter at ``key``; reports (retries, errors).
    The first write creates the key with CAS_CREATE: with cas 0, two processes that both read "absent"
    would both write "1"."""
    state = open_state(config)
    data = state.shared_data
    retries = errors = 0
    barrier.wait()
    done = 0
    while done < count:
        try:
            current = data.get(key)
        except StateError:
            errors += 1
            continue
        if current is None:
            status = data.set(key, b"1", CAS_CREATE)
        else:
            status = data.set(key, b"%d" % (int(current[0]) + 1), current[1])
        if status == Status.OK:
            done += 1
        elif status == Status.CAS_MISMATCH:
            retries += 1
        else:
            errors += 1
    state.close()
    out.put((retries, errors))


def enqueue_items(config: StateConfig, vm_id: str, name: str, items: list[bytes], out: Any) -> None:
    state = open_state(config)
    token = state.queues.resolve(vm_id, name)
    statuses = [] if token is None else [int(state.queues.enqueue(token, item)) for item in items]
    state.close()
    out.put((token, statuses))
