"""Config loading: every error names file, key path, bad value and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from wasm_gateway.config import load_config, parse_config
from wasm_gateway.exceptions import ConfigError

BASE = """
[upstreams.api]
targets = ["127.0.0.1:9000"]
[upstreams.static]
targets = ["http://127.0.0.1:9001", "127.0.0.1:9002"]
"""


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="gateway.toml", env=env or {})
    return info.value.errors


def test_minimal_config_defaults() -> None:
    config = parse_config(BASE + '[[routes]]\nupstream = "api"\n', source="gateway.toml", env={})
    assert config.server.port == 8080
    assert config.server.max_header_bytes == 60 * 1024
    assert config.routes[0].path_prefix == "/"
    assert config.routes[0].name == "route0"
    assert [t.authority for t in config.upstreams["static"].targets] == ["127.0.0.1:9001", "127.0.0.1:9002"]


def test_unknown_upstream_names_known_ones() -> None:
    text = (
        BASE
        + '[[routes]]\nupstream = "api"\n[[routes]]\nupstream = "api"\nname="b"\n[[routes]]\nupstream = "api2"\n'
    )
    assert errors_of(text) == [
        'gateway.toml: routes[2].upstream: unknown upstream "api2" (known: api, static)'
    ]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "[server]\nport = 70000\n",
            "gateway.toml: server.port: 70000 is out of range (expected an integer between 0 and 65535)",
        ),
        ('[server]\nport = "x"\n', 'gateway.toml: server.port: expected an integer, got "x"'),
        ("[server]\nworkerz = 2\n", "gateway.toml: server.workerz: unknown key"),
        (
            "[server.timeouts]\nheader_read = -1\n",
            "gateway.toml: server.timeouts.header_read: -1 is out of range",
        ),
        (
            "[upstreams.x]\ntargets = []\n",
            'gateway.toml: upstreams.x.targets: expected a non-empty list of "host:port", got an array',
        ),
        (
            '[upstreams.x]\ntargets = ["ftp://a:1"]\n',
            "gateway.toml: upstreams.x.targets[0]: \"ftp://a:1\": scheme 'ftp' is not supported (use http or https)",
        ),
        (
            '[upstreams.x]\ntargets = ["a:1"]\nhost_header = "keep"\n',
            'gateway.toml: upstreams.x.host_header: "keep" is not one of: preserve, rewrite',
        ),
        (
            '[[routes]]\npath = "/a"\npath_prefix = "/b"\nupstream = "api"\n',
            "gateway.toml: routes[0]: give one of path, path_prefix, path_pattern (got path, path_prefix)",
        ),
        (
            '[[routes]]\npath_prefix = "a"\nupstream = "api"\n',
            "gateway.toml: routes[0].path_prefix: \"a\" must start with '/'",
        ),
        (
            '[[routes]]\npath_prefix = "/a/../b"\nupstream = "api"\n',
            'gateway.toml: routes[0].path_prefix: "/a/../b" must be a canonical path',
        ),
        (
            '[[routes]]\nmethods = ["FETCH"]\nupstream = "api"\n',
            "gateway.toml: routes[0].methods[0]: 'FETCH' is not an HTTP method",
        ),
        (
            '[[routes]]\nfilters = ["auth"]\nupstream = "api"\n',
            'gateway.toml: routes[0].filters[0]: unknown filter "auth" (known: none defined)',
        ),
        (
            '[[routes]]\nname = "a"\n',
            'gateway.toml: routes[0]: missing target: upstream = "name" (from [upstreams]) or app = true',
        ),
        (
            'trusted_proxies = ["10.0.0.0/33"]\n',
            "gateway.toml: trusted_proxies[0]: '10.0.0.0/33' is not an IP address or CIDR",
        ),
        ('[filters.f]\nmodule = "nope.wasm"\n', "gateway.toml: filters.f.module: module file not found:"),
        ('[log]\nformat = "xml"\n', 'gateway.toml: log.format: "xml" is not one of: json, logfmt'),
        (
            '[upstreams.x]\ntargets = ["${MISSING}"]\n',
            "gateway.toml: upstreams.x.targets[0]: environment variable MISSING is not set",
        ),
    ],
)
def test_error_messages(snippet: str, expected: str) -> None:
    # Top-level keys must come before the first table in TOML.
    errors = errors_of(snippet + BASE if snippet.startswith("trusted") else BASE + snippet)
    assert any(e.startswith(expected) for e in errors), errors


def test_duplicate_route_names() -> None:
    errors = errors_of(BASE + '[[routes]]\nname="a"\nupstream="api"\n[[routes]]\nname="a"\nupstream="api"\n')
    assert errors == ["gateway.toml: routes[1].name: duplicate route name 'a' (route names must be unique)"]


def test_every_error_is_reported_at_once() -> None:
    errors = errors_of('[server]\nport = -1\nworkers = 0\n[log]\nlevel = "loud"\n')
    assert len(errors) == 3


def test_a_broken_filter_or_upstream_is_reported_once_not_at_each_reference() -> None:
    errors = errors_of(
        BASE
        + '[filters.f]\nmodule = "nope.wasm"\n[upstreams.bad]\ntargets = []\n'
        + '[[routes]]\nname = "r"\nfilters = ["f"]\nupstream = "bad"\n'
    )
    assert [e.split(":")[1].strip() for e in errors] == ["upstreams.bad.targets", "filters.f.module"], errors


def test_invalid_toml_names_file() -> None:
    errors = errors_of("[server\n")
    assert errors[0].startswith("gateway.toml: invalid TOML:")


def test_env_interpolation() -> None:
    config = parse_config(
        '[upstreams.a]\ntargets = ["${ORIGIN}"]\n[filters]\n', env={"ORIGIN": "10.1.2.3:81"}, source="g.toml"
    )
    assert config.upstreams["a"].targets[0].authority == "10.1.2.3:81"
    config = parse_config('[upstreams.a]\ntargets = ["${NOPE:-127.0.0.1:9}"]\n', env={}, source="g.toml")
    assert config.upstreams["a"].targets[0].port == 9


def test_filter_configuration_table_becomes_json(tmp_path: Path) -> None:
    module = tmp_path / "f.wasm"
    module.write_bytes(b"\0asm\1\0\0\0")
    (tmp_path / "g.toml").write_text(
        '[filters.f]\nmodule = "f.wasm"\nconfiguration = { key = "${SECRET}", n = 1 }\n'
    )
    config = load_config(tmp_path / "g.toml", env={"SECRET": "s3"})
    assert config.filters["f"].module == module
    assert config.filters["f"].configuration == b'{"key":"s3","n":1}'


def test_missing_file_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def test_examples_load() -> None:
    examples = Path(__file__).parent.parent / "examples"
    packaged = Path(__file__).parent.parent / "wasm_gateway" / "examples"
    paths = sorted(examples.glob("*.toml")) + sorted(packaged.glob("*.toml"))
    assert paths
    for path in paths:
        load_config(path, env={})


def test_builtin_filter_modules() -> None:
    config = parse_config('[filters.t]\nmodule = "builtin:transform"\n', env={}, source="g.toml")
    assert config.filters["t"].module.name == "transform.wasm" and config.filters["t"].module.is_file()
    errors = errors_of('[filters.t]\nmodule = "builtin:nope"\n')
    assert errors[0].startswith("gateway.toml: filters.t.module: \"builtin:nope\": no bundled filter 'nope'")


def test_reload_and_drain_keys(tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text(
        '[server]\npid_file = "run/g.pid"\nwatch_config = true\nwatch_interval = 0.5\n'
        "[server.timeouts]\ndrain_delay = 0\n"
    )
    config = load_config(tmp_path / "g.toml", env={})
    assert config.server.pid_file == tmp_path / "run" / "g.pid"  # relative to the config file
    assert (config.server.watch_config, config.server.watch_interval) == (True, 0.5)
    assert config.server.timeouts.drain_delay == 0.0
    assert parse_config("").server.timeouts.drain_delay == 0.0 and not parse_config("").server.watch_config
    assert errors_of("[server.timeouts]\ndrain_delay = -1\n") == [
        "gateway.toml: server.timeouts.drain_delay: -1 is out of range (expected a number of seconds >= 0)"
    ]
    assert errors_of("[server]\nwatch_config = 1\n") == [
        "gateway.toml: server.watch_config: expected true or false, got 1"
    ]


def test_edge_data_sections_and_grants(tmp_path: Path) -> None:
    text = (
        BASE
        + """
