"""In-process backend: one worker process, nothing survives it.

What the runtime's `LocalSharedData` does, plus a TTL on every entry and bounds (entries and bytes) enforced
by evicting the least recently written entries, so a flood of distinct keys cannot exhaust memory. Also the
fallback store of the Redis backend's ``fail_open`` policy (with its own range of cas values).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from ..runtime.abi import Status
from .base import (
    CAS_CREATE,
    MAX_CAS,
    EngineEdgeStore,
    EngineKV,
    EngineSharedData,
    QueueHub,
    SharedState,
    parse_int,
)

__all__ = ["MemoryQueueStorage", "MemoryStore", "open_memory_state"]
# Bookkeeping counted per entry on top of key and value, so a flood of empty values is bounded by bytes too.
ENTRY_OVERHEAD = 64


class MemoryStore:
    """`Engine` in a dict kept in write order. Entries past their TTL read as absent and are swept lazily;
    when over ``max_entries`` or ``max_bytes`` the least recently written entries go first."""

    backend = "memory"

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        cas_range: tuple[int, int] = (1, MAX_CAS),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        low, high = cas_range
        if not 1 <= low < high <= MAX_CAS:
            raise ValueError(f"bad cas range {cas_range}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._data: OrderedDict[bytes, tuple[bytes, int, float]] = (
            OrderedDict()
        )  # key -> (value, cas, expires)
        self._bytes = 0
        self._cas_low, self._cas_high = low, high
        self._next_cas = low
        self._writes = 0
        self.evictions = 0
        """Entries dropped to stay within the bounds (not expiries), since this store was created."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        entry = self._data.get(key)
        if entry is None or entry[2] <= self._clock():
            return None
        return entry[0], entry[1]

    def put(self, key: bytes, value: bytes, cas: int, ttl: float) -> int:
        # The host-call hot path (a rate limiter writes on every request): inlined, one dict lookup.
        with self._lock:
            now = self._clock()
            data = self._data
            current = data.get(key)
            if current is not None and current[2] <= now:
                self._drop(key)
                current = None
            if cas:
                if cas == CAS_CREATE:
                    if current is not None:
                        return 0
                elif current is None or current[1] != cas:
                    return 0
            new_cas = self._next_cas
            self._next_cas = new_cas + 1 if new_cas < self._cas_high else self._cas_low
            if current is None:
                data[key] = (value, new_cas, now + ttl)
                self._bytes += len(key) + len(value) + ENTRY_OVERHEAD
            else:
                data[key] = (value, new_cas, now + ttl)
                data.move_to_end(key)
                self._bytes += len(value) - len(current[0])
            self._writes += 1
            if len(data) > self.max_entries or self._bytes > self.max_bytes or not self._writes & 15:
                self._evict(now)
            return new_cas

    def incr(self, key: bytes, delta: int, ttl: float) -> int:
        with self._lock:
            now = self._clock()
            current = self._live(key, now)
            if current is None:
                total, expires = delta, now + ttl
            else:
                total, expires = parse_int(current[0]) + delta, current[2]
            self._store(key, str(total).encode(), expires, now)
            return total

    def delete(self, key: bytes) -> bool:
        with self._lock:
            now = self._clock()
            live = self._live(key, now) is not None
            self._drop(key)
            return live

    def scan(self, prefix: bytes, limit: int) -> list[bytes]:
        """Live keys starting with ``prefix``, sorted, at most ``limit``: a pass over every entry (the edge
        data has a store of its own, so that is the filters' namespaces, which are small)."""
        with self._lock:
            keys = self._scan(prefix, self._clock())
        keys.sort()
        return keys[:limit]

    def put_bounded(self, key: bytes, value: bytes, ttl: float, prefix: bytes, max_keys: int) -> bool:
        """Write unless ``key`` is new and ``max_keys`` live keys already start with ``prefix``."""
        with self._lock:
            now = self._clock()
            if self._live(key, now) is None and len(self._scan(prefix, now)) >= max_keys:
                return False
            self._store(key, value, now + ttl, now)
            return True

    def incr_bounded(self, key: bytes, delta: int, ttl: float, prefix: bytes, max_keys: int) -> int | None:
        """`incr`, or None when ``key`` is new and ``max_keys`` live keys already start with ``prefix``."""
        with self._lock:
            now = self._clock()
            current = self._live(key, now)
            if current is None:
                if len(self._scan(prefix, now)) >= max_keys:
                    return None
                total, expires = delta, now + ttl
            else:
                total, expires = parse_int(current[0]) + delta, current[2]
            self._store(key, str(total).encode(), expires, now)
            return total

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def close(self) -> None:
        self.clear()

    # -- internals (lock held)

    def _live(self, key: bytes, now: float) -> tuple[bytes, int, float] | None:
        entry = self._data.get(key)
        if entry is not None and entry[2] <= now:
            self._drop(key)
            return None
        return entry

    def _scan(self, prefix: bytes, now: float) -> list[bytes]:
        return [k for k, e in self._data.items() if e[2] > now and k.startswith(prefix)]

    def _drop(self, key: bytes) -> None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self._bytes -= len(key) + len(entry[0]) + ENTRY_OVERHEAD

    def _store(self, key: bytes, value: bytes, expires: float, now: float) -> int:
        new_cas = self._next_cas
        self._next_cas = new_cas + 1 if new_cas < self._cas_high else self._cas_low
        self._drop(key)
        self._data[key] = (value, new_cas, expires)
        self._bytes += len(key) + len(value) + ENTRY_OVERHEAD
        self._writes += 1
        self._evict(now)
        return new_cas

    def _evict(self, now: float) -> None:
        """While over a bound: the least recently written go. Also (every 16th write is enough) up to two
        expired entries at the old end, so expired entries do not wait for the bounds to be reached."""
        data = self._data
        swept = 0
        while data:
            oldest, entry = next(iter(data.items()))
            if len(data) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(oldest)
                self.evictions += 1
            elif entry[2] <= now and swept < 2:
                self._drop(oldest)
                swept += 1
            else:
                break


