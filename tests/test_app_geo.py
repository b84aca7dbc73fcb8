"""Geolocation in the running gateway: the client address (trusted-proxy aware) decides the country."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ThreadServer, gateway_server
from tests.origins import echo_origin
from tests.test_geo import CITY, write_mmdb


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadServer]:
    with ThreadServer(echo_origin) as server:
        yield server


def config(origin_port: int, database: Path, trusted: str = "") -> str:
    return f"""{trusted}
[upstreams.origin]
targets = ["127.0.0.1:{origin_port}"]
[geo]
database = "{database}"
[filters.geo]
module = "builtin:geo"
configuration = {{ headers = {{ "x-geo-country" = "country", "x-geo-city" = "city" }}, deny_countries = ["SE"], answer_path = "/api/geo" }}
[[routes]]
path_prefix = "/"
filters = ["geo"]
upstream = "origin"
[log]
access_log = false
"""


def seen_header(response: httpx.Response, name: str) -> list[str]:
    assert response.status_code == 200, response.text
    return [v for k, v in response.json()["headers"] if k == name]


def test_untrusted_xff_does_not_change_the_country(origin: ThreadServer, tmp_path: Path) -> None:
    db = write_mmdb(tmp_path / "city.mmdb", CITY, database_type="GeoLite2-City")
    with gateway_server(config(origin.port, db), tmp_path) as gw:
        r = httpx.get(gw.url + "/echo", headers={"x-forwarded-for": "81.2.69.142", "x-geo-country": "US"})
        assert seen_header(r, "x-geo-country") in ([], [""])  # loopback client: private, no country
        answer = httpx.get(gw.url + "/api/geo", headers={"x-forwarded-for": "81.2.69.142"}).json()
        assert answer["private"] is True and answer["country"] in ("", None)


def test_trusted_proxy_chain_sets_country_headers_deny_and_answer(
    origin: ThreadServer, tmp_path: Path
) -> None:
    db = write_mmdb(tmp_path / "city.mmdb", CITY, database_type="GeoLite2-City")
    with gateway_server(config(origin.port, db, 'trusted_proxies = ["127.0.0.1/32"]'), tmp_path) as gw:
        r = httpx.get(gw.url + "/echo", headers={"x-forwarded-for": "81.2.69.142", "x-geo-country": "US"})
        assert seen_header(r, "x-geo-country") == ["GB"]  # the client-sent copy was removed
        assert seen_header(r, "x-geo-city") == ["London"]
        denied = httpx.get(gw.url + "/echo", headers={"x-forwarded-for": "89.160.20.112"})
        assert denied.status_code == 403 and denied.json() == {"error": "forbidden", "country": "SE"}
        answer = httpx.get(gw.url + "/api/geo", headers={"x-forwarded-for": "81.2.69.142"}).json()
        assert answer["country"] == "GB" and answer["city"] == "London" and answer["ip"] == "81.2.69.142"
