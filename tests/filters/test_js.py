"""The bundled JS filter (QuickJS) through the filter harness: the script API, fetch, errors, limits."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wasm_gateway.config import load_config
from wasm_gateway.exceptions import FilterLoadError
from wasm_gateway.filters import filter_path
from wasm_gateway.runtime.context import HttpCallRequest
from wasm_gateway.testing import FilterHarness

JsFilter = Callable[..., FilterHarness]
LOG_ERROR = 4

ISSUE_EXAMPLE = """
export async function onRequest(request, ctx) {          // before the upstream; return a Response to answer
  if (new URL(request.url).pathname === "/api/hello")
    return Response.json({ message: "hello from the edge", region: ctx.env.EDGE_REGION ?? "unknown" });
  request.headers.set("x-edge", "js");                  // or modify and fall through to the upstream
}
export async function onResponse(response, request, ctx) { response.headers.set("x-served-by", "js"); }
"""


def js_config(script: str, **options: Any) -> str:
    return json.dumps({"script": script, "filename": "edge.js", **options})


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compiled-module cache for this file (compiling QuickJS per test would dominate the run)."""
    return tmp_path_factory.mktemp("js-cache")


@pytest.fixture
def js(module_cache: Path) -> Iterator[JsFilter]:
    """``js(script, env=..., buffer_request_body=..., spec=dict(...), http_calls=...)``: a harness, closed after."""
    opened: list[FilterHarness] = []

    def open_filter(
        script: str, *, spec: dict[str, Any] | None = None, http_calls: Any = None, **config: Any
    ) -> FilterHarness:
        options = {"callback_timeout_ms": 1000, **(spec or {})}
        h = FilterHarness.from_file(
            filter_path("js"),
            configuration=js_config(script, **config),
            http_calls=http_calls,
            cache_dir=module_cache,
            **options,
        )
        opened.append(h)
        return h

    yield open_filter
    for h in opened:
        h.close()


def load_error(script: str, **config: Any) -> str:
    with pytest.raises(FilterLoadError) as info:
        FilterHarness.from_file(
            filter_path("js"), configuration=js_config(script, **config), callback_timeout_ms=1000
        ).close()
    return str(info.value)


# -- the issue's example --------------------------------------------------------------------------------------


def test_issue_example_answers_locally_and_edits_headers(js: JsFilter) -> None:
    h = js(ISSUE_EXAMPLE, env={"EDGE_REGION": "eu-west"})
    r = h.request(path="/api/hello", authority="edge.example", response=(200, [], b"upstream"))
    assert not r.upstream_called
    assert r.local_response is not None
    status, headers, body = r.local_response
    assert status == 200 and ("content-type", "application/json") in headers
    assert json.loads(body) == {"message": "hello from the edge", "region": "eu-west"}

    r = h.request(path="/other", headers=[("x-edge", "client")], response=(200, [("server", "o")], b"up"))
    assert r.upstream_called and r.error is None
    assert ("x-edge", "js") in r.request_headers and ("x-edge", "client") not in r.request_headers
    assert ("x-served-by", "js") in r.response_headers and r.response_body == b"up"


def test_env_comes_from_the_filter_environment_and_the_configuration(js: JsFilter) -> None:
    h = js(ISSUE_EXAMPLE, spec={"env": {"EDGE_REGION": "from-wasi", "OTHER": "x"}})
    r = h.request(path="/api/hello")
    assert r.local_response is not None and json.loads(r.local_response[2])["region"] == "from-wasi"
    h = js(ISSUE_EXAMPLE, spec={"env": {"EDGE_REGION": "from-wasi"}}, env={"EDGE_REGION": "from-config"})
    r = h.request(path="/api/hello")
    assert r.local_response is not None and json.loads(r.local_response[2])["region"] == "from-config"
    r = js(ISSUE_EXAMPLE).request(path="/api/hello")
    assert r.local_response is not None and json.loads(r.local_response[2])["region"] == "unknown"
    frozen = js("export function onRequest(req, ctx) { ctx.env.X = 1; }", env={"A": "1"}).request()
    assert frozen.response_status == 503 and "TypeError" in logs_text(frozen)


