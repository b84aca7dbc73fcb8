"""What every shared-state backend has in common.

A backend offers three views of one store:

* ``shared_data``: the runtime's synchronous `SharedDataStore` (``proxy_get/set_shared_data``), with a TTL on
  every entry and compare-and-swap values that are non-zero and change on every write;
* ``queues``: the runtime's synchronous `SharedQueueStore` (``proxy_*_shared_queue``);
* ``kv``: a small asynchronous key/value interface (`AsyncKV`) for the gateway's own use (the response cache);
* ``edge``: the synchronous, namespaced `EdgeStore` behind the filters' ``kv.*`` foreign functions
  (wasm_gateway/edge/).

Shared data and the KV live in separate namespaces of the same store. The memory and local backends are
built from one synchronous `Engine`; Redis implements the views itself (see ``redis.py``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..exceptions import StateError
from ..runtime.abi import Status
from ..runtime.shared import SharedDataStore, SharedQueueStore

__all__ = [
    "CAS_CREATE",
    "EDGE_NAMESPACE",
    "KV_NAMESPACE",
    "MAX_CAS",
    "SHARED_NAMESPACE",
    "AsyncKV",
    "EdgeStore",
    "Engine",
    "EngineEdgeStore",
    "EngineKV",
    "EngineSharedData",
    "ErrorHook",
    "QueueHub",
    "QueueStorage",
    "RateLimitedLog",
    "SharedState",
    "parse_int",
    "queue_ident",
    "queue_token",
]

# The first byte of an engine key says whose it is: proxy_*_shared_data or the gateway's async KV.
SHARED_NAMESPACE = b"s"
KV_NAMESPACE = b"k"
EDGE_NAMESPACE = b"e"  # the filters' KV namespaces: b"e" + namespace + b"\0" + key

# A write with this cas succeeds only if the key is absent (or expired): an atomic create, which the ABI lacks
# (cas 0 writes unconditionally, so two processes that both read "absent" would both write). No backend ever
# hands it out as an entry's cas; every backend's cas values are in 1..MAX_CAS.
CAS_CREATE = 0xFFFFFFFF
MAX_CAS = CAS_CREATE - 1
_INTEGER = re.compile(rb"-?[0-9]+")

# Called once per backend error or per call answered by the failure policy instead of the backend:
# (backend, kind) with kind one of "timeout", "connection", "error", "unavailable". The lead wires a counter.
ErrorHook = Callable[[str, str], None]


class AsyncKV(Protocol):
    """The minimal asynchronous key/value interface (values are bytes; cas values as in shared data).

    Backend failures raise `StateUnavailableError` (callers such as a cache treat it as a miss).
    """

    async def get(self, key: bytes) -> tuple[bytes, int] | None:
        """(value, cas) or None when absent or expired."""
        ...

    async def set(self, key: bytes, value: bytes, *, ttl: float | None = None, cas: int = 0) -> int:
        """Store ``value`` for ``ttl`` seconds (None: the configured default). With ``cas`` non-zero, only
        when the stored cas equals it (`CAS_CREATE`: only when the key is absent). Returns the new cas, or 0
        when ``cas`` did not match."""
        ...

    async def delete(self, key: bytes) -> bool:
        """True when a live entry was removed."""
        ...

    async def incr(self, key: bytes, delta: int = 1, *, ttl: float | None = None) -> int:
        """Add ``delta`` to the decimal integer stored at ``key`` (absent: 0) and return the result.
        ``ttl`` applies when the key is created; an existing key keeps its expiry. ValueError when the
        stored value is not an integer."""
        ...


class Engine(Protocol):
    """A synchronous store of (value, cas, expiry) by key, safe for the processes that share it."""

    backend: str

    def get(self, key: bytes) -> tuple[bytes, int] | None: ...

    def put(self, key: bytes, value: bytes, cas: int, ttl: float) -> int:
        """cas 0 always writes; CAS_CREATE writes only an absent key; any other cas must equal the stored
        one. Returns the new cas, or 0 on mismatch."""
        ...

    def delete(self, key: bytes) -> bool: ...

    def incr(self, key: bytes, delta: int, ttl: float) -> int: ...

    def close(self) -> None: ...


def parse_int(value: bytes) -> int:
    """The stored value of a counter. ValueError when it is not a decimal integer (``-?[0-9]+``)."""
    if _INTEGER.fullmatch(value) is None:
        raise ValueError(f"the stored value is not an integer: {value[:32]!r}")
    return int(value)


class RateLimitedLog:
    """At most one line per ``interval`` seconds per key; says how many were suppressed in between."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, key: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self._logger.log(level, message, *args)


