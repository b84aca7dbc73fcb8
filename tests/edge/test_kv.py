"""kv.* through the foreign functions a filter gets, on every backend: operations, TTL expiry, isolation
between filters and namespaces, limits, and error results."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.edge import wire
from wasm_gateway.edge import EdgeData, ErrorCode, KVNamespaceConfig
from wasm_gateway.state import SharedState

NAMESPACES = {
    "flags": KVNamespaceConfig(name="flags", max_keys=5, max_key_bytes=16, max_value_bytes=32, max_list=3),
    "profiles": KVNamespaceConfig(name="profiles"),
}


def functions(state: SharedState, kv: tuple[str, ...] = ("flags", "profiles"), name: str = "f") -> dict:
    return EdgeData(state.edge, NAMESPACES, {}).functions(name, kv=kv)


def test_every_operation_round_trips(state: SharedState) -> None:
    fn = functions(state)
    assert wire.get_value(fn["kv.get"](wire.kv_get("profiles", "u1"))) is None
    assert wire.result(fn["kv.set"](wire.kv_set("profiles", "u1", b"\x00alice\xff"))).ok
    assert wire.get_value(fn["kv.get"](wire.kv_get("profiles", "u1"))) == b"\x00alice\xff"
    assert wire.result(fn["kv.set"](wire.kv_set("profiles", "u1", b"bob"))).ok  # overwrite
    assert wire.get_value(fn["kv.get"](wire.kv_get("profiles", "u1"))) == b"bob"
    assert wire.incr_total(fn["kv.incr"](wire.kv_incr("profiles", "hits", 5))) == 5
    assert wire.incr_total(fn["kv.incr"](wire.kv_incr("profiles", "hits", -7))) == -2
    assert wire.get_value(fn["kv.get"](wire.kv_get("profiles", "hits"))) == b"-2"
    assert wire.list_keys(fn["kv.list"](wire.kv_list("profiles"))) == ([b"hits", b"u1"], False)
    assert wire.list_keys(fn["kv.list"](wire.kv_list("profiles", "u"))) == ([b"u1"], False)
    assert fn["kv.delete"](wire.kv_delete("profiles", "u1")) == b"\x01\x00\x01"
    assert fn["kv.delete"](wire.kv_delete("profiles", "u1")) == b"\x01\x00\x00"
    assert wire.get_value(fn["kv.get"](wire.kv_get("profiles", "u1"))) is None
    assert wire.list_keys(fn["kv.list"](wire.kv_list("profiles"))) == ([b"hits"], False)


def test_ttl_expiry(state: SharedState) -> None:
    fn = functions(state)
    assert wire.result(fn["kv.set"](wire.kv_set("profiles", "short", "v", ttl_ms=150))).ok
    assert wire.result(fn["kv.set"](wire.kv_set("profiles", "long", "v", ttl_ms=60_000))).ok
    assert wire.incr_total(fn["kv.incr"](wire.kv_incr("profiles", "n", 1, ttl_ms=150))) == 1
    assert (
        wire.incr_total(fn["kv.incr"](wire.kv_incr("profiles", "n", 1, ttl_ms=60_000))) == 2
    )  # keeps its ttl
    assert wire.get_value(fn["kv.get"](wire.kv_get("profiles", "short"))) == b"v"
    time.sleep(0.3)
    assert wire.get_value(fn["kv.get"](wire.kv_get("profiles", "short"))) is None
    assert wire.get_value(fn["kv.get"](wire.kv_get("profiles", "n"))) is None
    assert wire.get_value(fn["kv.get"](wire.kv_get("profiles", "long"))) == b"v"
    assert wire.list_keys(fn["kv.list"](wire.kv_list("profiles"))) == ([b"long"], False)
    assert wire.incr_total(fn["kv.incr"](wire.kv_incr("profiles", "n", 1))) == 1  # a new counter


def test_isolation_between_namespaces_and_filters(state: SharedState) -> None:
    edge = EdgeData(state.edge, NAMESPACES, {})
    a = edge.functions("a", kv=("flags",))
    b = edge.functions("b", kv=("profiles",))
    assert wire.result(a["kv.set"](wire.kv_set("flags", "k", "from a"))).ok
    assert wire.result(b["kv.set"](wire.kv_set("profiles", "k", "from b"))).ok
    assert wire.get_value(a["kv.get"](wire.kv_get("flags", "k"))) == b"from a"
    assert wire.get_value(b["kv.get"](wire.kv_get("profiles", "k"))) == b"from b"
    for op, args in (
        ("kv.get", wire.kv_get("profiles", "k")),
        ("kv.set", wire.kv_set("profiles", "k", "x")),
        ("kv.delete", wire.kv_delete("profiles", "k")),
        ("kv.incr", wire.kv_incr("profiles", "k")),
        ("kv.list", wire.kv_list("profiles")),
    ):
        code, reason = wire.error(a[op](args))
        assert code == ErrorCode.DENIED and "'profiles' is not granted to filter 'a'" in reason
    code, reason = wire.error(a["kv.get"](wire.kv_get("nope", "k")))
    assert code == ErrorCode.DENIED and "no namespace 'nope' is declared" in reason
    assert wire.get_value(b["kv.get"](wire.kv_get("profiles", "k"))) == b"from b"  # untouched by a's attempts
    # Namespaces whose names are prefixes of one another do not see each other's keys.
    nested = {"p": KVNamespaceConfig(name="p"), "p2": KVNamespaceConfig(name="p2")}
    c = EdgeData(state.edge, nested, {}).functions("c", kv=("p", "p2"))
    assert wire.result(c["kv.set"](wire.kv_set("p2", "x", "1"))).ok
    assert wire.list_keys(c["kv.list"](wire.kv_list("p"))) == ([], False)


def test_limits(state: SharedState) -> None:
    fn = functions(state)
    code, reason = wire.error(fn["kv.set"](wire.kv_set("flags", "k" * 17, "v")))
    assert code == ErrorCode.LIMIT and "key of 17 bytes exceeds kv.flags.max_key_bytes (16)" in reason
    code, reason = wire.error(fn["kv.get"](wire.kv_get("flags", "k" * 17)))
    assert code == ErrorCode.LIMIT
    code, reason = wire.error(fn["kv.set"](wire.kv_set("flags", "k", "v" * 33)))
    assert code == ErrorCode.LIMIT and "value of 33 bytes exceeds kv.flags.max_value_bytes (32)" in reason
    for i in range(5):
        assert wire.result(fn["kv.set"](wire.kv_set("flags", f"k{i}", "v"))).ok
    code, reason = wire.error(fn["kv.set"](wire.kv_set("flags", "k5", "v")))
    assert code == ErrorCode.LIMIT and "holds kv.flags.max_keys (5) keys" in reason
    code, _ = wire.error(fn["kv.incr"](wire.kv_incr("flags", "k5")))
    assert code == ErrorCode.LIMIT
    assert wire.result(fn["kv.set"](wire.kv_set("flags", "k4", "overwrite"))).ok  # existing keys still write
    assert wire.list_keys(fn["kv.list"](wire.kv_list("flags"))) == ([b"k0", b"k1", b"k2"], True)  # max_list 3
    assert wire.list_keys(fn["kv.list"](wire.kv_list("flags", limit=2))) == ([b"k0", b"k1"], True)
    assert wire.list_keys(fn["kv.list"](wire.kv_list("flags", "k4"))) == ([b"k4"], False)
    assert fn["kv.delete"](wire.kv_delete("flags", "k0")) == b"\x01\x00\x01"
    assert wire.result(fn["kv.set"](wire.kv_set("flags", "k5", "v"))).ok  # room again


def test_error_results(state: SharedState) -> None:
    fn = functions(state)
    cases = [
        (b"", "empty arguments"),
        (b"\x02" + wire.kv_get("flags", "k")[1:], "encoding version 2 is not supported"),
        (wire.kv_get("flags", "k")[:-1], "arguments end inside key"),
        (wire.kv_get("flags", "k") + b"\x00", "1 unexpected bytes after the arguments"),
        (wire.kv_get("flags", ""), "empty key"),
    ]
    for args, expected in cases:
        code, reason = wire.error(fn["kv.get"](args))
        assert code == ErrorCode.BAD_REQUEST and expected in reason, (args, reason)
    assert wire.result(fn["kv.set"](wire.kv_set("profiles", "word", "abc"))).ok
    code, reason = wire.error(fn["kv.incr"](wire.kv_incr("profiles", "word")))
    assert code == ErrorCode.CONFLICT and "not an integer" in reason
    # No namespace declared at all: every kv function answers a reason, never a trap.
    bare = EdgeData(None, {}, {}).functions("f")
    code, reason = wire.error(bare["kv.get"](wire.kv_get("flags", "k")))
    assert code == ErrorCode.DENIED and "no KV namespace is declared" in reason


def test_ttl_is_clamped_to_the_namespace_maximum(state: SharedState) -> None:
    ns = {"short": KVNamespaceConfig(name="short", default_ttl_seconds=0.1, max_ttl_seconds=0.2)}
    fn = EdgeData(state.edge, ns, {}).functions("f", kv=("short",))
    assert wire.result(fn["kv.set"](wire.kv_set("short", "a", "v", ttl_ms=3_600_000))).ok  # clamped to 0.2 s
    assert wire.result(fn["kv.set"](wire.kv_set("short", "b", "v"))).ok  # default 0.1 s
    time.sleep(0.35)
    assert wire.get_value(fn["kv.get"](wire.kv_get("short", "a"))) is None
    assert wire.get_value(fn["kv.get"](wire.kv_get("short", "b"))) is None


@pytest.mark.parametrize("backend", ["redis"])
def test_redis_down_answers_unavailable(backend: str) -> None:
    from tests.conftest import free_port
    from wasm_gateway.state import StateConfig, open_state

    state = open_state(
        StateConfig(backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0", timeout_ms=50)
    )
    try:
        fn = functions(state)
        code, reason = wire.error(fn["kv.get"](wire.kv_get("flags", "k")))
        assert code == ErrorCode.UNAVAILABLE and "redis" in reason
        code, _ = wire.error(fn["kv.set"](wire.kv_set("flags", "k", "v")))
        assert code == ErrorCode.UNAVAILABLE
    finally:
        state.close()


def test_incr_beyond_64_bits_is_a_conflict_not_a_backend_failure(state: SharedState) -> None:
    fn = functions(state)
    assert wire.incr_total(fn["kv.incr"](wire.kv_incr("profiles", "big", 2**63 - 1))) == 2**63 - 1
    code, reason = wire.error(fn["kv.incr"](wire.kv_incr("profiles", "big", 1)))
    assert code == ErrorCode.CONFLICT and "64-bit" in reason, reason
    assert state.healthy  # Redis is not marked down by a filter's arithmetic
    assert wire.result(fn["kv.set"](wire.kv_set("profiles", "other", "v"))).ok


def test_filter_harness_serves_edge_data(zig_probe: Path) -> None:
    from wasm_gateway.runtime.services import SharedServices
    from wasm_gateway.state import StateConfig, open_state
    from wasm_gateway.testing import FilterHarness

    state = open_state(StateConfig(backend="memory"))
    edge = EdgeData(state.edge, NAMESPACES, {})
    try:
        with FilterHarness.from_file(zig_probe, kv=("flags",), shared=SharedServices(edge=edge)) as h:
            stored = h.request(
                path="/", headers=[("x-op", "set"), ("x-ns", "flags"), ("x-key", "k"), ("x-value", "v")]
            )
            assert (stored.response_status, stored.response_body) == (200, b"stored")
            got = h.request(path="/", headers=[("x-op", "get"), ("x-ns", "flags"), ("x-key", "k")])
            assert (got.response_status, got.response_body) == (200, b"v")
        assert (
            edge.functions("other", kv=("flags",))["kv.get"](wire.kv_get("flags", "k"))
            == b"\x01\x00\x01\x00\x00\x00v"
        )
    finally:
        state.close()


def _fill(directory: str, worker: int) -> int:
    """In a separate process: try to create 20 keys in a namespace bounded to 10; how many were accepted."""
    from wasm_gateway.state import StateConfig, open_state

    state = open_state(StateConfig(backend="local", path=Path(directory)))
    try:
        fn = EdgeData(state.edge, {"tight": KVNamespaceConfig(name="tight", max_keys=10)}, {}).functions(
            "f", kv=("tight",)
        )
        return sum(
            wire.result(fn["kv.set"](wire.kv_set("tight", f"w{worker}-{i}", "v"))).ok for i in range(20)
        )
    finally:
        state.close()


def test_namespace_bound_is_exact_across_processes(tmp_path: Path) -> None:
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=context) as pool:
        accepted = list(pool.map(_fill, [str(tmp_path / "state")] * 4, range(4)))
    assert sum(accepted) == 10, accepted


def test_a_host_without_edge_data_is_an_error_result_in_the_filter(zig_probe: Path) -> None:
    from wasm_gateway.testing import FilterHarness

    # No edge data at all: kv.get is an unknown foreign function (NOT_FOUND), which the binding reports.
    with FilterHarness.from_file(zig_probe) as h:
        r = h.request(path="/", headers=[("x-op", "get"), ("x-ns", "flags"), ("x-key", "k")])
    assert r.response_status == 500
    assert ("x-edge-code", "8") in r.response_headers
    assert b"no edge-data functions" in r.response_body