def logs_text(r: Any) -> str:
    return "\n".join(message for _, message in r.logs)


# -- handler styles -------------------------------------------------------------------------------------------


def test_workers_service_worker_syntax(js: JsFilter) -> None:
    script = """
    addEventListener("fetch", (event) => {
      const url = new URL(event.request.url);
      if (url.pathname === "/hi") event.respondWith(new Response("hi " + url.searchParams.get("name"), { status: 201 }));
      else event.request.headers.set("x-seen", "1");   // no respondWith: on to the upstream
    });
    """
    h = js(script)
    r = h.request(path="/hi?name=ada")
    assert r.local_response is not None and r.local_response[0] == 201 and r.local_response[2] == b"hi ada"
    assert ("content-type", "text/plain;charset=UTF-8") in r.local_response[1]
    r = h.request(path="/else")
    assert r.upstream_called and ("x-seen", "1") in r.request_headers


def test_workers_module_syntax_default_export(js: JsFilter) -> None:
    script = """
    export default {
      async fetch(request, env, ctx) {
        return new Response(`${request.method} ${new URL(request.url).pathname} ${env.NAME}`);
      },
    };
    """
    r = js(script, env={"NAME": "mod"}).request(method="DELETE", path="/x/y")
    assert r.local_response is not None and r.local_response[2] == b"DELETE /x/y mod"


def test_returning_a_request_rewrites_what_goes_upstream(js: JsFilter) -> None:
    script = """
    export function onRequest(request) {
      const url = new URL(request.url);
      url.pathname = "/v2" + url.pathname;
      url.searchParams.set("via", "edge");
      return new Request(url, { method: "PUT", headers: { "x-only": "this" } });
    }
    """
    r = js(script).request(path="/items/7?a=1", headers=[("x-drop", "1")])
    assert r.upstream_called
    assert (r.method, r.path) == ("PUT", "/v2/items/7?a=1&via=edge")
    assert r.request_headers == [("x-only", "this")]


def test_on_response_can_replace_an_unbuffered_response(js: JsFilter) -> None:
    script = """
    export function onResponse(response) {
      if (response.status >= 500) return Response.json({ error: "upstream failed", was: response.status }, { status: 502 });
      response.headers.delete("server");
    }
    """
    h = js(script)
    r = h.request(response=(503, [("server", "origin")], b"boom"))
    assert r.response_status == 502 and json.loads(r.response_body) == {
        "error": "upstream failed",
        "was": 503,
    }
    r = h.request(response=(200, [("server", "origin"), ("x-keep", "1")], b"fine"))
    assert r.response_status == 200 and r.response_headers == [("x-keep", "1")] and r.response_body == b"fine"


# -- bodies ---------------------------------------------------------------------------------------------------


def test_json_body_transform_both_ways(js: JsFilter) -> None:
    script = """
    export async function onRequest(request) {
      if (request.method !== "POST") return;
      const data = await request.json();
      delete data.password;
      data.name = data.name.toUpperCase();
      return new Request(request, { body: JSON.stringify(data) });
    }
    export async function onResponse(response) {
      const data = await response.json();
      return Response.json({ ...data, wrapped: true }, { status: response.status, headers: response.headers });
    }
    """
    h = js(script, buffer_request_body=True, buffer_response_body=True)
    body = b'{"name":"ada","password":"hunter2"}'
    origin_body = b'{"ok":1}'
    r = h.request(
        method="POST",
        path="/users",
        headers=[("content-type", "application/json"), ("content-length", str(len(body)))],
        body_chunks=[body[:10], body[10:]],
        response=(
            201,
            [("content-type", "application/json"), ("content-length", str(len(origin_body)))],
            origin_body,
        ),
    )
    assert r.error is None, logs_text(r)
    assert json.loads(r.request_body) == {"name": "ADA"}
    assert ("content-length", str(len(r.request_body))) in r.request_headers
    assert r.response_status == 201 and json.loads(r.response_body) == {"ok": 1, "wrapped": True}
    assert ("content-length", str(len(r.response_body))) in r.response_headers


