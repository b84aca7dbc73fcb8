"""Client address and header rules across the proxy, without sockets."""

from __future__ import annotations

import ipaddress

from wasm_gateway.forwarding import (
    ForwardingPolicy,
    client_address,
    request_id_for,
    response_headers,
    upstream_request_headers,
)

TRUSTED = ForwardingPolicy(trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
NONE = ForwardingPolicy()


def test_client_is_peer_without_trusted_proxies() -> None:
    assert client_address("203.0.113.9", [b"1.2.3.4"], NONE) == "203.0.113.9"


def test_client_from_trusted_chain() -> None:
    # peer 10.0.0.2 (trusted) <- 10.0.0.1 (trusted) <- 198.51.100.7 (client) ; leftmost entry is spoofed
    assert client_address("10.0.0.2", [b"6.6.6.6, 198.51.100.7, 10.0.0.1"], TRUSTED) == "198.51.100.7"
    assert client_address("10.0.0.2", [b"6.6.6.6", b"198.51.100.7"], TRUSTED) == "198.51.100.7"


def test_untrusted_peer_ignores_xff() -> None:
    assert client_address("198.51.100.7", [b"10.0.0.1"], TRUSTED) == "198.51.100.7"


def test_garbage_in_chain_stops_trust() -> None:
    assert client_address("10.0.0.2", [b"1.1.1.1, not-an-ip"], TRUSTED) == "10.0.0.2"


def test_all_trusted_returns_leftmost() -> None:
    assert client_address("10.0.0.2", [b"10.0.0.3"], TRUSTED) == "10.0.0.3"


def headers_for(
    headers: list[tuple[bytes, bytes]], peer: str, policy: ForwardingPolicy
) -> dict[bytes, list[bytes]]:
    out = upstream_request_headers(
        headers,
        peer=peer,
        client=client_address(peer, [v for n, v in headers if n == b"x-forwarded-for"], policy),
        scheme="http",
        host=b"example.com",
        policy=policy,
        request_id=b"rid",
    )
    result: dict[bytes, list[bytes]] = {}
    for name, value in out:
        result.setdefault(name, []).append(value)
    return result


def test_hop_by_hop_and_connection_named_headers_stripped() -> None:
    got = headers_for(
        [
            (b"host", b"example.com"),
            (b"connection", b"keep-alive, X-Secret-Internal"),
            (b"x-secret-internal", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"upgrade", b"h2c"),
            (b"proxy-authorization", b"Basic x"),
            (b"proxy-connection", b"keep-alive"),
            (b"transfer-encoding", b"chunked"),
            (b"content-length", b"5"),
            (b"accept", b"*/*"),
        ],
        "192.0.2.1",
        NONE,
    )
    for name in (
        b"connection",
        b"x-secret-internal",
        b"keep-alive",
        b"te",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
    ):
        assert name not in got, name
    assert got[b"accept"] == [b"*/*"]
    assert got[b"host"] == [b"example.com"]


def test_spoofed_forwarding_headers_from_untrusted_peer_replaced() -> None:
    got = headers_for(
        [
            (b"host", b"example.com"),
            (b"x-forwarded-for", b"127.0.0.1"),
            (b"x-forwarded-host", b"internal.admin"),
            (b"x-forwarded-proto", b"https"),
            (b"forwarded", b"for=127.0.0.1"),
            (b"x-real-ip", b"127.0.0.1"),
            (b"x-request-id", b"attacker"),
        ],
        "192.0.2.1",
        TRUSTED,
    )
    assert got[b"x-forwarded-for"] == [b"192.0.2.1"]
    assert got[b"x-forwarded-host"] == [b"example.com"]
    assert got[b"x-forwarded-proto"] == [b"http"]
    assert got[b"x-real-ip"] == [b"192.0.2.1"]
    assert got[b"x-request-id"] == [b"rid"]
    assert b"forwarded" not in got


def test_trusted_peer_chain_appended() -> None:
    got = headers_for(
        [(b"host", b"example.com"), (b"x-forwarded-for", b"198.51.100.7"), (b"x-forwarded-proto", b"https")],
        "10.0.0.2",
        TRUSTED,
    )
    assert got[b"x-forwarded-for"] == [b"198.51.100.7, 10.0.0.2"]
    assert got[b"x-forwarded-proto"] == [b"https"]
    assert got[b"x-real-ip"] == [b"198.51.100.7"]
    assert got[b"via"] == [b"1.1 wasm-gateway"]


def test_request_id_only_trusted_from_trusted_peer() -> None:
    headers = [(b"x-request-id", b"abc-123")]
    assert request_id_for(headers, "10.0.0.1", TRUSTED) == b"abc-123"
    assert request_id_for(headers, "192.0.2.1", TRUSTED) != b"abc-123"
    assert request_id_for([(b"x-request-id", b"bad\nid")], "10.0.0.1", TRUSTED) != b"bad\nid"


def test_response_hop_by_hop_stripped() -> None:
    out = response_headers(
        [
            (b"connection", b"close, x-internal"),
            (b"x-internal", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"content-type", b"text/plain"),
        ],
        request_id=b"r",
    )
    assert out == [(b"content-type", b"text/plain"), (b"x-request-id", b"r")]


def test_request_ids_unique_and_reseeded_after_fork() -> None:
    import multiprocessing
    import os

    from wasm_gateway.forwarding import new_request_id

    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)
    read, write = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:  # child: its first id must not collide with the parent's next one
        write.send(new_request_id())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = read.recv()
    assert child_id[:16] != new_request_id()[:16]
