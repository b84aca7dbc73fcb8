"""Edge-data fixtures: a shared-state store on each backend (Redis: the shared 127.0.0.1:6379 with a key
prefix of its own), and SQLite databases built in tmp_path."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.edge.probes import ZigUnavailable, build_zig_probe
from wasm_gateway.state import SharedState, StateConfig, open_state

REDIS_URL = "redis://127.0.0.1:6379/0"
BACKENDS = ("memory", "local", "redis")


def redis_prefix() -> str:
    return f"test-edge-{uuid.uuid4().hex[:12]}:"


def drop_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=BACKENDS)
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SharedState]:
    backend = request.param
    prefix = redis_prefix()
    opened = open_state(
        StateConfig(backend=backend, path=tmp_path / "state", redis_url=REDIS_URL, key_prefix=prefix)
    )
    yield opened
    opened.close()
    if backend == "redis":
        drop_prefix(prefix)


def make_products(path: Path, rows: int = 100) -> Path:
    """A small catalogue: products(id INTEGER PRIMARY KEY, name TEXT, price REAL, image BLOB, note TEXT)."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, price REAL, image BLOB, note TEXT)"
    )
    conn.executemany(
        "INSERT INTO products VALUES (?, ?, ?, ?, ?)",
        [(i, f"product {i}", i * 1.5, bytes([i % 256]) * 3, None) for i in range(1, rows + 1)],
    )
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def products_db(tmp_path: Path) -> Path:
    return make_products(tmp_path / "products.db")


@pytest.fixture(scope="session")
def zig_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_zig_probe(tmp_path_factory.mktemp("zig-probe"))
    except ZigUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def as_probe() -> Path:
    """tests/fixtures/assemblyscript/assembly/edge.ts (on the shipped edge_data.ts helper), built with the SDK."""
    from tests.fixtures.assemblyscript.build import DEFAULT_OUT_DIR, AssemblyScriptBuildError, build_all

    try:
        return build_all(DEFAULT_OUT_DIR)["edge"]
    except AssemblyScriptBuildError as exc:
        pytest.fail(f"cannot build the AssemblyScript filter fixtures: {exc}", pytrace=False)
