"""Canonical paths and route matching: pure functions, no I/O.

The gateway decides from ``raw_path`` once. :func:`canonicalize` turns what the client sent into the one path used
for route matching, filters (``:path``), cache keys and the upstream request line, so no later stage can see a
different path than the one the route (and its auth) was chosen for.

Rules, in order (RFC 3986 section 6.2.2 normalisation, then the rejections Envoy recommends at the edge):

* the path must start with ``/``; NUL, control characters, raw backslashes -> reject;
* per segment, percent-encoded *unreserved* characters are decoded once (``%41`` -> ``A``, ``%7E`` -> ``~``);
  other escapes are kept with upper-case hex; bytes outside the RFC 3986 ``pchar`` set are percent-encoded;
* a segment that decodes to ``.`` or ``..`` from an escape (``%2e``, ``.%2E``) -> reject (ambiguous for origins);
* ``%00`` -> reject; ``%5C`` (backslash) -> reject; ``%2F`` (slash) -> kept, but the request is rejected unless the
  matched route sets ``keep_encoded_slashes`` (it never acts as a separator for matching);
* ``..;`` / ``.;`` segments (Tomcat path parameters on dot segments) -> reject;
* ``.`` and ``..`` segments are resolved (``..`` never climbs above ``/``), duplicate slashes merged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from .config import RouteConfig

__all__ = [
    "CanonicalPath",
    "PathRejected",
    "RouteMatch",
    "RouteTable",
    "canonicalize",
    "normalize_host",
]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar = unreserved / pct-encoded / sub-delims / ":" / "@"  (RFC 3986 3.3); "%" handled separately
_PCHAR = _UNRESERVED | frozenset(b"!$&'()*+,;=:@")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class PathRejected(Exception):
    """The raw path cannot be made canonical without guessing; ``reason`` is a short client-safe message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CanonicalPath:
    path: str
    """Canonical, still percent-encoded where needed, ASCII only."""
    has_encoded_slash: bool


# Segments of pchars that do not start with "." (so no dot segments), no escapes, no empty segments.
_FAST_PATH_RE = re.compile(rb"^(?:/[A-Za-z0-9\-_~!$&'()*+,;=:@]+(?:\.[A-Za-z0-9\-_~!$&'()*+,;=:@]+)*)*/?$")


def canonicalize(raw_path: bytes) -> CanonicalPath:
    """Return the canonical form of a request's raw path (without query), or raise :class:`PathRejected`."""
    # Fast path: most paths are already canonical (no escapes, no dot segments, no empty segments).
    if _FAST_PATH_RE.match(raw_path):
        return CanonicalPath(raw_path.decode("ascii"), False)
    if not raw_path.startswith(b"/"):
        raise PathRejected("path must start with '/'")
    out_segments: list[str] = []
    has_encoded_slash = False
    trailing_slash = False
    for segment in raw_path.split(b"/")[1:]:
        text, encoded_dot, encoded_slash = _normalize_segment(segment)
        has_encoded_slash |= encoded_slash
        # RFC 3986 5.2.4: a path ending in "/", "/." or "/.." keeps a trailing slash.
        trailing_slash = text in ("", ".", "..")
        if text == "":
            continue  # merge duplicate slashes
        if text in (".", ".."):
            if encoded_dot:
                raise PathRejected("encoded dot segment in path")
            if text == ".." and out_segments:
                out_segments.pop()
            continue
        if text.startswith((".;", "..;")):
            raise PathRejected("path parameter on a dot segment")
        out_segments.append(text)
    path = "/" + "/".join(out_segments)
    if trailing_slash and out_segments:
        path += "/"
    return CanonicalPath(path, has_encoded_slash)


def _normalize_segment(segment: bytes) -> tuple[str, bool, bool]:
    """Decode unreserved escapes once; return (text, decoded-a-dot, has %2F)."""
    out = bytearray()
    encoded_dot = False
    encoded_slash = False
    i = 0
    n = len(segment)
    while i < n:
        c = segment[i]
        if c == 0x25:  # '%'
            if i + 2 < n and segment[i + 1] in _HEX and segment[i + 2] in _HEX:
                value = int(segment[i + 1 : i + 3], 16)
                if value == 0:
                    raise PathRejected("encoded NUL in path")
                if value == 0x5C:
                    raise PathRejected("encoded backslash in path")
                if value in _UNRESERVED:
                    out.append(value)
                    encoded_dot |= value == 0x2E
                else:
                    encoded_slash |= value == 0x2F
                    out += b"%%%02X" % value
                i += 3
                continue
            raise PathRejected("malformed percent-encoding in path")
        if c < 0x20 or c == 0x7F:
            raise PathRejected("control character in path")
        if c == 0x5C:
            raise PathRejected("backslash in path")
        if c in _PCHAR:
            out.append(c)
        else:
            out += b"%%%02X" % c
        i += 1
    return out.decode("ascii"), encoded_dot, encoded_slash


