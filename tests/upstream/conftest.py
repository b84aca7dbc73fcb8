from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import uvloop

from wasm_gateway.upstream import Target, UpstreamPool, UpstreamSettings

from .origins import Handler, Origin


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    # Production runs under uvloop (uvicorn's loop); the stdlib loop behaves differently around flow control.
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class Origins:
    def __init__(self) -> None:
        self.started: list[Origin] = []

    async def start(self, handler: Handler, port: int = 0) -> Origin:
        origin = await Origin(handler).start(port)
        self.started.append(origin)
        return origin


class Pools:
    def __init__(self) -> None:
        self.created: list[UpstreamPool] = []

    def make(self, *targets: Origin | Target, **settings: Any) -> UpstreamPool:
        resolved = tuple(t.target if isinstance(t, Origin) else t for t in targets)
        pool = UpstreamPool(UpstreamSettings(name=settings.pop("name", "api"), targets=resolved, **settings))
        self.created.append(pool)
        return pool


@pytest.fixture
async def origins() -> AsyncIterator[Origins]:
    registry = Origins()
    yield registry
    for origin in registry.started:
        await origin.close()


@pytest.fixture
async def pools(origins: Origins) -> AsyncIterator[Pools]:
    # Depends on `origins` so that pools close first and origins see their clients go.
    registry = Pools()
    yield registry
    for pool in registry.created:
        await pool.close()