def test_unbuffered_body_is_a_clear_script_error(js: JsFilter) -> None:
    r = js("export async function onRequest(request) { await request.text(); }").request(
        method="POST", body_chunks=[b"abc", b"def"]
    )
    assert r.response_status == 503
    assert "set buffer_request_body = true" in logs_text(r)


# -- fetch ----------------------------------------------------------------------------------------------------

FETCH_SCRIPT = """
export async function onRequest(request, ctx) {
  const auth = await fetch("http://authz/check?user=" + encodeURIComponent(request.headers.get("x-user") ?? ""), {
    method: "POST",
    headers: { "x-original-path": new URL(request.url).pathname },
    body: JSON.stringify({ token: request.headers.get("authorization") }),
  });
  if (!auth.ok) return new Response(`denied: ${await auth.text()}`, { status: 403 });
  const who = await auth.json();
  request.headers.set("x-user-id", String(who.id));
  request.headers.delete("authorization");
}
"""


def authz(req: HttpCallRequest) -> tuple[int, list[tuple[str, str]], bytes]:
    token = json.loads(req.body)["token"]
    if token == "Bearer good":
        return 200, [("content-type", "application/json")], b'{"id": 42}'
    return 401, [], b"bad token"


def test_fetch_to_an_upstream_pauses_and_resumes_the_request(js: JsFilter) -> None:
    h = js(FETCH_SCRIPT, http_calls={"authz": authz})
    r = h.request(path="/orders", headers=[("authorization", "Bearer good"), ("x-user", "ada lovelace")])
    assert r.error is None, logs_text(r)
    assert r.upstream_called
    assert ("x-user-id", "42") in r.request_headers
    assert all(k != "authorization" for k, _ in r.request_headers)
    (call,) = r.http_calls
    assert (call.upstream, call.method, call.path) == ("authz", "POST", "/check?user=ada%20lovelace")
    assert ("x-original-path", "/orders") in call.headers
    assert ("content-type", "text/plain;charset=UTF-8") in call.headers

    r = h.request(path="/orders", headers=[("authorization", "Bearer bad")])
    assert not r.upstream_called
    assert (
        r.local_response is not None
        and r.local_response[:1] == (403,)
        and r.local_response[2] == b"denied: bad token"
    )


def test_parallel_fetches_all_resolve(js: JsFilter) -> None:
    script = """
    export async function onRequest() {
      const [a, b] = await Promise.all([fetch("http://one/"), fetch("http://two/x")]);
      return new Response((await a.text()) + "+" + (await b.text()));
    }
    """
    h = js(
        script,
        http_calls={
            "one": lambda req: (200, [], b"1"),
            "two": lambda req: (200, [], b"2" + req.path.encode()),
        },
    )
    r = h.request()
    assert r.local_response is not None and r.local_response[2] == b"1+2/x"


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_fetch_failure_rejects_and_the_policy_applies(js: JsFilter, policy: str) -> None:
    h = js(FETCH_SCRIPT, spec={"failure_policy": policy})  # no handler for "authz": the call fails
    r = h.request(headers=[("authorization", "Bearer good")])
    assert "fetch http://authz/check" in logs_text(r) and "did not answer" in logs_text(r)
    if policy == "fail_closed":
        assert r.response_status == 503 and not r.upstream_called
    else:
        assert r.upstream_called and r.failed_open and ("authorization", "Bearer good") in r.request_headers


# -- errors ---------------------------------------------------------------------------------------------------

