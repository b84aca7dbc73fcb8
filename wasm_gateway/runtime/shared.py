"""State that outlives one instance: shared data (with CAS), shared queues, filter-defined metrics.

Host calls are synchronous, so these interfaces are synchronous too. The process-local implementations are
the defaults; a cross-process backend implements the same small protocols.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .abi import MetricType, Status

__all__ = [
    "LocalSharedData",
    "LocalSharedQueues",
    "Metric",
    "MetricsRegistry",
    "SharedDataStore",
    "SharedQueueStore",
]


class SharedDataStore(Protocol):
    """Key/value store with compare-and-swap, as `proxy_get/set_shared_data` see it."""

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        """(value, cas) or None when absent."""
        ...

    def set(self, key: bytes, value: bytes, cas: int) -> Status:
        """cas 0 always writes; otherwise it must equal the stored cas (else CAS_MISMATCH)."""
        ...


CAS_CREATE = 0xFFFFFFFF
"""The cas that means "create if absent"; never handed out for a stored entry."""


class LocalSharedData:
    """Process-local `SharedDataStore`; every write gets a new non-zero cas."""

    def __init__(self) -> None:
        self._data: dict[bytes, tuple[bytes, int]] = {}
        self._next_cas = 1
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        return self._data.get(key)

    def set(self, key: bytes, value: bytes, cas: int) -> Status:
        with self._lock:
            current = self._data.get(key)
            if cas == CAS_CREATE:
                # "Write only if absent": Envoy creates an absent key for any cas, and no stored entry ever
                # carries this value, so creation is atomic (the state backends implement the same).
                if current is not None:
                    return Status.CAS_MISMATCH
            elif cas and (current is None or current[1] != cas):
                return Status.CAS_MISMATCH
            new_cas = self._next_cas
            self._next_cas = new_cas + 1 if new_cas < CAS_CREATE - 1 else 1
            self._data[key] = (bytes(value), new_cas)
        return Status.OK


class SharedQueueStore(Protocol):
    def register(self, vm_id: str, name: str, owner: object, on_ready: Callable[[int], None]) -> int: ...
    def resolve(self, vm_id: str, name: str) -> int | None: ...
    def enqueue(self, token: int, data: bytes) -> Status: ...
    def dequeue(self, token: int) -> bytes | Status: ...


@dataclass
class _Queue:
    vm_id: str
    name: str
    items: deque[bytes] = field(default_factory=deque)
    on_ready: Callable[[int], None] | None = None


class LocalSharedQueues:
    """Process-local shared queues. ``on_ready(token)`` is called after each enqueue (outside the guest)."""

    MAX_ITEMS = 10_000

    def __init__(self) -> None:
        self._queues: dict[int, _Queue] = {}
        self._by_name: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def register(self, vm_id: str, name: str, owner: object, on_ready: Callable[[int], None]) -> int:
        with self._lock:
            token = self._by_name.get((vm_id, name))
            if token is None:
                token = len(self._queues) + 1
                self._queues[token] = _Queue(vm_id, name)
                self._by_name[(vm_id, name)] = token
            self._queues[token].on_ready = on_ready
            return token

    def resolve(self, vm_id: str, name: str) -> int | None:
        return self._by_name.get((vm_id, name))

    def enqueue(self, token: int, data: bytes) -> Status:
        q = self._queues.get(token)
        if q is None:
            return Status.NOT_FOUND
        with self._lock:
            if len(q.items) >= self.MAX_ITEMS:
                return Status.INTERNAL_FAILURE
            q.items.append(bytes(data))
        if q.on_ready is not None:
            q.on_ready(token)
        return Status.OK

    def dequeue(self, token: int) -> bytes | Status:
        q = self._queues.get(token)
        if q is None:
            return Status.NOT_FOUND
        with self._lock:
            if not q.items:
                return Status.EMPTY
            return q.items.popleft()


@dataclass
class Metric:
    filter_name: str
    name: str
    type: MetricType
    value: int = 0
    # Histogram: every recorded value, bounded (the exporter turns them into buckets).
    samples: deque[int] = field(default_factory=lambda: deque(maxlen=1024))
    count: int = 0
    total: int = 0


class MetricsRegistry:
    """Metrics defined by filters, keyed by (filter name, metric name); ids are stable per process."""

    def __init__(self) -> None:
        self._by_id: dict[int, Metric] = {}
        self._ids: dict[tuple[str, str, MetricType], int] = {}
        self._lock = threading.Lock()

    def define(self, filter_name: str, name: str, mtype: MetricType) -> int:
        key = (filter_name, name, mtype)
        with self._lock:
            mid = self._ids.get(key)
            if mid is None:
                # Ids encode the type in the low bits, as Envoy's do, so a wrong-type call is detectable.
                mid = ((len(self._ids) + 1) << 2) | int(mtype)
                self._ids[key] = mid
                self._by_id[mid] = Metric(filter_name, name, mtype)
            return mid

    def get(self, mid: int) -> Metric | None:
        return self._by_id.get(mid)

    def increment(self, mid: int, delta: int) -> Status:
        m = self._by_id.get(mid)
        if m is None:
            return Status.NOT_FOUND
        if m.type == MetricType.HISTOGRAM:
            return Status.BAD_ARGUMENT
        m.value += delta
        return Status.OK

    def record(self, mid: int, value: int) -> Status:
        m = self._by_id.get(mid)
        if m is None:
            return Status.NOT_FOUND
        if m.type == MetricType.HISTOGRAM:
            m.samples.append(value)
            m.count += 1
            m.total += value
        else:
            m.value = value
        return Status.OK

    def all(self) -> list[Metric]:
        """Snapshot of every defined metric (for the Prometheus exporter)."""
        return list(self._by_id.values())
