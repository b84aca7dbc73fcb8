"""Filters in the running gateway: real uvicorn, real origins, real compiled Wasm (inline WAT and SDK-built)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import wasmtime

from tests.conftest import ThreadServer, gateway_server
from tests.fixtures.assemblyscript.build import DEFAULT_OUT_DIR, AssemblyScriptBuildError, build_all
from tests.origins import echo_origin
from tests.runtime.wat import filter_wat, imp

# A filter that adds x-filtered to requests and x-filtered-response to responses, unless the request asks it
# to misbehave: x-trap traps, x-loop spins forever, x-grow eats memory until the limit and then traps.
# The callback time limit (500 ms) is far above what a well-behaved callback takes even on a loaded machine:
# at 50 ms a descheduled request failed as a timeout now and then.
GUARD = filter_wat(
    """
  (data (i32.const 0x400) "x-trap")
  (data (i32.const 0x410) "x-loop")
  (data (i32.const 0x420) "x-grow")
  (data (i32.const 0x430) "x-filtered")
  (data (i32.const 0x440) "1")
  (data (i32.const 0x450) "x-filtered-response")
  (func $has (param $k i32) (result i32)
    (i32.eqz (call $proxy_get_header_map_value
      (i32.const 0) (local.get $k) (i32.const 6) (i32.const 0x100) (i32.const 0x104))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (call $has (i32.const 0x400)) (then unreachable))
    (if (call $has (i32.const 0x410)) (then (loop $l (br $l))))
    (if (call $has (i32.const 0x420)) (then
      (loop $g (br_if $g (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
      unreachable))
    (drop (call $proxy_add_header_map_value
      (i32.const 0) (i32.const 0x430) (i32.const 10) (i32.const 0x440) (i32.const 1)))
    i32.const 0)
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $proxy_add_header_map_value
      (i32.const 2) (i32.const 0x450) (i32.const 19) (i32.const 0x440) (i32.const 1)))
    i32.const 0)
""",
    imports=imp("proxy_get_header_map_value", 5) + imp("proxy_add_header_map_value", 5),
)


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


@pytest.fixture(scope="module")
def guard_wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wasm") / "guard.wasm"
    path.write_bytes(wasmtime.wat2wasm(GUARD))
    return path


def guarded_config(origin_port: int, module: Path, policy: str = "fail_closed", extra: str = "") -> str:
    return f"""
[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]

[filters.guard]
module = "{module}"
failure_policy = "{policy}"
callback_timeout_ms = 500
memory_limit_bytes = 1048576
pool = {{ min = 2, max = 4, borrow_timeout = 5.0 }}
{extra}
[[routes]]
name = "guarded"
path_prefix = "/"
filters = ["guard"]
upstream = "origin"