_log = logging.getLogger("wasm_gateway.state")
_engine_log = RateLimitedLog(_log)
_OK, _CAS_MISMATCH, _BAD_ARGUMENT, _INTERNAL_FAILURE = (
    Status.OK,
    Status.CAS_MISMATCH,
    Status.BAD_ARGUMENT,
    Status.INTERNAL_FAILURE,
)


class EngineSharedData:
    """`SharedDataStore` over an `Engine`: every write carries the default TTL.

    A failing engine (a local database error) makes ``get`` raise `StateError` (the host call answers
    INTERNAL_FAILURE) and ``set`` answer INTERNAL_FAILURE.
    """

    def __init__(self, engine: Engine, *, ttl: float, max_value_bytes: int) -> None:
        self._engine = engine
        self._ttl = ttl
        self._max_value_bytes = max_value_bytes

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        return self._engine.get(SHARED_NAMESPACE + key)

    def set(self, key: bytes, value: bytes, cas: int) -> Status:
        if len(value) > self._max_value_bytes:
            return Status.BAD_ARGUMENT
        try:
            new_cas = self._engine.put(SHARED_NAMESPACE + key, bytes(value), cas, self._ttl)
        except StateError as exc:
            _engine_log.log(
                "set", logging.ERROR, "shared data: %s backend failed: %s", self._engine.backend, exc
            )
            return Status.INTERNAL_FAILURE
        return Status.OK if new_cas else Status.CAS_MISMATCH


class EngineKV:
    """`AsyncKV` over an `Engine`. Engine calls take microseconds, so they run inline on the event loop."""

    def __init__(self, engine: Engine, *, ttl: float, max_value_bytes: int) -> None:
        self._engine = engine
        self._ttl = ttl
        self._max_value_bytes = max_value_bytes

    async def get(self, key: bytes) -> tuple[bytes, int] | None:
        return self._engine.get(KV_NAMESPACE + key)

    async def set(self, key: bytes, value: bytes, *, ttl: float | None = None, cas: int = 0) -> int:
        if len(value) > self._max_value_bytes:
            raise ValueError(f"value of {len(value)} bytes exceeds max_value_bytes ({self._max_value_bytes})")
        return self._engine.put(KV_NAMESPACE + key, value, cas, self._ttl if ttl is None else ttl)

    async def delete(self, key: bytes) -> bool:
        return self._engine.delete(KV_NAMESPACE + key)

    async def incr(self, key: bytes, delta: int = 1, *, ttl: float | None = None) -> int:
        return self._engine.incr(KV_NAMESPACE + key, delta, self._ttl if ttl is None else ttl)


class EdgeStore(Protocol):
    """The filters' namespaced KV (``kv.*`` foreign functions): synchronous, since host calls are.

    Namespace names never contain NUL or ``:`` (the config checks). Failures raise `StateError`
    (`StateUnavailableError` when a remote backend is down); ValueError when ``incr`` meets a non-integer.
    """

    backend: str

    def get(self, ns: bytes, key: bytes) -> bytes | None: ...

    def put(self, ns: bytes, key: bytes, value: bytes, ttl: float, max_keys: int) -> bool:
        """Store; False (nothing written) when the key is new and ``ns`` already holds ``max_keys`` keys."""
        ...

    def delete(self, ns: bytes, key: bytes) -> bool: ...

    def incr(self, ns: bytes, key: bytes, delta: int, ttl: float, max_keys: int) -> int | None:
        """The new total (``ttl`` applies to a new key); None when the key is new and ``ns`` is full."""
        ...

    def scan(self, ns: bytes, prefix: bytes, limit: int) -> list[bytes]:
        """Up to ``limit`` live keys of ``ns`` starting with ``prefix``, in byte order."""
        ...


