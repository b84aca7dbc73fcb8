"""Header conversions between the request path (bytes) and the filters' view (str, Envoy pseudo-headers).

The conversions have a fast path (whole lists converted in C) and a plain per-pair fallback; both must give
exactly what the per-pair rules below say, whatever the filters did to the list.
"""

from __future__ import annotations

import random

import pytest

from wasm_gateway.filtering import (
    from_filter_request,
    from_filter_response,
    to_filter_request,
    to_filter_response,
)

Bytes = list[tuple[bytes, bytes]]
Str = list[tuple[str, str]]
DROPPED = {"content-length", "transfer-encoding", "connection", "keep-alive", "te", "upgrade", "host"}


def expected_from_request(headers: Str) -> tuple[str, str, bytes, Bytes]:
    pseudo = {n: v for n, v in headers if n.startswith(":")}  # the last of each wins
    out = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers if not n.startswith(":")]
    out = [(n, v) for n, v in out if n.decode() not in DROPPED]
    host = pseudo.get(":authority", "").encode("latin-1")
    return pseudo.get(":method", ""), pseudo.get(":path", ""), host, [(b"host", host), *out]


def expected_from_response(headers: Str, fallback: int) -> tuple[int, Bytes]:
    status = fallback
    for n, v in headers:
        if n == ":status" and v.isdigit() and 100 <= int(v) <= 599:
            status = int(v)
    out = [
        (n.encode("latin-1"), v.encode("latin-1"))
        for n, v in headers
        if not n.startswith(":") and n not in DROPPED - {"host"}
    ]
    return status, out


REQUEST: Bytes = [
    (b"user-agent", b"curl/8"),
    (b"accept", b"*/*"),
    (b"host", b"site.example"),
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"cookie", b"a=\xe9"),  # latin-1 byte
]


def test_request_round_trip_is_the_identity_for_the_upstream() -> None:
    seen = to_filter_request("GET", "/a?b=1", b"site.example", "https", REQUEST)
    assert seen[:4] == [
        (":method", "GET"),
        (":path", "/a?b=1"),
        (":authority", "site.example"),
        (":scheme", "https"),
    ]
    assert ("host", "site.example") not in seen
    assert ("cookie", "a=\xe9") in seen
    method, target, host, out = from_filter_request(seen)
    assert (method, target, host) == ("GET", "/a?b=1", b"site.example")
    assert out == [(b"host", b"site.example"), *(h for h in REQUEST if h[0] != b"host")]


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.append(("x-added", "1")),
        lambda h: h.__setitem__(1, (":path", "/rewritten")),
        lambda h: h.append((":path", "/second")),  # a later duplicate pseudo-header wins
        lambda h: h.append(("content-length", "5")),  # framing is the upstream client's business
        lambda h: h.append(("host", "evil.example")),  # Host comes from :authority only
        lambda h: h.append(("x-nul", "a\0b")),  # cannot occur on the wire; must not confuse the fast path
        lambda h: h.append(("x-colon", ":value")),  # a value that starts with ':'
        lambda h: h.append((":unknown", "x")),  # unknown pseudo-header: never forwarded
        lambda h: h.pop(0),  # :method removed
        lambda h: h.insert(0, h.pop(3)),  # pseudo-headers reordered
        lambda h: h.clear(),
    ],
)
def test_from_filter_request_follows_the_per_pair_rules(edit: object) -> None:
    seen = to_filter_request("POST", "/x", b"site.example", "http", REQUEST)
    edit(seen)  # type: ignore[operator]
    assert from_filter_request(seen) == expected_from_request(seen)


def test_response_conversions_follow_the_per_pair_rules() -> None:
    upstream: Bytes = [(b"content-type", b"text/plain"), (b"content-length", b"3"), (b"x-\xff", b"\xfe")]
    seen = to_filter_response(200, upstream)
    assert seen == [
        (":status", "200"),
        ("content-type", "text/plain"),
        ("content-length", "3"),
        ("x-\xff", "\xfe"),
    ]
    assert from_filter_response(seen, 200) == expected_from_response(seen, 200)
    for edit in (
        [(":status", "404"), ("x-a", "1")],
        [(":status", "999"), ("x-a", "1")],  # out of range: the fallback status
        [("x-a", "1"), (":status", "201")],
        [(":status", "200"), ("transfer-encoding", "chunked"), ("connection", "close"), ("x-b", "\0")],
        [(":status", "200"), (":weird", "1")],
        [],
    ):
        assert from_filter_response(edit, 502) == expected_from_response(edit, 502), edit


def test_random_lists_agree_with_the_per_pair_rules() -> None:
    rng = random.Random(7)
    names = [":method", ":path", ":authority", ":scheme", ":status", "host", "te", "x-a", "x-b", "accept"]
    values = ["", "1", "/p", "a b", ":v", "\xe9", "x\0y", "200", "GET"]
    for _ in range(2000):
        headers = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.5:
            headers[:0] = [(":method", "GET"), (":path", "/"), (":authority", "h"), (":scheme", "http")]
        assert from_filter_request(headers) == expected_from_request(headers), headers
        assert from_filter_response(headers, 503) == expected_from_response(headers, 503), headers
        as_bytes = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        assert to_filter_response(204, as_bytes) == [(":status", "204"), *headers]
        seen = to_filter_request("GET", "/", b"h", "http", as_bytes)
        assert seen[4:] == [h for h in headers if h[0] != "host"]
