"""The bundled geo filter (wasm_gateway/filters/geo.wasm) through FilterHarness.

The geo properties come from a real lookup in a database written for the test (tests/test_geo.py), passed
the way the gateway passes them: ``RequestInfo(extra=db.properties_for(client))``.

    python tests/filters/test_geo_filter.py [--requests N]    # per-request cost (numbers, not a test)
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import wasmtime

from tests.filters.conftest import LoadFilter, config_error, single, values
from tests.test_geo import ASN, CITY, write_mmdb
from wasm_gateway.config import GatewayConfig, parse_config
from wasm_gateway.exceptions import ConfigError
from wasm_gateway.filters import filter_path
from wasm_gateway.geo import GeoDatabase, GeoInfo, properties
from wasm_gateway.runtime.context import RequestInfo
from wasm_gateway.testing import HarnessResult

LONDON = "81.2.69.142"  # GB, ENG England, London, AS20712
LINKOPING = "89.160.20.112"  # SE, E Östergötland County, Linköping, no ASN
MILTON = "216.160.83.56"  # US, WA Washington, Milton
TOKYO6 = "2001:218::1"  # JP only, AS2914
GOOGLE = "8.8.8.8"  # only the ASN database knows it: country unknown
NOWHERE = "198.18.0.1"  # benchmarking range: private
UNLISTED = "203.0.114.1"  # public, in no database

ALL_HEADERS = {
    "x-geo-country": "country",
    "x-geo-region": "region",
    "x-geo-region-name": "region_name",
    "x-geo-city": "city",
    "x-geo-asn": "asn",
    "x-geo-as-org": "as_org",
    "x-geo-private": "private",
}


@pytest.fixture(scope="module")
def geo_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeoDatabase]:
    d = tmp_path_factory.mktemp("geo")
    city = write_mmdb(d / "GeoLite2-City.mmdb", CITY, database_type="GeoLite2-City")
    asn = write_mmdb(d / "GeoLite2-ASN.mmdb", ASN, database_type="GeoLite2-ASN")
    with GeoDatabase.open(city, asn_path=asn) as db:
        yield db


@pytest.fixture
def client(geo_db: GeoDatabase) -> Any:
    """``client(address, port=...)``: the RequestInfo the gateway builds for a client at ``address``."""

    def make(address: str, port: int = 51000) -> RequestInfo:
        return RequestInfo(source_address=address, source_port=port, extra=geo_db.properties_for(address))

    return make


def passed(r: HarnessResult) -> bool:
    if r.local_response is None:
        assert r.upstream_called and r.response_status == 200
        return True
    assert not r.upstream_called
    return False


def forbidden_country(r: HarnessResult) -> str | None:
    """The refused client's country from a 403 answer."""
    assert r.local_response is not None, "the request was not refused"
    assert r.response_status == 403
    assert single(r.response_headers, "content-type") == "application/json"
    body = json.loads(r.response_body)
    assert body.keys() == {"error", "country"} and body["error"] == "forbidden"
    country: str | None = body["country"]
    return country


# --- headers --------------------------------------------------------------------------------------------


def test_every_field_as_a_header(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"headers": ALL_HEADERS})
    r = h.request(path="/", headers=[("accept", "*/*")], info=client(LONDON))
    assert passed(r)
    assert r.request_headers == [
        ("accept", "*/*"),
        ("x-geo-country", "GB"),
        ("x-geo-region", "ENG"),
        ("x-geo-region-name", "England"),
        ("x-geo-city", "London"),
        ("x-geo-asn", "20712"),
        ("x-geo-as-org", "Andrews & Arnold Ltd"),
        ("x-geo-private", "false"),
    ]


def test_absent_fields_add_no_header(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"headers": ALL_HEADERS})
    r = h.request(info=client(TOKYO6))
    assert dict(r.request_headers) == {
        "x-geo-country": "JP",
        "x-geo-asn": "2914",
        "x-geo-as-org": "NTT America, Inc.",
        "x-geo-private": "false",
    }
    unknown = h.request(info=client(UNLISTED))
    assert dict(unknown.request_headers) == {"x-geo-private": "false"}
    private = h.request(info=client("10.20.30.40"))
    assert dict(private.request_headers) == {"x-geo-private": "true"}


def test_non_ascii_values_are_percent_encoded(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"headers": {"x-geo-city": "city", "x-geo-region-name": "region_name"}})
    r = h.request(info=client(LINKOPING))
    assert single(r.request_headers, "x-geo-city") == "Link%C3%B6ping"
    assert single(r.request_headers, "x-geo-region-name") == "%C3%96sterg%C3%B6tland County"


