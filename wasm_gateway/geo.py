"""Client geolocation from MaxMind-format (``.mmdb``) databases, offered to filters as properties.

::

    db = GeoDatabase.open("GeoLite2-City.mmdb", asn_path="GeoLite2-ASN.mmdb")
    db.lookup("81.2.69.142")   # GeoInfo(ip='81.2.69.142', country='GB', region='ENG', region_name='England',
                               #         city='London', asn=20712, as_org='Andrews & Arnold Ltd', private=False)
    info = RequestInfo(..., extra=db.properties_for(client))
                               # {"geo.country": "GB", "geo.private": False, "geo.city": "London", ...,
                               #  "geo": <the same as one map>}

Works with GeoLite2/GeoIP2 City, Country and ASN, DB-IP Lite (city, country, ASN: the GeoIP2 layout, with
subdivision names but no subdivision codes), IPinfo's flat layouts (``country``/``country_code``, ``asn`` as
"AS123", ``as_name``) and similar custom databases. ``builtin:country`` selects the registry-country table of
the ``iptocc`` package instead of a file (optional: ``pip install iptocc``).

Answers, by kind of address:

- not an IP address (e.g. "unknown" when the gateway has no peer address): ``None``;
- not a public unicast address (private, loopback, link-local, CGNAT, documentation, reserved, multicast):
  ``GeoInfo(country="", private=True)``, without asking the database;
- a public address no database knows: ``None``;
- otherwise a ``GeoInfo`` with whatever the databases hold ("" / None for absent fields).

`properties` maps an answer to property paths (``geo.country`` ...); ``None`` maps to ``geo.country = ""``
and ``geo.private = False``, so a filter can tell "database configured, address unknown" from "no database"
(no ``geo.country`` property at all). Reference: docs/filters/geo.md.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import logging
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol

from .exceptions import GeoDatabaseError

if TYPE_CHECKING:
    import maxminddb

__all__ = [
    "BUILTIN_COUNTRY",
    "PROPERTY_NAMES",
    "GeoConfig",
    "GeoDatabase",
    "GeoInfo",
    "PropertyValue",
    "properties",
]

logger = logging.getLogger("wasm_gateway.geo")

BUILTIN_COUNTRY: Final = "builtin:country"
"""A database name meaning "the registry-country table of the iptocc package" (country codes only)."""

PROPERTY_NAMES: Final = (
    "geo",
    "geo.country",
    "geo.region",
    "geo.region_name",
    "geo.city",
    "geo.asn",
    "geo.as_org",
    "geo.private",
)

PropertyValue = str | int | bool | bytes
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DEFAULT_CACHE_SIZE: Final = 4096
_MAX_TEXT: Final = 256  # longer names are cut: they end up in headers
_COUNTRY_CODE: Final = re.compile(r"[A-Za-z]{2}")
_ASN_TEXT: Final = re.compile(r"(?:AS)?(\d{1,10})", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class GeoConfig:
    """The ``[geo]`` section: where the databases are (None: geolocation off)."""

    database: Path | None = None
    """City, Country or ASN database (or `BUILTIN_COUNTRY`)."""
    asn_database: Path | None = None
    """An ASN database consulted for ``asn``/``as_org`` when ``database`` has none."""
    cache_size: int = _DEFAULT_CACHE_SIZE
    """Lookups remembered (least recently used first out)."""


@dataclass(frozen=True, slots=True)
class GeoInfo:
    """What the databases say about one address."""

    ip: str
    country: str = ""
    """ISO 3166-1 alpha-2, upper case ("" when unknown)."""
    region: str = ""
    """The top-level subdivision's ISO 3166-2 code without the country prefix ("CA" for US-CA)."""
    region_name: str = ""
    city: str = ""
    asn: int | None = None
    as_org: str = ""
    private: bool = False
    """Not a public unicast address: nothing was looked up."""