class MemoryQueueStorage:
    """`QueueStorage` in this process, bounded per queue (items) and in total (bytes)."""

    def __init__(self, *, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._slots: dict[int, bytes] = {}
        self._items: dict[int, deque[bytes]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def slot(self, token: int) -> bytes | None:
        return self._slots.get(token)

    def claim(self, token: int, ident: bytes) -> bytes:
        with self._lock:
            return self._slots.setdefault(token, ident)

    def push(self, token: int, item: bytes) -> Status:
        with self._lock:
            if token not in self._slots:
                return Status.NOT_FOUND
            items = self._items.setdefault(token, deque())
            if len(items) >= self.max_items or self._bytes + len(item) > self.max_bytes:
                return Status.INTERNAL_FAILURE
            items.append(item)
            self._bytes += len(item)
            return Status.OK

    def pop(self, token: int) -> bytes | None:
        with self._lock:
            items = self._items.get(token)
            if not items:
                return None
            item = items.popleft()
            self._bytes -= len(item)
            return item


def open_memory_state(
    *,
    max_entries: int,
    max_bytes: int,
    max_value_bytes: int,
    default_ttl: float,
    max_queue_items: int,
) -> SharedState:
    store = MemoryStore(max_entries=max_entries, max_bytes=max_bytes)
    queues = MemoryQueueStorage(max_items=max_queue_items, max_bytes=max(max_bytes // 4, max_value_bytes))
    return SharedState(
        backend="memory",
        shared_data=EngineSharedData(store, ttl=default_ttl, max_value_bytes=max_value_bytes),
        queues=QueueHub(queues, max_item_bytes=max_value_bytes),
        kv=EngineKV(store, ttl=default_ttl, max_value_bytes=max_value_bytes),
        close=store.close,
        # The filters' namespaces get a store of their own: bounding a namespace counts its keys, which must
        # not mean a pass over every shared-data and cache entry.
        edge=EngineEdgeStore(MemoryStore(max_entries=max_entries, max_bytes=max_bytes)),
    )