class ScanningEngine(Engine, Protocol):
    """An `Engine` that also lists keys by prefix and bounds how many keys a prefix holds."""

    def scan(self, prefix: bytes, limit: int) -> list[bytes]:
        """Up to ``limit`` live keys starting with ``prefix``, in byte order."""
        ...

    def put_bounded(self, key: bytes, value: bytes, ttl: float, prefix: bytes, max_keys: int) -> bool:
        """Write (cas 0) unless ``key`` is new and ``max_keys`` live keys start with ``prefix``; atomically."""
        ...

    def incr_bounded(self, key: bytes, delta: int, ttl: float, prefix: bytes, max_keys: int) -> int | None:
        """`Engine.incr`, or None when ``key`` is new and ``prefix`` is full; atomically."""
        ...


class EngineEdgeStore:
    """`EdgeStore` over an engine (memory, local). The namespace bound is checked and the key written in one
    step (under the store's lock, in one LMDB transaction): exact across threads and processes. Checking
    counts the namespace's live keys, once per write of a new key."""

    def __init__(self, engine: ScanningEngine) -> None:
        self._engine = engine
        self.backend = engine.backend

    @staticmethod
    def _key(ns: bytes, key: bytes) -> bytes:
        return EDGE_NAMESPACE + ns + b"\0" + key

    def get(self, ns: bytes, key: bytes) -> bytes | None:
        entry = self._engine.get(self._key(ns, key))
        return None if entry is None else entry[0]

    def put(self, ns: bytes, key: bytes, value: bytes, ttl: float, max_keys: int) -> bool:
        head = EDGE_NAMESPACE + ns + b"\0"
        return self._engine.put_bounded(head + key, value, ttl, head, max_keys)

    def delete(self, ns: bytes, key: bytes) -> bool:
        return self._engine.delete(self._key(ns, key))

    def incr(self, ns: bytes, key: bytes, delta: int, ttl: float, max_keys: int) -> int | None:
        head = EDGE_NAMESPACE + ns + b"\0"
        return self._engine.incr_bounded(head + key, delta, ttl, head, max_keys)

    def scan(self, ns: bytes, prefix: bytes, limit: int) -> list[bytes]:
        head = EDGE_NAMESPACE + ns + b"\0"
        return [k[len(head) :] for k in self._engine.scan(head + prefix, limit)]


# ---------------------------------------------------------------------------------------------------- queues

# Tokens are derived from (vm_id, name), so every process (and node) agrees on them without a round trip;
# the shared registry of slots resolves the rare hash collision by probing the next token.
_TOKEN_SPACE = 0x7FFFFFFF
_PROBES = 16


def queue_ident(vm_id: str, name: str) -> bytes:
    return vm_id.encode() + b"\0" + name.encode()


def queue_token(ident: bytes, probe: int = 0) -> int:
    base = int.from_bytes(hashlib.sha256(ident).digest()[:4], "big")
    return (base + probe) % _TOKEN_SPACE + 1


class QueueStorage(Protocol):
    """Where queue slots and items live. Failures raise `StateError`."""

    def slot(self, token: int) -> bytes | None:
        """The ident registered at ``token``, or None."""
        ...

    def claim(self, token: int, ident: bytes) -> bytes:
        """Register ``ident`` at ``token`` unless another ident holds it; returns the holder after the call."""
        ...

    def push(self, token: int, item: bytes) -> Status:
        """Append; OK, NOT_FOUND (no such slot) or INTERNAL_FAILURE (queue full)."""
        ...

    def pop(self, token: int) -> bytes | None: ...


