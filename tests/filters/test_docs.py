"""The examples in docs/filters/*.md work: the Python examples run, the TOML configurations are accepted."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.filters.conftest import LoadFilter
from wasm_gateway.config import parse_config
from wasm_gateway.filters import FILTERS_DIR

DOCS = Path(__file__).resolve().parents[2] / "docs" / "filters"
PAGES = {"transform": DOCS / "transform.md", "rate_limit": DOCS / "rate-limit.md"}


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("name", PAGES)
def test_python_example_runs(name: str, request: pytest.FixtureRequest) -> None:
    if name == "rate_limit":
        # The example's 11 requests must fall within one second of each other, whatever the machine's load.
        request.getfixturevalue("clock")
    (example,) = blocks(PAGES[name], "python")
    exec(compile(example, str(PAGES[name]), "exec"), {})


@pytest.mark.parametrize("name", PAGES)
def test_toml_example_is_accepted(name: str, load: LoadFilter) -> None:
    (example,) = blocks(PAGES[name], "toml")
    config: dict[str, Any] = tomllib.loads(example)
    (filter_config,) = config["filters"].values()
    assert (
        filter_config["module"] == f"builtin:{name.replace('_', '-')}"
        or filter_config["module"] == f"builtin:{name}"
    )
    assert (FILTERS_DIR / f"{name}.wasm").is_file()
    parse_config(example, env={})  # the whole example is a valid gateway config
    h = load(name, json.dumps(filter_config["configuration"]))
    assert h.request(path="/").upstream_called
