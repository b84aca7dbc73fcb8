"""Real backends for the state tests: LMDB in tmp_path, and redis-server processes started by the tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import free_port
from wasm_gateway.state import SharedState, StateConfig, open_state

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A redis-server of our own on 127.0.0.1 (no persistence), so tests can kill, restart and stall it."""

    def __init__(self, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (Debian package redis-server)")
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--enable-debug-command", "local",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if self.client(socket_connect_timeout=0.2).ping():
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stall(self, seconds: float) -> None:
        """Block the server for ``seconds`` (DEBUG SLEEP) from another connection; returns at once."""
        import threading

        client = self.client()
        command = f"DEBUG SLEEP {seconds}"
        thread = threading.Thread(target=lambda: client.execute_command(command), daemon=True)  # type: ignore[no-untyped-call]
        thread.start()
        time.sleep(0.05)  # let the server take the command before the caller's next one


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server shared by the contract tests (each test uses its own key prefix)."""
    server = RedisServer().start()
    yield server
    server.kill()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server for one test, which the test may kill, restart or stall."""
    server = RedisServer().start()
    yield server
    server.kill()


StateFactory = Callable[..., SharedState]


@pytest.fixture
def make_state(tmp_path: Path, redis_server: RedisServer) -> Iterator[StateFactory]:
    """``make_state(backend, **config)``: an open SharedState on a fresh store (closed after the test)."""
    opened: list[SharedState] = []
    prefix = f"test-{uuid.uuid4().hex[:12]}:"

    def make(backend: str, **config: Any) -> SharedState:
        config.setdefault("path", tmp_path / "state")
        config.setdefault("redis_url", redis_server.url)
        config.setdefault("key_prefix", prefix)
        state = open_state(StateConfig(backend=backend, **config))  # type: ignore[arg-type]
        opened.append(state)
        return state

    yield make
    for state in opened:
        state.close()
