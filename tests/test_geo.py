"""wasm_gateway.geo on small MaxMind-format databases written by ``mmdb-writer`` in temp dirs.

The layouts imitate the real products: GeoLite2/GeoIP2 City, Country and ASN (nested maps with ``names``),
DB-IP Lite (the same, but subdivisions carry names and no ISO codes) and IPinfo's flat layouts. The helpers
that write them are also used by tests/filters/test_geo_filter.py.
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

import mmdb_writer
import netaddr
import pytest

from wasm_gateway.exceptions import GatewayError, GeoDatabaseError
from wasm_gateway.geo import (
    BUILTIN_COUNTRY,
    PROPERTY_NAMES,
    GeoConfig,
    GeoDatabase,
    GeoInfo,
    properties,
)
from wasm_gateway.runtime.memory import decode_pairs

Records = dict[str, dict[str, Any]]


def names(en: str, **others: str) -> dict[str, Any]:
    return {"names": {"en": en, **{k.replace("_", "-"): v for k, v in others.items()}}}


def write_mmdb(path: Path, records: Records, *, database_type: str, ip_version: int = 6) -> Path:
    """One network -> record per entry (IPv4 networks go into an IPv6 tree as IPv4-mapped, like MaxMind's)."""
    writer = mmdb_writer.MMDBWriter(
        ip_version=ip_version,
        ipv4_compatible=ip_version == 6,
        database_type=database_type,
        languages=["en"],
        description=f"test {database_type}",
    )
    for network, record in records.items():
        writer.insert_network(netaddr.IPSet([network]), record)
    writer.to_db_file(str(path))
    return path


GB = {"geoname_id": 2635167, "iso_code": "GB", **names("United Kingdom", de="Vereinigtes Königreich")}
SE = {"iso_code": "SE", **names("Sweden")}
US = {"iso_code": "US", **names("United States")}
JP = {"iso_code": "JP", **names("Japan")}

CITY: Records = {
    "81.2.69.0/24": {
        "city": {"geoname_id": 2643743, **names("London", de="London", ru="Лондон")},
        "continent": {"code": "EU", **names("Europe")},
        "country": GB,
        "registered_country": GB,
        "location": {"latitude": 51.5142, "longitude": -0.0931, "time_zone": "Europe/London"},
        "subdivisions": [{"iso_code": "ENG", **names("England")}],
    },
    "89.160.20.0/24": {
        "city": names("Linköping"),
        "country": SE,
        "subdivisions": [{"iso_code": "E", **names("Östergötland County")}],
    },
    "216.160.83.0/24": {
        "city": names("Milton"),
        "country": US,
        # Two levels: the larger one comes first and is the region.
        "subdivisions": [{"iso_code": "WA", **names("Washington")}, {"iso_code": "X1", **names("Pierce")}],
    },
    "2001:218::/32": {"country": JP, "continent": {"code": "AS"}},
    # Anycast ranges have no location, only the country their network is registered in.
    "1.0.0.0/24": {
        "registered_country": {"iso_code": "AU", **names("Australia")},
        "traits": {"is_anycast": True},
    },
    # Known network, no country at all.
    "2.125.160.0/24": {"location": {"latitude": 51.5, "longitude": -0.13}},
    # A database claiming a private range: must never be consulted for it.
    "10.0.0.0/8": {"country": {"iso_code": "ZZ"}},
}

ASN: Records = {
    "81.2.69.0/24": {
        "autonomous_system_number": 20712,
        "autonomous_system_organization": "Andrews & Arnold Ltd",
    },
    "2001:218::/32": {
        "autonomous_system_number": 2914,
        "autonomous_system_organization": "NTT America, Inc.",
    },
    "8.8.8.0/24": {"autonomous_system_number": 15169, "autonomous_system_organization": "GOOGLE"},
}

# DB-IP Lite: GeoIP2-shaped, subdivisions without ISO codes.
DBIP_CITY: Records = {
    "89.160.20.0/24": {
        "city": names("Linköping"),
        "continent": {"code": "EU", "geoname_id": 6255148, **names("Europe")},
        "country": {"geoname_id": 2661886, "is_in_european_union": True, "iso_code": "SE", **names("Sweden")},
        "location": {"latitude": 58.4109, "longitude": 15.6216},
        "subdivisions": [names("Östergötland")],
    },
}

# IPinfo Lite: flat; "country" is the name and "country_code" the code; "asn" is text.
IPINFO_LITE: Records = {
    "81.2.69.0/24": {
        "asn": "AS20712",
        "as_name": "Andrews & Arnold Ltd",
        "as_domain": "aa.net.uk",
        "country_code": "GB",
        "country": "United Kingdom",
        "continent_code": "EU",
        "continent": "Europe",
    },
}

# IPinfo's older country_asn: the code is in "country".
IPINFO_COUNTRY_ASN: Records = {
    "2001:218::/32": {"country": "JP", "country_name": "Japan", "asn": "AS2914", "as_name": "NTT"},
}


@pytest.fixture
def city_db(tmp_path: Path) -> Path:
    return write_mmdb(tmp_path / "GeoLite2-City.mmdb", CITY, database_type="GeoLite2-City")


@pytest.fixture
def asn_db(tmp_path: Path) -> Path:
    return write_mmdb(tmp_path / "GeoLite2-ASN.mmdb", ASN, database_type="GeoLite2-ASN")


# --- lookups: GeoLite2 layouts --------------------------------------------------------------------------


def test_city_database_ipv4(city_db: Path) -> None:
    with GeoDatabase.open(city_db) as db:
        assert db.lookup("81.2.69.142") == GeoInfo(
            ip="81.2.69.142", country="GB", region="ENG", region_name="England", city="London"
        )
        assert db.lookup("89.160.20.112") == GeoInfo(
            ip="89.160.20.112",
            country="SE",
            region="E",
            region_name="Östergötland County",
            city="Linköping",
        )
        # Two subdivision levels: the region is the larger one.
        info = db.lookup("216.160.83.56")
        assert info is not None
        assert (info.country, info.region, info.region_name, info.city) == (
            "US",
            "WA",
            "Washington",
            "Milton",
        )


def test_city_database_ipv6_and_ipv4_mapped(city_db: Path) -> None:
    with GeoDatabase.open(city_db) as db:
        assert db.lookup("2001:218::1") == GeoInfo(ip="2001:218::1", country="JP")
        assert db.lookup("2001:218:0:0:0:0:0:abcd") == GeoInfo(ip="2001:218::abcd", country="JP")
        # An IPv4 client seen on a dual-stack socket is the IPv4 client.
        mapped = db.lookup("::ffff:81.2.69.142")
        assert mapped is not None and mapped.ip == "81.2.69.142" and mapped.city == "London"


def test_registered_country_stands_in_for_a_missing_country(city_db: Path) -> None:
    with GeoDatabase.open(city_db) as db:
        assert db.lookup("1.0.0.1") == GeoInfo(ip="1.0.0.1", country="AU")
        # A known network with no country at all: found, country unknown.
        assert db.lookup("2.125.160.216") == GeoInfo(ip="2.125.160.216")


def test_names_in_another_language_fall_back_to_english(city_db: Path) -> None:
    with GeoDatabase.open(city_db, language="ru") as db:
        london = db.lookup("81.2.69.142")
        sweden = db.lookup("89.160.20.112")
    assert london is not None and london.city == "Лондон" and london.region_name == "England"
    assert sweden is not None and sweden.city == "Linköping"


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",  # in the test database as "ZZ": never looked up
        "192.168.1.1",
        "172.16.0.1",
        "127.0.0.1",
        "169.254.10.1",  # link-local
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",  # multicast
        "::1",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",  # unique local
        "::ffff:10.1.2.3",
        "2001:db8::1",  # documentation
    ],
)
def test_private_and_special_addresses_are_flagged_without_a_lookup(city_db: Path, address: str) -> None:
    with GeoDatabase.open(city_db) as db:
        info = db.lookup(address)
    assert info is not None
    assert info.private is True
    assert (info.country, info.region, info.city, info.asn) == ("", "", "", None)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "2606:4700::1111", "unknown", "", "not an address", "81.2.69"]
)
def test_unknown_and_invalid_addresses_are_none(city_db: Path, address: str) -> None:
    with GeoDatabase.open(city_db) as db:
        assert db.lookup(address) is None


