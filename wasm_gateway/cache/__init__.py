"""The response cache: an RFC 9111 shared cache in front of a route's upstream (see docs/cache.md).

* ``policy``: what may be stored and reused (pure functions);
* ``keys``: primary (URI) and secondary (variant) keys;
* ``store``: entries and bodies on a shared-state engine (memory, LMDB, Redis);
* ``coalesce``: one upstream request per key and process for concurrent misses.

The request path that uses them is in ``app.py`` (``Gateway._cached``).
"""

from __future__ import annotations

from ..state.base import EngineKV, ErrorHook
from ..state.config import StateConfig
from .coalesce import Coalescer
from .keys import KeySpec, cache_url, canonical_target, extra_key, primary_key, secondary_key
from .policy import Freshness, Reuse, StoreOptions, decide_reuse, freshness_for, request_directives
from .store import CacheStore, Entry, EntryWriter, StoreStats

__all__ = [
    "CacheStore",
    "Coalescer",
    "Entry",
    "EntryWriter",
    "Freshness",
    "KeySpec",
    "Reuse",
    "StoreOptions",
    "StoreStats",
    "cache_url",
    "canonical_target",
    "decide_reuse",
    "extra_key",
    "freshness_for",
    "open_cache_store",
    "primary_key",
    "request_directives",
    "secondary_key",
]

# The engines count ~64 bytes of bookkeeping per record; a cache record is rarely smaller than 256 bytes.
_BYTES_PER_RECORD = 256


def open_cache_store(
    *,
    backend: str,
    max_bytes: int,
    chunk_bytes: int,
    max_ttl: float,
    directory: object = None,
    redis_url: str = "redis://127.0.0.1:6379/0",
    key_prefix: str = "wasm-gateway:cache:",
    timeout_ms: int = 250,
    on_error: ErrorHook | None = None,
    near_ttl: float = 1.0,
) -> CacheStore:
    """A store of its own (own bounds, own LMDB directory or Redis prefix): a burst of cached objects must
    never evict the rate limiter's counters that share ``[state]``. ``near_ttl``: Redis only, how long a
    process reuses records it read (0: every lookup asks Redis)."""
    from pathlib import Path

    max_entries = max(1024, max_bytes // _BYTES_PER_RECORD)
    # A record holds one body chunk (a flush may exceed chunk_bytes by one upstream read) or an entry
    # with its headers and an inline body of up to chunk_bytes.
    max_value = 2 * chunk_bytes + 1024 * 1024
    if backend == "memory":
        from ..state.memory import MemoryStore

        memory = MemoryStore(max_entries=max_entries, max_bytes=max_bytes)
        return CacheStore(
            EngineKV(memory, ttl=max_ttl, max_value_bytes=max_value),
            backend="memory",
            chunk_bytes=chunk_bytes,
            max_ttl=max_ttl,
            stats=lambda: StoreStats(len(memory), memory.bytes_used, memory.evictions),
            close=memory.close,
        )
    if backend == "local":
        from ..state.local import LocalStore

        assert directory is not None
        local = LocalStore(Path(str(directory)), max_entries=max_entries, max_bytes=max_bytes)

        def local_stats() -> StoreStats:
            s = local.stats()
            return StoreStats(s["entries"], s["bytes"], local.evictions)

        return CacheStore(
            EngineKV(local, ttl=max_ttl, max_value_bytes=max_value),
            backend="local",
            chunk_bytes=chunk_bytes,
            max_ttl=max_ttl,
            stats=local_stats,
            close=local.close,
        )
    from ..state import open_state

    config = StateConfig(
        backend="redis",
        redis_url=redis_url,
        key_prefix=key_prefix,
        timeout_ms=timeout_ms,
        on_error="fail_closed",
        max_bytes=max(max_bytes, 4 * max_value),
        max_value_bytes=max_value,
        default_ttl_seconds=max_ttl,
    )
    state = open_state(config, on_error=on_error)
    return CacheStore(
        state.kv,
        backend="redis",
        chunk_bytes=chunk_bytes,
        max_ttl=max_ttl,
        stats=None,
        close=state.aclose,
        near_ttl=near_ttl,
    )
