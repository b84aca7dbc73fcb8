"""Fixtures for the bundled filters: harness loading, configuration errors, a controllable clock."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from wasm_gateway.exceptions import FilterLoadError
from wasm_gateway.filters import filter_path
from wasm_gateway.runtime import hostcalls
from wasm_gateway.runtime.chain import FilterRuntime, FilterSpec
from wasm_gateway.testing import FilterHarness

Pairs = Sequence[tuple[str, str]]
LoadFilter = Callable[..., FilterHarness]

LOG_ERROR = 4


@pytest.fixture
def load() -> Iterator[LoadFilter]:
    """``load("transform", {...config...}, **spec_options)``: a harness on the shipped module, closed after."""
    opened: list[FilterHarness] = []

    def open_filter(name: str, config: Any, **options: Any) -> FilterHarness:
        text = config if isinstance(config, str | bytes) else json.dumps(config)
        h = FilterHarness.from_file(filter_path(name), configuration=text, **options)
        opened.append(h)
        return h

    yield open_filter
    for h in opened:
        h.close()


def config_error(name: str, config: Any) -> str:
    """Load the shipped filter with a configuration it must reject; the error it logged."""
    text = config if isinstance(config, str) else json.dumps(config)
    logs: list[tuple[int, str]] = []
    spec = FilterSpec(
        name=name,
        module_path=filter_path(name),
        configuration=text.encode(),
        pool_min=1,
        pool_max=1,
        log_level="trace",
    )
    with pytest.raises(FilterLoadError) as info:
        FilterRuntime.load([spec], log_sink=lambda _n, level, msg: logs.append((level, msg))).close()
    assert "proxy_on_configure returned false" in str(info.value)
    errors = [msg for level, msg in logs if level >= LOG_ERROR]
    assert len(errors) == 1, logs
    prefix = f"{name}: invalid configuration: "
    assert errors[0].startswith(prefix), errors[0]
    return errors[0].removeprefix(prefix)


def values(headers: Pairs, name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def single(headers: Pairs, name: str) -> str:
    found = values(headers, name)
    assert len(found) == 1, f"expected one {name!r} header, got {found!r} in {list(headers)!r}"
    return found[0]


class FakeClock:
    """Stands in for the `time` module where the host reads the clock for
    ``proxy_get_current_time_nanoseconds``, so limits can be tested across windows without sleeping."""

    def __init__(self, start_s: float) -> None:
        self.now_ns = int(start_s * 1e9)
        self.reads = 0

    def time_ns(self) -> int:
        self.reads += 1
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock(1_750_000_000.0)
    monkeypatch.setattr(hostcalls, "time", fake)
    yield fake
    # Guards the guard: if the host stops reading the clock there, these tests would silently use real time.
    assert fake.reads > 0, "the host never read the fake clock (hostcalls no longer uses time.time_ns?)"