class QueueHub:
    """`SharedQueueStore` over a `QueueStorage`.

    Items are shared by every process using the storage; ``on_ready`` runs for enqueues made in this process
    (a registrant elsewhere sees the items at its next dequeue). A failing storage makes ``register`` and
    ``resolve`` raise `StateError` and ``enqueue``/``dequeue`` answer INTERNAL_FAILURE, whatever the failure
    policy: accepting a message that is then dropped would be worse than saying so.
    """

    def __init__(self, storage: QueueStorage, *, max_item_bytes: int) -> None:
        self._storage = storage
        self._max_item_bytes = max_item_bytes
        self._tokens: dict[bytes, int] = {}  # ident -> token, for queues seen by this process
        self._known: set[int] = set()
        self._registered: dict[int, bytes] = {}  # token -> ident, for queues registered here
        self._ready: dict[int, Callable[[int], None]] = {}
        self._lock = threading.Lock()

    def register(self, vm_id: str, name: str, owner: object, on_ready: Callable[[int], None]) -> int:
        ident = queue_ident(vm_id, name)
        token = self._claim(ident)
        with self._lock:
            self._tokens[ident] = token
            self._known.add(token)
            self._registered[token] = ident
            self._ready[token] = on_ready
        return token

    def _claim(self, ident: bytes) -> int:
        for probe in range(_PROBES):
            token = queue_token(ident, probe)
            if self._storage.claim(token, ident) == ident:
                return token
        raise StateError(f"no free queue token for {ident!r}")

    def resolve(self, vm_id: str, name: str) -> int | None:
        ident = queue_ident(vm_id, name)
        token = self._tokens.get(ident)
        if token is not None:
            return token
        for probe in range(_PROBES):
            candidate = queue_token(ident, probe)
            holder = self._storage.slot(candidate)
            if holder is None:
                return None
            if holder == ident:
                with self._lock:
                    self._tokens[ident] = candidate
                    self._known.add(candidate)
                return candidate
        return None

    def enqueue(self, token: int, data: bytes) -> Status:
        if len(data) > self._max_item_bytes:
            return Status.BAD_ARGUMENT
        try:
            if token not in self._known:
                if self._storage.slot(token) is None:
                    return Status.NOT_FOUND
                self._known.add(token)
            status = self._storage.push(token, bytes(data))
            ident = self._registered.get(token)
            if status == Status.NOT_FOUND and ident is not None:
                # The slot expired (Redis TTL) while this process still has the registrant: register again.
                self._storage.claim(token, ident)
                status = self._storage.push(token, bytes(data))
        except StateError as exc:
            _engine_log.log("enqueue", logging.ERROR, "shared queue: enqueue failed: %s", exc)
            return Status.INTERNAL_FAILURE
        if status == Status.OK:
            callback = self._ready.get(token)
            if callback is not None:
                callback(token)
        return status

    def dequeue(self, token: int) -> bytes | Status:
        try:
            if token not in self._known:
                if self._storage.slot(token) is None:
                    return Status.NOT_FOUND
                self._known.add(token)
            item = self._storage.pop(token)
        except StateError as exc:
            _engine_log.log("dequeue", logging.ERROR, "shared queue: dequeue failed: %s", exc)
            return Status.INTERNAL_FAILURE
        return Status.EMPTY if item is None else item


# ---------------------------------------------------------------------------------------------------- state


class SharedState:
    """One opened backend: its three views, health and counters. Close it when done (``aclose`` when the
    async KV was used: it also closes the KV's connections)."""

    def __init__(
        self,
        *,
        backend: str,
        shared_data: SharedDataStore,
        queues: SharedQueueStore,
        kv: AsyncKV,
        close: Callable[[], None],
        aclose: Callable[[], Awaitable[None]] | None = None,
        healthy: Callable[[], bool] | None = None,
        error_counts: Callable[[], dict[str, int]] | None = None,
        edge: EdgeStore | None = None,
    ) -> None:
        self.backend = backend
        self.edge = edge
        self.shared_data = shared_data
        self.queues = queues
        self.kv = kv
        self._close = close
        self._aclose = aclose
        self._healthy = healthy
        self._error_counts = error_counts
        self._closed = False

    @property
    def healthy(self) -> bool:
        """False while a remote backend is considered down (the failure policy is answering)."""
        return True if self._healthy is None else self._healthy()

    @property
    def error_counts(self) -> dict[str, int]:
        """Failures and policy answers so far, by kind (what the error hook was told)."""
        return {} if self._error_counts is None else dict(self._error_counts())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    async def aclose(self) -> None:
        if self._aclose is not None:
            await self._aclose()
        self.close()

    def __enter__(self) -> SharedState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
