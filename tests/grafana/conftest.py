"""An in-process gateway with every kind of route, after the scenario's traffic: its /metrics text."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ThreadServer, free_port, gateway_server
from tests.grafana import scenario
from tests.origins import echo_origin


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("gateway")
    with ThreadServer(echo_origin) as origin:
        config = scenario.write_config(tmp_path, port=0, origin_port=origin.port, dead_port=free_port())
        with gateway_server(config.read_text(), tmp_path) as gateway:
            scenario.drive(gateway.port)
            yield httpx.get(f"http://127.0.0.1:{gateway.port}/metrics").text