def test_client_sent_copies_of_configured_headers_are_replaced(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"headers": {"X-Geo-Country": "country", "x-geo-city": "city"}})
    spoofed = [("X-Geo-Country", "US"), ("x-geo-country", "CA"), ("X-GEO-CITY", "Springfield"), ("a", "1")]
    r = h.request(headers=spoofed, info=client(LONDON))
    assert values(r.request_headers, "x-geo-country") == ["GB"]
    assert values(r.request_headers, "x-geo-city") == ["London"]
    assert values(r.request_headers, "a") == ["1"]
    # Nothing to set for this client: the client's copies still go.
    r = h.request(headers=spoofed, info=client(TOKYO6))
    assert values(r.request_headers, "x-geo-country") == ["JP"]
    assert values(r.request_headers, "x-geo-city") == []
    r = h.request(headers=spoofed, info=client(UNLISTED))
    assert values(r.request_headers, "x-geo-country") == values(r.request_headers, "x-geo-city") == []


def test_strip_removes_client_geo_headers_by_prefix_and_name(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"headers": {"x-geo-country": "country"}, "strip": ["x-geo-*", "cf-ipcountry"]})
    sent = [
        ("x-geo-country", "US"),
        ("X-Geo-Region", "CA"),
        ("x-geo-city", "Springfield"),
        ("x-geo-city", "Shelbyville"),
        ("CF-IPCountry", "US"),
        ("x-geolocation", "kept: not the x-geo- prefix"),
        ("user-agent", "curl/8"),
    ]
    r = h.request(headers=sent, info=client(LONDON))
    assert r.request_headers == [
        ("x-geolocation", "kept: not the x-geo- prefix"),
        ("user-agent", "curl/8"),
        ("x-geo-country", "GB"),
    ]
    # Without any configured header, strip alone still cleans up.
    h = load("geo", {"strip": ["x-geo-*"]})
    r = h.request(headers=sent, info=client(UNLISTED))
    assert [k for k, _ in r.request_headers] == ["cf-ipcountry", "x-geolocation", "user-agent"]


def test_headers_without_a_geo_map_property_read_single_properties(load: LoadFilter, client: Any) -> None:
    # A host that offers only the per-field properties (not the "geo" map) gets the same headers.
    h = load("geo", {"headers": ALL_HEADERS})
    full = h.request(info=client(LONDON))
    extra = dict(
        properties(
            GeoInfo(
                ip=LONDON,
                country="GB",
                region="ENG",
                region_name="England",
                city="London",
                asn=20712,
                as_org="Andrews & Arnold Ltd",
            )
        )
    )
    del extra["geo"]
    single_props = h.request(info=RequestInfo(source_address=LONDON, extra=extra))
    assert single_props.request_headers == full.request_headers
    assert ("x-geo-asn", "20712") in full.request_headers


# --- allow / deny ---------------------------------------------------------------------------------------


def test_allow_list(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"allow_countries": ["gb", "SE"]})
    assert passed(h.request(info=client(LONDON)))
    assert passed(h.request(info=client(LINKOPING)))
    assert forbidden_country(h.request(info=client(MILTON))) == "US"
    assert forbidden_country(h.request(info=client(TOKYO6))) == "JP"
    # Unknown and private clients are not on an allow list: refused by default.
    assert forbidden_country(h.request(info=client(UNLISTED))) is None
    assert forbidden_country(h.request(info=client(GOOGLE))) is None
    assert forbidden_country(h.request(info=client("127.0.0.1"))) is None


def test_deny_list(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"deny_countries": ["US", "jp"], "headers": {"x-geo-country": "country"}})
    assert forbidden_country(h.request(info=client(MILTON))) == "US"
    assert forbidden_country(h.request(info=client(TOKYO6))) == "JP"
    r = h.request(info=client(LONDON))
    assert passed(r) and single(r.request_headers, "x-geo-country") == "GB"
    # Unknown and private clients pass a deny list by default.
    assert passed(h.request(info=client(UNLISTED)))
    assert passed(h.request(info=client("192.168.0.10")))


