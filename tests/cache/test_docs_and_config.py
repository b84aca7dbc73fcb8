"""docs/cache.md's configurations are accepted; bad cache configuration gets errors that name key, value, fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wasm_gateway.config import parse_config
from wasm_gateway.exceptions import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "cache.md"


def toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(toml_blocks())))
def test_doc_examples_are_valid_configs(index: int) -> None:
    config = parse_config(toml_blocks()[index], env={"CACHE_PURGE_TOKEN": "a-long-enough-secret"})
    assert any(route.cache.enabled for route in config.routes)


def test_doc_reference_lists_every_key() -> None:
    from wasm_gateway.config import CacheConfig, RouteCacheConfig

    text = DOC.read_text()
    for cls in (CacheConfig, RouteCacheConfig):
        for name in cls.__dataclass_fields__:
            assert f"| `{name}` |" in text, name


BASE = '[upstreams.o]\ntargets = ["127.0.0.1:9"]\n'


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + text, source="gateway.toml")
    return info.value.errors


def test_route_cache_defaults_and_values() -> None:
    config = parse_config(
        BASE + '[[routes]]\nupstream = "o"\ncache = { enabled = true, key_cookie = "tenant" }\n'
    )
    c = config.routes[0].cache
    assert c.enabled and c.default_ttl is None and c.bypass_headers == () and c.key_cookie == "tenant"
    plain = parse_config(BASE + '[[routes]]\nupstream = "o"\n').routes[0].cache
    assert not plain.enabled and plain.bypass_headers == ("cookie",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[routes]]\nupstream = "o"\ncache = { enabled = "yes" }\n', "routes[0].cache.enabled: expected true or false"),
        ('[[routes]]\nupstream = "o"\ncache = { ttl = 5 }\n', "routes[0].cache.ttl: unknown key"),
        ('[[routes]]\nupstream = "o"\ncache = { default_ttl = -1 }\n', "routes[0].cache.default_ttl: -1 is out of range"),
        ('[[routes]]\nupstream = "o"\ncache = { key_headers = ["bad header"] }\n', 'routes[0].cache.key_headers[0]: "bad header" is not a valid header name'),
        ('[[routes]]\nupstream = "o"\ncache = { key_cookie = "t", bypass_headers = ["cookie"] }\n', "routes[0].cache.bypass_headers: lists cookie while key_cookie is set"),
        ('[[routes]]\napp = true\ncache = { enabled = true }\n', "routes[0].cache.enabled: the cache sits in front of upstreams only"),
        ('[cache]\nbackend = "disk"\n', 'cache.backend: "disk" is not one of: memory, local, redis'),
        ('[cache]\nmax_bytes = 10\n', "cache.max_bytes: 10 is out of range"),
        ('[cache]\nmax_object_bytes = 200000000\n', "cache.max_object_bytes: 200000000 is more than a quarter of cache.max_bytes"),
        ('[cache]\nredis_url = "http://x"\n', 'cache.redis_url: "http://x" is not a redis://'),
        ('[cache]\nkey_prefix = "{x}"\n', "cache.key_prefix: braces are reserved"),
        ('[cache.purge]\nenabled = true\n', "cache.purge.token: the purge endpoint needs a token of at least 16 characters"),
        ('[cache.purge]\nenabled = true\ntoken = "short"\n', "cache.purge.token: the purge endpoint needs a token"),
        ('[cache.purge]\nenabled = true\ntoken = "0123456789abcdef"\npath = "/healthz"\n', "cache.purge.path must be distinct"),
    ],
)  # fmt: skip
def test_errors_name_key_value_and_fix(text: str, message: str) -> None:
    found = errors(text)
    assert any(message in e and e.startswith("gateway.toml: ") for e in found), found