THROWING = """
function check(request) {
  if (request.headers.has("x-throw")) throw new RangeError("bad input " + request.headers.get("x-throw"));
}
export async function onRequest(request) {
  check(request);
  if (request.headers.has("x-reject")) await Promise.reject(new Error("rejected later"));
  request.headers.set("x-passed", "1");
}
"""


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
@pytest.mark.parametrize("trigger", ["x-throw", "x-reject"])
def test_exceptions_and_rejections_apply_the_failure_policy(js: JsFilter, policy: str, trigger: str) -> None:
    h = js(THROWING, spec={"failure_policy": policy})
    r = h.request(headers=[(trigger, "42")])
    text = logs_text(r)
    expected = "RangeError: bad input 42" if trigger == "x-throw" else "Error: rejected later"
    assert f"js: onRequest failed: {expected}" in text
    assert "at check (edge.js:3)" in text or trigger == "x-reject"  # the JS stack is logged
    assert any(level == LOG_ERROR for level, _ in r.logs)
    if policy == "fail_closed":
        assert r.response_status == 503 and not r.upstream_called
        assert (
            json.loads(r.response_body)["error"] == "filter_failed"
            and "RangeError" not in r.response_body.decode()
        )
    else:
        assert r.upstream_called and r.failed_open and (trigger, "42") in r.request_headers
        assert ("x-passed", "1") not in r.request_headers
    # the filter recovers: the next request runs the script normally
    r = h.request()
    assert r.upstream_called and ("x-passed", "1") in r.request_headers


def test_pass_through_on_exception(js: JsFilter) -> None:
    r = js(
        "export function onRequest(r, ctx) { ctx.passThroughOnException(); throw new Error('x'); }"
    ).request()
    assert r.upstream_called and r.response_status == 200 and "passing the request through" in logs_text(r)


def test_wrong_return_value_is_a_script_error(js: JsFilter) -> None:
    r = js("export function onRequest() { return 42; }").request()
    assert r.response_status == 503
    assert "onRequest must return undefined, a Response (answer) or a Request" in logs_text(r)


def test_syntax_errors_fail_at_load_with_file_line_and_column() -> None:
    message = load_error("export function onRequest(request) {\n  let x = ;\n}\n")
    assert "edge.js:2:11: SyntaxError" in message
    message = load_error("const a = 1;\nconst a = 2;\nexport function onRequest() {}")
    assert "edge.js:2:" in message and "SyntaxError" in message


def test_load_errors_name_the_problem() -> None:
    assert "defines no handler" in load_error("const x = 1;")
    assert "the script failed while loading: Error: boom" in load_error("throw new Error('boom');")
    assert 'no script (give "script"' in load_error("   ")
    with pytest.raises(FilterLoadError, match="not valid JSON"):
        FilterHarness.from_file(filter_path("js"), configuration='{"script": ').close()


def test_plain_source_as_configuration(js: JsFilter) -> None:
    h = FilterHarness.from_file(
        filter_path("js"), configuration="export function onRequest() { return new Response('raw'); }"
    )
    try:
        r = h.request()
        assert r.local_response is not None and r.local_response[2] == b"raw"
    finally:
        h.close()


# -- limits ---------------------------------------------------------------------------------------------------


def test_endless_loop_is_cut_off_and_the_filter_recovers(js: JsFilter) -> None:
    script = """
    export function onRequest(request) {
      if (request.headers.has("x-loop")) for (;;) {}
      request.headers.set("x-ok", "1");
    }
    """
    h = js(script, spec={"callback_timeout_ms": 100})
    r = h.request(headers=[("x-loop", "1")])
    assert r.response_status == 503 and r.error is not None and "time limit" in str(r.error)
    r = h.request()
    assert r.upstream_called and ("x-ok", "1") in r.request_headers


def test_memory_hungry_script_hits_the_memory_limit(js: JsFilter) -> None:
    script = """
    export function onRequest(request) {
      if (request.headers.has("x-hog")) { const keep = []; for (;;) keep.push("x".repeat(1 << 16) + keep.length); }
    }
    """
    h = js(script, spec={"memory_limit_bytes": 8 * 1024 * 1024})
    r = h.request(headers=[("x-hog", "1")])
    assert r.response_status == 503 and not r.upstream_called
    assert "out of memory" in logs_text(r) or (r.error is not None and "trap" in str(r.error))
    assert h.request().upstream_called