[kv.flags]
max_keys = 10
default_ttl_seconds = 60
[kv.sessions]
[sql.shop]
path = "data/shop.db"
timeout_ms = 20
[filters.f]
module = "builtin:transform"
kv = ["flags"]
sql = ["shop"]
"""
    )
    config = parse_config(text, source="gateway.toml", base_dir=tmp_path, env={})
    assert config.kv["flags"].max_keys == 10 and config.kv["flags"].default_ttl_seconds == 60
    assert config.kv["sessions"].max_value_bytes == 64 * 1024
    assert config.sql["shop"].path == tmp_path / "data/shop.db" and config.sql["shop"].timeout_ms == 20
    assert config.filters["f"].kv == ("flags",) and config.filters["f"].sql == ("shop",)


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            '[filters.f]\nmodule = "builtin:transform"\nkv = ["nope"]\n',
            'gateway.toml: filters.f.kv[0]: unknown kv "nope" (known: none declared; declare [kv.nope])',
        ),
        (
            '[sql.shop]\npath = "x.db"\n[filters.f]\nmodule = "builtin:transform"\nsql = ["shop", "other"]\n',
            'gateway.toml: filters.f.sql[1]: unknown sql "other" (known: shop; declare [sql.other])',
        ),
        ("[kv.flags]\nmax_key_bytes = 500\n", "gateway.toml: kv.flags.max_key_bytes: 500 is out of range"),
        (
            "[kv.flags]\nmax_value_bytes = 5000000\n",
            "gateway.toml: kv.flags.max_value_bytes: 5000000 is out of range",
        ),
        ("[kv.flags]\nmax_keyz = 5\n", "gateway.toml: kv.flags.max_keyz: unknown key"),
        (
            "[kv.flags]\ndefault_ttl_seconds = 100\nmax_ttl_seconds = 10\n",
            "gateway.toml: kv.flags.default_ttl_seconds: must be at most max_ttl_seconds (10)",
        ),
        ("[sql.shop]\ntimeout_ms = 5\n", 'gateway.toml: sql.shop: missing "path"'),
        ('[sql."a:b"]\npath = "x.db"\n', "gateway.toml: sql.a:b: name 'a:b' must be"),
    ],
)
def test_edge_data_errors(snippet: str, expected: str) -> None:
    errors = errors_of(BASE + snippet)
    assert any(e.startswith(expected) for e in errors), errors