def test_unknown_and_private_policies(load: LoadFilter, client: Any) -> None:
    # An allow list that lets the internal network in but not clients of no known country.
    h = load("geo", {"allow_countries": ["GB"], "private": "allow"})
    assert passed(h.request(info=client("10.0.0.7")))
    assert passed(h.request(info=client("fd00::7")))
    assert forbidden_country(h.request(info=client(UNLISTED))) is None
    h = load("geo", {"allow_countries": ["GB"], "unknown": "allow"})  # private follows unknown
    assert passed(h.request(info=client(UNLISTED)))
    assert passed(h.request(info=client("10.0.0.7")))
    assert forbidden_country(h.request(info=client(MILTON))) == "US"
    # Deny lists let unknown clients through unless told otherwise; "unknown" alone needs a known country.
    h = load("geo", {"deny_countries": ["US"], "unknown": "deny", "private": "allow"})
    assert forbidden_country(h.request(info=client(UNLISTED))) is None
    assert passed(h.request(info=client("10.0.0.7")))
    h = load("geo", {"unknown": "deny"})
    assert passed(h.request(info=client(MILTON)))
    assert forbidden_country(h.request(info=client(GOOGLE))) is None
    assert forbidden_country(h.request(info=client("10.0.0.7"))) is None


def test_refusals_do_not_trust_client_headers(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"allow_countries": ["GB"], "headers": {"x-geo-country": "country"}})
    r = h.request(headers=[("x-geo-country", "GB"), ("x-forwarded-for", LONDON)], info=client(MILTON))
    assert forbidden_country(r) == "US"


def test_without_geo_properties_every_client_is_unknown_and_it_is_logged_once(load: LoadFilter) -> None:
    h = load("geo", {"allow_countries": ["GB"]})
    first = h.request(info=RequestInfo(source_address=LONDON))
    assert forbidden_country(first) is None
    assert [m for level, m in first.logs if level == 3] == [
        "geo: the gateway offers no geo properties (is a geo database configured?); every client counts as unknown"
    ]
    second = h.request(info=RequestInfo(source_address=LONDON))
    assert forbidden_country(second) is None
    assert [m for level, m in second.logs if level >= 3] == []


# --- the geo answer -------------------------------------------------------------------------------------


def answer(r: HarnessResult) -> dict[str, Any]:
    assert r.local_response is not None and not r.upstream_called
    assert r.response_status == 200
    assert single(r.response_headers, "content-type") == "application/json"
    assert single(r.response_headers, "cache-control") == "no-store"
    body: dict[str, Any] = json.loads(r.response_body)
    return body


def test_answer_path(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"answer_path": "/api/geo", "headers": {"x-geo-country": "country"}})
    assert answer(h.request(path="/api/geo", info=client(LONDON))) == {
        "ip": LONDON,
        "country": "GB",
        "region": "ENG",
        "region_name": "England",
        "city": "London",
        "asn": 20712,
        "as_org": "Andrews & Arnold Ltd",
        "private": False,
    }
    assert answer(h.request(path="/api/geo?callback=x", info=client(LINKOPING)))["city"] == "Linköping"
    assert answer(h.request(method="HEAD", path="/api/geo", info=client(LONDON)))["country"] == "GB"
    assert answer(h.request(path="/api/geo", info=client(TOKYO6, port=443))) == {
        "ip": TOKYO6,
        "country": "JP",
        "region": None,
        "region_name": None,
        "city": None,
        "asn": 2914,
        "as_org": "NTT America, Inc.",
        "private": False,
    }
    assert answer(h.request(path="/api/geo", info=client("192.168.1.20", port=0))) == {
        "ip": "192.168.1.20",
        "country": None,
        "region": None,
        "region_name": None,
        "city": None,
        "asn": None,
        "as_org": None,
        "private": True,
    }
    # Other paths go on to the upstream.
    for path in ("/api/geo/", "/api/geox", "/API/geo", "/"):
        r = h.request(path=path, info=client(LONDON))
        assert passed(r), path
        assert single(r.request_headers, "x-geo-country") == "GB"


def test_answer_path_methods_and_escaping(load: LoadFilter) -> None:
    h = load("geo", {"answer_path": "/where"})
    refused = h.request(method="POST", path="/where", info=RequestInfo(source_address=LONDON))
    assert refused.response_status == 405 and not refused.upstream_called
    assert single(refused.response_headers, "allow") == "GET, HEAD"
    odd = GeoInfo(ip=LONDON, country="GB", city='Quote " and \\ and \n and \x01', as_org="Ünïcode")
    body = answer(h.request(path="/where", info=RequestInfo(source_address=LONDON, extra=properties(odd))))
    assert body["city"] == odd.city and body["as_org"] == odd.as_org


