"""serve() and the limits protocol, against real uvicorn servers in subprocesses, with raw sockets."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as websocket_connect

from wasm_gateway.exceptions import ConfigError
from wasm_gateway.server import GatewayHttpProtocol, ServeOptions, ServerLimits, protocol_class, serve

REPO_ROOT = Path(__file__).resolve().parent.parent

# Small limits so every deadline in this file is a fraction of a second.
MAX_HEADER_BYTES = 4096
MAX_HEADER_COUNT = 20
HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
KEEPALIVE_TIMEOUT = 0.5
TEST_LIMITS = {
    "max_header_bytes": MAX_HEADER_BYTES,
    "max_header_count": MAX_HEADER_COUNT,
    "header_read_timeout": HEADER_TIMEOUT,
    "body_read_timeout": BODY_TIMEOUT,
}
# Clients give up after this long: far past every server deadline, so only a missing limit reaches it.
CLIENT_PATIENCE = 5.0


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    stderr_path: Path

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_server(tmp_path: Path, **fields: Any) -> RunningServer:
    fields.setdefault("port", 0)
    fields.setdefault("limits", TEST_LIMITS)
    fields.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT)
    fields.setdefault("log_level", "warning")
    stderr_path = tmp_path / f"server-{time.monotonic_ns()}.log"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", "from tests.server_apps import main; main()", json.dumps(fields)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            line = process.stdout.readline()
            if line.startswith(b"LISTENING "):
                return RunningServer(process, int(line.split()[1]), stderr_path)
            if not line:
                break
    process.kill()
    process.wait()
    raise AssertionError(f"server did not start:\n{stderr_path.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    assert running.stop() == 0, running.stderr_path.read_text()


# HTTP on raw sockets


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def read_head(sock: socket.socket, buffered: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response head: {data!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, rest


def read_response(sock: socket.socket) -> Response:
    status, headers, body = read_head(sock)
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        body += chunk
    assert len(body) == length, "bytes after the response"
    return Response(status, headers, body)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def is_closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def get(path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


def trickle_until_answered(sock: socket.socket, piece: bytes, interval: float = 0.1) -> None:
    """Send ``piece`` every ``interval`` until the server answers (or CLIENT_PATIENCE runs out)."""
    deadline = time.monotonic() + CLIENT_PATIENCE
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            return
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return  # closed by the server: the caller checks how
    raise AssertionError("the server never answered the trickling client")


def assert_error(response: Response, status: int, error: str, detail: str) -> None:
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert json.loads(response.body) == {"error": error, "status": status, "detail": detail}


def padded_request(total_header_bytes: int) -> bytes:
    """A GET whose request line + header lines are exactly ``total_header_bytes`` long."""
    request_line = b"GET / HTTP/1.1\r\n"
    host = b"Host: test\r\n"
    pad_overhead = len(b"X-Pad: \r\n")
    value = b"p" * (total_header_bytes - len(request_line) - len(host) - pad_overhead)
    request = request_line + host + b"X-Pad: " + value + b"\r\n"
    assert len(request) == total_header_bytes
    return request + b"\r\n"


# normal traffic


def test_requests_on_one_keep_alive_connection(server: RunningServer) -> None:
    with server.connect() as sock:
        for _ in range(3):
            sock.sendall(get())
            response = read_response(sock)
            assert (response.status, response.body) == (200, b"ok")
            assert "date" in response.headers
            assert "server" not in response.headers
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello")
        assert read_response(sock).body == b"hello"


def test_websocket_upgrade_outlives_the_idle_deadlines(server: RunningServer) -> None:
    with websocket_connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10) as websocket:
        websocket.send("first")
        assert websocket.recv(timeout=10) == "first"
        time.sleep(2 * max(HEADER_TIMEOUT, KEEPALIVE_TIMEOUT))
        websocket.send("after the deadlines")
        assert websocket.recv(timeout=10) == "after the deadlines"


# header deadline


def test_trickled_headers_get_408(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Trickle: ")
        trickle_until_answered(sock, b"a")
        assert_error(
            read_response(sock),
            408,
            "request_timeout",
            f"request headers not received within {HEADER_TIMEOUT:g} s",
        )
        assert is_closed_by_peer(sock)


def test_trickled_keep_alive_request_gets_408(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.sendall(get())
        assert read_response(sock).status == 200
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Trickle: ")
        trickle_until_answered(sock, b"a")
        assert read_response(sock).status == 408
        assert is_closed_by_peer(sock)


def test_silent_new_connection_is_closed(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.settimeout(CLIENT_PATIENCE)
        assert read_until_closed(sock) == b""


def test_stray_line_breaks_do_not_extend_the_idle_deadline(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.sendall(get())
        assert read_response(sock).status == 200
        trickle_until_answered(sock, b"\r\n")
        assert is_closed_by_peer(sock)


# header size and count


def test_headers_at_the_byte_limit_pass(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.sendall(padded_request(MAX_HEADER_BYTES))
        assert read_response(sock).status == 200


def test_headers_one_byte_over_the_limit_get_431(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.sendall(padded_request(MAX_HEADER_BYTES + 1))
        assert_error(
            read_response(sock),
            431,
            "request_header_fields_too_large",
            f"request headers exceed {MAX_HEADER_BYTES} bytes",
        )
        assert is_closed_by_peer(sock)


def test_long_request_target_gets_431(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.sendall(get("/" + "t" * MAX_HEADER_BYTES))
        assert read_response(sock).status == 431


def test_unfinished_header_line_over_the_limit_gets_431(server: RunningServer) -> None:
    # httptools buffers a header line until it ends; the raw bytes received must bound it.
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Endless: ")
        trickle_until_answered(sock, b"e" * 1024, interval=0.02)
        assert read_response(sock).status == 431
        assert is_closed_by_peer(sock)


def test_header_count_at_the_limit_passes_and_one_more_gets_431(server: RunningServer) -> None:
    # Host is one of the counted fields.
    at_limit = "".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADER_COUNT - 1))
    with server.connect() as sock:
        sock.sendall(get(extra=at_limit))
        assert read_response(sock).status == 200
        sock.sendall(get(extra=at_limit + "X-One-More: v\r\n"))
        assert_error(
            read_response(sock),
            431,
            "request_header_fields_too_large",
            f"request has more than {MAX_HEADER_COUNT} header fields",
        )
        assert is_closed_by_peer(sock)


def test_too_many_header_lines_get_431_before_the_headers_end(server: RunningServer) -> None:
    with server.connect() as sock:
        lines = "".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADER_COUNT + 5))
        sock.sendall(f"GET / HTTP/1.1\r\nHost: test\r\n{lines}".encode())  # no blank line: unfinished
        sock.settimeout(CLIENT_PATIENCE)
        assert_error(
            read_response(sock),
            431,
            "request_header_fields_too_large",
            f"request has more than {MAX_HEADER_COUNT} header fields",
        )


# body deadline


def test_stalled_body_gets_408(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc")
        sock.settimeout(CLIENT_PATIENCE)
        assert_error(
            read_response(sock),
            408,
            "request_timeout",
            f"no request body bytes received for {BODY_TIMEOUT:g} s",
        )
        assert is_closed_by_peer(sock)


def test_slow_but_steady_body_is_accepted(server: RunningServer) -> None:
    # Takes longer than the body deadline in total; no single gap does.
    body = b"steadily"
    with server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(body))
        for byte in body:
            time.sleep(BODY_TIMEOUT / 4)
            sock.sendall(bytes([byte]))
        response = read_response(sock)
        assert (response.status, response.body) == (200, body)


def test_stalled_body_after_response_started_closes_the_connection(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.sendall(b"POST /stream-echo HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc")
        sock.settimeout(CLIENT_PATIENCE)
        status, headers, rest = read_head(sock)
        assert status == 200
        assert headers["transfer-encoding"] == "chunked"
        received = rest + read_until_closed(sock)
        assert received == b"3\r\nabc\r\n", "the chunked body must end without its terminating chunk"


# processes and signals


def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(tmp_path: Path) -> None:
    running = start_server(tmp_path, graceful_shutdown_timeout=10)
    with running.connect() as sock:
        sock.sendall(get("/slow?1"))
        status, _, rest = read_head(sock)  # the app is now sleeping inside the request
        assert status == 200
        running.process.send_signal(signal.SIGTERM)
        body = rest + read_until_closed(sock)
    assert body == b"done"
    assert running.process.wait(timeout=30) == 0, running.stderr_path.read_text()


def test_two_workers_serve_with_limits_and_metrics_dir(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    stale = metrics_dir / "counter_99999.db"
    stale.write_bytes(b"left over from an earlier run")
    running = start_server(
        tmp_path,
        workers=2,
        metrics_multiproc_dir=str(metrics_dir),
        env={"TEST_SERVER_MARK": "from-serve"},
    )
    try:
        with running.connect() as sock:
            sock.sendall(get("/info"))
            info = json.loads(read_response(sock).body)
        assert info["ppid"] == running.process.pid  # answered by a spawned worker
        assert info["multiproc_dir"] == str(metrics_dir)
        assert info["mark"] == "from-serve"
        assert not stale.exists()

        # The limits reached the workers.
        with running.connect() as sock:
            sock.sendall(padded_request(MAX_HEADER_BYTES + 1))
            assert read_response(sock).status == 431
        with running.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Trickle: ")
            trickle_until_answered(sock, b"a")
            assert read_response(sock).status == 408

        # A worker that dies is marked dead for prometheus-client (its live gauge file goes).
        live_gauge = metrics_dir / f"gauge_livesum_{info['pid']}.db"
        assert live_gauge.exists()
        os.kill(info["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while live_gauge.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not live_gauge.exists()
        with running.connect() as sock:
            sock.sendall(get())
            assert read_response(sock).status == 200
    finally:
        exit_code = running.stop()
    assert exit_code == 0, running.stderr_path.read_text()


# in-process


def test_protocol_class_is_cached_per_limits() -> None:
    assert protocol_class(ServerLimits()) is GatewayHttpProtocol
    small = ServerLimits(max_header_bytes=1024)
    assert protocol_class(small) is protocol_class(ServerLimits(max_header_bytes=1024))
    assert protocol_class(small) is not GatewayHttpProtocol
    assert protocol_class(small).limits == small  # type: ignore[attr-defined]


def test_invalid_limits_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="header_read_timeout: 0"):
        ServerLimits(header_read_timeout=0)


def test_workers_need_an_import_string() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(ConfigError, match="import string"):
        serve(ServeOptions(app=app, workers=2))