def test_country_database_ipv4_only(tmp_path: Path) -> None:
    path = write_mmdb(
        tmp_path / "GeoLite2-Country.mmdb",
        {"81.2.69.0/24": {"continent": {"code": "EU"}, "country": GB, "registered_country": GB}},
        database_type="GeoLite2-Country",
        ip_version=4,
    )
    with GeoDatabase.open(path) as db:
        assert db.lookup("81.2.69.1") == GeoInfo(ip="81.2.69.1", country="GB")
        # An IPv6 address in an IPv4-only database: unknown, not an error.
        assert db.lookup("2001:218::1") is None


def test_asn_database_alone(asn_db: Path) -> None:
    with GeoDatabase.open(asn_db) as db:
        assert db.lookup("8.8.8.8") == GeoInfo(ip="8.8.8.8", asn=15169, as_org="GOOGLE")
        assert db.lookup("2001:218::5") == GeoInfo(ip="2001:218::5", asn=2914, as_org="NTT America, Inc.")


def test_city_and_asn_databases_together(city_db: Path, asn_db: Path) -> None:
    with GeoDatabase.open(city_db, asn_path=asn_db) as db:
        assert db.sources == (str(city_db), str(asn_db))
        assert db.lookup("81.2.69.142") == GeoInfo(
            ip="81.2.69.142",
            country="GB",
            region="ENG",
            region_name="England",
            city="London",
            asn=20712,
            as_org="Andrews & Arnold Ltd",
        )
        # Only the ASN database knows it: still an answer.
        assert db.lookup("8.8.8.8") == GeoInfo(ip="8.8.8.8", asn=15169, as_org="GOOGLE")
        # Only the city database knows it.
        assert db.lookup("216.160.83.56") == GeoInfo(
            ip="216.160.83.56", country="US", region="WA", region_name="Washington", city="Milton"
        )


