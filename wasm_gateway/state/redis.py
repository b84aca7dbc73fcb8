"""Redis backend: state shared by every gateway node of a cluster.

Keys (``prefix`` = ``state.key_prefix``, one per gateway cluster sharing a Redis):

* ``prefix d:<key>``  shared data, ``prefix k:<key>`` the async KV: a string ``cas (u32 big-endian) + value``,
  always with a TTL (PX). Writes are one Lua script: compare, assign the next cas, write, atomically.
* ``prefix e:{<ns>}:<key>`` the filters' KV namespaces (wasm_gateway/edge/): the plain value with a TTL;
  ``prefix e:{<ns>}`` (no colon after the brace) a sorted set of the namespace's keys scored by expiry (ms),
  which bounds the namespace and lists it. The hash tag keeps a namespace in one Redis Cluster slot.
* ``prefix q:{<token>}:n`` a queue's registration (its ident), ``prefix q:{<token>}:l`` its items (a list);
  the hash tag keeps both in one Redis Cluster slot.

Cas values of a key count up from a random start (per key, so no global counter key and no cross-slot
script); a re-created key starts elsewhere, so a stale cas from a previous life of the key does not match.
They stay in 1..2^31-1: the ``fail_open`` fallback store uses 2^31..2^32-1, so a cas read from one never
matches in the other.

Every command has the configured connect/read timeout and no retry. When one fails, the backend is marked
down: calls are answered by the failure policy without touching the network, and one call per backoff
interval (100 ms doubling to 2 s, jittered) probes Redis again; the first success marks it up. Nothing needs
restarting. Errors are logged (rate limited) and counted through the error hook.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..exceptions import StateUnavailableError
from ..runtime.abi import Status
from .base import MAX_CAS, SHARED_NAMESPACE, ErrorHook, QueueHub, SharedState
from .memory import MemoryStore

__all__ = [
    "RedisBackend",
    "RedisEdgeStore",
    "RedisHealth",
    "RedisKV",
    "RedisQueueStorage",
    "RedisSharedData",
    "open_redis_state",
]

_log = logging.getLogger("wasm_gateway.state")

REDIS_MAX_CAS = 0x7FFFFFFF
FALLBACK_CAS_RANGE = (REDIS_MAX_CAS + 1, MAX_CAS)
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
STILL_DOWN_LOG_INTERVAL_S = 30.0
ASYNC_POOL_SIZE = 64

# KEYS[1] key; ARGV: value, expected cas (0: any, 0xFFFFFFFF: only if absent), ttl ms, cas seed for a new key.
# -> the new cas, 0 on mismatch.
_SET_LUA = """
local expected = tonumber(ARGV[2])
local cur = redis.call('GET', KEYS[1])
local cas
if cur and #cur >= 4 then
  if expected == 4294967295 then return 0 end
  local old = struct.unpack('>I4', cur)
  if expected ~= 0 and old ~= expected then return 0 end
  cas = old % 2147483647 + 1
else
  if expected ~= 0 and expected ~= 4294967295 then return 0 end
  cas = tonumber(ARGV[4])
end
redis.call('SET', KEYS[1], struct.pack('>I4', cas) .. ARGV[1], 'PX', ARGV[3])
return cas
"""

# KEYS[1] key; ARGV: delta, ttl ms (new keys only), cas seed. -> the new total, or false if not an integer.
_INCR_LUA = """
local cur = redis.call('GET', KEYS[1])
local total = tonumber(ARGV[1])
local cas = tonumber(ARGV[3])
local keep = false
if cur and #cur >= 4 then
  local digits = string.sub(cur, 5)
  if string.find(digits, '^%-?%d+$') == nil then return false end
  total = tonumber(digits) + total
  cas = struct.unpack('>I4', cur) % 2147483647 + 1
  keep = true
end
local packed = struct.pack('>I4', cas) .. string.format('%d', total)
if keep then redis.call('SET', KEYS[1], packed, 'KEEPTTL') else redis.call('SET', KEYS[1], packed, 'PX', ARGV[2]) end
return string.format('%d', total)
"""

# KEYS[1] registration; ARGV: ident, ttl ms. -> the ident holding the slot after the call.
_CLAIM_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return cur
"""

