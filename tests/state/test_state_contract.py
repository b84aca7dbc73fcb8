"""The same contract for every backend: shared data with CAS, TTLs, bounds, queues, the async KV."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from wasm_gateway.exceptions import ConfigError
from wasm_gateway.runtime.abi import Status
from wasm_gateway.state import CAS_CREATE, MAX_CAS, StateConfig
from wasm_gateway.state.local import LocalStore
from wasm_gateway.state.memory import MemoryStore

from .conftest import RedisServer, StateFactory

BACKENDS = ["memory", "local", "redis"]
U32 = 0xFFFFFFFF


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_set_and_cas(make_state: StateFactory, backend: str) -> None:
    data = make_state(backend).shared_data
    assert data.get(b"vm\0k") is None
    assert data.set(b"vm\0k", b"v1", 0) == Status.OK
    entry = data.get(b"vm\0k")
    assert entry is not None
    value, cas = entry
    assert value == b"v1"
    assert 0 < cas <= U32
    # a non-zero cas must match the stored one
    assert data.set(b"vm\0k", b"v2", cas + 1 if cas < U32 else 1) == Status.CAS_MISMATCH
    assert data.get(b"vm\0k") == (b"v1", cas)
    assert data.set(b"vm\0k", b"v2", cas) == Status.OK
    value2, cas2 = data.get(b"vm\0k") or (b"", 0)
    assert value2 == b"v2"
    assert cas2 not in (0, cas)
    # the old cas is spent
    assert data.set(b"vm\0k", b"v3", cas) == Status.CAS_MISMATCH
    # cas 0 always writes; a non-zero cas on an absent key never does
    assert data.set(b"vm\0k", b"v4", 0) == Status.OK
    assert data.get(b"vm\0k") is not None and data.get(b"vm\0k")[0] == b"v4"  # type: ignore[index]
    assert data.set(b"vm\0absent", b"x", 7) == Status.CAS_MISMATCH
    assert data.get(b"vm\0absent") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_cas_create_writes_only_an_absent_key(make_state: StateFactory, backend: str) -> None:
    state = make_state(backend, default_ttl_seconds=0.3)
    data = state.shared_data
    assert data.set(b"k", b"first", CAS_CREATE) == Status.OK
    assert data.set(b"k", b"second", CAS_CREATE) == Status.CAS_MISMATCH
    entry = data.get(b"k")
    assert entry is not None and entry[0] == b"first"
    assert entry[1] not in (0, CAS_CREATE)
    time.sleep(0.45)  # an expired key counts as absent
    assert data.set(b"k", b"third", CAS_CREATE) == Status.OK


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_write_gets_a_new_nonzero_cas(make_state: StateFactory, backend: str) -> None:
    data = make_state(backend).shared_data
    seen = []
    for i in range(50):
        assert data.set(b"k", b"%d" % i, 0) == Status.OK
        entry = data.get(b"k")
        assert entry is not None and entry[0] == b"%d" % i
        seen.append(entry[1])
    assert len(set(seen)) == 50
    assert all(0 < c <= MAX_CAS for c in seen)
    # other keys' writes do not hand out a cas this key had
    data.set(b"other", b"x", 0)
    assert data.get(b"other") is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_and_long_keys_and_empty_values(make_state: StateFactory, backend: str) -> None:
    data = make_state(backend).shared_data
    long_a, long_b = b"a" * 2000 + b"1", b"a" * 2000 + b"2"  # past LMDB's 511-byte key limit
    assert data.set(long_a, b"A", 0) == Status.OK
    assert data.set(long_b, b"B", 0) == Status.OK
    assert data.set(b"\0\xff\n", b"", 0) == Status.OK
    assert (data.get(long_a) or (b"",))[0] == b"A"
    assert (data.get(long_b) or (b"",))[0] == b"B"
    assert (data.get(b"\0\xff\n") or (None,))[0] == b""


@pytest.mark.parametrize("backend", BACKENDS)
def test_oversized_values_are_refused(make_state: StateFactory, backend: str) -> None:
    state = make_state(backend, max_value_bytes=1024)
    assert state.shared_data.set(b"k", b"x" * 1025, 0) == Status.BAD_ARGUMENT
    assert state.shared_data.get(b"k") is None
    assert state.shared_data.set(b"k", b"x" * 1024, 0) == Status.OK


@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_expire(make_state: StateFactory, backend: str) -> None:
    state = make_state(backend, default_ttl_seconds=0.3)
    data = state.shared_data
    assert data.set(b"k", b"v", 0) == Status.OK
    entry = data.get(b"k")
    assert entry is not None
    time.sleep(0.45)
    assert data.get(b"k") is None
    # an expired entry's cas no longer matches: a CAS write needs a fresh read
    assert data.set(b"k", b"w", entry[1]) == Status.CAS_MISMATCH
    assert data.set(b"k", b"w", 0) == Status.OK
    assert (data.get(b"k") or (b"",))[0] == b"w"


@pytest.mark.parametrize("backend", ["memory", "local"])
def test_a_flood_of_distinct_keys_is_bounded(make_state: StateFactory, backend: str, tmp_path: Path) -> None:
    state = make_state(backend, max_entries=200)
    data = state.shared_data
    assert data.set(b"hot", b"0", 0) == Status.OK
    for i in range(5000):
        assert data.set(b"flood-%d" % i, b"x" * 100, 0) == Status.OK
        if i % 50 == 0:  # a key in use is rewritten all the time: it survives the flood
            assert data.set(b"hot", b"%d" % i, 0) == Status.OK
    store = _engine(state)
    count = len(store) if isinstance(store, MemoryStore) else store.stats()["entries"]
    assert count <= 200
    assert data.get(b"hot") is not None
    assert data.get(b"flood-4999") is not None
    assert data.get(b"flood-0") is None
    if isinstance(store, LocalStore):
        # ... and the file stays small: pages are reused, not appended (5000 x 100 B written)
        stats = store.stats()
        assert stats["bytes"] <= 200 * (100 + 64 + 32 + 20)
        assert stats["disk_bytes"] < 2 * 1024 * 1024


@pytest.mark.parametrize("backend", ["memory", "local"])
def test_the_byte_bound_evicts_oldest_first(make_state: StateFactory, backend: str) -> None:
    state = make_state(backend, max_bytes=64 * 1024, max_value_bytes=16 * 1024)
    data = state.shared_data
    for i in range(40):
        assert data.set(b"k%d" % i, bytes(10_000), 0) == Status.OK
    store = _engine(state)
    used = store.bytes_used if isinstance(store, MemoryStore) else store.stats()["bytes"]
    assert used <= 64 * 1024
    assert data.get(b"k39") is not None
    assert data.get(b"k0") is None


def _engine(state: object) -> MemoryStore | LocalStore:
    engine = state.shared_data._engine  # type: ignore[attr-defined]
    assert isinstance(engine, MemoryStore | LocalStore)
    return engine


def test_redis_keys_always_carry_a_ttl_and_the_prefix(
    make_state: StateFactory, redis_server: RedisServer
) -> None:
    state = make_state("redis", key_prefix="ttl-check:", default_ttl_seconds=600)
    state.shared_data.set(b"vm\0a", b"1", 0)
    token = state.queues.register("vm", "q", None, lambda t: None)
    state.queues.enqueue(token, b"item")
    client = redis_server.client()
    keys = list(client.scan_iter(match="ttl-check:*"))
    assert len(keys) == 3  # the entry, the queue's registration, its list
    for key in keys:
        assert 0 < client.pttl(key) <= 600_000, key
    assert client.get(b"ttl-check:d:vm\0a")[4:] == b"1"  # type: ignore[index]


@pytest.mark.parametrize("backend", BACKENDS)
def test_queues(make_state: StateFactory, backend: str) -> None:
    state = make_state(backend, max_queue_items=3)
    queues = state.queues
    ready: list[int] = []
    token = queues.register("vm", "jobs", object(), ready.append)
    assert token > 0
    assert queues.register("vm", "jobs", object(), ready.append) == token
    assert queues.resolve("vm", "jobs") == token
    assert queues.resolve("vm", "other") is None
    assert queues.resolve("other-vm", "jobs") is None
    assert queues.dequeue(token) == Status.EMPTY
    assert queues.enqueue(token, b"a") == Status.OK
    assert queues.enqueue(token, b"b") == Status.OK
    assert queues.enqueue(token, b"c") == Status.OK
    assert queues.enqueue(token, b"d") == Status.INTERNAL_FAILURE  # full
    assert ready == [token, token, token]
    assert [queues.dequeue(token) for _ in range(4)] == [b"a", b"b", b"c", Status.EMPTY]
    unknown = (token % 1000) + 1 if token != (token % 1000) + 1 else token + 1
    assert queues.enqueue(unknown, b"x") == Status.NOT_FOUND
    assert queues.dequeue(unknown) == Status.NOT_FOUND
    # a second queue does not see the first one's items
    other = queues.register("vm", "other", object(), ready.append)
    assert other != token
    queues.enqueue(other, b"o")
    assert queues.dequeue(token) == Status.EMPTY
    assert queues.dequeue(other) == b"o"


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_queues_and_data_are_shared_between_opened_states(make_state: StateFactory, backend: str) -> None:
    a, b = make_state(backend), make_state(backend)
    token = a.queues.register("vm", "q", None, lambda t: None)
    assert b.queues.resolve("vm", "q") == token
    assert b.queues.enqueue(token, b"from b") == Status.OK
    assert a.queues.dequeue(token) == b"from b"
    a.shared_data.set(b"k", b"v", 0)
    entry = b.shared_data.get(b"k")
    assert entry is not None
    assert b.shared_data.set(b"k", b"w", entry[1]) == Status.OK
    assert a.shared_data.set(b"k", b"x", entry[1]) == Status.CAS_MISMATCH


@pytest.mark.parametrize("backend", BACKENDS)
async def test_async_kv(make_state: StateFactory, backend: str) -> None:
    state = make_state(backend)
    kv = state.kv
    try:
        assert await kv.get(b"page") is None
        cas = await kv.set(b"page", b"<html>", ttl=60)
        assert cas > 0
        assert await kv.get(b"page") == (b"<html>", cas)
        assert await kv.set(b"page", b"new", cas=cas + 1 if cas < U32 else 1) == 0
        cas2 = await kv.set(b"page", b"new", cas=cas)
        assert cas2 not in (0, cas)
        assert await kv.delete(b"page") is True
        assert await kv.delete(b"page") is False
        assert await kv.get(b"page") is None
        assert await kv.incr(b"n") == 1
        assert await kv.incr(b"n", 41) == 42
        assert await kv.incr(b"n", -50) == -8
        assert (await kv.get(b"n") or (b"",))[0] == b"-8"
        await kv.set(b"text", b"abc")
        with pytest.raises(ValueError):
            await kv.incr(b"text")
        # the KV and shared data are separate namespaces
        state.shared_data.set(b"shared", b"1", 0)
        assert await kv.get(b"shared") is None
        # a short TTL
        await kv.set(b"brief", b"x", ttl=0.2)
        assert await kv.get(b"brief") is not None
        time.sleep(0.3)
        assert await kv.get(b"brief") is None
    finally:
        await state.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_incr_keeps_the_expiry_of_an_existing_counter(make_state: StateFactory, backend: str) -> None:
    state = make_state(backend)
    try:
        assert await state.kv.incr(b"window", ttl=0.3) == 1
        time.sleep(0.15)
        assert await state.kv.incr(b"window", ttl=10) == 2  # does not extend the window
        time.sleep(0.25)
        assert await state.kv.get(b"window") is None
        assert await state.kv.incr(b"window", ttl=10) == 1
    finally:
        await state.aclose()


def test_local_state_survives_a_restart(tmp_path: Path) -> None:
    from wasm_gateway.state import open_state

    config = StateConfig(backend="local", path=tmp_path / "st")
    state = open_state(config)
    state.shared_data.set(b"k", b"kept", 0)
    token = state.queues.register("vm", "q", None, lambda t: None)
    state.queues.enqueue(token, b"item")
    entry = state.shared_data.get(b"k")
    state.close()
    again = open_state(config)
    try:
        assert again.shared_data.get(b"k") == entry
        assert again.queues.resolve("vm", "q") == token
        assert again.queues.dequeue(token) == b"item"
        # cas values keep counting up after a restart: the old one still matches, the next one is new
        assert entry is not None
        assert again.shared_data.set(b"k", b"next", entry[1]) == Status.OK
        new = again.shared_data.get(b"k")
        assert new is not None and new[1] != entry[1]
    finally:
        again.close()


def test_memory_store_cas_range_and_wrap() -> None:
    store = MemoryStore(max_entries=10, max_bytes=1 << 20, cas_range=(MAX_CAS - 1, MAX_CAS))
    assert store.put(b"a", b"1", 0, 60) == MAX_CAS - 1
    assert store.put(b"a", b"2", 0, 60) == MAX_CAS
    assert store.put(b"a", b"3", 0, 60) == MAX_CAS - 1  # wraps within the range: never 0 nor CAS_CREATE


def test_config_validation() -> None:
    assert StateConfig().backend == "local"
    with pytest.raises(ConfigError) as err:
        StateConfig(backend="etcd", timeout_ms=0, on_error="ignore")  # type: ignore[arg-type]
    assert len(err.value.errors) == 3
    assert "state.backend" in str(err.value)
    with pytest.raises(ConfigError, match="unknown key"):
        StateConfig.from_mapping({"backend": "redis", "timeout": 5})
    with pytest.raises(ConfigError, match="braces"):
        StateConfig.from_mapping({"key_prefix": "{gw}:"})
    config = StateConfig.from_mapping({"backend": "local", "path": "~/x", "max_entries": 10})
    assert config.path == Path("~/x").expanduser()
    assert config.max_entries == 10
    with pytest.raises(ConfigError, match=r"gateway\.state\.max_entries"):
        StateConfig.from_mapping({"max_entries": "many"}, where="gateway.state")
