"""JavaScript filters in the running gateway: the examples in examples/js/ on real uvicorn and a real origin."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ThreadServer, gateway_server
from tests.origins import echo_origin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "js"


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


def examples_config(tmp_path: Path, origin_port: int, extra: str = "") -> str:
    """examples/js/gateway.toml pointed at the test origin, its scripts next to it."""
    for script in EXAMPLES.glob("*.js"):
        shutil.copyfile(script, tmp_path / script.name)
    text = (EXAMPLES / "gateway.toml").read_text().replace("127.0.0.1:9000", f"127.0.0.1:{origin_port}")
    return text + extra + "\n[log]\naccess_log = false\n"


def echoed(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def header(data: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in data["headers"] if k == name]


def test_examples_through_the_gateway(origin: ThreadServer, tmp_path: Path) -> None:
    with (
        gateway_server(examples_config(tmp_path, origin.port), tmp_path) as gw,
        httpx.Client(base_url=gw.url, timeout=10) as c,
    ):
        # hello.js: a local JSON answer with ctx.env, and header edits both ways
        r = c.get("/api/hello")
        assert r.status_code == 200 and r.json() == {"message": "hello from the edge", "region": "eu-west"}
        assert r.headers["content-type"] == "application/json"
        r = c.get("/echo", headers={"x-edge": "spoofed"})
        assert header(echoed(r), "x-edge") == ["js"] and r.headers["x-served-by"] == "js"

        # health.js: fetch() to the upstream named "origin", then a local answer
        r = c.get("/edge/health")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok" and r.json()["upstream"] == 200
        assert r.headers["cache-control"] == "no-store"

        # headers.js then transform.js on /orders: header rewrite, JSON body transform both ways
        body = {"item": "book", "password": "hunter2"}
        r = c.post("/orders/new", json=body, headers={"x-user": "ada", "x-internal-debug": "1"})
        assert r.status_code == 200, r.text
        wrapped = r.json()
        assert wrapped["served_by"] == "edge"
        seen = wrapped["data"]
        assert header(seen, "x-shop-user") == ["ada"] and header(seen, "x-user") == []
        assert header(seen, "x-internal-debug") == []
        assert re.fullmatch(r"[0-9a-f-]{36}", header(seen, "x-request-uuid")[0])
        assert seen["method"] == "POST" and seen["path"] == "/orders/new"
        assert seen["body_size"] == int(header(seen, "content-length")[0])
        r = c.post("/orders/new", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json() == {"error": "invalid_json"}


LOOPING = """
export async function onRequest(request) {
  if (request.headers.has("x-loop")) for (;;) {}
  if (request.headers.has("x-throw")) throw new Error("script bug");
  if (request.headers.has("x-reject")) await Promise.reject(new TypeError("rejected"));
  request.headers.set("x-js", "1");
}
"""


def looping_config(tmp_path: Path, origin_port: int, policy: str = "fail_closed") -> str:
    (tmp_path / "loop.js").write_text(LOOPING)
    return f"""
[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]

[filters.edge]
module = "builtin:js"
failure_policy = "{policy}"
callback_timeout_ms = 100
pool = {{ min = 2, max = 4, borrow_timeout = 5.0 }}
configuration = {{ script = "loop.js" }}

[[routes]]
upstream = "origin"
filters = ["edge"]