[log]
access_log = false
"""


def echoed(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def header(data: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in data["headers"] if k == name]


def test_filter_edits_reach_origin_and_client(origin: ThreadServer, guard_wasm: Path, tmp_path: Path) -> None:
    with gateway_server(guarded_config(origin.port, guard_wasm), tmp_path) as gw:
        response = httpx.get(gw.url + "/echo", headers={"x-filtered": "spoofed-by-client"})
        data = echoed(response)
        assert header(data, "x-filtered") == ["spoofed-by-client", "1"]
        assert response.headers["x-filtered-response"] == "1"
        # The guard exports a (pass-through) body callback, so a streamed upload is re-framed as chunked.
        payload = b"z" * 300_000
        data = echoed(httpx.post(gw.url + "/upload", content=payload))
        assert data["body_size"] == len(payload)
        assert header(data, "transfer-encoding") == ["chunked"]


PASS_THROUGH = filter_wat(
    """
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    i32.const 0)
"""
)


@pytest.mark.parametrize("edits", [True, False], ids=["filter-edits-headers", "filter-passes-through"])
def test_host_rewrite_applies_behind_filters(
    origin: ThreadServer, guard_wasm: Path, tmp_path: Path, edits: bool
) -> None:
    # Filters see the client's Host as :authority; the upstream still gets the rewritten one (Envoy's order).
    module = guard_wasm
    if not edits:
        module = tmp_path / "pass.wasm"
        module.write_bytes(wasmtime.wat2wasm(PASS_THROUGH))
    target = f'targets = ["127.0.0.1:{origin.port}"]'
    config = guarded_config(origin.port, module).replace(target, target + '\nhost_header = "rewrite"')
    with gateway_server(config, tmp_path) as gw:
        data = echoed(httpx.get(gw.url + "/echo", headers={"Host": "site.example"}))
        assert header(data, "host") == [f"127.0.0.1:{origin.port}"]
        assert header(data, "x-forwarded-host") == ["site.example"]
        assert bool(header(data, "x-filtered")) is edits


def test_faulty_filter_under_load_fails_exactly_the_affected_requests(
    origin: ThreadServer, guard_wasm: Path, tmp_path: Path
) -> None:
    kinds = ["ok"] * 60 + ["x-trap"] * 10 + ["x-loop"] * 5 + ["x-grow"] * 5
    with gateway_server(guarded_config(origin.port, guard_wasm), tmp_path) as gw:

        def one(kind: str) -> tuple[str, int, dict[str, Any]]:
            headers = {} if kind == "ok" else {kind: "1"}
            r = httpx.get(gw.url + "/echo", headers=headers, timeout=20)
            return kind, r.status_code, r.json()

        def health() -> int:
            return httpx.get(gw.url + "/healthz", timeout=20).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, k) for k in kinds[::3] + kinds[1::3] + kinds[2::3]]
            checks = [pool.submit(health) for _ in range(20)]
            results = [f.result() for f in futures]
            assert [c.result() for c in checks] == [200] * 20
        for kind, status, body in results:
            if kind == "ok":
                assert status == 200 and header(body, "x-filtered") == ["1"], (kind, status, body)
            else:
                assert status == 503, (kind, status, body)
                assert body["error"] == "filter_failed" and body["filter"] == "guard"
        metrics = httpx.get(gw.url + "/metrics").text
        faults = dict(
            re.findall(r'wasm_gateway_filter_faults_total\{filter="guard",kind="(\w+)"\} (\S+)', metrics)
        )
        assert float(faults["trap"]) == 15  # 10 traps + 5 memory-exhausted traps
        assert float(faults["timeout"]) == 5
        assert (
            'wasm_gateway_filter_policy_decisions_total{decision="fail_closed",filter="guard"} 20.0'
            in metrics
        )


def test_fail_open_continues_without_the_filter(
    origin: ThreadServer, guard_wasm: Path, tmp_path: Path
) -> None:
    with gateway_server(guarded_config(origin.port, guard_wasm, policy="fail_open"), tmp_path) as gw:
        data = echoed(httpx.get(gw.url + "/echo", headers={"x-trap": "1"}))
        assert header(data, "x-filtered") == []  # nothing of the failed filter's edit applied
        assert header(echoed(httpx.get(gw.url + "/echo")), "x-filtered") == ["1"]


def test_bad_module_fails_startup_with_its_name(origin: ThreadServer, tmp_path: Path) -> None:
    from wasm_gateway.app import Gateway
    from wasm_gateway.config import load_config
    from wasm_gateway.exceptions import FilterLoadError

    bad = tmp_path / "bad.wasm"
    bad.write_bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1))'))
    (tmp_path / "g.toml").write_text(guarded_config(origin.port, bad))
    gateway = Gateway(load_config(tmp_path / "g.toml"))
    import asyncio

    with pytest.raises(FilterLoadError, match=r"bad\.wasm"):
        asyncio.run(gateway.startup())


# -- SDK-built filters (AssemblyScript, @solo-io/proxy-runtime) through the gateway --------------------------


@pytest.fixture(scope="module")
def as_filters() -> dict[str, Path]:
    try:
        return build_all(DEFAULT_OUT_DIR)
    except AssemblyScriptBuildError as exc:
        pytest.fail(f"cannot build the AssemblyScript filter fixtures: {exc}", pytrace=False)


async def authz_service(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The `authz` upstream: allows `Bearer good`."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = dict(scope["headers"])
    if headers.get(b"x-original-authorization") == b"Bearer good":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-auth-user", b"alice")]})
        await send({"type": "http.response.body", "body": b"ok"})
    else:
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b"bad token"})


def sdk_config(origin_port: int, authz_port: int, filters: dict[str, Path]) -> str:
    return f"""
[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]
[upstreams.authz]
targets = ["127.0.0.1:{authz_port}"]

[filters.headers]
module = "{filters["headers"]}"
[filters.local_reply]
module = "{filters["local_reply"]}"
root_id = "local_reply"
configuration = "/local/"
[filters.authz]
module = "{filters["authz"]}"
root_id = "authz"
configuration = "authz"
[filters.counter]
module = "{filters["counter"]}"
root_id = "counter"
configuration = "hits"

[[routes]]
name = "headers"
path_prefix = "/headers"
filters = ["headers"]
upstream = "origin"
[[routes]]
name = "local"
path_prefix = "/local"
filters = ["local_reply"]
upstream = "origin"
[[routes]]
name = "orders"
path_prefix = "/orders"
filters = ["authz"]
upstream = "origin"
[[routes]]
name = "counted"
path_prefix = "/counted"
filters = ["counter", "headers"]
upstream = "origin"

