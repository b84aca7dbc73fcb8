"""Config generations in one process: what a reload may change, the config digest, and who closes what when."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import origins
from tests.conftest import ThreadServer
from tests.origins import echo_origin
from tests.test_reload import module_version
from wasm_gateway.app import Gateway
from wasm_gateway.config import load_config, parse_config
from wasm_gateway.generation import config_digest, restart_only_changes
from wasm_gateway.runtime.pool import PoolState

BASE = '[upstreams.o]\ntargets = ["127.0.0.1:{port}"]\n[[routes]]\nupstream = "o"\n'


def test_restart_only_changes_name_the_keys() -> None:
    old = parse_config(BASE.format(port=1))
    assert restart_only_changes(old, parse_config(BASE.format(port=2))) == []
    new = parse_config(
        "[server]\nport = 9\n[server.timeouts]\nidle = 9\nupstream_read = 9\n" + BASE.format(port=1)
    )
    assert restart_only_changes(old, new) == ["server.port", "server.timeouts.idle"]
    assert restart_only_changes(old, parse_config("[log]\nlevel = 'debug'\n" + BASE.format(port=1))) == [
        "log"
    ]


def test_config_digest_covers_the_file_and_every_module(tmp_path: Path) -> None:
    module = tmp_path / "m.wasm"
    module.write_bytes(b"one")
    digest = config_digest(b"text", {"m": module})
    assert digest == config_digest(b"text", {"m": module})
    assert digest != config_digest(b"text2", {"m": module})
    module.write_bytes(b"two")  # replaced in place under the same name: a new version
    assert digest != config_digest(b"text", {"m": module})
    module.unlink()
    assert config_digest(b"text", {"m": module}) != digest  # missing hashes differently, no exception


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


def write(tmp_path: Path, origin_port: int, tag: str, module: bytes | None = None) -> Path:
    (tmp_path / f"{tag}.wasm").write_bytes(module if module is not None else module_version(tag))
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[filters.m]\nmodule = "{tag}.wasm"\n'
        f'[upstreams.o]\ntargets = ["127.0.0.1:{origin_port}"]\n'
        '[[routes]]\nupstream = "o"\nfilters = ["m"]\n[log]\naccess_log = false\n'
    )
    return path


async def test_old_generation_is_closed_after_its_last_request(tmp_path: Path, origin: ThreadServer) -> None:
    gateway = Gateway(load_config(write(tmp_path, origin.port, "a")))
    await gateway.startup()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw")
    try:
        old = gateway.generation
        assert old.runtime is not None
        slow = asyncio.create_task(client.get("/slow?s=0.5"))
        while origins.slow_in_flight < 1:
            await asyncio.sleep(0.01)
        assert old.active == 1

        write(tmp_path, origin.port, "b")
        assert await gateway.reload()
        new = gateway.generation
        assert new is not old and new.digest != old.digest
        assert (await client.get("/echo")).headers["x-module"] == "b"
        # The old version still owns a request: nothing of it is closed yet.
        assert not old.runtime._closed
        assert all(pool.state is PoolState.OPEN for pool in old.runtime.pools.values())

        response = await slow
        assert (response.status_code, response.headers["x-module"]) == (200, "a")
        for _ in range(200):
            if old.runtime._closed:
                break
            await asyncio.sleep(0.01)
        assert old.runtime._closed and old.active == 0
        assert all(
            pool.state is PoolState.CLOSED and pool.stats().size == 0 for pool in old.runtime.pools.values()
        )
        assert all(pool._closed for pool in old.pools.values())
        assert not gateway._retiring

        # A module that does not load: the reload fails and nothing changes.
        write(tmp_path, origin.port, "c", module=b"\0asm garbage")
        assert not await gateway.reload()
        assert gateway.generation is new
        assert gateway.last_reload["result"] == "failure" and "c.wasm" in gateway.last_reload["error"]
        assert (await client.get("/echo")).headers["x-module"] == "b"
        ready = (await client.get("/readyz")).json()
        assert ready["config"]["hash"] == new.digest and ready["config"]["reload"]["result"] == "failure"
    finally:
        await client.aclose()
        await gateway.shutdown()
    assert new.runtime is not None and new.runtime._closed
