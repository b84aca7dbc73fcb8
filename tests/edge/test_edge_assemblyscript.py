"""Edge data from an AssemblyScript (@solo-io/proxy-runtime) filter through the shipped helper
(wasm_gateway/filters/assemblyscript/edge_data.ts), in the running gateway: the same probe protocol as the
Zig filter (see tests/edge/zig/edge_probe.zig)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ThreadServer, gateway_server
from tests.edge.test_edge_gateway import edge_config
from tests.origins import echo_origin


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


def test_every_operation_from_assemblyscript(
    origin: ThreadServer, as_probe: Path, products_db: Path, tmp_path: Path
) -> None:
    config = edge_config(
        origin.port, as_probe, products_db, f'backend = "local"\npath = "{tmp_path / "state"}"'
    )
    with gateway_server(config, tmp_path) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:

        def probe(path: str = "/probe", **headers: str) -> httpx.Response:
            return c.get(path, headers={f"x-{k}": v for k, v in headers.items()})

        assert probe(op="get", ns="flags", key="beta").status_code == 404
        assert probe(op="set", ns="flags", key="beta", value="on", ttl="60000").text == "stored"
        assert probe(op="get", ns="flags", key="beta").text == "on"
        assert probe(op="incr", ns="flags", key="n", delta="-5").text == "-5"
        assert probe(op="incr", ns="flags", key="n", delta="7").text == "2"
        r = probe(op="list", ns="flags")
        assert (r.text, r.headers["x-truncated"]) == ("beta\nn", "0")
        assert probe(op="list", ns="flags", prefix="b", limit="1").text == "beta"
        assert probe(op="delete", ns="flags", key="beta").text == "deleted"
        assert probe(op="delete", ns="flags", key="beta").text == "absent"
        r = probe(op="set", ns="secrets", key="k", value="v")
        assert (r.status_code, r.headers["x-edge-code"]) == (500, "3")
        assert "'secrets' is not granted to filter 'probe'" in r.text
        r = probe(op="set", ns="flags", key="big", value="x" * 17)
        assert (r.status_code, r.headers["x-edge-code"]) == (500, "4")
        r = probe(
            op="sql", db="shop", sql="SELECT id, name, price, note FROM products WHERE id = ?", p1="i:7"
        )
        assert r.text == "id\tname\tprice\tnote\n7\tproduct 7\t10.5\tNULL"
        r = probe(op="sql", db="shop", sql="SELECT ?, ?, ?, ?", p1="t:hi", p2="f:0.25", p3="b:AB", p4="i:-3")
        assert r.text.splitlines()[1] == "hi\t0.25\t<2 bytes>\t-3"
        r = probe(op="sql", db="shop", sql="INSERT INTO products (id) VALUES (999)")
        assert (r.status_code, r.headers["x-edge-code"]) == (500, "3")
        r = probe("/other", op="get", ns="secrets", key="k")
        assert r.status_code == 404  # the other filter's own namespace
        for _ in range(200):  # results are released: no growth that would trap a long-lived instance
            assert (
                probe(op="sql", db="shop", sql="SELECT name FROM products WHERE id = ?", p1="i:3").status_code
                == 200
            )
