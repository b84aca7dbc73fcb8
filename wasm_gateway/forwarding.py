"""Who the client is, and which headers cross the proxy: pure functions on ASGI header lists.

Client address (Envoy's and nginx ``real_ip_recursive``'s rule): the TCP peer, unless the peer is a trusted
proxy; then walk ``X-Forwarded-For`` from the right, skipping trusted proxies; the first untrusted address is the
client. A client-supplied ``X-Forwarded-For`` alone is never believed.

Forwarding headers (Traefik's rule for untrusted peers): from an untrusted peer, client-sent ``X-Forwarded-*``,
``Forwarded``, ``X-Real-IP`` and ``X-Request-Id`` are dropped and replaced by the gateway's own; from a trusted
peer they are kept and the peer is appended to ``X-Forwarded-For``.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "HOP_BY_HOP",
    "ForwardingPolicy",
    "client_address",
    "connection_tokens",
    "new_request_id",
    "request_id_for",
    "response_headers",
    "upstream_request_headers",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Headers the gateway computes itself; client-sent copies are dropped unless the peer is trusted.
_FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,200}$")


@dataclass(frozen=True, slots=True)
class ForwardingPolicy:
    trusted_proxies: tuple[IPNetwork, ...] = ()
    via: bytes = b"1.1 wasm-gateway"
    request_id_header: bytes = b"x-request-id"
    rewrite_host: bytes | None = None
    """When set, the upstream gets this Host (``host_header = "rewrite"``); else the client's Host is preserved."""

    def is_trusted(self, address: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted_proxies)


def client_address(peer: str | None, forwarded_for: Sequence[bytes], policy: ForwardingPolicy) -> str:
    """The client's address from the TCP peer and, only through trusted proxies, ``X-Forwarded-For``."""
    if peer is None:
        return "unknown"
    if not policy.trusted_proxies or not policy.is_trusted(peer):
        return peer
    hops = [h.strip().decode("latin-1") for value in forwarded_for for h in value.split(b",")]
    for hop in reversed(hops):
        address = _strip_port(hop)
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return peer  # garbage in the chain: trust nothing beyond the last trusted hop we saw
        if not policy.is_trusted(address):
            return address
        peer = address
    return peer


def _strip_port(hop: str) -> str:
    if hop.startswith("["):
        return hop[1 : hop.find("]")] if "]" in hop else hop
    if hop.count(":") == 1:
        return hop.split(":", 1)[0]
    return hop


def connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def upstream_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    peer: str | None,
    client: str,
    scheme: str,
    host: bytes,
    policy: ForwardingPolicy,
    request_id: bytes,
    keep_upgrade: bool = False,
) -> list[tuple[bytes, bytes]]:
    """Headers for the upstream request: hop-by-hop and framing stripped, forwarding headers set.

    ``Content-Length`` / ``Transfer-Encoding`` are dropped: the upstream client re-frames every body itself.
    """
    trusted = peer is not None and policy.is_trusted(peer)
    named = connection_tokens(headers) if any(n == b"connection" for n, _ in headers) else frozenset()
    out: list[tuple[bytes, bytes]] = []
    xff: list[bytes] = []
    proto: bytes | None = None
    fwd_host: bytes | None = None
    via: list[bytes] = []
    for name, value in headers:
        if name in HOP_BY_HOP or name in named:
            if keep_upgrade and name == b"upgrade":
                out.append((name, value))
            continue
        if name == b"content-length" or name == b"host" or name == policy.request_id_header:
            continue
        if name in _FORWARDING:
            if trusted:
                if name == b"x-forwarded-for":
                    xff.append(value)
                elif name == b"x-forwarded-proto":
                    proto = value
                elif name == b"x-forwarded-host":
                    fwd_host = value
                else:
                    out.append((name, value))
            continue
        if name == b"via":
            via.append(value)
            continue
        out.append((name, value))
    out.append((b"host", policy.rewrite_host or host))
    if keep_upgrade:
        out.append((b"connection", b"upgrade"))
    if peer is not None:
        xff.append(peer.encode())
    out.append((b"x-forwarded-for", b", ".join(xff)))
    out.append((b"x-forwarded-proto", proto or scheme.encode()))
    out.append((b"x-forwarded-host", fwd_host or host))
    out.append((b"x-real-ip", client.encode()))
    via.append(policy.via)
    out.append((b"via", b", ".join(via)))
    out.append((policy.request_id_header, request_id))
    return out


_id_prefix = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _reseed_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed_ids)  # forked workers (gunicorn --preload) must not share ids


def new_request_id() -> bytes:
    """32 hex characters, unique per process (random prefix) and per request (counter): a uuid4 costs 4x more."""
    return f"{_id_prefix}{next(_id_counter):016x}".encode()


def request_id_for(
    headers: Sequence[tuple[bytes, bytes]], peer: str | None, policy: ForwardingPolicy
) -> bytes:
    """Propagate a well-formed request id from a trusted peer, else generate one (Envoy's default)."""
    if peer is not None and policy.trusted_proxies and policy.is_trusted(peer):
        for name, value in headers:
            if name == policy.request_id_header and _REQUEST_ID_RE.match(value):
                return value
    return new_request_id()


def response_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    request_id: bytes | None = None,
    request_id_header: bytes = b"x-request-id",
) -> list[tuple[bytes, bytes]]:
    """Upstream response headers for the client: hop-by-hop (incl. those named in Connection) removed, and the
    origin's ``Date`` dropped because the server adds the gateway's own (nginx's default too)."""
    named = connection_tokens(headers) if any(n == b"connection" for n, _ in headers) else frozenset()
    out = [
        (name, value)
        for name, value in headers
        if name not in HOP_BY_HOP and name not in named and name != b"date"
    ]
    if request_id is not None and not any(n == request_id_header for n, _ in out):
        out.append((request_id_header, request_id))
    return out