# --- lookups: other layouts -----------------------------------------------------------------------------


def test_dbip_lite_layout_has_region_names_but_no_codes(tmp_path: Path) -> None:
    city = write_mmdb(tmp_path / "dbip-city-lite.mmdb", DBIP_CITY, database_type="DBIP-City-Lite")
    asn = write_mmdb(
        tmp_path / "dbip-asn-lite.mmdb",
        {
            "89.160.0.0/16": {
                "autonomous_system_number": 29518,
                "autonomous_system_organization": "Bredband2 AB",
            }
        },
        database_type="DBIP-ASN-Lite (compat=GeoLite2-ASN)",
    )
    with GeoDatabase.open(city, asn_path=asn) as db:
        assert db.lookup("89.160.20.112") == GeoInfo(
            ip="89.160.20.112",
            country="SE",
            region="",
            region_name="Östergötland",
            city="Linköping",
            asn=29518,
            as_org="Bredband2 AB",
        )


def test_flat_ipinfo_layouts(tmp_path: Path) -> None:
    lite = write_mmdb(tmp_path / "ipinfo_lite.mmdb", IPINFO_LITE, database_type="ipinfo lite")
    country_asn = write_mmdb(
        tmp_path / "country_asn.mmdb", IPINFO_COUNTRY_ASN, database_type="ipinfo country_asn"
    )
    with GeoDatabase.open(lite) as db:
        assert db.lookup("81.2.69.142") == GeoInfo(
            ip="81.2.69.142", country="GB", asn=20712, as_org="Andrews & Arnold Ltd"
        )
    with GeoDatabase.open(country_asn) as db:
        assert db.lookup("2001:218::1") == GeoInfo(ip="2001:218::1", country="JP", asn=2914, as_org="NTT")


def test_flat_custom_layout_with_region_and_city(tmp_path: Path) -> None:
    path = write_mmdb(
        tmp_path / "own.mmdb",
        {
            "81.2.69.0/24": {
                "country_code": "gb",
                "region_code": "ENG",
                "region": "England",
                "city": "London",
                "asn": 20712,
                "as_org": "A&A",
            },
            # Values of the wrong type or shape are ignored, not trusted.
            "89.160.20.0/24": {"country": "Sweden", "asn": "ASX", "city": 7},
        },
        database_type="own",
    )
    with GeoDatabase.open(path) as db:
        assert db.lookup("81.2.69.1") == GeoInfo(
            ip="81.2.69.1",
            country="GB",
            region="ENG",
            region_name="England",
            city="London",
            asn=20712,
            as_org="A&A",
        )
        assert db.lookup("89.160.20.1") == GeoInfo(ip="89.160.20.1")