# KEYS[1] registration, KEYS[2] list; ARGV: item, max items, ttl ms. -> 1 ok, -1 no such queue, -2 full.
_PUSH_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[2]) then return -2 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# The filters' namespaced KV. KEYS[1] value, KEYS[2] the namespace's index; ARGV: value, ttl ms, max keys, key.
# -> 1 written, 0 the key is new and the namespace full. Expired index members go first.
_EDGE_SET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# As above with ARGV: delta, ttl ms (new keys), max keys, key. -> {1, total}, {0} full, {-1} not an integer,
# {-2} the total would leave i64 (an error answered to the filter, not a Redis failure).
_EDGE_INCR_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  if string.find(cur, '^%-?%d+$') == nil then return {-1} end
  local total = redis.pcall('INCRBY', KEYS[1], ARGV[1])
  if type(total) == 'table' then return {-2} end
  return {1, tostring(total)}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return {0} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return {1, ARGV[1]}
"""

# KEYS[1] a namespace's index -> its live keys (expiry after Redis's own clock, so nodes' clocks do not matter).
_EDGE_LIST_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""

Kind = Literal["timeout", "connection", "error"]


def _kind(exc: BaseException) -> Kind:
    if isinstance(exc, RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError):
        return "connection"
    return "error"


def _where(url: str) -> str:
    """host:port of the URL, never its credentials (for logs)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"


def _seed() -> int:
    return random.randint(1, REDIS_MAX_CAS)