def test_promise_that_never_settles_is_an_error(js: JsFilter) -> None:
    r = js("export function onRequest() { return new Promise(() => {}); }").request()
    assert r.response_status == 503 and "never settled" in logs_text(r)


def test_delayed_timers_are_refused_and_zero_delay_ones_run(js: JsFilter) -> None:
    script = """
    export async function onRequest(request) {
      const order = [];
      await new Promise((resolve) => { setTimeout(() => { order.push("timer"); resolve(); }, 0); queueMicrotask(() => order.push("micro")); });
      if (request.headers.has("x-delay")) setTimeout(() => {}, 10);
      return new Response(order.join(","));
    }
    """
    h = js(script)
    r = h.request()
    assert r.local_response is not None and r.local_response[2] == b"micro,timer"
    r = h.request(headers=[("x-delay", "1")])
    assert r.response_status == 503 and "setTimeout with a delay is not supported" in logs_text(r)


# -- Web APIs: the same expressions in QuickJS (the filter) and Node ---------------------------------------------

WEB_API_CASES = r"""
const u = new URL("HTTPS://User:Pa ss@Example.COM:443/a/./b/../c d?q=1 2&x=é#frag ment");
const rel = new URL("../up?z#h", "http://h.test/a/b/c");
const p = new URLSearchParams("a=1&b=2+3&a=%C3%A9&c");
p.append("d", "x y&z=é");
p.sort();
const h = new Headers([["X-A", "1"], ["x-b", " 2 "]]);
h.append("x-a", "3");
h.set("Content-Type", "text/plain");
const enc = new TextEncoder().encode("h€llo \ud83d\ude00");
const results = {
  href: u.href, origin: u.origin, host: u.host, pathname: u.pathname, search: u.search, hash: u.hash,
  username: u.username, password: u.password, port: u.port,
  rel: rel.href, proto: new URL("//x.test/p", "https://b.test/").href,
  ip: new URL("http://0x7f.1/").hostname, port8080: new URL("http://a.test:8080").port,
  mailto: new URL("mailto:ada@example.com").pathname,
  params: p.toString(), paramsA: p.getAll("a"), paramsHas: p.has("c"), paramsSize: p.size,
  searchParams: (() => { const x = new URL("http://a.test/?k=v"); x.searchParams.set("k", "w w"); x.searchParams.append("n", "1"); return x.href; })(),
  headers: [...h], headerA: h.get("x-a"), headerHas: h.has("X-B"),
  encoded: Array.from(enc), decoded: new TextDecoder().decode(enc),
  replaced: new TextDecoder().decode(new Uint8Array([0x61, 0xff, 0x62, 0xe2, 0x82])),
  lone: Array.from(new TextEncoder().encode("\ud800")),
  b64: btoa("hello\u00ff"), unb64: atob("aGVsbG8="),
  uuid: /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(crypto.randomUUID()),
  random: crypto.getRandomValues(new Uint8Array(32)).some((x) => x !== 0),
  json: JSON.stringify({ a: [1, { b: null }] }),
  status: new Response(null, { status: 204 }).status, ok: new Response("x", { status: 404 }).ok,
  respJsonType: Response.json({}).headers.get("content-type"),
  badStatus: (() => { try { new Response("", { status: 100 }); return "no"; } catch (e) { return e.name; } })(),
  badHeader: (() => { try { new Headers({ "bad name": "x" }); return "no"; } catch (e) { return e.name; } })(),
  badUrl: (() => { try { new URL("/relative"); return "no"; } catch (e) { return e.name; } })(),
  reqMethod: new Request("http://a.test/", { method: "post" }).method,
};
"""