def properties(info: GeoInfo | None) -> dict[str, PropertyValue]:
    """The filter properties (``RequestInfo.extra``) for a lookup result.

    One property per field (``geo.country`` ... ``geo.private``; absent fields are left out, except
    ``geo.country``, "" when unknown, and ``geo.private``, always there), plus ``geo``: all of them as one
    map in the header-pairs encoding (as Envoy encodes map attributes such as ``request.headers``), with
    text values ("15169", "true"), so a filter reads the whole record with one host call.
    """
    out: dict[str, PropertyValue] = {"geo.country": "", "geo.private": False}
    if info is not None:
        out["geo.country"] = info.country
        out["geo.private"] = info.private
        if info.region:
            out["geo.region"] = info.region
        if info.region_name:
            out["geo.region_name"] = info.region_name
        if info.city:
            out["geo.city"] = info.city
        if info.asn is not None:
            out["geo.asn"] = info.asn
        if info.as_org:
            out["geo.as_org"] = info.as_org
    fields = [(path.removeprefix("geo."), value) for path, value in out.items()]
    out["geo"] = _encode_map(fields)
    return out


def _text_value(value: PropertyValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _encode_map(fields: list[tuple[str, PropertyValue]]) -> bytes:
    """Header-pairs encoding: u32 N, N x (u32 key_len, u32 value_len), then each key and value + NUL."""
    pairs = [(k.encode(), _text_value(v).encode()) for k, v in fields]
    sizes = [len(pairs)]
    for k, v in pairs:
        sizes += (len(k), len(v))
    body = b"".join(k + b"\0" + v + b"\0" for k, v in pairs)
    return struct.pack(f"<{len(sizes)}I", *sizes) + body


# --------------------------------------------------------------------------------------------------------------
# Sources


class _Source(Protocol):
    label: str

    def record(self, address: IPAddress) -> Mapping[str, Any] | None: ...

    def close(self) -> None: ...


class _MmdbSource:
    def __init__(self, reader: maxminddb.Reader, label: str) -> None:
        self._reader = reader
        self.label = label
        self.ip_version = reader.metadata().ip_version
        self._failed = False

    def record(self, address: IPAddress) -> Mapping[str, Any] | None:
        if address.version == 6 and self.ip_version == 4:
            return None  # an IPv4-only database knows no IPv6 address
        try:
            found = self._reader.get(address)
        except Exception as exc:  # a corrupt record must not fail the request
            if not self._failed:
                self._failed = True
                logger.error("geo database %s: lookup of %s failed: %s", self.label, address, exc)
            return None
        if isinstance(found, Mapping):
            return found
        if isinstance(found, str) and _COUNTRY_CODE.fullmatch(found):
            return {"country_code": found}  # a database whose records are bare country codes
        return None

    def close(self) -> None:
        self._reader.close()


class _RegistrySource:
    """Country of registration from the Regional Internet Registries' delegation files (package iptocc)."""

    def __init__(self, country_code: Callable[[str], str | None], label: str) -> None:
        self._country_code = country_code
        self.label = label

    def record(self, address: IPAddress) -> Mapping[str, Any] | None:
        code = self._country_code(str(address))
        return {"country_code": code} if code else None

    def close(self) -> None:
        pass


def _describe_bad_file(path: Path) -> str:
    """Why ``path`` is probably not a MaxMind DB file (a hint after the main message)."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        return ""
    if not head:
        return " (the file is empty)"
    if head.startswith(b"\x1f\x8b"):
        return " (it is gzip-compressed: extract the .mmdb file from the .tar.gz / .gz download first)"
    if head.startswith(b"PK\x03\x04"):
        return " (it is a ZIP archive: extract the .mmdb file from it first)"
    if head[257:262] == b"ustar":
        return " (it is a tar archive: extract the .mmdb file from it first)"
    if b"," in head and all(b == 9 or b == 10 or b == 13 or 32 <= b < 127 for b in head):
        return " (it looks like a CSV file: download the MMDB edition of the database)"
    return " (no MaxMind DB metadata found: truncated or another format?)"


def _open_mmdb(path: Path, role: str) -> _MmdbSource:
    label = str(path)
    if not path.exists():
        raise GeoDatabaseError(f"{role} {label}: file not found")
    if path.is_dir():
        raise GeoDatabaseError(f"{role} {label}: is a directory, not a .mmdb file")
    try:
        import maxminddb
    except ImportError:
        raise GeoDatabaseError(
            f"{role} {label}: the maxminddb package is not installed (pip install 'wasm-gateway[geo]')"
        ) from None
    try:
        reader = maxminddb.open_database(label)
    except maxminddb.InvalidDatabaseError:
        raise GeoDatabaseError(
            f"{role} {label}: not a MaxMind DB (.mmdb) file{_describe_bad_file(path)}"
        ) from None
    except PermissionError:
        raise GeoDatabaseError(f"{role} {label}: permission denied") from None
    except (OSError, ValueError) as exc:
        raise GeoDatabaseError(f"{role} {label}: cannot open: {exc}") from None
    return _MmdbSource(reader, label)


def _open_registry(role: str) -> _RegistrySource:
    try:
        module = importlib.import_module("iptocc")
    except ImportError:
        raise GeoDatabaseError(
            f"{role} {BUILTIN_COUNTRY}: the iptocc package is not installed (pip install iptocc)"
        ) from None
    country_code: Callable[[str], str | None] = module.country_code
    return _RegistrySource(country_code, BUILTIN_COUNTRY)


def _open_source(path: str | Path, role: str) -> _Source:
    if str(path) == BUILTIN_COUNTRY:
        return _open_registry(role)
    return _open_mmdb(Path(path), role)


# --------------------------------------------------------------------------------------------------------------
# Record layouts


def _text(value: object) -> str:
    return value.strip()[:_MAX_TEXT] if isinstance(value, str) else ""


def _first_text(record: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    for key in keys:
        text = _text(record.get(key))
        if text:
            return text
    return ""


def _name(obj: Mapping[str, Any], language: str) -> str:
    """A GeoIP2 ``names`` map in ``language``, else English, else any; or a flat ``name``."""
    names = obj.get("names")
    if isinstance(names, Mapping):
        for key in (language, "en"):
            text = _text(names.get(key))
            if text:
                return text
        for value in names.values():
            text = _text(value)
            if text:
                return text
    return _text(obj.get("name"))


def _country_code(value: object) -> str:
    return value.upper() if isinstance(value, str) and _COUNTRY_CODE.fullmatch(value) else ""


def _country(record: Mapping[str, Any]) -> str:
    # GeoIP2 / DB-IP: where the address is used, else where its network is registered (anycast ranges).
    for key in ("country", "registered_country"):
        obj = record.get(key)
        if isinstance(obj, Mapping):
            code = _country_code(obj.get("iso_code"))
            if code:
                return code
    # Flat layouts: IPinfo Lite has country_code (and country = the name); IPinfo's older country_asn has
    # the code in country.
    for key in ("country_code", "country_iso_code", "iso_code", "country"):
        code = _country_code(record.get(key))
        if code:
            return code
    return ""


def _region(record: Mapping[str, Any], language: str) -> tuple[str, str]:
    subdivisions = record.get("subdivisions")
    if isinstance(subdivisions, list) and subdivisions and isinstance(subdivisions[0], Mapping):
        top = subdivisions[0]  # GeoIP2 lists the largest subdivision first
        return _text(top.get("iso_code")), _name(top, language)
    code = _first_text(record, ("region_code", "subdivision_code", "subdivision_1_iso_code", "state_code"))
    name = _first_text(
        record, ("region_name", "region", "subdivision_1_name", "subdivision", "state1", "state")
    )
    return code, name


def _city(record: Mapping[str, Any], language: str) -> str:
    city = record.get("city")
    if isinstance(city, Mapping):
        return _name(city, language)
    return _text(city) or _text(record.get("city_name"))


def _asn_number(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (m := _ASN_TEXT.fullmatch(value.strip())):
        number = int(m.group(1))
    else:
        return None
    return number if 0 < number < 2**32 else None


def _asn(record: Mapping[str, Any]) -> tuple[int | None, str]:
    traits = record.get("traits")  # GeoIP2 Enterprise / Insights keep the ASN among the traits
    for obj in (record, traits if isinstance(traits, Mapping) else {}):
        number = _asn_number(obj.get("autonomous_system_number"))
        if number is not None:
            return number, _text(obj.get("autonomous_system_organization"))
    number = _asn_number(record.get("asn"))
    if number is not None:
        return number, _first_text(record, ("as_name", "as_org", "as_organization", "asn_org"))
    return None, ""


# --------------------------------------------------------------------------------------------------------------
# The database


def _parse(ip: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped  # ::ffff:a.b.c.d is the IPv4 client
        if address.scope_id:
            return ipaddress.IPv6Address(str(address).partition("%")[0])
    return address


def _is_public(address: IPAddress) -> bool:
    return address.is_global and not address.is_multicast


class GeoDatabase:
    """One or two opened databases with a lookup cache. Close it (or use ``with``) to release the files."""

    def __init__(
        self,
        primary: _Source,
        asn: _Source | None = None,
        *,
        cache_size: int = _DEFAULT_CACHE_SIZE,
        language: str = "en",
    ) -> None:
        self._primary = primary
        self._asn = asn
        self.language = language
        # Per-address caches (functools' C LRU: a hit costs a fraction of a microsecond).
        self._cached_lookup = functools.lru_cache(maxsize=cache_size)(self._lookup)
        self._cached_properties = functools.lru_cache(maxsize=cache_size)(self._properties)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        asn_path: str | Path | None = None,
        cache_size: int = _DEFAULT_CACHE_SIZE,
        language: str = "en",
    ) -> GeoDatabase:
        """Open ``path`` (a .mmdb file or `BUILTIN_COUNTRY`) and, if given, an ASN database.
        GeoDatabaseError names the file and what is wrong with it."""
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        primary = _open_source(path, "geo database")
        try:
            asn = _open_source(asn_path, "geo asn_database") if asn_path is not None else None
        except BaseException:
            primary.close()
            raise
        return cls(primary, asn, cache_size=cache_size, language=language)

    @classmethod
    def from_config(cls, config: GeoConfig) -> GeoDatabase | None:
        """The configured databases, or None when geolocation is off (no ``database``)."""
        if config.database is None:
            if config.asn_database is not None:
                raise GeoDatabaseError(
                    f"geo asn_database {config.asn_database}: set geo.database too (the ASN database "
                    "only adds asn/as_org to what the main database finds)"
                )
            return None
        return cls.open(config.database, asn_path=config.asn_database, cache_size=config.cache_size)

    @property
    def sources(self) -> tuple[str, ...]:
        """The opened databases (file paths or `BUILTIN_COUNTRY`), for logs."""
        return (self._primary.label,) + ((self._asn.label,) if self._asn is not None else ())

    def lookup(self, ip: str) -> GeoInfo | None:
        """What the databases say about ``ip`` (see the module docstring for the kinds of answer). Cached."""
        return self._cached_lookup(ip)

    def properties_for(self, ip: str) -> Mapping[str, PropertyValue]:
        """``properties(self.lookup(ip))`` as a read-only mapping, cached: what the gateway passes as
        ``RequestInfo.extra``."""
        return self._cached_properties(ip)

    def cache_clear(self) -> None:
        self._cached_lookup.cache_clear()
        self._cached_properties.cache_clear()

    def _lookup(self, ip: str) -> GeoInfo | None:
        address = _parse(ip)
        if address is None:
            return None
        text = str(address)
        if not _is_public(address):
            return GeoInfo(ip=text, private=True)
        record = self._primary.record(address)
        asn_record = self._asn.record(address) if self._asn is not None else None
        if record is None and asn_record is None:
            return None
        country = region = region_name = city = as_org = ""
        asn: int | None = None
        if record is not None:
            country = _country(record)
            region, region_name = _region(record, self.language)
            city = _city(record, self.language)
            asn, as_org = _asn(record)
        if asn is None and asn_record is not None:
            asn, as_org = _asn(asn_record)
        return GeoInfo(
            ip=text,
            country=country,
            region=region,
            region_name=region_name,
            city=city,
            asn=asn,
            as_org=as_org,
        )

    def _properties(self, ip: str) -> Mapping[str, PropertyValue]:
        return MappingProxyType(properties(self.lookup(ip)))

    def close(self) -> None:
        self._primary.close()
        if self._asn is not None:
            self._asn.close()

    def __enter__(self) -> GeoDatabase:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
