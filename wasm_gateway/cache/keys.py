"""Cache keys: pure functions.

The primary key names a URI: scheme, canonical host and canonical path + query (the path the route and its
filters were chosen for, from `routing.canonicalize`). Everything else that selects a variant (the route's
extra key parts, the forwarding headers the origin may reflect, and the response's ``Vary``) goes into the
secondary key, so invalidating or purging a URI (one delete of its primary record) drops every variant.

Keys are SHA-256 digests: fixed length whatever the URL, and no key can be forged to collide with another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from hashlib import sha256

from ..routing import PathRejected, canonicalize, normalize_host
from .policy import normalise_vary_value

__all__ = ["KeySpec", "cache_url", "canonical_target", "extra_key", "primary_key", "secondary_key"]

Headers = Sequence[tuple[bytes, bytes]]

# Forwarding headers the gateway itself sends upstream (from a trusted proxy they may differ from Host and
# the scheme): an origin may reflect them into a body, so they key the entry.
KEYED_FORWARDING = (b"x-forwarded-host", b"x-forwarded-proto", b"forwarded")
# Request headers that rewrite what some origins serve without being part of the URL (classic unkeyed
# inputs of cache-poisoning attacks): never sent upstream on cached routes.
STRIPPED_ON_CACHED_ROUTES = frozenset(
    {
        b"x-original-url",
        b"x-rewrite-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-forwarded-server",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-host",
        b"x-original-host",
    }
)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A route's extra key parts."""

    headers: tuple[bytes, ...] = ()
    """Request header names (lower-case), e.g. a claim header set by the auth filter."""
    cookie: bytes | None = None
    """One cookie's name: its value keys the entry."""


def canonical_target(target: str) -> str | None:
    """The canonical path + query of a request target (filters may have rewritten it), None when the path
    cannot be made canonical (the request then bypasses the cache)."""
    path, sep, query = target.partition("?")
    try:
        canonical = canonicalize(path.encode("latin-1")).path
    except (PathRejected, UnicodeEncodeError):
        return None
    return canonical + sep + query


def cache_url(scheme: str, host: str, target: str) -> str:
    """The URL an entry is filed under (what purges name): ``scheme://host/path?query``."""
    return f"{scheme}://{_normalized_host(host)}{target}"


@lru_cache(maxsize=1024)
def _normalized_host(host: str) -> str:
    return normalize_host(host)


def primary_key(url: str) -> bytes:
    return sha256(b"GET " + url.encode("latin-1", "replace")).digest()


def extra_key(spec: KeySpec, headers: Headers, host: bytes, scheme: bytes, forwarded: bool = True) -> bytes:
    """The route's extra key parts and the keyed forwarding headers as sent upstream, as one byte string;
    empty when every part has its default (forwarding headers that just repeat Host and the scheme, no
    extra header, no cookie), which lets the common entry live at its primary key (one read per hit).
    ``forwarded`` False: ``headers`` are the client's, whose forwarding headers the gateway replaces (an
    untrusted peer), so those parts have their defaults."""
    forwarded_host = forwarded_proto = forwarded_list = b""
    extra: list[bytes] = []
    if forwarded:
        for name, value in headers:
            if name == b"x-forwarded-host":
                forwarded_host = value
            elif name == b"x-forwarded-proto":
                forwarded_proto = value
            elif name == b"forwarded":
                forwarded_list += value + b","
    parts = [
        b"" if forwarded_host == host else forwarded_host,
        b"" if forwarded_proto == scheme else forwarded_proto,
        forwarded_list,
    ]
    for name in spec.headers:
        extra.append(b",".join(v for n, v in headers if n == name))
    if spec.cookie is not None:
        extra.append(_cookie(headers, spec.cookie) or b"")
    parts.extend(extra)
    if not any(parts):
        return b""
    return b"\n".join(p.replace(b"\n", b"") for p in parts)


def secondary_key(primary: bytes, extra: bytes, vary: Sequence[bytes], headers: Headers) -> bytes:
    """The variant key: primary key, extra key parts, and the normalised values of the ``Vary`` fields."""
    h = sha256(primary)
    h.update(b"\x00")
    h.update(extra)
    for name in vary:
        h.update(b"\x00" + name + b"=")
        h.update(normalise_vary_value(name, [v for n, v in headers if n == name]))
    return h.digest()


def _cookie(headers: Headers, name: bytes) -> bytes | None:
    for n, value in headers:
        if n != b"cookie":
            continue
        for pair in value.split(b";"):
            key, eq, val = pair.strip().partition(b"=")
            if eq and key == name:
                return val
    return None