def test_refused_clients_do_not_get_the_answer(load: LoadFilter, client: Any) -> None:
    h = load("geo", {"answer_path": "/api/geo", "deny_countries": ["US"]})
    assert forbidden_country(h.request(path="/api/geo", info=client(MILTON))) == "US"
    assert answer(h.request(path="/api/geo", info=client(LONDON)))["country"] == "GB"


# --- configuration --------------------------------------------------------------------------------------


def test_empty_configuration_passes_everything_untouched(load: LoadFilter, client: Any) -> None:
    h = load("geo", "")
    r = h.request(headers=[("x-geo-country", "US")], info=client(MILTON))
    assert passed(r) and r.request_headers == [("x-geo-country", "US")]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{", "not valid JSON"),
        ([], "configuration: expected an object, got an array"),
        (
            {"countries": ["GB"]},
            'configuration: unknown field "countries" (expected one of: headers, strip, allow_countries, deny_countries, unknown, private, answer_path)',
        ),
        ({"headers": ["x-geo-country"]}, "headers: expected an object of header names to geo fields"),
        (
            {"headers": {"x-geo-town": "town"}},
            'headers.x-geo-town: expected one of "country", "region", "region_name", "city", "asn", "as_org", "private", got "town"',
        ),
        ({"headers": {"x geo": "country"}}, 'headers.x geo: "x geo" is not a valid header name'),
        (
            {"headers": {"Host": "country"}},
            'headers.Host: "host" is managed by the gateway and cannot carry a geo value',
        ),
        ({"headers": {"x-geo": "country", "X-Geo": "city"}}, 'headers.X-Geo: "x-geo" is configured twice'),
        ({"headers": {"x-geo": 1}}, "headers.x-geo: expected a string, got a number"),
        ({"allow_countries": "GB"}, "allow_countries: expected an array, got a string"),
        ({"allow_countries": []}, "allow_countries: at least one country code is needed"),
        (
            {"deny_countries": ["GB", "GBR"]},
            'deny_countries[1]: "GBR" is not an ISO 3166-1 alpha-2 country code',
        ),
        ({"deny_countries": ["G1"]}, 'deny_countries[0]: "G1" is not an ISO 3166-1 alpha-2 country code'),
        (
            {"allow_countries": ["GB"], "deny_countries": ["US"]},
            "allow_countries, deny_countries: set one of them, not both",
        ),
        ({"unknown": "block"}, 'unknown: expected one of "allow", "deny", got "block"'),
        ({"private": True}, "private: expected a string, got a boolean"),
        ({"answer_path": "api/geo"}, "answer_path: \"api/geo\" must be a path starting with '/'"),
        (
            {"answer_path": "/api/geo?x=1"},
            "answer_path: \"/api/geo?x=1\" may not contain '?', '#', spaces or control characters",
        ),
        ({"strip": ["*"]}, "strip[0]: \"*\": a prefix needs at least two characters before the '*'"),
        (
            {"strip": ["x-geo-*", "bad name"]},
            "strip[1]: \"bad name\" is not a header name or a header-name prefix ending in '*'",
        ),
    ],
)
def test_configuration_errors_name_the_field(config: Any, message: str) -> None:
    assert config_error("geo", config).startswith(message)


def test_module_exports_only_the_request_headers_callback() -> None:
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(filter_path("geo")))
    assert {e.name for e in module.exports} == {
        "memory",
        "proxy_abi_version_0_2_1",
        "proxy_on_memory_allocate",
        "proxy_on_configure",
        "proxy_on_delete",
        "proxy_on_request_headers",
    }
    assert {i.module for i in module.imports} == {"env"}


# --- the documentation example ----------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "filters" / "geo.md"


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_python_example_runs() -> None:
    (example,) = doc_blocks("python")
    exec(compile(example, str(DOC), "exec"), {})


