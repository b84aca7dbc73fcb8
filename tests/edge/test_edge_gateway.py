"""Edge data from a compiled Zig filter (tests/edge/zig/edge_probe.zig, on the bundled binding) in the running
gateway: every operation, grants per filter, error results, on every state backend; a database replaced
under load; one Redis shared by two gateway processes."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Subprocess, ThreadServer, free_port, gateway_server
from tests.edge.conftest import BACKENDS, REDIS_URL, drop_prefix, make_products, redis_prefix
from tests.origins import echo_origin


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


def edge_config(origin_port: int, probe: Path, db: Path, state: str) -> str:
    return f"""
[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]

[state]
{state}

[kv.flags]
max_keys = 3
max_value_bytes = 16
[kv.secrets]

[sql.shop]
path = "{db}"
timeout_ms = 1000

[filters.probe]
module = "{probe}"
kv = ["flags"]
sql = ["shop"]
callback_timeout_ms = 2000

[filters.other]
module = "{probe}"
kv = ["secrets"]
callback_timeout_ms = 2000

[[routes]]
name = "probe"
path_prefix = "/probe"
filters = ["probe"]
upstream = "origin"

[[routes]]
name = "other"
path_prefix = "/other"
filters = ["other"]
upstream = "origin"

[log]
access_log = false
"""


def state_section(backend: str, tmp_path: Path, prefix: str) -> str:
    if backend == "redis":
        return f'backend = "redis"\nredis_url = "{REDIS_URL}"\nkey_prefix = "{prefix}"'
    if backend == "local":
        return f'backend = "local"\npath = "{tmp_path / "state"}"'
    return 'backend = "memory"'


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_operation_from_zig(
    backend: str, origin: ThreadServer, zig_probe: Path, products_db: Path, tmp_path: Path
) -> None:
    prefix = redis_prefix()
    config = edge_config(origin.port, zig_probe, products_db, state_section(backend, tmp_path, prefix))
    try:
        with gateway_server(config, tmp_path) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:

            def probe(path: str = "/probe", **headers: str) -> httpx.Response:
                return c.get(path, headers={f"x-{k}": v for k, v in headers.items()})

            assert probe(op="get", ns="flags", key="beta").status_code == 404
            r = probe(op="set", ns="flags", key="beta", value="on")
            assert (r.status_code, r.text) == (200, "stored")
            assert probe(op="get", ns="flags", key="beta").text == "on"
            assert probe(op="incr", ns="flags", key="n", delta="41").text == "41"
            assert probe(op="incr", ns="flags", key="n", delta="1").text == "42"
            r = probe(op="list", ns="flags")
            assert (r.text, r.headers["x-truncated"]) == ("beta\nn", "0")
            assert probe(op="list", ns="flags", limit="1").headers["x-truncated"] == "1"
            assert probe(op="delete", ns="flags", key="beta").text == "deleted"
            assert probe(op="delete", ns="flags", key="beta").text == "absent"
            # Error results reach the filter as a code and a reason.
            r = probe(op="set", ns="flags", key="big", value="x" * 17)
            assert (r.status_code, r.headers["x-edge-code"]) == (500, "4")
            assert "exceeds kv.flags.max_value_bytes (16)" in r.text
            r = probe(op="get", ns="secrets", key="k")
            assert (r.status_code, r.headers["x-edge-code"]) == (500, "3")
            assert "'secrets' is not granted to filter 'probe'" in r.text
            # The other filter has its own namespace, and no database.
            assert probe("/other", op="set", ns="secrets", key="beta", value="theirs").status_code == 200
            assert probe(op="get", ns="flags", key="beta").status_code == 404
            assert probe("/other", op="get", ns="secrets", key="beta").text == "theirs"
            r = probe("/other", op="sql", db="shop", sql="SELECT 1")
            assert (r.status_code, r.headers["x-edge-code"]) == (500, "3")
            # SQL: parameters of every type, rows back, writes and ATTACH refused.
            r = probe(
                op="sql", db="shop", sql="SELECT id, name, price, note FROM products WHERE id = ?", p1="i:7"
            )
            assert r.text == "id\tname\tprice\tnote\n7\tproduct 7\t10.5\tNULL"
            r = probe(
                op="sql", db="shop", sql="SELECT ?, ?, ?, ?", p1="t:hello", p2="f:0.25", p3="b:AB", p4="n"
            )
            assert r.status_code == 200 and r.text.splitlines()[1] == "hello\t0.25\tx'4142'\tNULL"
            for statement in (
                "DELETE FROM products",
                "ATTACH DATABASE ':memory:' AS x",
                "PRAGMA query_only=0",
            ):
                r = probe(op="sql", db="shop", sql=statement)
                assert (r.status_code, r.headers["x-edge-code"]) == (500, "3"), statement
            r = probe(op="sql", db="shop", sql="SELECT count(*) FROM products")
            assert r.text == "count(*)\n100"
            assert c.get("/probe").status_code == 200  # no x-op: the request goes to the origin
    finally:
        if backend == "redis":
            drop_prefix(prefix)


def test_database_replaced_under_load(origin: ThreadServer, zig_probe: Path, tmp_path: Path) -> None:
    db = make_products(tmp_path / "shop.db", rows=10)
    config = edge_config(origin.port, zig_probe, db, 'backend = "memory"')
    stop = threading.Event()
    seen: set[str] = set()
    failures: list[str] = []
    with gateway_server(config, tmp_path) as gw:

        def load() -> int:
            n = 0
            with httpx.Client(base_url=gw.url, timeout=10) as c:
                while not stop.is_set():
                    r = c.get(
                        "/probe",
                        headers={"x-op": "sql", "x-db": "shop", "x-sql": "SELECT count(*) FROM products"},
                    )
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    else:
                        seen.add(r.text.splitlines()[1])
                    n += 1
            return n

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load) for _ in range(4)]
            for generation in range(1, 21):
                fresh = make_products(tmp_path / f"next-{generation}.db", rows=10 + generation)
                os.replace(fresh, db)
                threading.Event().wait(0.02)
            stop.set()
            total = sum(f.result() for f in futures)
    assert failures == []
    assert total > 20
    assert "30" in seen  # the last file was picked up without a restart
    assert seen <= {str(n) for n in range(10, 31)}


def test_redis_namespace_shared_by_two_gateway_processes(
    origin: ThreadServer, zig_probe: Path, tmp_path: Path
) -> None:
    prefix = redis_prefix()
    db = make_products(tmp_path / "shop.db", rows=1)
    state = f'backend = "redis"\nredis_url = "{REDIS_URL}"\nkey_prefix = "{prefix}"'
    ports = [free_port(), free_port()]
    configs = []
    for i in range(2):
        path = tmp_path / f"gateway-{i}.toml"
        path.write_text(edge_config(origin.port, zig_probe, db, state))
        configs.append(path)
    try:
        with (
            Subprocess("serve", "--config", str(configs[0]), "--port", str(ports[0]), port=ports[0]),
            Subprocess("serve", "--config", str(configs[1]), "--port", str(ports[1]), port=ports[1]),
        ):
            a, b = (f"http://127.0.0.1:{p}/probe" for p in ports)
            assert (
                httpx.get(
                    a, headers={"x-op": "set", "x-ns": "flags", "x-key": "k", "x-value": "from a"}
                ).status_code
                == 200
            )
            assert httpx.get(b, headers={"x-op": "get", "x-ns": "flags", "x-key": "k"}).text == "from a"
            totals = []
            for i in range(10):
                url = (a, b)[i % 2]
                r = httpx.get(url, headers={"x-op": "incr", "x-ns": "flags", "x-key": "n", "x-delta": "1"})
                totals.append(int(r.text))
            assert totals == list(range(1, 11))
            assert httpx.get(a, headers={"x-op": "delete", "x-ns": "flags", "x-key": "k"}).text == "deleted"
            assert httpx.get(b, headers={"x-op": "get", "x-ns": "flags", "x-key": "k"}).status_code == 404
    finally:
        drop_prefix(prefix)