def test_builtin_registry_country_table() -> None:
    with GeoDatabase.open(BUILTIN_COUNTRY) as db:
        assert db.sources == (BUILTIN_COUNTRY,)
        google = db.lookup("8.8.8.8")  # registered to Google in ARIN's region for decades
        assert google is not None and google.country == "US" and google.city == ""
        assert db.lookup("::ffff:8.8.8.8") == google
        private = db.lookup("192.168.0.1")
        assert private is not None and private.private
        assert db.lookup("unknown") is None
    # As the configuration gives it (a Path).
    configured = GeoDatabase.from_config(GeoConfig(database=Path(BUILTIN_COUNTRY)))
    assert configured is not None and configured.sources == (BUILTIN_COUNTRY,)
    configured.close()


# --- properties -----------------------------------------------------------------------------------------


def test_properties_of_a_full_answer(city_db: Path, asn_db: Path) -> None:
    with GeoDatabase.open(city_db, asn_path=asn_db) as db:
        props: dict[str, Any] = properties(db.lookup("81.2.69.142"))
    expected = {
        "geo.country": "GB",
        "geo.private": False,
        "geo.region": "ENG",
        "geo.region_name": "England",
        "geo.city": "London",
        "geo.asn": 20712,
        "geo.as_org": "Andrews & Arnold Ltd",
    }
    packed = geo_map(props)
    assert props == expected
    assert set(PROPERTY_NAMES) == {*expected, "geo"}
    # The "geo" map holds the same, as text, in the header-pairs encoding.
    assert packed == [
        (b"country", b"GB"),
        (b"private", b"false"),
        (b"region", b"ENG"),
        (b"region_name", b"England"),
        (b"city", b"London"),
        (b"asn", b"20712"),
        (b"as_org", b"Andrews & Arnold Ltd"),
    ]