def drop_table(toml: str, name: str) -> str:
    """``toml`` without the table ``[name]`` (its header line up to the next table)."""
    out: list[str] = []
    skipping = False
    for line in toml.splitlines():
        if line.startswith("["):
            skipping = line.strip() == f"[{name}]"
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def test_doc_toml_example_is_a_valid_configuration(load: LoadFilter, client: Any) -> None:
    (example,) = doc_blocks("toml")
    config: dict[str, Any] = tomllib.loads(example)
    assert config["geo"] == {"database": "/var/lib/wasm-gateway/dbip-city-lite.mmdb"}
    (filter_config,) = config["filters"].values()
    assert filter_config["module"] == "builtin:geo"
    h = load("geo", json.dumps(filter_config["configuration"]))
    r = h.request(path="/", headers=[("x-geo-city", "Springfield")], info=client(LONDON))
    assert passed(r)
    assert dict(r.request_headers) == {
        "x-geo-country": "GB",
        "x-geo-region": "England",
        "x-geo-city": "London",
    }
    pyongyang = RequestInfo(source_address="175.45.176.1", extra=properties(GeoInfo("175.45.176.1", "KP")))
    assert forbidden_country(h.request(path="/", info=pyongyang)) == "KP"
    assert answer(h.request(path="/api/geo", info=client(LINKOPING)))["country"] == "SE"
    if "geo" in GatewayConfig.__dataclass_fields__:
        parse_config(example, env={})  # the whole example, once the gateway reads [geo]
    else:
        with pytest.raises(ConfigError, match="geo"):
            parse_config(example, env={})
        parse_config(drop_table(example, "geo"), env={})


# --- per-request cost (python tests/filters/test_geo_filter.py) -----------------------------------------


BENCH_CASES: Mapping[str, dict[str, Any]] = {
    "empty configuration (runtime floor)": {},
    "deny list (1 property)": {"deny_countries": ["KP", "IR"]},
    "1 header (1 property)": {"headers": {"x-geo-country": "country"}},
    "deny list + 2 headers (geo map)": {
        "deny_countries": ["KP"],
        "headers": {"x-geo-country": "country", "x-geo-city": "city"},
    },
    "deny + 2 headers + answer_path, not asked": {
        "deny_countries": ["KP"],
        "headers": {"x-geo-country": "country", "x-geo-city": "city"},
        "answer_path": "/api/geo",
    },
    "deny + 2 headers + strip x-geo-*": {
        "deny_countries": ["KP"],
        "headers": {"x-geo-country": "country", "x-geo-city": "city"},
        "strip": ["x-geo-*"],
    },
    "refused (403 answered locally)": {"allow_countries": ["US"]},
    "geo answer (200 answered locally)": {"answer_path": "/api/users/42"},
}


def bench(argv: list[str]) -> int:
    import argparse
    import asyncio
    import statistics
    import time

    from wasm_gateway.runtime.chain import DecisionKind, FilterRuntime, FilterSpec

    parser = argparse.ArgumentParser(description="Per-request cost of the geo filter through ChainStream.")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    request = [
        (":method", "GET"),
        (":path", "/api/users/42"),
        (":authority", "shop.example"),
        (":scheme", "https"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("x-consumer", "alice"),
    ]
    response = [(":status", "200"), ("content-type", "application/json")]
    london = GeoInfo(LONDON, "GB", "ENG", "England", "London", 20712, "Andrews & Arnold Ltd")
    info = RequestInfo(source_address=LONDON, source_port=40000, extra=properties(london))

    async def one(runtime: FilterRuntime) -> DecisionKind:
        stream = runtime.chain(["geo"]).start(info)
        try:
            d = await stream.on_request_headers(list(request), True)
            if d.kind is DecisionKind.CONTINUE:
                await stream.on_response_headers(list(response), True)
            return d.kind
        finally:
            stream.finish()

    async def measure(runtime: FilterRuntime, n: int) -> tuple[list[float], DecisionKind]:
        kind = await one(runtime)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await one(runtime)
            samples.append((time.perf_counter() - t0) * 1e6)
        return samples, kind

    runtimes = {
        label: FilterRuntime.load(
            [
                FilterSpec(
                    name="geo",
                    module_path=filter_path("geo"),
                    configuration=json.dumps(config).encode(),
                    pool_min=1,
                    pool_max=1,
                )
            ]
        )
        for label, config in BENCH_CASES.items()
    }
    medians: dict[str, list[float]] = {label: [] for label in runtimes}
    kinds: dict[str, DecisionKind] = {}
    try:
        for runtime in runtimes.values():
            asyncio.run(measure(runtime, 1000))
        for _ in range(args.rounds):  # cases interleaved: load on a shared machine hits them alike
            for label, runtime in runtimes.items():
                samples, kinds[label] = asyncio.run(measure(runtime, args.requests))
                medians[label].append(statistics.median(samples))
    finally:
        for runtime in runtimes.values():
            runtime.close()
    print(f"{'geo filter, per request (all callbacks)':<46} {'best median':>11} {'median':>8}  outcome")
    for label, m in medians.items():
        print(f"{label:<46} {min(m):>9.1f}us {statistics.median(m):>6.1f}us  {kinds[label].value}")
    return 0


if __name__ == "__main__":
    sys.exit(bench(sys.argv[1:]))
