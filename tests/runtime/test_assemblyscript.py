"""Compatibility proof: Proxy-Wasm filters built with the AssemblyScript SDK from npm run unchanged.

The filters in tests/fixtures/assemblyscript/assembly are compiled here with `@solo-io/proxy-runtime`
0.1.8 and `assemblyscript` 0.14 (pinned by that folder's package-lock.json) and driven through
`wasm_gateway.testing.FilterHarness`. Node.js and npm are required: without them the tests fail.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from tests.fixtures.assemblyscript.build import (
    DEFAULT_OUT_DIR,
    FILTER_NAMES,
    AssemblyScriptBuildError,
    build_all,
)
from wasm_gateway.runtime.context import HttpCallRequest
from wasm_gateway.testing import FilterHarness

Pairs = Sequence[tuple[str, str]]

LOG_INFO = 2


@pytest.fixture(scope="session")
def as_filters() -> dict[str, Path]:
    try:
        return build_all(DEFAULT_OUT_DIR)
    except AssemblyScriptBuildError as exc:
        pytest.fail(f"cannot build the AssemblyScript filter fixtures: {exc}", pytrace=False)


LoadHarness = Callable[..., FilterHarness]


@pytest.fixture
def load() -> Iterator[LoadHarness]:
    """`FilterHarness.from_file`, with every harness closed when the test ends."""
    opened: list[FilterHarness] = []

    def open_harness(path: Path, **kwargs: Any) -> FilterHarness:
        harness = FilterHarness.from_file(path, **kwargs)
        opened.append(harness)
        return harness

    yield open_harness
    for harness in opened:
        harness.close()


def values(headers: Pairs, name: str) -> list[str]:
    """Every value of header `name` (case-insensitive), in order."""
    return [v for k, v in headers if k.lower() == name]


def single(headers: Pairs, name: str) -> str:
    found = values(headers, name)
    assert len(found) == 1, f"expected one {name!r} header, got {found!r} in {list(headers)!r}"
    return found[0]


# --- what the compiled modules need from a host ------------------------------------------------

SDK_BASE_IMPORTS = {
    ("env", "proxy_log"),
    ("env", "proxy_get_property"),  # plugin_root_id, read by the SDK to pick the root context
    ("env", "proxy_get_buffer_bytes"),  # plugin configuration, read by the SDK's onConfigure
    ("env", "proxy_set_effective_context"),
    ("wasi_unstable", "proc_exit"),  # the SDK's abort handler
}

# Host functions each filter exists to exercise: a fixture edit cannot silently stop covering them.
EXERCISED_IMPORTS = {
    "headers": {
        "proxy_add_header_map_value",
        "proxy_replace_header_map_value",
        "proxy_remove_header_map_value",
        "proxy_get_header_map_value",
        "proxy_get_header_map_pairs",
        "proxy_set_header_map_pairs",
    },
    "properties": {"proxy_get_property", "proxy_get_buffer_bytes", "proxy_get_current_time_nanoseconds"},
    "local_reply": {"proxy_send_local_response", "proxy_get_header_map_value"},
    "authz": {
        "proxy_http_call",
        "proxy_continue_stream",
        "proxy_send_local_response",
        "proxy_get_buffer_bytes",
    },
    "counter": {"proxy_get_shared_data", "proxy_set_shared_data"},
    "edge": {"proxy_call_foreign_function", "proxy_send_local_response", "proxy_get_header_map_value"},
}


@pytest.mark.parametrize("name", FILTER_NAMES)
def test_sdk_module_shape(as_filters: dict[str, Path], name: str) -> None:
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(as_filters[name]))
    imports = {(i.module, i.name) for i in module.imports}
    exports = {e.name for e in module.exports}

    assert imports >= SDK_BASE_IMPORTS
    assert {("env", n) for n in EXERCISED_IMPORTS[name]} <= imports
    assert {m for m, _ in imports} == {"env", "wasi_unstable"}
    # The SDK speaks ABI 0.2.0 and takes host data through `malloc`, not proxy_on_memory_allocate.
    assert {"proxy_abi_version_0_2_0", "malloc", "memory", "proxy_on_context_create"} <= exports
    assert "proxy_on_memory_allocate" not in exports


# --- (a) headers: add / replace / remove ----------------------------------------------------------


def test_headers_filter_edits_request_and_response_headers(
    as_filters: dict[str, Path], load: LoadHarness
) -> None:
    harness = load(as_filters["headers"])
    result = harness.request(
        method="GET",
        path="/items?id=7",
        headers=[
            ("host", "shop.test"),
            ("user-agent", "pytest"),
            ("x-as-replaced", "old-value"),
            ("x-as-removed", "bye"),
        ],
        response=(
            200,
            [("content-type", "text/plain"), ("server", "origin"), ("x-upstream-secret", "s3cret")],
            b"hello",
        ),
    )

    assert result.local_response is None
    upstream = result.request_headers
    assert values(upstream, "x-as-added") == ["request"]
    assert values(upstream, "x-as-replaced") == ["new-value"]
    assert values(upstream, "x-as-replace-absent") == ["created"]
    assert values(upstream, "x-as-removed") == []
    assert values(upstream, "x-as-never-there") == []
    assert values(upstream, "user-agent") == ["pytest"]
    # Pseudo-headers as Envoy shows them to filters; an absent header reads as empty.
    assert single(upstream, "x-as-seen-method") == "GET"
    assert single(upstream, "x-as-seen-path") == "/items?id=7"
    assert single(upstream, "x-as-seen-authority") == "shop.test"
    assert single(upstream, "x-as-seen-missing") == "[]"
    assert int(single(upstream, "x-as-header-count")) >= 4
    assert single(upstream, "x-as-end-of-stream") == "true"

    assert result.response_status == 200
    assert result.response_body == b"hello"
    client = result.response_headers
    assert not [k for k, _ in client if k.startswith(":")], "pseudo-headers leaked to the client"
    assert values(client, "x-as-response-added") == ["yes"]
    assert values(client, "server") == ["assemblyscript"]
    assert values(client, "x-upstream-secret") == []
    assert values(client, "content-type") == ["text/plain"]
    assert single(client, "x-as-seen-status") == "200"
    assert values(client, "x-as-set-pairs-status") == []
    # The whole-map read returned :status like Envoy, and the whole-map write kept every pair.
    names = single(client, "x-as-pair-names").split(",")
    assert ":status" in names
    assert {"content-type", "server", "x-as-response-added", "x-as-seen-status"} <= set(names)
    assert "x-upstream-secret" not in names

    # Envoy's stream lifecycle, as the SDK logs it: create, then done -> log -> delete.
    lifecycle = [
        message
        for _, message in result.logs
        if message.startswith("Registering new context")
        or message.endswith(("onDone()", "onLog()", "onDelete()"))
    ]
    assert len(lifecycle) == 4, result.logs
    context_id = lifecycle[0].split("context_id: ")[1].split(" ")[0]
    assert lifecycle[1:] == [
        f"context id: {context_id}: {hook}()" for hook in ("onDone", "onLog", "onDelete")
    ]


def test_headers_filter_sees_end_of_stream_false_when_a_body_follows(
    as_filters: dict[str, Path], load: LoadHarness
) -> None:
    harness = load(as_filters["headers"])
    result = harness.request(
        method="POST",
        path="/upload",
        headers=[("host", "shop.test"), ("content-type", "application/octet-stream")],
        body=b"payload",
        response=(204, [], b""),
    )

    assert single(result.request_headers, "x-as-end-of-stream") == "false"
    assert single(result.request_headers, "x-as-seen-method") == "POST"
    assert result.request_body == b"payload"
    assert result.response_status == 204


# --- (b) properties and configuration --------------------------------------------------------------


def test_properties_filter_reads_properties_and_configuration(
    as_filters: dict[str, Path], load: LoadHarness
) -> None:
    harness = load(
        as_filters["properties"],
        configuration=b'{"mode":"echo"}',
        root_id="properties",
        vm_configuration=b"vm-settings",
        name="props-under-test",
    )
    before_ns = time.time_ns()
    result = harness.request(
        method="PUT",
        path="/orders/42?expand=1",
        headers=[("host", "shop.test")],
        response=(201, [("content-type", "application/json")], b"{}"),
    )
    after_ns = time.time_ns()

    assert result.local_response is None, result.logs
    upstream = result.request_headers
    assert single(upstream, "x-prop-request-path") == "/orders/42?expand=1"
    assert single(upstream, "x-prop-request-method") == "PUT"
    assert single(upstream, "x-prop-plugin-root-id") == "properties"
    assert single(upstream, "x-prop-plugin-name") == "props-under-test"
    assert single(upstream, "x-plugin-config") == '{"mode":"echo"}'
    assert single(upstream, "x-vm-config") == "vm-settings"
    # Envoy's source.address is the client's "ip:port".
    source = single(upstream, "x-prop-source-address")
    host, colon, port = source.rpartition(":")
    assert colon and port.isdigit(), f"source.address should be Envoy's 'ip:port', got {source!r}"
    ipaddress.ip_address(host.strip("[]"))
    assert single(upstream, "x-prop-source-port") == port
    # The host clock is wall-clock time in nanoseconds (a correctness check, not a timing one).
    assert before_ns - 60 * 10**9 <= int(single(upstream, "x-now-ns")) <= after_ns + 60 * 10**9

    assert result.response_status == 201
    # response.code arrives as an 8-byte little-endian integer, decoded by the filter.
    assert single(result.response_headers, "x-prop-response-code") == "201"
    assert (LOG_INFO, "properties filter saw path /orders/42?expand=1") in result.logs


# --- (c) local responses ----------------------------------------------------------------------------


def test_local_reply_filter_answers_matching_paths_itself(
    as_filters: dict[str, Path], load: LoadHarness
) -> None:
    harness = load(as_filters["local_reply"], configuration=b"/local", root_id="local_reply")
    upstream_answer = (200, [("content-type", "text/plain")], b"from upstream")

    answered = harness.request(
        method="GET", path="/local/ping", headers=[("host", "a")], response=upstream_answer
    )
    assert answered.local_response is not None, answered.logs
    status, headers, body = answered.local_response
    assert status == 418
    assert body == b"answered locally for /local/ping\n"
    assert values(headers, "x-as-local") == ["1"]
    assert values(headers, "content-type") == ["text/plain; charset=utf-8"]
    assert answered.response_status == 418
    assert answered.response_body == b"answered locally for /local/ping\n"
    assert values(answered.response_headers, "x-as-local") == ["1"]

    # The same instance then lets another path through to the upstream.
    passed = harness.request(
        method="GET", path="/api/ping", headers=[("host", "a")], response=upstream_answer
    )
    assert passed.local_response is None
    assert values(passed.request_headers, "x-as-local-passed") == ["1"]
    assert passed.response_status == 200
    assert passed.response_body == b"from upstream"
    assert values(passed.response_headers, "x-as-local") == []


# --- (d) http_call, pause, then resume or deny -----------------------------------------------------


class AuthzService:
    """The `authz` upstream: allows `Bearer good`, denies anything else; records what it was sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, list[tuple[str, str]], bytes]] = []

    def __call__(self, req: HttpCallRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = list(req.headers)
        self.calls.append((req.method, req.path, req.authority, headers, bytes(req.body)))
        if values(headers, "x-original-authorization") == ["Bearer good"]:
            return 200, [("x-auth-user", "alice")], b"ok"
        return 401, [("content-type", "text/plain")], b"bad token"


def test_authz_filter_resumes_the_request_after_an_allowing_http_call(
    as_filters: dict[str, Path], load: LoadHarness
) -> None:
    service = AuthzService()
    harness = load(as_filters["authz"], configuration=b"authz", root_id="authz")
    result = harness.request(
        method="GET",
        path="/orders",
        headers=[("host", "shop.test"), ("authorization", "Bearer good")],
        response=(200, [("content-type", "text/plain")], b"orders"),
        http_calls={"authz": service},
    )

    assert len(service.calls) == 1
    method, path, authority, headers, body = service.calls[0]
    assert (method, path, authority) == ("POST", "/check", "authz.internal")
    assert values(headers, "x-original-path") == ["/orders"]
    assert values(headers, "x-original-authorization") == ["Bearer good"]
    assert body == b"check /orders"

    assert result.local_response is None, result.logs
    # Headers added from the http_call response, in the callback, after the pause.
    assert values(result.request_headers, "x-auth-user") == ["alice"]
    assert values(result.request_headers, "x-auth-body") == ["ok"]
    assert result.response_status == 200
    assert result.response_body == b"orders"
    assert values(result.response_headers, "x-as-authz") == ["allowed"]


def test_authz_filter_denies_locally_after_a_refusing_http_call(
    as_filters: dict[str, Path], load: LoadHarness
) -> None:
    service = AuthzService()
    harness = load(as_filters["authz"], configuration=b"authz", root_id="authz")
    result = harness.request(
        method="GET",
        path="/orders",
        headers=[("host", "shop.test"), ("authorization", "Bearer stolen")],
        response=(200, [], b"orders"),
        http_calls={"authz": service},
    )

    assert len(service.calls) == 1
    assert result.local_response is not None, result.logs
    status, headers, body = result.local_response
    assert status == 403
    assert body == b"denied: bad token"
    assert values(headers, "x-authz-status") == ["401"]
    assert result.response_status == 403
    assert result.response_body == b"denied: bad token"
    assert values(result.response_headers, "x-as-authz") == []


def test_authz_filter_answers_500_when_the_host_refuses_the_upstream_name(
    as_filters: dict[str, Path], load: LoadHarness
) -> None:
    service = AuthzService()
    harness = load(
        as_filters["authz"],
        configuration=b"nowhere",
        root_id="authz",
        upstreams=frozenset({"authz"}),
    )
    result = harness.request(
        method="GET",
        path="/orders",
        headers=[("host", "shop.test"), ("authorization", "Bearer good")],
        response=(200, [], b"orders"),
        http_calls={"authz": service},
    )

    assert service.calls == []
    assert result.local_response is not None, result.logs
    status, headers, body = result.local_response
    assert status == 500
    assert body == b"http_call failed\n"
    # proxy_http_call answered BAD_ARGUMENT (2), as Envoy does for an unknown cluster.
    assert values(headers, "x-as-call-result") == ["2"]
    assert not result.upstream_called


def test_authz_filter_answers_503_when_the_http_call_fails(
    as_filters: dict[str, Path], load: LoadHarness
) -> None:
    def unreachable(req: HttpCallRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        raise ConnectionRefusedError(req.authority)

    harness = load(as_filters["authz"], configuration=b"authz", root_id="authz")
    result = harness.request(
        method="GET",
        path="/orders",
        headers=[("host", "shop.test"), ("authorization", "Bearer good")],
        response=(200, [], b"orders"),
        http_calls={"authz": unreachable},
    )

    # The SDK hands the filter's callback zero headers for a failed call.
    assert result.local_response is not None, result.logs
    assert result.local_response[0] == 503
    assert result.local_response[2] == b"authz unavailable\n"
    assert not result.upstream_called


# --- (e) shared data with compare-and-swap ---------------------------------------------------------


def test_counter_filter_counts_requests_in_shared_data(
    as_filters: dict[str, Path], load: LoadHarness
) -> None:
    harness = load(as_filters["counter"], configuration=b"hits", root_id="counter")

    seen = []
    for _ in range(5):
        result = harness.request(method="GET", path="/", headers=[("host", "a")], response=(200, [], b""))
        assert result.local_response is None, result.logs
        headers = result.response_headers
        seen.append(
            (
                single(headers, "x-request-count"),
                single(headers, "x-as-cas-attempts"),
                single(headers, "x-as-cas-stale-write"),
            )
        )

    # The first write (cas 0) is unconditional; every later request proves a stale cas is refused
    # with CAS_MISMATCH (8) and that the refused write did not clobber the count.
    assert seen == [
        ("1", "1", "skipped"),
        ("2", "1", "8"),
        ("3", "1", "8"),
        ("4", "1", "8"),
        ("5", "1", "8"),
    ]