def test_web_apis_behave_like_node(js: JsFilter) -> None:
    script = WEB_API_CASES + "\nexport function onRequest() { return Response.json(results); }\n"
    r = js(script).request()
    assert r.local_response is not None, logs_text(r)
    ours = json.loads(r.local_response[2])
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the comparison needs it)")
    out = subprocess.run(
        [node, "-e", WEB_API_CASES + "\nprocess.stdout.write(JSON.stringify(results));"],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(out.stdout)
    assert ours == theirs


def test_console_goes_to_the_gateway_log_with_levels(js: JsFilter) -> None:
    script = """
    export function onRequest() {
      console.log("plain", 1, { a: [1, "x"] }, null);
      console.debug("dbg %s=%d", "n", 5);
      console.warn("careful");
      console.error(new TypeError("bad"));
    }
    """
    r = js(script).request()
    assert (2, 'plain 1 { a: [1, "x"] } null') in r.logs
    assert (1, "dbg n=5") in r.logs
    assert (3, "careful") in r.logs
    assert any(level == 4 and message.startswith("TypeError: bad") for level, message in r.logs)


def test_properties_are_readable(js: JsFilter) -> None:
    script = (
        "export function onRequest(r, ctx) { return new Response(String(ctx.property('request.path'))); }"
    )
    r = js(script).request(path="/some/where?x=1")
    assert r.local_response is not None and r.local_response[2] == b"/some/where?x=1"


# -- docs/filters/js.md --------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "filters" / "js.md"


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_python_example_runs() -> None:
    (example,) = doc_blocks("python")
    exec(compile(example, str(DOC), "exec"), {})


def test_doc_script_and_toml_work_together(tmp_path: Path, module_cache: Path) -> None:
    (script,) = doc_blocks("js")
    (toml,) = doc_blocks("toml")
    assert script.strip() == ISSUE_EXAMPLE.strip()
    (tmp_path / "edge.js").write_text(script)
    (tmp_path / "gateway.toml").write_text(toml)
    config = load_config(tmp_path / "gateway.toml")
    edge = config.filters["edge"]
    assert edge.module == filter_path("js")
    with FilterHarness.from_file(edge.module, configuration=edge.configuration, cache_dir=module_cache) as h:
        r = h.request(path="/api/hello")
        assert r.local_response is not None
        assert json.loads(r.local_response[2]) == {"message": "hello from the edge", "region": "eu-west"}


def test_doc_syntax_error_example_is_what_the_filter_says() -> None:
    message = load_error("export function onRequest(request) {\n  return new Response(;\n}\n")
    line = re.search(r"`(js: edge\.js:2:23: SyntaxError: [^`]*)`", DOC.read_text())
    assert line is not None and line.group(1) in message


def test_header_values_are_byte_strings_kept_exactly(js: JsFilter) -> None:
    script = """
    export function onRequest(request) {
      if (request.headers.has("x-euro")) request.headers.set("x-bad", "\\u20ac");
      request.headers.set("x-seen", String(request.headers.get("x-name").length));
      if (request.headers.has("x-echo")) return new Response(request.headers.get("x-name"));
    }
    """
    h = js(script)
    r = h.request(headers=[("x-name", "caf\xe9\xff")])  # obs-text bytes, as a client may send them
    assert r.upstream_called and ("x-name", "caf\xe9\xff") in r.request_headers
    assert ("x-seen", "5") in r.request_headers
    r = h.request(headers=[("x-name", "caf\xe9"), ("x-echo", "1")])
    assert r.local_response is not None and r.local_response[2] == "café".encode()
    r = h.request(headers=[("x-name", "x"), ("x-euro", "1")])
    assert r.response_status == 503 and "characters up to U+00FF only" in logs_text(r)


def test_after_a_fetch_the_script_still_sees_its_own_request(js: JsFilter) -> None:
    script = """
    export async function onRequest(request, ctx) {
      const r = await fetch("http://svc/x");
      return new Response(`${await r.text()} ${ctx.property("request.path")} ${request.headers.get("x-id")}`);
    }
    """
    r = js(script, http_calls={"svc": lambda req: (200, [], b"svc")}).request(
        path="/mine", headers=[("x-id", "7")]
    )
    assert r.local_response is not None and r.local_response[2] == b"svc /mine 7"


def test_fetch_to_an_upstream_the_filter_may_not_call_is_refused_at_once(js: JsFilter) -> None:
    script = """
    export async function onRequest() {
      try { await fetch("http://internal-admin/"); } catch (e) { return new Response(e.message, { status: 502 }); }
    }
    """
    h = js(script, spec={"upstreams": frozenset({"authz"})}, http_calls={"internal-admin": authz})
    r = h.request()
    assert r.local_response is not None and r.local_response[0] == 502
    assert b"fetch http://internal-admin/: refused by the gateway" in r.local_response[2]
    assert r.http_calls == []


def test_on_response_alone_sees_the_request(js: JsFilter) -> None:
    script = """
    export function onResponse(response, request) {
      response.headers.set("x-for", `${request.method} ${new URL(request.url).pathname}`);
    }
    """
    r = js(script).request(method="PATCH", path="/a/b?c=1")
    assert ("x-for", "PATCH /a/b") in r.response_headers


def test_fetch_refuses_to_forward_an_unbuffered_body(js: JsFilter) -> None:
    script = """
    export async function onRequest(request) {
      await fetch(new Request("http://svc/copy", request));
    }
    """
    r = js(script, http_calls={"svc": lambda req: (200, [], b"")}).request(
        method="POST", body_chunks=[b"a", b"b"]
    )
    assert r.response_status == 503 and "request body is not buffered" in logs_text(r) and r.http_calls == []


def test_deep_recursion_is_a_catchable_error(js: JsFilter) -> None:
    script = """
    function plain(n) { return n === 0 ? 0 : 1 + plain(n - 1); }
    function viaMap(n) { return n === 0 ? 0 : 1 + [n - 1].map(viaMap)[0]; }
    export function onRequest(request) {
      const n = Number(request.headers.get("x-n"));
      const f = request.headers.has("x-map") ? viaMap : plain;
      try { return new Response(String(f(n))); } catch (e) { return new Response(`${e.name}: ${e.message}`, { status: 500 }); }
    }
    """
    h = js(script)
    for extra in ([], [("x-map", "1")]):
        r = h.request(headers=[("x-n", "200"), *extra])
        assert r.local_response is not None and r.local_response[2] == b"200"
        r = h.request(headers=[("x-n", "1000000"), *extra])
        assert r.local_response is not None, logs_text(r)
        assert r.local_response[:1] == (500,) and r.local_response[2] == b"InternalError: stack overflow"


def test_hostile_json_bodies_fail_cleanly(js: JsFilter) -> None:
    script = """
    export async function onRequest(request) {
      try { await request.json(); } catch (e) { return Response.json({ error: e.name }, { status: 400 }); }
      return new Response("ok");
    }
    """
    h = js(script, buffer_request_body=True)
    for body in (b"[" * 200_000, b'{"a":' * 50_000, b"\xff\xfe not json", b'"' + b"\\u" * 1000):
        r = h.request(method="POST", body=body, headers=[("content-length", str(len(body)))])
        assert r.local_response is not None, logs_text(r)
        assert r.local_response[0] == 400
    r = h.request(method="POST", body=b'{"fine": true}', headers=[("content-length", "14")])
    assert r.local_response is not None and r.local_response[2] == b"ok"


def test_requests_leave_no_garbage_behind(js: JsFilter) -> None:
    """Each request's objects are freed by reference counting (no cycles left for the collector): the
    instance's memory stays the same over thousands of requests."""
    script = """
    export async function onRequest(request, ctx) {
      request.headers.set("x-seen", new URL(request.url).pathname);
      if (request.headers.has("x-answer")) return Response.json({ env: ctx.env, n: [1, 2, 3] });
    }
    export async function onResponse(response) { response.headers.set("x-out", "1"); }
    """
    h = js(script, spec={"pool_max": 1})
    pool = h.runtime.pools[h.spec.name]

    def memory() -> int:
        (inst,) = pool.idle_instances()
        assert inst.host.memory is not None
        return inst.host.memory.current_size()

    for i in range(300):
        h.request(path=f"/warm/{i}", headers=[("x-answer", "1")] if i % 2 else [])
    before = memory()
    for i in range(3000):
        r = h.request(path=f"/p/{i}", headers=[("x-answer", "1")] if i % 2 else [])
    assert r.error is None
    assert memory() == before


def test_fetch_in_on_response_pauses_the_response(js: JsFilter) -> None:
    script = """
    export async function onResponse(response) {
      const audit = await fetch("http://audit/log", { method: "POST", body: String(response.status) });
      response.headers.set("x-audit", await audit.text());
    }
    """
    h = js(script, http_calls={"audit": lambda req: (200, [], b"logged " + req.body)})
    r = h.request(response=(201, [("content-type", "text/plain")], b"made"))
    assert r.error is None, logs_text(r)
    assert r.response_status == 201 and ("x-audit", "logged 201") in r.response_headers
    assert r.response_body == b"made"


def test_crypto_subtle_digest_and_hmac_match_python(js: JsFilter) -> None:
    import hashlib
    import hmac

    script = """
    const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");
    export async function onRequest(request) {
      const bytes = (s) => Uint8Array.from(s ?? "", (ch) => ch.charCodeAt(0)); // header values are byte strings
      const data = bytes(request.headers.get("x-data"));
      const keyBytes = bytes(request.headers.get("x-key"));
      const out = {};
      for (const hash of ["SHA-1", "SHA-256"]) {
        out[hash + " digest"] = hex(await crypto.subtle.digest(hash, data));
        const key = await crypto.subtle.importKey("raw", keyBytes, { name: "HMAC", hash }, false, ["sign", "verify"]);
        const mac = await crypto.subtle.sign("HMAC", key, data);
        out[hash + " hmac"] = hex(mac);
        out[hash + " verify"] = await crypto.subtle.verify("HMAC", key, mac, data);
        const bad = new Uint8Array(mac); bad[0] ^= 1;
        out[hash + " verify bad"] = await crypto.subtle.verify("HMAC", key, bad, data);
      }
      try { await crypto.subtle.digest("MD5", data); } catch (e) { out.md5 = e.name; }
      return Response.json(out);
    }
    """
    h = js(script)
    for data, key in [("", ""), ("abc", "k"), ("x" * 1000, "long key " * 20), ("é€", "0123456789" * 7)]:
        r = h.request(headers=[("x-data", data.encode().decode("latin-1")), ("x-key", key)])
        assert r.local_response is not None, logs_text(r)
        got = json.loads(r.local_response[2])
        for name, algo in (("SHA-1", hashlib.sha1), ("SHA-256", hashlib.sha256)):
            raw = data.encode()
            assert got[f"{name} digest"] == algo(raw).hexdigest()
            assert got[f"{name} hmac"] == hmac.new(key.encode(), raw, algo).hexdigest()
            assert got[f"{name} verify"] is True and got[f"{name} verify bad"] is False
        assert got["md5"] == "NotSupportedError"


def test_returning_a_fetched_response_answers_with_it(js: JsFilter) -> None:
    script = """
    export function onRequest(request) {
      const url = new URL(request.url);
      return fetch(`http://api${url.pathname}`, { headers: { "x-from": "edge" } });
    }
    """
    upstream = (
        202,
        [("content-type", "application/json"), ("content-length", "11"), ("connection", "keep-alive")],
        b'{"ok":true}',
    )
    r = js(script, http_calls={"api": lambda req: upstream}).request(path="/items/1")
    assert r.local_response is not None and not r.upstream_called
    status, headers, body = r.local_response
    assert (status, body) == (202, b'{"ok":true}')
    assert ("content-type", "application/json") in headers
    assert all(k not in ("content-length", "connection") for k, _ in headers)
    assert r.http_calls[0].path == "/items/1" and ("x-from", "edge") in r.http_calls[0].headers
