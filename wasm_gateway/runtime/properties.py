"""Envoy attribute names and encodings for proxy_get_property.

Strings are raw bytes, integers 8-byte little-endian, booleans one byte, timestamps int64 nanoseconds, and
maps (``request.headers``) in the header-pairs encoding. A path is NUL-separated segments; a map can be
indexed by one more segment (``request.headers\\0user-agent``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .memory import encode_pairs

if TYPE_CHECKING:
    from .context import Headers, HostState, StreamContext

__all__ = ["encode_value", "get_property", "split_path"]

_I64: Final = struct.Struct("<q")


def encode_value(value: bytes | str | int | bool) -> bytes:
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return _I64.pack(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def split_path(raw: bytes) -> list[bytes]:
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    parts = raw.split(b"\0")
    # Some SDKs (Go's) send dotted names as one segment: accept "request.path" like ["request", "path"]
    if len(parts) == 1 and b"." in parts[0]:
        return [parts[0]]
    return parts


def _header(headers: Headers, name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _map(headers: Headers) -> bytes:
    return encode_pairs(
        [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers if not k.startswith(":")]
    )


def _req(name: str) -> Callable[[StreamContext], str | None]:
    return lambda s: _header(s.request_headers, name)


def _hostport(address: str, port: int) -> str | None:
    """Envoy's address attributes are "ip:port" ("[v6]:port")."""
    if not address:
        return None
    if not port:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _path_parts(s: StreamContext) -> tuple[str, str]:
    p = _header(s.request_headers, ":path") or ""
    path, _, query = p.partition("?")
    return path, query


_STREAM: Final[dict[str, Callable[[StreamContext], bytes | str | int | bool | None]]] = {
    "request.path": _req(":path"),
    "request.url_path": lambda s: _path_parts(s)[0],
    "request.query": lambda s: _path_parts(s)[1],
    "request.host": _req(":authority"),
    "request.scheme": _req(":scheme"),
    "request.method": _req(":method"),
    "request.useragent": _req("user-agent"),
    "request.referer": _req("referer"),
    "request.id": lambda s: _header(s.request_headers, "x-request-id") or s.info.request_id or None,
    "request.protocol": lambda s: s.info.protocol,
    "request.time": lambda s: s.info.start_time_ns,
    "request.size": lambda s: len(s.request_body) if s.request_eos else None,
    "request.headers": lambda s: _map(s.request_headers),
    "response.code": lambda s: (
        int(c) if (c := _header(s.response_headers, ":status")) and c.isdigit() else None
    ),
    "response.headers": lambda s: _map(s.response_headers) if s.response_headers else None,
    "response.size": lambda s: len(s.response_body) if s.response_eos else None,
    "source.address": lambda s: _hostport(s.info.source_address, s.info.source_port),
    "source.port": lambda s: s.info.source_port or None,
    "destination.address": lambda s: _hostport(s.info.destination_address, s.info.destination_port),
    "destination.port": lambda s: s.info.destination_port or None,
    "connection.id": lambda s: s.info.connection_id,
    "route_name": lambda s: s.info.route_name or None,
    "upstream.address": lambda s: s.info.upstream_address or None,
}

_MAPS: Final = {"request.headers": "request_headers", "response.headers": "response_headers"}


# Filters ask for the same few paths on every request: parse each once. Bounded (paths come from the guest).
_parsed: dict[bytes, tuple[bytes, str, tuple[str, ...]] | None] = {}
_PARSED_MAX: Final = 1024


def _parse(raw_path: bytes) -> tuple[bytes, str, tuple[str, ...]] | None:
    """(NUL-joined key, dotted name, segments), or None when the path is not UTF-8."""
    parts = split_path(raw_path)
    try:
        segs = tuple(p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        return None
    return b"\0".join(parts), ".".join(segs), segs


def get_property(state: HostState, raw_path: bytes) -> bytes | None:
    """The encoded value of a property, or None when it is not known (NOT_FOUND)."""
    try:
        parsed = _parsed[raw_path]
    except KeyError:
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        parsed = _parsed[raw_path] = _parse(raw_path)
    if parsed is None:
        return None
    key, dotted, segs = parsed
    stream = state.current
    if stream is not None and stream._properties:
        custom = stream._properties.get(key)
        if custom is not None:
            return custom
    svc = state.services
    if dotted == "plugin_name":
        return svc.name.encode()
    if dotted == "plugin_root_id":
        return svc.root_id.encode()
    if dotted == "plugin_vm_id":
        return svc.vm_id.encode()
    if stream is None:
        return None
    if len(segs) >= 3:
        base = ".".join(segs[:2])
        attr = _MAPS.get(base)
        if attr is not None:
            value = _header(getattr(stream, attr), ".".join(segs[2:]).lower())
            return value.encode("latin-1") if value is not None else None
    getter = _STREAM.get(dotted)
    if getter is not None:
        v = getter(stream)
        return None if v is None else encode_value(v)
    extra = stream.info.extra.get(dotted)
    return None if extra is None else encode_value(extra)
