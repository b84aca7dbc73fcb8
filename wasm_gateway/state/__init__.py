"""Shared-state backends behind ``proxy_get/set_shared_data`` and shared queues (and the gateway's async KV).

    state = open_state(StateConfig(backend="redis"), on_error=count_state_error)
    runtime = FilterRuntime.load(specs, shared=SharedServices(shared_data=state.shared_data, queues=state.queues))
    ...
    await state.aclose()          # or state.close() when the async KV was not used

Backends: ``memory`` (this process), ``local`` (LMDB file shared by the worker processes of a host, survives
restarts), ``redis`` (every node of a gateway cluster). See docs/state.md.
"""

from __future__ import annotations

from ..exceptions import ConfigError, StateError, StateUnavailableError
from .base import CAS_CREATE, MAX_CAS, AsyncKV, ErrorHook, SharedState
from .config import Backend, FailurePolicy, StateConfig, default_state_dir

__all__ = [
    "CAS_CREATE",
    "MAX_CAS",
    "AsyncKV",
    "Backend",
    "ErrorHook",
    "FailurePolicy",
    "SharedState",
    "StateConfig",
    "StateError",
    "StateUnavailableError",
    "default_state_dir",
    "open_state",
]


def open_state(config: StateConfig, *, on_error: ErrorHook | None = None) -> SharedState:
    """Open the configured backend (in the process that uses it: after a fork, open again).

    ``on_error(backend, kind)`` is called for every backend failure and every call the failure policy
    answered; kind: "timeout", "connection", "error" or "unavailable". Raises ConfigError when a backend's
    library is missing, StateError when the local database cannot be opened. Redis is not contacted here:
    a Redis that is down at start is handled like one that goes down later.
    """
    ttl = float(config.default_ttl_seconds)
    if config.backend == "memory":
        from .memory import open_memory_state

        return open_memory_state(
            max_entries=config.max_entries,
            max_bytes=config.max_bytes,
            max_value_bytes=config.max_value_bytes,
            default_ttl=ttl,
            max_queue_items=config.max_queue_items,
        )
    if config.backend == "local":
        try:
            from .local import open_local_state
        except ImportError as exc:
            raise ConfigError(
                f"state.backend = 'local' needs the lmdb package ({exc}): pip install lmdb"
            ) from None
        return open_local_state(
            config.directory,
            max_entries=config.max_entries,
            max_bytes=config.max_bytes,
            max_value_bytes=config.max_value_bytes,
            default_ttl=ttl,
            max_queue_items=config.max_queue_items,
        )
    try:
        from .redis import open_redis_state
    except ImportError as exc:
        raise ConfigError(
            f"state.backend = 'redis' needs the redis package ({exc}): pip install 'wasm-gateway[redis]'"
        ) from None
    return open_redis_state(
        config.redis_url,
        key_prefix=config.key_prefix,
        timeout_ms=config.timeout_ms,
        policy=config.on_error,
        max_entries=config.max_entries,
        max_bytes=config.max_bytes,
        max_value_bytes=config.max_value_bytes,
        default_ttl=ttl,
        max_queue_items=config.max_queue_items,
        on_error=on_error,
    )