[log]
access_log = false
"""


def test_endless_loop_is_cut_off_while_other_requests_succeed(origin: ThreadServer, tmp_path: Path) -> None:
    kinds = ["ok"] * 24 + ["x-loop"] * 3 + ["x-throw"] * 3 + ["x-reject"] * 3
    with gateway_server(looping_config(tmp_path, origin.port), tmp_path) as gw:

        def one(kind: str) -> tuple[str, int, dict[str, Any]]:
            r = httpx.get(gw.url + "/echo", headers={} if kind == "ok" else {kind: "1"}, timeout=30)
            return kind, r.status_code, r.json()

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, kinds[::2] + kinds[1::2]))
        for kind, status, body in results:
            if kind == "ok":
                assert status == 200 and header(body, "x-js") == ["1"], (kind, status, body)
            else:
                assert status == 503 and body == {"error": "filter_failed", "filter": "edge", "status": 503}
        metrics = httpx.get(gw.url + "/metrics").text
        faults = dict(
            re.findall(r'wasm_gateway_filter_faults_total\{filter="edge",kind="(\w+)"\} (\S+)', metrics)
        )
        assert float(faults["timeout"]) == 3 and float(faults["trap"]) == 6  # script errors end in a trap


def test_fail_open_passes_the_request_on_untouched(origin: ThreadServer, tmp_path: Path) -> None:
    with gateway_server(looping_config(tmp_path, origin.port, "fail_open"), tmp_path) as gw:
        for trigger in ("x-throw", "x-reject"):
            data = echoed(httpx.get(gw.url + "/echo", headers={trigger: "1"}, timeout=10))
            assert header(data, "x-js") == [] and header(data, trigger) == ["1"]
        assert header(echoed(httpx.get(gw.url + "/echo", timeout=10)), "x-js") == ["1"]


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wasm_gateway", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_check_reports_script_syntax_errors_with_file_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "edge.js").write_text("export function onRequest(request) {\n  return new Response(;\n}\n")
    config = tmp_path / "g.toml"
    config.write_text(
        '[upstreams.o]\ntargets = ["127.0.0.1:1"]\n'
        '[filters.edge]\nmodule = "builtin:js"\nconfiguration = { script = "edge.js" }\n'
        '[[routes]]\nupstream = "o"\nfilters = ["edge"]\n'
    )
    result = run_check(config)
    assert result.returncode == 1
    assert "edge.js:2:23: SyntaxError" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "edge.js").write_text("export function onRequest() {}\n")
    assert run_check(config).returncode == 0


def test_configuration_errors_name_the_key(tmp_path: Path) -> None:
    from wasm_gateway.config import load_config
    from wasm_gateway.exceptions import ConfigError

    config = tmp_path / "g.toml"
    base = '[upstreams.o]\ntargets = ["127.0.0.1:1"]\n[[routes]]\nupstream = "o"\nfilters = ["edge"]\n'
    config.write_text(
        '[filters.edge]\nmodule = "builtin:js"\nconfiguration = { script = "missing.js" }\n' + base
    )
    with pytest.raises(ConfigError, match=r"filters\.edge\.configuration\.script: cannot read .*missing\.js"):
        load_config(config)
    config.write_text(
        '[filters.edge]\nmodule = "builtin:js"\nconfiguration = { source = "x", script = "y.js", bogus = 1 }\n'
        + base
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "filters.edge.configuration: give either script" in str(info.value)
    assert "filters.edge.configuration.bogus: unknown key" in str(info.value)
    # inline source is not ${}-interpolated: template literals stay JavaScript
    config.write_text(
        '[filters.edge]\nmodule = "builtin:js"\n'
        "configuration = { source = 'export function onRequest() { return new Response(`${1+1}`); }' }\n"
        + base
    )
    sent = json.loads(load_config(config).filters["edge"].configuration)
    assert "`${1+1}`" in sent["script"] and sent["filename"] == "inline.js"


def test_watch_config_reloads_when_the_script_changes(tmp_path: Path, origin: ThreadServer) -> None:
    from tests.conftest import Subprocess, free_port

    port = free_port()
    script = tmp_path / "edge.js"
    script.write_text('export function onRequest() { return new Response("v1"); }\n')
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[server]\nport = {port}\nwatch_config = true\nwatch_interval = 0.2\n"
        f'[upstreams.origin]\ntargets = ["127.0.0.1:{origin.port}"]\n'
        '[filters.edge]\nmodule = "builtin:js"\nconfiguration = { script = "edge.js" }\n'
        '[[routes]]\nupstream = "origin"\nfilters = ["edge"]\n[log]\naccess_log = false\n'
    )
    url = f"http://127.0.0.1:{port}/"
    with Subprocess("serve", "--config", str(config), port=port):
        assert httpx.get(url, timeout=10).text == "v1"
        tmp = tmp_path / "edge.js.tmp"  # replaced whole, as editors and deploys do
        tmp.write_text('export function onRequest() { return new Response("v2"); }\n')
        tmp.replace(script)
        deadline = time.monotonic() + 30
        while (text := httpx.get(url, timeout=10).text) != "v2":
            assert text == "v1" and time.monotonic() < deadline
            time.sleep(0.1)
