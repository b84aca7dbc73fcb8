"""The bundled transform filter (wasm_gateway/filters/transform.wasm) through FilterHarness."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.filters.conftest import LoadFilter, config_error, single, values

JSON = ("content-type", "application/json")


def json_request(body: Any, *extra: tuple[str, str]) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return {
        "method": "POST",
        "path": "/items",
        "headers": [JSON, ("content-length", str(len(raw))), *extra],
        "body": raw,
    }


# --- headers ----------------------------------------------------------------------------------------


def test_request_header_edits_apply_remove_rename_set_add_in_order(load: LoadFilter) -> None:
    h = load(
        "transform",
        {
            "request": {
                "headers": {
                    "remove": ["x-secret", "X-Debug"],
                    "rename": {"x-old": "x-new", "x-user": "x-forwarded-user"},
                    "set": {"x-env": "prod", "x-forwarded-user": "overridden-by-set"},
                    "add": {"x-tag": ["a", "b"], "x-env": "second"},
                }
            }
        },
    )
    r = h.request(
        headers=[
            ("x-secret", "s"),
            ("x-debug", "1"),
            ("x-old", "o1"),
            ("x-old", "o2"),
            ("x-new", "clobbered-by-rename"),
            ("x-env", "dev"),
            ("x-env", "dev2"),
            ("x-keep", "k"),
        ]
    )
    up = r.request_headers
    assert values(up, "x-secret") == [] and values(up, "x-debug") == []
    assert values(up, "x-old") == []
    assert values(up, "x-new") == ["o1", "o2"]  # every value renamed; the old x-new replaced
    assert values(up, "x-forwarded-user") == ["overridden-by-set"]  # absent x-user: set still applies
    assert values(up, "x-env") == ["prod", "second"]  # set replaced both, then add appended
    assert values(up, "x-tag") == ["a", "b"]
    assert values(up, "x-keep") == ["k"]
    assert r.logs == []


def test_write_only_header_edits_without_reading_the_map(load: LoadFilter) -> None:
    # remove/set/add only: the filter edits through single host calls (no rename, path, query or body).
    h = load(
        "transform", {"request": {"headers": {"remove": ["x-a"], "set": {"x-b": "2"}, "add": {"x-c": "3"}}}}
    )
    r = h.request(headers=[("x-a", "1"), ("x-b", "old"), ("x-b", "older")])
    assert values(r.request_headers, "x-a") == []
    assert values(r.request_headers, "x-b") == ["2"]
    assert values(r.request_headers, "x-c") == ["3"]


def test_response_header_edits(load: LoadFilter) -> None:
    h = load(
        "transform",
        {
            "response": {
                "headers": {
                    "remove": ["server"],
                    "rename": {"x-upstream-id": "x-request-ref"},
                    "set": {"cache-control": "no-store"},
                    "add": {"x-served-by": "gateway"},
                }
            }
        },
    )
    r = h.request(
        response=(
            200,
            [("server", "origin/1.0"), ("x-upstream-id", "42"), ("cache-control", "max-age=60")],
            b"ok",
        )
    )
    down = r.response_headers
    assert values(down, "server") == []
    assert values(down, "x-request-ref") == ["42"] and values(down, "x-upstream-id") == []
    assert values(down, "cache-control") == ["no-store"]
    assert values(down, "x-served-by") == ["gateway"]
    assert r.response_body == b"ok"


def test_no_configuration_passes_everything_through(load: LoadFilter) -> None:
    h = load("transform", "")
    r = h.request(**json_request({"a": 1}), response=(201, [JSON], b'{"b":2}'))
    assert r.path == "/items" and r.request_body == b'{"a":1}'
    assert r.response_status == 201 and r.response_body == b'{"b":2}'


# --- path and query -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "path", "expected"),
    [
        ([{"strip_prefix": "/api"}], "/api/users?x=1", "/users?x=1"),
        ([{"strip_prefix": "/api"}], "/api", "/"),
        ([{"strip_prefix": "/api"}], "/api?x=1", "/?x=1"),
        ([{"strip_prefix": "/api"}], "/apix/users", "/apix/users"),  # whole segments only
        ([{"strip_prefix": "/api/"}], "/api/users", "/users"),
        ([{"replace_prefix": "/v1", "with": "/v2"}], "/v1/users/7", "/v2/users/7"),
        ([{"replace_prefix": "/api/v1", "with": "/"}], "/api/v1/users", "/users"),
        ([{"replace_prefix": "/old", "with": "/new"}], "/other", "/other"),
        ([{"add_prefix": "/backend"}], "/users?q=a", "/backend/users?q=a"),
        (
            [{"template": "/users/{id}/posts/{post}", "to": "/posts/{post}?author={id}"}],
            "/users/7/posts/99?fields=title",
            "/posts/99?author=7&fields=title",
        ),
        ([{"template": "/files/{rest*}", "to": "/static/{rest}"}], "/files/a/b/c.txt", "/static/a/b/c.txt"),
        ([{"template": "/files/{rest*}", "to": "/static/{rest}"}], "/files", "/static/"),
        ([{"template": "/users/{id}", "to": "/u/{id}"}], "/users/7/extra", "/users/7/extra"),  # no match
        ([{"template": "/users/{id}", "to": "/u/{id}"}], "/users/", "/users/"),  # empty capture: no match
        (
            [{"strip_prefix": "/api"}, {"template": "/users/{id}", "to": "/accounts/{id}/profile"}],
            "/api/users/alice",
            "/accounts/alice/profile",
        ),
    ],
)
def test_path_rules(load: LoadFilter, rules: list[dict[str, str]], path: str, expected: str) -> None:
    h = load("transform", {"request": {"path": rules}})
    assert h.request(path=path).path == expected


def test_query_parameters_remove_set_add(load: LoadFilter) -> None:
    h = load(
        "transform",
        {
            "request": {
                "query": {
                    "remove": ["debug", "token"],
                    "set": {"page": "1"},
                    "add": {"source": "gateway", "note": "a b&c=d/é"},
                }
            }
        },
    )
    r = h.request(path="/search?q=zig&debug=1&debu%67=2&page=7&token=t&token=u&page=8")
    assert r.path == "/search?q=zig&page=1&source=gateway&note=a%20b%26c%3Dd%2F%C3%A9"


def test_query_added_to_a_path_without_one(load: LoadFilter) -> None:
    h = load("transform", {"request": {"query": {"add": {"v": "2"}}, "path": [{"add_prefix": "/x"}]}})
    assert h.request(path="/y").path == "/x/y?v=2"


def test_query_removal_that_empties_the_query_drops_the_question_mark(load: LoadFilter) -> None:
    h = load("transform", {"request": {"query": {"remove": ["a"]}}})
    assert h.request(path="/p?a=1&a=2").path == "/p"


# --- JSON bodies -------------------------------------------------------------------------------------


def test_request_body_edits_and_content_length(load: LoadFilter) -> None:
    h = load(
        "transform",
        {
            "request": {
                "body": {
                    "edits": [
                        {"op": "set", "pointer": "/meta/source", "value": "gateway"},
                        {"op": "set", "pointer": "/meta/tags", "value": ["a", {"b": 1}]},
                        {"op": "remove", "pointer": "/password"},
                        {"op": "rename", "pointer": "/user/name", "to": "full_name"},
                        {"op": "uppercase", "pointer": "/user/full_name"},
                        {"op": "lowercase", "pointer": "/user/email"},
                        {"op": "set", "pointer": "/items/0/qty", "value": 5},
                        {"op": "set", "pointer": "/items/-", "value": {"sku": "added"}},
                        {"op": "remove", "pointer": "/items/1"},
                        {"op": "remove", "pointer": "/does/not/exist"},
                        {"op": "uppercase", "pointer": "/count"},
                    ]
                }
            }
        },
    )
    raw = (
        b'{"user":{"id":1,"name":"Ada Lovelace","email":"ADA@Example.ORG"},"password":"hunter2",'
        b'"count":12345678901234567890,"ratio":1.10e3,"items":[{"sku":"x","qty":1},{"sku":"y"}],"s":"\xc3\xa9\\u00e9"}'
    )
    r = h.request(
        method="POST",
        path="/users",
        headers=[JSON, ("content-length", str(len(raw)))],
        body=raw,
    )
    assert r.local_response is None
    assert single(r.request_headers, "content-length") == str(len(r.request_body))
    # Members keep their places; numbers keep their exact text; non-ASCII stays as UTF-8.
    assert r.request_body == (
        b'{"user":{"id":1,"full_name":"ADA LOVELACE","email":"ada@example.org"},'
        b'"count":12345678901234567890,"ratio":1.10e3,"items":[{"sku":"x","qty":5},{"sku":"added"}],'
        b'"s":"\xc3\xa9\xc3\xa9","meta":{"source":"gateway","tags":["a",{"b":1}]}}'
    )


def test_edits_never_change_the_configured_values(load: LoadFilter) -> None:
    h = load(
        "transform",
        {
            "request": {
                "body": {
                    "edits": [
                        {"op": "set", "pointer": "/obj", "value": {"name": "ada"}},
                        {"op": "uppercase", "pointer": "/obj/name"},
                        {"op": "set", "pointer": "/obj/extra", "value": True},
                    ]
                }
            }
        },
    )
    for _ in range(3):
        r = h.request(**json_request({}))
        assert json.loads(r.request_body) == {"obj": {"name": "ADA", "extra": True}}


def test_chunked_request_body_is_edited_and_framed_by_length(load: LoadFilter) -> None:
    h = load("transform", {"request": {"body": {"edits": [{"op": "remove", "pointer": "/b"}]}}})
    r = h.request(
        method="PUT",
        path="/x",
        headers=[
            ("content-type", "application/vnd.api+json; charset=utf-8"),
            ("transfer-encoding", "chunked"),
        ],
        body_chunks=[b'{"a":', b'1,"b"', b":2}"],
    )
    assert r.request_body == b'{"a":1}'
    assert single(r.request_headers, "content-length") == "7"
    assert values(r.request_headers, "transfer-encoding") == []


@pytest.mark.parametrize("policy", ["pass", "reject"])
def test_non_json_content_type(load: LoadFilter, policy: str) -> None:
    h = load(
        "transform",
        {"request": {"body": {"edits": [{"op": "remove", "pointer": "/a"}], "on_invalid": policy}}},
    )
    r = h.request(
        method="POST",
        path="/f",
        headers=[("content-type", "text/plain"), ("content-length", "7")],
        body=b'{"a":1}',
    )
    if policy == "pass":
        assert r.local_response is None and r.request_body == b'{"a":1}'
    else:
        assert r.upstream_called is False
        assert r.response_status == 415
        assert json.loads(r.response_body) == {"error": "unsupported_media_type", "status": 415}


@pytest.mark.parametrize("policy", ["pass", "reject"])
def test_malformed_json(load: LoadFilter, policy: str) -> None:
    h = load(
        "transform",
        {"request": {"body": {"edits": [{"op": "remove", "pointer": "/a"}], "on_invalid": policy}}},
    )
    r = h.request(**json_request(b'{"a":1,'))
    if policy == "pass":
        assert r.local_response is None and r.request_body == b'{"a":1,'
        assert single(r.request_headers, "content-length") == "7"
    else:
        assert r.upstream_called is False
        assert r.response_status == 400
        assert json.loads(r.response_body)["error"] == "invalid_json_body"


def test_duplicate_members_count_as_invalid_json(load: LoadFilter) -> None:
    h = load(
        "transform",
        {"request": {"body": {"edits": [{"op": "remove", "pointer": "/role"}], "on_invalid": "reject"}}},
    )
    r = h.request(**json_request(b'{"role":"user","role":"admin"}'))
    assert r.response_status == 400


def test_nesting_deeper_than_max_depth_is_invalid(load: LoadFilter) -> None:
    h = load(
        "transform",
        {
            "request": {
                "body": {"edits": [{"op": "remove", "pointer": "/a"}], "max_depth": 8, "on_invalid": "reject"}
            }
        },
    )
    assert h.request(**json_request(b"[" * 8 + b"]" * 8)).local_response is None
    assert h.request(**json_request(b"[" * 9 + b"]" * 9)).response_status == 400
    # Brackets inside strings are not nesting.
    assert h.request(**json_request(b'{"a":"[[[[[[[[[[[[[[[[[["}')).request_body == b"{}"


@pytest.mark.parametrize("policy", ["pass", "reject"])
def test_oversized_by_content_length(load: LoadFilter, policy: str) -> None:
    h = load(
        "transform",
        {
            "request": {
                "body": {
                    "edits": [{"op": "remove", "pointer": "/a"}],
                    "max_bytes": 16,
                    "on_oversized": policy,
                }
            }
        },
    )
    small = h.request(**json_request({"a": 1, "b": 2}))
    assert small.request_body == b'{"b":2}'
    big = json_request({"a": 1, "b": "x" * 20})
    r = h.request(**big)
    if policy == "pass":
        assert r.request_body == big["body"]
    else:
        assert r.upstream_called is False
        assert r.response_status == 413
        assert json.loads(r.response_body)["error"] == "body_too_large"


@pytest.mark.parametrize("policy", ["pass", "reject"])
def test_oversized_while_streaming(load: LoadFilter, policy: str) -> None:
    h = load(
        "transform",
        {
            "request": {
                "body": {
                    "edits": [{"op": "remove", "pointer": "/a"}],
                    "max_bytes": 16,
                    "on_oversized": policy,
                }
            }
        },
    )
    chunks = [b'{"a":1,', b'"b":"xxxxxxxxxxxx', b'xxxxxxxx"}']
    r = h.request(method="POST", path="/p", headers=[JSON], body_chunks=chunks)
    if policy == "pass":
        assert r.request_body == b"".join(chunks)
    else:
        assert r.upstream_called is False
        assert r.response_status == 413


def test_response_body_edits(load: LoadFilter) -> None:
    h = load(
        "transform",
        {
            "response": {
                "body": {
                    "edits": [
                        {"op": "remove", "pointer": "/internal"},
                        {"op": "set", "pointer": "/version", "value": 2},
                    ]
                }
            }
        },
    )
    r = h.request(
        headers=[("accept-encoding", "gzip, br")],
        response=(200, [JSON, ("content-length", "29")], b'{"internal":{"x":1},"data":[]}'),
    )
    # The upstream must answer uncompressed for the filter to read the body.
    assert values(r.request_headers, "accept-encoding") == []
    assert r.response_body == b'{"data":[],"version":2}'
    assert single(r.response_headers, "content-length") == str(len(r.response_body))


def test_compressed_response_body_passes_through(load: LoadFilter) -> None:
    h = load("transform", {"response": {"body": {"edits": [{"op": "remove", "pointer": "/a"}]}}})
    r = h.request(response=(200, [JSON, ("content-encoding", "gzip")], b"\x1f\x8b-not-really"))
    assert r.response_body == b"\x1f\x8b-not-really"


def test_invalid_response_body_rejected_with_502(load: LoadFilter) -> None:
    h = load(
        "transform",
        {"response": {"body": {"edits": [{"op": "remove", "pointer": "/a"}], "on_invalid": "reject"}}},
    )
    r = h.request(response=(200, [JSON], b"<html>"))
    assert r.response_status == 502
    assert json.loads(r.response_body)["error"] == "upstream_body_not_json"
    ok = h.request(response=(200, [JSON], b'{"a":1,"b":2}'))
    assert ok.response_status == 200 and ok.response_body == b'{"b":2}'


def test_bodyless_requests_and_responses_are_untouched(load: LoadFilter) -> None:
    h = load(
        "transform",
        {
            "request": {
                "body": {"edits": [{"op": "set", "pointer": "/a", "value": 1}], "on_invalid": "reject"}
            },
            "response": {
                "body": {"edits": [{"op": "set", "pointer": "/a", "value": 1}], "on_invalid": "reject"}
            },
        },
    )
    r = h.request(method="GET", path="/", response=(204, [], b""))
    assert r.upstream_called and r.request_body == b""
    assert r.response_status == 204 and r.response_body == b""


def test_memory_stays_bounded_across_many_large_bodies(load: LoadFilter) -> None:
    """Per-callback scratch memory is reset: 200 x 60 KB bodies must not grow the instance's memory."""
    h = load(
        "transform",
        {"request": {"body": {"edits": [{"op": "uppercase", "pointer": "/s"}], "max_bytes": 100_000}}},
        pool_min=1,
        pool_max=1,
    )
    body = {"s": "a" * 60_000}
    h.request(**json_request(body))
    (pool,) = h.runtime.pools.values()
    (instance,) = pool.idle_instances()
    assert instance.host.memory is not None
    after_first = instance.host.memory.size
    for _ in range(200):
        r = h.request(**json_request(body))
        assert len(r.request_body) == 60_008
    assert instance.host.memory.size <= after_first + 1024 * 1024


