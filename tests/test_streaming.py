"""200 MB each way through the gateway with flat memory: bodies stream, they are never buffered whole."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import Subprocess, ThreadServer, free_port
from tests.origins import echo_origin

SIZE = 200 * 1024 * 1024
MAX_GROWTH = 64 * 1024 * 1024


def rss_peak(pid: int) -> int:
    """Peak resident set (VmHWM) of the gateway process and its children, in bytes."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_200mb_up_and_down_with_flat_rss(tmp_path: Path) -> None:
    port = free_port()
    with ThreadServer(echo_origin) as origin:
        config = tmp_path / "g.toml"
        config.write_text(
            f"""
[server]
port = {port}
max_request_body_bytes = {SIZE * 2}
[upstreams.origin]
targets = ["127.0.0.1:{origin.port}"]
[[routes]]
path_prefix = "/"
upstream = "origin"
[log]
access_log = false
"""
        )
        with (
            Subprocess("serve", "--config", str(config), port=port) as gw,
            httpx.Client(timeout=60) as client,
        ):
            assert gw.proc is not None
            client.get(f"http://127.0.0.1:{port}/echo")  # warm up
            baseline = rss_peak(gw.proc.pid)

            digest = hashlib.sha256()

            def body() -> Iterator[bytes]:
                block = bytes(range(256)) * 4096  # 1 MiB
                for _ in range(SIZE // len(block)):
                    digest.update(block)
                    yield block

            response = client.post(f"http://127.0.0.1:{port}/upload", content=body())
            assert response.status_code == 200
            assert response.json()["body_size"] == SIZE
            assert response.json()["body_sha256"] == digest.hexdigest()

            received = 0
            with client.stream("GET", f"http://127.0.0.1:{port}/big?n={SIZE}") as stream:
                assert stream.status_code == 200
                for chunk in stream.iter_raw():
                    received += len(chunk)
            assert received == SIZE

            growth = rss_peak(gw.proc.pid) - baseline
            print(f"baseline {baseline / 2**20:.1f} MiB, growth {growth / 2**20:.1f} MiB")
            assert growth < MAX_GROWTH, f"gateway peak RSS grew by {growth / 2**20:.0f} MiB for 2 x 200 MiB"