[log]
access_log = false
"""


@pytest.fixture(scope="module")
def sdk_gateway(
    origin: ThreadServer, as_filters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadServer]:
    with (
        ThreadServer(authz_service) as authz,
        gateway_server(sdk_config(origin.port, authz.port, as_filters), tmp_path_factory.mktemp("sdk")) as gw,
    ):
        yield gw


def test_sdk_headers_filter_through_gateway(sdk_gateway: ThreadServer) -> None:
    response = httpx.get(
        sdk_gateway.url + "/headers/x", headers={"x-as-removed": "1", "x-as-replaced": "old"}
    )
    data = echoed(response)
    assert header(data, "x-as-added") != []
    assert header(data, "x-as-removed") == []
    assert len(header(data, "x-as-replaced")) == 1 and header(data, "x-as-replaced") != ["old"]
    assert response.headers["x-as-response-added"]
    assert response.headers["server"] == "assemblyscript"


def test_sdk_filter_sees_and_forwards_a_streamed_body(sdk_gateway: ThreadServer) -> None:
    payload = bytes(range(256)) * 2000  # 512 KB, streamed through a chain that exports body callbacks
    data = echoed(httpx.post(sdk_gateway.url + "/headers/upload", content=payload))
    assert data["body_size"] == len(payload)
    assert data["body_sha256"] == hashlib.sha256(payload).hexdigest()


def test_sdk_local_reply_through_gateway(sdk_gateway: ThreadServer) -> None:
    response = httpx.get(sdk_gateway.url + "/local/thing")
    assert response.status_code == 418
    assert response.text == "answered locally for /local/thing\n"
    assert response.headers["x-as-local"] == "1"
    assert response.headers["x-request-id"]


def test_sdk_http_call_then_resume_or_deny(sdk_gateway: ThreadServer) -> None:
    allowed = httpx.get(sdk_gateway.url + "/orders", headers={"authorization": "Bearer good"})
    data = echoed(allowed)
    assert header(data, "x-auth-user") == ["alice"]
    assert allowed.headers["x-as-authz"] == "allowed"
    denied = httpx.get(sdk_gateway.url + "/orders", headers={"authorization": "Bearer bad"})
    assert denied.status_code == 403
    assert "bad token" in denied.text


def test_sdk_shared_data_counter_through_gateway(sdk_gateway: ThreadServer) -> None:
    counts = [int(httpx.get(sdk_gateway.url + "/counted").headers["x-request-count"]) for _ in range(5)]
    assert counts == list(range(counts[0], counts[0] + 5))


def test_filters_on_an_app_route_in_middleware_mode(guard_wasm: Path, tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from wasm_gateway import WasmGateway
    from wasm_gateway.config import parse_config

    async def show(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"filtered": request.headers.get("x-filtered"), "body": len(body)})

    app = Starlette(routes=[Route("/{p:path}", show, methods=["GET", "POST"])])
    config = parse_config(
        f"""
[filters.guard]
module = "{guard_wasm}"
callback_timeout_ms = 50
[[routes]]
name = "app"
path_prefix = "/"
filters = ["guard"]
app = true
[log]
access_log = false
""",
        env={},
    )
    with ThreadServer(WasmGateway(app, config=config)) as server:
        response = httpx.get(server.url + "/x")
        assert response.json() == {"filtered": "1", "body": 0}
        assert response.headers["x-filtered-response"] == "1"
        assert int(response.headers["content-length"]) == len(response.content)
        response = httpx.post(server.url + "/x", content=b"a" * 100_000)
        assert response.json() == {"filtered": "1", "body": 100_000}
        trapped = httpx.get(server.url + "/x", headers={"x-trap": "1"})
        assert trapped.status_code == 503 and trapped.json()["filter"] == "guard"


def test_response_body_filters_see_small_answers_whole_and_keep_their_length(
    origin: ThreadServer, tmp_path: Path
) -> None:
    edits = '[{ op = "set", pointer = "/edited", value = true }]'
    config = f"""
[upstreams.origin]
targets = ["127.0.0.1:{origin.port}"]

[filters.t]
module = "builtin:transform"
configuration = {{ response = {{ body = {{ edits = {edits} }} }} }}

[[routes]]
name = "r"
path_prefix = "/"
upstream = "origin"
filters = ["t"]
"""
    with gateway_server(config, tmp_path) as gw:
        response = httpx.get(gw.url + "/echo")
        assert response.json()["edited"] is True
        assert response.headers["content-length"] == str(len(response.content))
        assert "transfer-encoding" not in response.headers
        head = httpx.head(gw.url + "/echo")
        assert head.status_code == 200 and head.content == b""
        streamed = httpx.get(gw.url + "/big?n=300000")  # not JSON, streamed: passed on as it comes
        assert streamed.status_code == 200 and len(streamed.content) == 300_000
    # Header edits only: the module still has body callbacks, which pass the small body on untouched.
    config = config.replace(f"body = {{ edits = {edits} }}", 'headers = { set = { x-t = "1" } }')
    with gateway_server(config, tmp_path) as gw:
        response = httpx.get(gw.url + "/echo")
        assert response.headers["x-t"] == "1"
        assert response.headers["content-length"] == str(len(response.content))