def normalize_host(host: str) -> str:
    """Lower-case, strip one trailing dot from the name, keep the port (``Api.Example.COM.:80`` -> ``api.example.com:80``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host
    name, sep, port = host.rpartition(":")
    if not sep:
        name, port = host, ""
    name = name.rstrip(".") if name.endswith(".") else name
    return f"{name}:{port}" if sep else name


class _Kind(Enum):
    EXACT = 0
    PATTERN = 1
    PREFIX = 2


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    config: RouteConfig
    kind: _Kind
    prefix: str
    regex: re.Pattern[str] | None
    methods: frozenset[str]
    order: int

    def matches_path(self, path: str) -> bool:
        if self.kind is _Kind.EXACT:
            return path == self.prefix
        if self.kind is _Kind.PREFIX:
            p = self.prefix
            return p == "/" or path == p or path.startswith(p + "/") or path == p + "/"
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Result of :meth:`RouteTable.match`: a route, or the reason there is none."""

    route: RouteConfig | None
    status: int = 200
    """200 when matched; 404 (no route) or 405 (path matched, method did not)."""
    allow: tuple[str, ...] = ()


class RouteTable:
    """Routes grouped like Envoy virtual hosts: a request whose Host names a route's host only sees those routes;
    host-less routes serve every other host. Within the group: exact path, then patterns, then the longest prefix,
    ties in config order."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._by_host: dict[str, list[_CompiledRoute]] = {}
        self._wildcards: list[tuple[str, list[_CompiledRoute]]] = []
        self._default: list[_CompiledRoute] = []
        for order, route in enumerate(routes):
            compiled = _compile(route, order)
            if not route.hosts:
                self._default.append(compiled)
            for host in route.hosts:
                if host.startswith("*."):
                    for suffix, group in self._wildcards:
                        if suffix == host[1:]:
                            group.append(compiled)
                            break
                    else:
                        self._wildcards.append((host[1:], [compiled]))
                else:
                    self._by_host.setdefault(normalize_host(host), []).append(compiled)
        for group in [self._default, *self._by_host.values(), *(g for _, g in self._wildcards)]:
            group.sort(key=_specificity)
        self._wildcards.sort(key=lambda item: -len(item[0]))

    def _group(self, host: str) -> list[_CompiledRoute]:
        group = self._by_host.get(host)
        if group is not None:
            return group
        name = host.rpartition(":")[0] if ":" in host and not host.endswith("]") else host
        group = self._by_host.get(name)
        if group is not None:
            return group
        for suffix, wild in self._wildcards:
            if name.endswith(suffix) and len(name) > len(suffix):
                return wild
        return self._default

    def match(self, host: str, path: str, method: str) -> RouteMatch:
        allow: set[str] = set()
        for compiled in self._group(host):
            if not compiled.matches_path(path):
                continue
            if not compiled.methods or method in compiled.methods:
                return RouteMatch(compiled.config)
            allow |= compiled.methods
        if allow:
            return RouteMatch(None, 405, tuple(sorted(allow)))
        return RouteMatch(None, 404)


def _specificity(route: _CompiledRoute) -> tuple[int, int, int]:
    return (route.kind.value, -len(route.prefix) if route.kind is _Kind.PREFIX else 0, route.order)


def _compile(route: RouteConfig, order: int) -> _CompiledRoute:
    methods = set(route.methods)
    if "GET" in methods:
        methods.add("HEAD")
    if route.path is not None:
        return _CompiledRoute(route, _Kind.EXACT, route.path, None, frozenset(methods), order)
    if route.path_pattern is not None:
        regex = _pattern_regex(route.path_pattern)
        return _CompiledRoute(route, _Kind.PATTERN, route.path_pattern, regex, frozenset(methods), order)
    prefix = route.path_prefix or "/"
    if len(prefix) > 1:
        prefix = prefix.rstrip("/")
    return _CompiledRoute(route, _Kind.PREFIX, prefix, None, frozenset(methods), order)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    pos = 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}", pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>.+)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out))
