"""Canonical paths and route matching, without sockets."""

from __future__ import annotations

import pytest

from wasm_gateway.config import RouteConfig
from wasm_gateway.routing import PathRejected, RouteTable, canonicalize, normalize_host


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (b"/", "/"),
        (b"/a/b", "/a/b"),
        (b"/a//b", "/a/b"),
        (b"//admin", "/admin"),
        (b"/a/./b", "/a/b"),
        (b"/a/../b", "/b"),
        (b"/../../etc/passwd", "/etc/passwd"),
        (b"/a/b/", "/a/b/"),
        (b"/a/b/..", "/a/"),
        (b"/a/.", "/a/"),
        (b"/%61dmin", "/admin"),
        (b"/A%7e%2D", "/A~-"),
        (b"/a%3f", "/a%3F"),
        (b"/caf\xc3\xa9", "/caf%C3%A9"),
        (b"/.well-known/x", "/.well-known/x"),
        (b"/a;b=c/d", "/a;b=c/d"),
        (b"/public/..//admin", "/admin"),
    ],
)
def test_canonical(raw: bytes, canonical: str) -> None:
    assert canonicalize(raw).path == canonical


@pytest.mark.parametrize(
    "raw",
    [
        b"/public/%2e%2e/admin",
        b"/public/.%2E/admin",
        b"/public/%2e/admin",
        b"/a%00b",
        b"/a\x00b",
        b"/a\\..\\admin",
        b"/a%5c..%5cadmin",
        b"/a%zz",
        b"/a%2",
        b"/public/..;/admin",
        b"/public/.;/admin",
        b"/a\x7f",
        b"admin",
    ],
)
def test_rejected(raw: bytes) -> None:
    with pytest.raises(PathRejected):
        canonicalize(raw)


def test_encoded_slash_kept_and_flagged() -> None:
    result = canonicalize(b"/files/a%2fb")
    assert result.path == "/files/a%2Fb"
    assert result.has_encoded_slash


def test_canonical_is_idempotent() -> None:
    for raw in [b"/a//b/../c/%41", b"/caf\xc3\xa9/./x", b"/x/%2F/y"]:
        once = canonicalize(raw).path
        assert canonicalize(once.encode()).path == once


def route(name: str, **kw: object) -> RouteConfig:
    return RouteConfig(name=name, upstream="u", **kw)  # type: ignore[arg-type]


def test_most_specific_wins() -> None:
    table = RouteTable(
        [
            route("root", path_prefix="/"),
            route("api", path_prefix="/api"),
            route("api-v2", path_prefix="/api/v2/"),
            route("user", path_pattern="/api/users/{id}"),
            route("exact", path="/api/health"),
        ]
    )
    m = lambda p: table.match("h", p, "GET").route.name  # noqa: E731
    assert m("/x") == "root"
    assert m("/api") == "api"
    assert m("/api/x") == "api"
    assert m("/apix") == "root"  # prefixes match whole segments
    assert m("/api/v2") == "api-v2"
    assert m("/api/v2/x") == "api-v2"
    assert m("/api/users/7") == "user"
    assert m("/api/users/7/x") == "api"
    assert m("/api/health") == "exact"


def test_method_not_allowed_lists_allow() -> None:
    table = RouteTable([route("r", path_prefix="/a", methods=("GET", "POST"))])
    result = table.match("h", "/a/b", "DELETE")
    assert result.route is None and result.status == 405
    assert result.allow == ("GET", "HEAD", "POST")
    assert table.match("h", "/a", "HEAD").route is not None
    assert table.match("h", "/b", "GET").status == 404


def test_hosts_are_virtual_hosts() -> None:
    table = RouteTable(
        [
            route("admin", hosts=("admin.example.com",), path_prefix="/"),
            route("wild", hosts=("*.apps.example.com",), path_prefix="/"),
            route("default", path_prefix="/public"),
        ]
    )
    assert table.match("admin.example.com", "/x", "GET").route.name == "admin"
    assert table.match("admin.example.com:8443", "/x", "GET").route.name == "admin"
    assert table.match("a.apps.example.com", "/", "GET").route.name == "wild"
    # An unknown host never falls into another host's routes.
    assert table.match("evil.com", "/x", "GET").status == 404
    assert table.match("evil.com", "/public", "GET").route.name == "default"
    # A host with its own routes does not fall back to host-less routes either (Envoy's virtual hosts).
    assert table.match("admin.example.com", "/public", "GET").route.name == "admin"


def test_normalize_host() -> None:
    assert normalize_host("Admin.Example.COM.") == "admin.example.com"
    assert normalize_host("admin.example.com.:80") == "admin.example.com:80"
    assert normalize_host("[::1]:80") == "[::1]:80"


def test_pattern_path_param() -> None:
    table = RouteTable([route("files", path_pattern="/files/{rest:path}"), route("root", path_prefix="/")])
    assert table.match("h", "/files/a/b/c", "GET").route.name == "files"
    assert table.match("h", "/files/", "GET").route.name == "root"