def geo_map(props: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The "geo" map property, decoded (and removed from ``props``)."""
    packed = props.pop("geo")
    assert isinstance(packed, bytes)
    pairs = decode_pairs(packed)
    assert pairs is not None
    return pairs


def test_properties_of_partial_private_and_unknown_answers() -> None:
    jp: dict[str, Any] = properties(GeoInfo(ip="2001:218::1", country="JP"))
    assert geo_map(jp) == [(b"country", b"JP"), (b"private", b"false")]
    assert jp == {"geo.country": "JP", "geo.private": False}
    private: dict[str, Any] = properties(GeoInfo(ip="10.0.0.1", private=True))
    assert geo_map(private) == [(b"country", b""), (b"private", b"true")]
    assert private == {"geo.country": "", "geo.private": True}
    unknown: dict[str, Any] = properties(None)
    assert geo_map(unknown) == [(b"country", b""), (b"private", b"false")]
    assert unknown == {"geo.country": "", "geo.private": False}
    utf8: dict[str, Any] = properties(GeoInfo(ip="89.160.20.1", country="SE", city="Linköping"))
    assert (b"city", "Linköping".encode()) in geo_map(utf8)


def test_lookups_and_properties_are_cached_and_read_only(city_db: Path) -> None:
    with GeoDatabase.open(city_db, cache_size=2) as db:
        first = db.lookup("81.2.69.142")
        assert db.lookup("81.2.69.142") is first
        props = db.properties_for("81.2.69.142")
        assert db.properties_for("81.2.69.142") is props
        assert props["geo.city"] == "London"
        with pytest.raises(TypeError):
            props["geo.country"] = "US"  # type: ignore[index]
        # Bounded: older entries are evicted.
        db.lookup("89.160.20.112")
        db.lookup("216.160.83.56")
        assert db.lookup("81.2.69.142") is not first
        assert db.lookup("81.2.69.142") == first


# --- configuration and errors ---------------------------------------------------------------------------


def test_from_config(city_db: Path, asn_db: Path) -> None:
    assert GeoDatabase.from_config(GeoConfig(database=None)) is None
    db = GeoDatabase.from_config(GeoConfig(database=city_db, asn_database=asn_db, cache_size=16))
    assert db is not None
    with db:
        info = db.lookup("81.2.69.142")
        assert info is not None and info.asn == 20712
    with pytest.raises(GeoDatabaseError, match=r"asn_database .*GeoLite2-ASN\.mmdb: set geo\.database too"):
        GeoDatabase.from_config(GeoConfig(database=None, asn_database=asn_db))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d / "missing.mmdb", "file not found"),
        (lambda d: d, "is a directory, not a .mmdb file"),
        (lambda d: _write(d / "empty.mmdb", b""), r"not a MaxMind DB \(\.mmdb\) file \(the file is empty\)"),
        (
            lambda d: _write(d / "GeoLite2-City.tar.gz", gzip.compress(b"GeoLite2-City_20250101/")),
            r"gzip-compressed: extract the \.mmdb file",
        ),
        (lambda d: _write(d / "db.zip", b"PK\x03\x04" + b"\0" * 40), "ZIP archive"),
        (
            lambda d: _write(
                d / "GeoLite2-City-Blocks-IPv4.csv", b"network,geoname_id\n1.0.0.0/24,2077456\n"
            ),
            "looks like a CSV file: download the MMDB edition",
        ),
        (lambda d: _write(d / "random.mmdb", bytes(range(256)) * 8), "no MaxMind DB metadata found"),
    ],
)
def test_open_errors_name_the_file_and_the_problem(tmp_path: Path, make: Any, problem: str) -> None:
    target = tmp_path / "sub"
    target.mkdir()
    path = make(target)
    with pytest.raises(GeoDatabaseError, match=problem) as err:
        GeoDatabase.open(path)
    assert str(path) in str(err.value)
    assert str(err.value).startswith(f"geo database {path}: ")
    assert isinstance(err.value, GatewayError)


def test_asn_database_errors_say_which_database(city_db: Path, tmp_path: Path) -> None:
    with pytest.raises(GeoDatabaseError, match=r"^geo asn_database .*nope\.mmdb: file not found$"):
        GeoDatabase.open(city_db, asn_path=tmp_path / "nope.mmdb")


def test_corrupt_database_answers_unknown_and_logs_once(
    city_db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The metadata sits at the end of the file: overwriting the start of the search tree leaves a file that
    # opens but cannot answer. Lookups then say "unknown" (and log, once) instead of failing requests.
    data = city_db.read_bytes()
    cut = _write(tmp_path / "cut.mmdb", b"\xff" * 64 + data[64:])
    geo_logger = logging.getLogger("wasm_gateway.geo")
    geo_logger.addHandler(caplog.handler)  # directly: the gateway's logging set-up may stop propagation
    try:
        with GeoDatabase.open(cut) as db:
            assert [db.lookup(a) for a in ("81.2.69.142", "89.160.20.112", "2001:218::1")] == [None] * 3
    finally:
        geo_logger.removeHandler(caplog.handler)
    # Each record once (it may also have reached caplog by propagation).
    records = {id(r): r for r in caplog.records if r.name == "wasm_gateway.geo"}
    errors = [r.getMessage() for r in records.values()]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"geo database {cut}: lookup of 81.2.69.142 failed: ")


def test_every_public_test_address_is_public() -> None:
    # Guards the test data: the addresses above that must be looked up are global unicast addresses.
    for address in ("81.2.69.142", "89.160.20.112", "216.160.83.56", "2001:218::1", "1.0.0.1", "8.8.8.8"):
        assert ipaddress.ip_address(address).is_global, address


def test_missing_optional_packages_are_named(city_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "iptocc", None)  # what `import iptocc` meets when it is not installed
    with pytest.raises(
        GeoDatabaseError,
        match=r"^geo database builtin:country: the iptocc package is not installed \(pip install iptocc\)$",
    ):
        GeoDatabase.open(BUILTIN_COUNTRY)
    monkeypatch.setitem(sys.modules, "maxminddb", None)
    with pytest.raises(
        GeoDatabaseError,
        match=r"the maxminddb package is not installed \(pip install 'wasm-gateway\[geo\]'\)",
    ):
        GeoDatabase.open(city_db)
