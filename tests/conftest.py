"""Shared test helpers: real uvicorn servers on loopback, in threads or subprocesses."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class ThreadServer:
    """A uvicorn server running an ASGI app in a daemon thread (own event loop)."""

    def __init__(self, app: Any, **config: Any) -> None:
        import uvicorn

        self.port = config.pop("port", None) or free_port()
        config.setdefault("log_level", "warning")
        config.setdefault("access_log", False)
        config.setdefault("lifespan", "on")
        config.setdefault("loop", "uvloop")
        config.setdefault("http", "httptools")
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, **config)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn test server failed to start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def gateway_server(config_text: str, tmp_path: Path, app: Any = None, **server_kw: Any) -> ThreadServer:
    """The gateway from TOML text, served by uvicorn with the gateway's own protocol class (limits on)."""
    from wasm_gateway.app import Gateway
    from wasm_gateway.config import load_config
    from wasm_gateway.server import limits_for, protocol_class

    path = tmp_path / "gateway.toml"
    path.write_text(config_text)
    config = load_config(path)
    gateway = Gateway(config, app)
    server_kw.setdefault("http", protocol_class(limits_for(config.server)))
    server_kw.setdefault("proxy_headers", False)  # the gateway decides client addresses itself
    server_kw.setdefault("server_header", False)  # as serve() runs it
    server = ThreadServer(gateway, **server_kw)
    server.gateway = gateway  # type: ignore[attr-defined]
    return server


class Subprocess:
    """``python -m wasm_gateway ...`` in a subprocess; stops it (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.args = [sys.executable, "-m", "wasm_gateway", *args]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Subprocess:
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT)
        )
        if self.port is not None:
            try:
                wait_port(self.port, timeout=30)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"gateway did not start: {self.output()}") from None
        return self

    def output(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stdout is not None
        return self.proc.stdout.read().decode(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def port() -> int:
    return free_port()


def raw_request(port: int, data: bytes, *, timeout: float = 5.0, read_all: bool = True) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_all and b"\r\n\r\n" in b"".join(chunks):
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)
