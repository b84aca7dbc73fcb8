"""Two worker processes sharing the LMDB store: one fills it, the other hits; metrics merge across workers."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cache.conftest import CacheOrigin
from tests.conftest import Subprocess, ThreadServer, free_port


@pytest.fixture
def plain_origin(
    origin_server: tuple[ThreadServer, CacheOrigin], origin: CacheOrigin
) -> Iterator[ThreadServer]:
    yield origin_server[0]


def test_two_workers_share_entries_and_merge_metrics(
    tmp_path: Path, plain_origin: ThreadServer, origin: CacheOrigin
) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[server]
port = {port}

[cache]
backend = "local"
path = "{tmp_path / "cache"}"

[upstreams.origin]
targets = ["127.0.0.1:{plain_origin.port}"]

[[routes]]
name = "cached"
upstream = "origin"
cache = {{ enabled = true }}
"""
    )
    with Subprocess("serve", "--config", str(config), "--workers", "2", port=port):
        bodies = set()
        for _ in range(30):
            with httpx.Client() as c:  # a fresh connection per request: the kernel spreads them over workers
                bodies.add(c.get(f"http://127.0.0.1:{port}/shared").text)
        assert bodies == {"GET /shared? #1"}
        assert origin.counts["/shared"] == 1
        time.sleep(2.5)  # the gauges are refreshed every 2 s
        text = ""
        for _ in range(10):
            with httpx.Client() as c:
                text = c.get(f"http://127.0.0.1:{port}/metrics").text
    lookups = re.findall(
        r'^wasm_gateway_cache_lookups_total\{result="(\w+)",route="cached"\} (\S+)$', text, re.M
    )
    counts = {result: float(value) for result, value in lookups}
    assert counts["hit"] + counts["miss"] == 30 and counts["miss"] == 1, text[:3000]
    stored = re.findall(r"^wasm_gateway_cache_stored_bytes (\S+)$", text, re.M)
    assert len(stored) == 1 and float(stored[0]) > 0, text[:3000]  # one series: livemax over the workers