class RedisHealth:
    """Whether Redis is considered up, when to probe it next, and the logging/counting of failures."""

    def __init__(
        self,
        where: str,
        policy: str,
        on_error: ErrorHook | None = None,
        on_recover: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where = where
        self.policy = policy
        self.up = True
        self.counts: dict[str, int] = {"timeout": 0, "connection": 0, "error": 0, "unavailable": 0}
        self._on_error = on_error
        self._on_recover = on_recover
        self._clock = clock
        self._lock = threading.Lock()
        self._backoff = BACKOFF_MIN_S
        self._next_probe = 0.0
        self._down_since = 0.0
        self._last_log = 0.0
        self._failures_since_log = 0

    def allow(self) -> bool:
        """True: send the command (Redis is up, or this call is the probe). False: answer by the policy."""
        if self.up:
            return True
        now = self._clock()
        with self._lock:
            if self.up:
                return True
            if now >= self._next_probe:
                self._next_probe = now + self._backoff * random.uniform(0.8, 1.2)
                self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
                return True
        self._count("unavailable")
        return False

    def failure(self, operation: str, exc: BaseException) -> None:
        kind = _kind(exc)
        self._count(kind)
        now = self._clock()
        with self._lock:
            went_down = self.up
            if went_down:
                self.up = False
                self._down_since = now
                self._backoff = BACKOFF_MIN_S
                self._next_probe = now + BACKOFF_MIN_S
                self._failures_since_log = 0
                self._last_log = now
            else:
                self._failures_since_log += 1
                if now - self._last_log < STILL_DOWN_LOG_INTERVAL_S:
                    return
                self._last_log = now
            failures, self._failures_since_log = self._failures_since_log, 0
            down_for = now - self._down_since
        if went_down:
            _log.warning(
                "redis at %s unavailable (%s %s: %s); policy %s until it answers again",
                self.where, operation, kind, exc, self.policy,
            )  # fmt: skip
        else:
            _log.warning(
                "redis at %s still unavailable after %.0f s: %d failed probes since the last message "
                "(last: %s %s: %s); policy %s",
                self.where, down_for, failures, operation, kind, exc, self.policy,
            )  # fmt: skip

    def success(self) -> None:
        if self.up:
            return
        with self._lock:
            if self.up:
                return
            self.up = True
            self._backoff = BACKOFF_MIN_S
            down_for = self._clock() - self._down_since
        _log.warning("redis at %s answers again after %.1f s down", self.where, down_for)
        if self._on_recover is not None:
            self._on_recover()

    def _count(self, kind: str) -> None:
        self.counts[kind] += 1
        if self._on_error is not None:
            self._on_error("redis", kind)


class RedisBackend:
    """The connections, scripts and health shared by the three views."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str,
        timeout_ms: int,
        policy: str,
        default_ttl: float,
        max_value_bytes: int,
        max_queue_items: int,
        fallback: MemoryStore | None,
        on_error: ErrorHook | None = None,
    ) -> None:
        self.url = url
        self.prefix = key_prefix.encode()
        self.timeout = timeout_ms / 1000
        self.policy = policy
        self.ttl_ms = max(1, round(default_ttl * 1000))
        self.max_value_bytes = max_value_bytes
        self.max_queue_items = max_queue_items
        self.fallback = fallback
        self.health = RedisHealth(_where(url), policy, on_error, self._recovered)
        self.client = redis.Redis.from_url(url, **self._client_options(Retry(NoBackoff(), 0)))
        self.set_script = self.client.register_script(_SET_LUA)
        self.incr_script = self.client.register_script(_INCR_LUA)
        self.claim_script = self.client.register_script(_CLAIM_LUA)
        self.push_script = self.client.register_script(_PUSH_LUA)
        self.edge_set_script = self.client.register_script(_EDGE_SET_LUA)
        self.edge_incr_script = self.client.register_script(_EDGE_INCR_LUA)
        self.edge_list_script = self.client.register_script(_EDGE_LIST_LUA)
        self._async: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None

    def _client_options(self, retry: object) -> dict[str, Any]:
        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": retry,
            "health_check_interval": 0,
        }

    def _recovered(self) -> None:
        if self.fallback is not None:
            self.fallback.clear()  # what was written while Redis was down is process-local and now stale

    def async_client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            # A blocking pool: a burst of concurrent calls (a cache stampede) waits up to the command
            # timeout for a connection instead of failing with "Too many connections" and marking Redis down.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.url,
                max_connections=ASYNC_POOL_SIZE,
                timeout=self.timeout,
                **self._client_options(redis.asyncio.retry.Retry(NoBackoff(), 0)),
            )
            client = redis.asyncio.Redis.from_pool(pool)
            self._async = (loop, client)
        return self._async[1]

    async def aclose(self) -> None:
        held, self._async = self._async, None
        if held is not None and held[0] is asyncio.get_running_loop():
            await held[1].aclose()

    def close(self) -> None:
        self.client.close()

    def unavailable(self, what: str) -> StateUnavailableError:
        return StateUnavailableError(f"redis at {self.health.where} unavailable ({what})", "redis")


def _decode(raw: bytes | None) -> tuple[bytes, int] | None:
    if raw is None or len(raw) < 4:
        return None
    return raw[4:], int.from_bytes(raw[:4], "big")


class RedisSharedData:
    """`SharedDataStore` on Redis with the failure policy.

    ``fail_closed``: ``get`` raises `StateUnavailableError` (the host call answers INTERNAL_FAILURE) and
    ``set`` answers INTERNAL_FAILURE. ``fail_open``: both go to a process-local bounded store while Redis is
    down, so a rate limiter keeps limiting per process instead of letting everything through.
    """

    def __init__(self, backend: RedisBackend) -> None:
        self._b = backend
        self._client = backend.client
        self._health = backend.health
        self._prefix = backend.prefix + b"d:"

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        health = self._health
        if health.allow():
            try:
                raw = cast("bytes | None", self._client.get(self._prefix + key))
            except RedisError as exc:
                health.failure("get", exc)
            else:
                health.success()
                return _decode(raw)
        fallback = self._b.fallback
        if fallback is None:
            raise self._b.unavailable("get")
        return fallback.get(SHARED_NAMESPACE + key)

    def set(self, key: bytes, value: bytes, cas: int) -> Status:
        b = self._b
        if len(value) > b.max_value_bytes:
            return Status.BAD_ARGUMENT
        health = self._health
        if health.allow():
            try:
                new_cas = b.set_script(keys=[self._prefix + key], args=[bytes(value), cas, b.ttl_ms, _seed()])
            except RedisError as exc:
                health.failure("set", exc)
            else:
                health.success()
                return Status.OK if new_cas else Status.CAS_MISMATCH
        if b.fallback is None:
            return Status.INTERNAL_FAILURE
        new = b.fallback.put(SHARED_NAMESPACE + key, value, cas, b.ttl_ms / 1000)
        return Status.OK if new else Status.CAS_MISMATCH


class RedisKV:
    """`AsyncKV` on Redis (asyncio client, one per event loop). Failures raise `StateUnavailableError`,
    whatever the policy: the caller (a cache) decides what a failed lookup means."""

    def __init__(self, backend: RedisBackend) -> None:
        self._b = backend
        self._prefix = backend.prefix + b"k:"
        self._scripts: dict[int, tuple[Any, Any]] = {}

    def _ttl_ms(self, ttl: float | None) -> int:
        return self._b.ttl_ms if ttl is None else max(1, round(ttl * 1000))

    async def _run(self, operation: str, call: Callable[[redis.asyncio.Redis], Any]) -> Any:
        health = self._b.health
        if not health.allow():
            raise self._b.unavailable(operation)
        try:
            result = await call(self._b.async_client())
        except RedisError as exc:
            health.failure(operation, exc)
            raise self._b.unavailable(f"{operation}: {exc}") from None
        health.success()
        return result

    def _script(self, client: redis.asyncio.Redis, which: int) -> Any:
        scripts = self._scripts.get(id(client))
        if scripts is None:
            self._scripts.clear()  # a new loop's client: the old client's scripts go with it
            scripts = (client.register_script(_SET_LUA), client.register_script(_INCR_LUA))
            self._scripts[id(client)] = scripts
        return scripts[which]

    async def get(self, key: bytes) -> tuple[bytes, int] | None:
        raw = await self._run("kv get", lambda c: c.get(self._prefix + key))
        return _decode(raw)

    async def set(self, key: bytes, value: bytes, *, ttl: float | None = None, cas: int = 0) -> int:
        if len(value) > self._b.max_value_bytes:
            raise ValueError(
                f"value of {len(value)} bytes exceeds max_value_bytes ({self._b.max_value_bytes})"
            )
        args = [bytes(value), cas, self._ttl_ms(ttl), _seed()]
        result = await self._run(
            "kv set", lambda c: self._script(c, 0)(keys=[self._prefix + key], args=args, client=c)
        )
        return int(result)

    async def delete(self, key: bytes) -> bool:
        return bool(await self._run("kv delete", lambda c: c.delete(self._prefix + key)))

    async def incr(self, key: bytes, delta: int = 1, *, ttl: float | None = None) -> int:
        args = [delta, self._ttl_ms(ttl), _seed()]
        result = await self._run(
            "kv incr", lambda c: self._script(c, 1)(keys=[self._prefix + key], args=args, client=c)
        )
        if result is None:
            raise ValueError("the stored value is not an integer")
        return int(result)


class RedisQueueStorage:
    """`QueueStorage` on Redis lists. Failures raise `StateUnavailableError` (see `QueueHub`)."""

    def __init__(self, backend: RedisBackend) -> None:
        self._b = backend
        self._client = backend.client
        self._prefix = backend.prefix + b"q:{"

    def _keys(self, token: int) -> tuple[bytes, bytes]:
        base = self._prefix + str(token).encode()
        return base + b"}:n", base + b"}:l"

    def _call(self, operation: str, call: Callable[[], Any]) -> Any:
        health = self._b.health
        if not health.allow():
            raise self._b.unavailable(operation)
        try:
            result = call()
        except RedisError as exc:
            health.failure(operation, exc)
            raise self._b.unavailable(f"{operation}: {exc}") from None
        health.success()
        return result

    def slot(self, token: int) -> bytes | None:
        ident: bytes | None = self._call("queue lookup", lambda: self._client.get(self._keys(token)[0]))
        return ident

    def claim(self, token: int, ident: bytes) -> bytes:
        reg = self._keys(token)[0]
        holder: bytes = self._call(
            "queue register", lambda: self._b.claim_script(keys=[reg], args=[ident, self._b.ttl_ms])
        )
        return holder

    def push(self, token: int, item: bytes) -> Status:
        reg, items = self._keys(token)
        result = self._call(
            "enqueue",
            lambda: self._b.push_script(
                keys=[reg, items], args=[item, self._b.max_queue_items, self._b.ttl_ms]
            ),
        )
        if result == -1:
            return Status.NOT_FOUND
        if result == -2:
            return Status.INTERNAL_FAILURE
        return Status.OK

    def pop(self, token: int) -> bytes | None:
        item: bytes | None = self._call("dequeue", lambda: self._client.lpop(self._keys(token)[1]))
        return item


class RedisEdgeStore:
    """`EdgeStore` on Redis with the sync client (host calls are synchronous, like shared data). No
    fallback store whatever the policy: a filter's data must not silently fork per process, so a failure
    raises `StateUnavailableError` and the filter gets an ``unavailable`` result."""

    backend = "redis"

    def __init__(self, backend: RedisBackend) -> None:
        self._b = backend
        self._client = backend.client
        self._prefix = backend.prefix + b"e:{"

    def _keys(self, ns: bytes, key: bytes) -> tuple[bytes, bytes]:
        index = self._prefix + ns + b"}"
        return index + b":" + key, index

    def _call(self, operation: str, call: Callable[[], Any]) -> Any:
        health = self._b.health
        if not health.allow():
            raise self._b.unavailable(operation)
        try:
            result = call()
        except RedisError as exc:
            health.failure(operation, exc)
            raise self._b.unavailable(f"{operation}: {exc}") from None
        health.success()
        return result

    def get(self, ns: bytes, key: bytes) -> bytes | None:
        value: bytes | None = self._call("kv get", lambda: self._client.get(self._keys(ns, key)[0]))
        return value

    def put(self, ns: bytes, key: bytes, value: bytes, ttl: float, max_keys: int) -> bool:
        keys = list(self._keys(ns, key))
        args: list[bytes | int] = [value, max(1, round(ttl * 1000)), max_keys, key]
        return bool(self._call("kv set", lambda: self._b.edge_set_script(keys=keys, args=args)))

    def delete(self, ns: bytes, key: bytes) -> bool:
        full, index = self._keys(ns, key)
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(full)
        pipe.zrem(index, key)
        removed = self._call("kv delete", pipe.execute)
        return bool(removed[0])

    def incr(self, ns: bytes, key: bytes, delta: int, ttl: float, max_keys: int) -> int | None:
        keys = list(self._keys(ns, key))
        args: list[bytes | int] = [delta, max(1, round(ttl * 1000)), max_keys, key]
        result = self._call("kv incr", lambda: self._b.edge_incr_script(keys=keys, args=args))
        if result[0] == -1:
            raise ValueError("the stored value is not an integer")
        if result[0] == -2:
            raise ValueError("the total would not fit in a signed 64-bit integer")
        return None if result[0] == 0 else int(result[1])

    def scan(self, ns: bytes, prefix: bytes, limit: int) -> list[bytes]:
        index = self._keys(ns, b"")[1]
        members: list[bytes] = self._call("kv list", lambda: self._b.edge_list_script(keys=[index]))
        return sorted(m for m in members if m.startswith(prefix))[:limit]


def open_redis_state(
    url: str,
    *,
    key_prefix: str,
    timeout_ms: int,
    policy: str,
    max_entries: int,
    max_bytes: int,
    max_value_bytes: int,
    default_ttl: float,
    max_queue_items: int,
    on_error: ErrorHook | None = None,
) -> SharedState:
    """Never touches the network: a Redis that is down at start is handled like one that goes down later."""
    fallback = None
    if policy == "fail_open":
        fallback = MemoryStore(max_entries=max_entries, max_bytes=max_bytes, cas_range=FALLBACK_CAS_RANGE)
    backend = RedisBackend(
        url,
        key_prefix=key_prefix,
        timeout_ms=timeout_ms,
        policy=policy,
        default_ttl=default_ttl,
        max_value_bytes=max_value_bytes,
        max_queue_items=max_queue_items,
        fallback=fallback,
        on_error=on_error,
    )
    return SharedState(
        backend="redis",
        shared_data=RedisSharedData(backend),
        queues=QueueHub(RedisQueueStorage(backend), max_item_bytes=max_value_bytes),
        kv=RedisKV(backend),
        close=backend.close,
        aclose=backend.aclose,
        healthy=lambda: backend.health.up,
        error_counts=lambda: backend.health.counts,
        edge=RedisEdgeStore(backend),
    )