# --- configuration errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{nope", "not valid JSON (SyntaxError) at line 1, column 2"),
        ([], "configuration: expected an object, got an array"),
        ({"requests": {}}, 'configuration: unknown field "requests" (expected one of: request, response)'),
        ({"response": {"path": []}}, 'response: unknown field "path" (expected one of: headers, body)'),
        (
            {"request": {"headers": {"add": {"x-a": 1}}}},
            "request.headers.add.x-a: expected a string, got a number",
        ),
        (
            {"request": {"headers": {"remove": ["bad name"]}}},
            'request.headers.remove[0]: "bad name" is not a valid header name',
        ),
        (
            {"request": {"headers": {"set": {"x-a": "a\r\nb"}}}},
            "request.headers.set.x-a: header values may not contain CR, LF or NUL",
        ),
        (
            {"request": {"headers": {"set": {"content-length": "1"}}}},
            'request.headers.set.content-length: "content-length" is managed by the gateway and cannot be edited',
        ),
        (
            {"request": {"headers": {"remove": [":path"]}}},
            'request.headers.remove[0]: pseudo-header ":path" cannot be edited here (use request.path for the path)',
        ),
        (
            {"request": {"headers": {"rename": ["x-a"]}}},
            "request.headers.rename: expected an object of old names to new names, got an array",
        ),
        (
            {"request": {"path": [{"strip_prefix": "api"}]}},
            'request.path[0].strip_prefix: must start with "/"',
        ),
        (
            {"request": {"path": [{"strip_prefix": "/a", "add_prefix": "/b"}]}},
            "request.path[0]: a path rule has exactly one of strip_prefix, replace_prefix, add_prefix, template",
        ),
        ({"request": {"path": [{"replace_prefix": "/a"}]}}, 'request.path[0]: replace_prefix needs "with"'),
        ({"request": {"path": [{"template": "/a/{id}"}]}}, 'request.path[0]: template needs "to"'),
        (
            {"request": {"path": [{"template": "/a/{x*}/b", "to": "/"}]}},
            "request.path[0].template: {x*} must be the last segment",
        ),
        (
            {"request": {"path": [{"template": "/a/v{x}", "to": "/"}]}},
            'request.path[0].template: a capture must be a whole segment, like /{id}/ (got "v{x}")',
        ),
        (
            {"request": {"path": [{"template": "/a/{x}/{x}", "to": "/"}]}},
            'request.path[0].template: capture "x" appears twice',
        ),
        (
            {"request": {"path": [{"template": "/a/{x}", "to": "/{y}"}]}},
            "request.path[0].to: {y} is not captured by the template",
        ),
        ({"request": {"path": [{"template": "/a/{x}", "to": "/{x"}]}}, 'request.path[0].to: unmatched "{"'),
        (
            {"request": {"path": [{"strip_prefix": "/a", "to": "/b"}]}},
            'request.path[0]: "to" does not belong to this kind of path rule',
        ),
        ({"request": {"query": {"add": {"a": 1}}}}, "request.query.add.a: expected a string, got a number"),
        ({"request": {"body": {}}}, "request.body.edits: missing"),
        (
            {"request": {"body": {"edits": [{"op": "frob", "pointer": "/a"}]}}},
            'request.body.edits[0].op: expected one of "set", "remove", "rename", "uppercase", "lowercase", got "frob"',
        ),
        (
            {"request": {"body": {"edits": [{"op": "set", "pointer": "a", "value": 1}]}}},
            'request.body.edits[0].pointer: a JSON pointer starts with "/" (got "a")',
        ),
        (
            {"request": {"body": {"edits": [{"op": "remove", "pointer": "/a~2"}]}}},
            'request.body.edits[0].pointer: "~" must be followed by 0 or 1 in "/a~2"',
        ),
        (
            {"request": {"body": {"edits": [{"op": "set", "pointer": "/a"}]}}},
            'request.body.edits[0]: op "set" needs "value"',
        ),
        (
            {"request": {"body": {"edits": [{"op": "rename", "pointer": "/a"}]}}},
            'request.body.edits[0]: op "rename" needs "to" (the new member name)',
        ),
        (
            {"request": {"body": {"edits": [{"op": "remove", "pointer": "/a", "value": 1}]}}},
            'request.body.edits[0]: "value" only belongs to op "set"',
        ),
        (
            {"request": {"body": {"edits": [], "max_bytes": 0}}},
            "request.body.max_bytes: expected an integer between 1 and 16777216",
        ),
        (
            {"request": {"body": {"edits": [], "max_bytes": "1k"}}},
            "request.body.max_bytes: expected an integer, got a string",
        ),
        (
            {"request": {"body": {"edits": [], "on_invalid": "drop"}}},
            'request.body.on_invalid: expected one of "pass", "reject", got "drop"',
        ),
    ],
)
def test_bad_configuration_is_rejected_with_the_reason(config: Any, message: str) -> None:
    assert config_error("transform", config) == message


def test_rename_pointer_escapes(load: LoadFilter) -> None:
    h = load(
        "transform",
        {"request": {"body": {"edits": [{"op": "rename", "pointer": "/a~1b/c~0d", "to": "e"}]}}},
    )
    r = h.request(**json_request({"a/b": {"c~d": 1, "z": 2}}))
    assert r.request_body == b'{"a/b":{"e":1,"z":2}}'
