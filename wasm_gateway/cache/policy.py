"""RFC 9111 (shared cache), RFC 5861 and RFC 9211 decisions as pure functions on header lists.

Nothing here does I/O or reads a clock: callers pass ``now`` (unix seconds). The store keeps what these
functions computed when a response was stored (`Freshness`), so a lookup decides from a few numbers and
never parses the stored response's headers again: that is what keeps the hit path flat.

Why not hishel's state machine (hishel 2.0.0, `IdleClient.next`): it costs ~17.5 us per hit decision on this
machine (a raw uvicorn answer costs ~21 us in all), re-parses the stored response on every lookup, and its
age is ``now - Date`` only (no ``Age`` from upstream caches, no response delay; no ``Date`` means age 0
forever). ``tests/cache/test_policy_hishel.py`` cross-checks freshness and storability against it where the
two agree by design.
"""

from __future__ import annotations

import calendar
import email.utils
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "HEURISTIC_STATUSES",
    "Decision",
    "Freshness",
    "RequestDirectives",
    "Reuse",
    "StoreOptions",
    "client_not_modified",
    "conditional_headers",
    "current_age",
    "decide_reuse",
    "freshness_for",
    "headers_to_store",
    "invalidation_targets",
    "may_serve_on_error",
    "merge_not_modified",
    "normalise_vary_value",
    "parse_cache_control",
    "parse_http_date",
    "parse_vary",
    "request_directives",
    "weak_etag_match",
]

Headers = Sequence[tuple[bytes, bytes]]

# RFC 9110 15.1: statuses cacheable by default (heuristic freshness allowed). 206 is left out: no ranges here.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
HEURISTIC_FRACTION = 0.1  # RFC 9111 4.2.2: "10% of the interval since Last-Modified" is typical
HEURISTIC_MAX = 86_400.0

# Not stored with an entry: hop-by-hop, framing and what the gateway sets per answer (RFC 9111 3.1).
_NOT_STORED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authentication-info",
        b"age",
        b"date",
        b"content-length",
    }
)
# A 304 never updates these (RFC 9111 3.2: Content-Length; and the framing the stored body depends on).
_NOT_UPDATED = frozenset({b"content-length", b"content-encoding", b"content-range", b"transfer-encoding"})
# Vary'd headers whose values are case-insensitive lists: normalised so equivalent requests share a variant.
_CASE_INSENSITIVE = frozenset({b"accept", b"accept-encoding", b"accept-language", b"accept-charset"})


# ------------------------------------------------------------------------------------------------- parsing


def parse_cache_control(values: Iterable[bytes]) -> dict[str, str | None]:
    """Directives of every ``Cache-Control`` value: lower-case names, unquoted arguments (None: no argument).

    A directive given twice keeps its first value except where a duplicate makes it stricter: callers check
    the few that matter (RFC 9111 4.2.1: conflicting max-age -> treat as stale)."""
    out: dict[str, str | None] = {}
    for value in values:
        for part in _split_list(value.decode("latin-1")):
            name, eq, arg = part.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            argument = arg.strip().strip('"') if eq else None
            if name in out and name in ("max-age", "s-maxage") and out[name] != argument:
                out[name] = "0"  # conflicting lifetimes: stale (4.2.1)
                continue
            out.setdefault(name, argument)
    return out


def _split_list(value: str) -> list[str]:
    """Split a comma list, respecting quoted strings (``no-cache="a, b"``)."""
    if '"' not in value:
        return [p for p in (s.strip() for s in value.split(",")) if p]
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def _delta_seconds(value: str | None) -> float | None:
    """A delta-seconds argument (RFC 9111 1.2.2); None when absent or malformed."""
    if value is None or not value.isdigit():
        return None
    return float(min(int(value), 2**31))


def parse_http_date(value: bytes | None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as unix seconds, or None when invalid."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value.decode("latin-1"))
    except (ValueError, IndexError, TypeError):
        return None
    if parsed is None:
        return None
    try:
        return float(calendar.timegm(parsed[:9]) - (parsed[9] or 0))
    except (ValueError, OverflowError):
        return None


def parse_vary(headers: Headers) -> tuple[bytes, ...] | None:
    """Sorted, lower-case field names of ``Vary``; None for ``Vary: *`` (never matches: not stored)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"vary":
            for token in value.split(b","):
                token = token.strip().lower()
                if token == b"*":
                    return None
                if token:
                    names.add(token)
    return tuple(sorted(names))


def normalise_vary_value(name: bytes, values: Sequence[bytes]) -> bytes:
    """One request header's value for a secondary key: every occurrence joined, list items trimmed (so
    ``gzip,br`` and ``gzip, br`` match), lower-cased where the field is case-insensitive. Absent: empty."""
    if not values:
        return b""
    items = [item.strip() for value in values for item in value.split(b",")]
    joined = b",".join(item for item in items if item)
    return joined.lower() if name in _CASE_INSENSITIVE else joined


def _get_all(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def _get(headers: Headers, name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    """What a request says about reusing stored responses (RFC 9111 5.2.1) and about itself."""

    no_cache: bool = False
    no_store: bool = False
    max_age: float | None = None
    max_stale: float | None = None
    """Seconds of staleness accepted; ``inf`` for a bare ``max-stale``."""
    min_fresh: float | None = None
    only_if_cached: bool = False
    authorization: bool = False


NO_DIRECTIVES = RequestDirectives()


_AUTHORIZATION = frozenset({b"authorization"})


def request_directives(headers: Headers, credentials: frozenset[bytes] = _AUTHORIZATION) -> RequestDirectives:
    """The request's cache directives. ``Pragma: no-cache`` counts only without ``Cache-Control`` (5.4).

    ``credentials``: header names that carry a credential (Authorization, and e.g. the auth filter's API-key
    header): a request with one gets RFC 9111 3.5's Authorization rule."""
    cc_values: list[bytes] = []
    pragma_no_cache = False
    authorization = False
    for name, value in headers:
        if name == b"cache-control":
            cc_values.append(value)
        elif name in credentials:
            authorization = True
        elif name == b"pragma" and b"no-cache" in value.lower():
            pragma_no_cache = True
    if not cc_values:
        if not pragma_no_cache and not authorization:
            return NO_DIRECTIVES
        return RequestDirectives(no_cache=pragma_no_cache, authorization=authorization)
    cc = parse_cache_control(cc_values)
    max_stale: float | None = None
    if "max-stale" in cc:
        arg = cc["max-stale"]
        max_stale = float("inf") if arg is None else _delta_seconds(arg)
    return RequestDirectives(
        no_cache="no-cache" in cc,
        no_store="no-store" in cc,
        max_age=_delta_seconds(cc.get("max-age")),
        max_stale=max_stale,
        min_fresh=_delta_seconds(cc.get("min-fresh")),
        only_if_cached="only-if-cached" in cc,
        authorization=authorization,
    )


# ----------------------------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """A route's knobs that change what may be stored."""

    default_ttl: float | None = None
    """Freshness for heuristically cacheable responses that give none (None: only what the origin says)."""
    heuristic: bool = True
    """RFC 9111 4.2.2 heuristic freshness (10% of the time since Last-Modified, at most a day)."""
    store_set_cookie: bool = False
    """Store responses carrying Set-Cookie without the cookie (else they are not stored)."""
    keep_stale: float = 600.0
    """How long an entry with validators is kept past its freshness, for conditional revalidation."""


# Flags kept with an entry.
NO_CACHE = 1  # response no-cache: validate before every reuse
MUST_REVALIDATE = 2  # must-revalidate / proxy-revalidate / s-maxage: never served stale (4.2.4, 5.2.2.8)
HAS_VALIDATOR = 4
SHAREABLE_WITH_AUTH = 8  # public, s-maxage or must-revalidate: may answer requests with Authorization (3.5)


@dataclass(frozen=True, slots=True)
class Freshness:
    """Computed once when a response is stored (or revalidated); all a lookup needs."""

    lifetime: float
    initial_age: float
    """corrected_initial_age of RFC 9111 4.2.3 at ``response_time``."""
    response_time: float
    stale_while_revalidate: float
    stale_if_error: float
    flags: int
    keep_for: float
    """Seconds the store keeps the entry (freshness left + the longest stale use)."""


def freshness_for(
    status: int,
    headers: Headers,
    *,
    request: RequestDirectives,
    request_time: float,
    response_time: float,
    options: StoreOptions,
) -> Freshness | str:
    """`Freshness` when a GET response may be stored (RFC 9111 3, 3.5, 4.2), else the reason it may not
    (a short token for ``Cache-Status: detail=`` and logs)."""
    if request.no_store:
        return "request-no-store"
    if status < 200 or status in (206, 304) or status >= 600:
        return "status"
    cc = parse_cache_control(_get_all(headers, b"cache-control"))
    if "no-store" in cc:
        return "no-store"
    if "private" in cc:
        return "private"  # qualified private="f" too: dropping fields would still be a guess
    if parse_vary(headers) is None:
        return "vary-star"
    if not options.store_set_cookie and _get(headers, b"set-cookie") is not None:
        return "set-cookie"
    public = "public" in cc
    s_maxage = _delta_seconds(cc.get("s-maxage"))
    must_revalidate = "must-revalidate" in cc or "proxy-revalidate" in cc or s_maxage is not None
    shareable = public or s_maxage is not None or "must-revalidate" in cc
    if request.authorization and not shareable:
        return "authorization"
    date_value = parse_http_date(_get(headers, b"date"))
    lifetime: float | None = s_maxage
    if lifetime is None:
        lifetime = _delta_seconds(cc.get("max-age"))
        if lifetime is None and "max-age" in cc:
            lifetime = 0.0  # malformed max-age: stale (4.2.1)
    if lifetime is None:
        expires_raw = _get(headers, b"expires")
        if expires_raw is not None:
            expires = parse_http_date(expires_raw)
            # Invalid Expires means "already expired" (5.3); without Date, the time we got it stands in.
            base = date_value if date_value is not None else response_time
            lifetime = max(0.0, expires - base) if expires is not None else 0.0
    if lifetime is None and (public or status in HEURISTIC_STATUSES):
        last_modified = parse_http_date(_get(headers, b"last-modified"))
        if options.heuristic and last_modified is not None:
            base = date_value if date_value is not None else response_time
            lifetime = min(max(0.0, base - last_modified) * HEURISTIC_FRACTION, HEURISTIC_MAX)
        elif options.default_ttl is not None:
            lifetime = options.default_ttl
    has_validator = _get(headers, b"etag") is not None or _get(headers, b"last-modified") is not None
    no_cache = "no-cache" in cc  # qualified no-cache="f": treated as unqualified (stricter)
    if lifetime is None:
        return "no-freshness"
    if no_cache and not has_validator:
        return "no-cache-without-validator"  # every reuse would be a full fetch: storing buys nothing
    age_value = _delta_seconds((_get(headers, b"age") or b"").decode("latin-1").strip()) or 0.0
    apparent_age = max(0.0, response_time - date_value) if date_value is not None else 0.0
    corrected_age_value = age_value + max(0.0, response_time - request_time)
    initial_age = max(apparent_age, corrected_age_value)
    swr = _delta_seconds(cc.get("stale-while-revalidate")) or 0.0
    sie = _delta_seconds(cc.get("stale-if-error")) or 0.0
    flags = (
        (NO_CACHE if no_cache else 0)
        | (MUST_REVALIDATE if must_revalidate else 0)
        | (HAS_VALIDATOR if has_validator else 0)
        | (SHAREABLE_WITH_AUTH if shareable else 0)
    )
    if must_revalidate:
        swr = sie = 0.0
    fresh_left = max(0.0, lifetime - initial_age)
    stale_use = max(swr, sie, options.keep_stale if has_validator else 0.0)
    if fresh_left + stale_use <= 0:
        return "stale-on-arrival"
    return Freshness(
        lifetime=lifetime,
        initial_age=initial_age,
        response_time=response_time,
        stale_while_revalidate=swr,
        stale_if_error=sie,
        flags=flags,
        keep_for=fresh_left + stale_use,
    )


def headers_to_store(headers: Headers, options: StoreOptions) -> list[tuple[bytes, bytes]]:
    """The response headers an entry keeps: no hop-by-hop, framing, Age or Date (the gateway computes
    those per answer) and no Set-Cookie (when such responses are stored at all)."""
    named = _connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in _NOT_STORED and n not in named and n != b"set-cookie"]


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens = [t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")]
    return frozenset(t for t in tokens if t)


# ------------------------------------------------------------------------------------------------- reuse


def current_age(freshness: Freshness, now: float) -> float:
    """RFC 9111 4.2.3: corrected_initial_age + resident_time."""
    return freshness.initial_age + max(0.0, now - freshness.response_time)


class Reuse(Enum):
    FRESH = "fresh"
    STALE_REVALIDATE = "stale-while-revalidate"  # serve, refresh in the background (RFC 5861 3)
    STALE_OK = "stale-ok"  # the client accepts this much staleness (max-stale)
    VALIDATE = "validate"  # conditional request to the origin, then serve or replace
    MISS = "miss"  # cannot be used: fetch anew (no validators, or the request forbids reuse)


class Decision:
    """How a stored response may answer (a plain class: made once per hit, a frozen dataclass costs 3x)."""

    __slots__ = ("age", "reuse", "ttl")

    def __init__(self, reuse: Reuse, age: float, ttl: float) -> None:
        self.reuse = reuse
        self.age = age
        self.ttl = ttl
        """Freshness left (negative when stale), for ``Cache-Status: ttl=``."""


def decide_reuse(freshness: Freshness, request: RequestDirectives, now: float) -> Decision:
    """May the stored response answer this request, and how (RFC 9111 4, 4.2.4, 5.2; RFC 5861)."""
    age = current_age(freshness, now)
    ttl = freshness.lifetime - age
    flags = freshness.flags
    if request is NO_DIRECTIVES:  # the common case: no request directives at all
        if ttl > 0 and not flags & NO_CACHE:
            return Decision(Reuse.FRESH, age, ttl)
        return _stale_decision(freshness, age, ttl, None)
    if request.authorization and not flags & SHAREABLE_WITH_AUTH:
        return Decision(Reuse.MISS, age, ttl)
    if request.no_cache or flags & NO_CACHE:
        return Decision(Reuse.VALIDATE if flags & HAS_VALIDATOR else Reuse.MISS, age, ttl)
    if request.max_age is not None and age > request.max_age:
        return Decision(Reuse.VALIDATE if flags & HAS_VALIDATOR else Reuse.MISS, age, ttl)
    if request.min_fresh is not None and ttl < request.min_fresh:
        return Decision(Reuse.VALIDATE if flags & HAS_VALIDATOR else Reuse.MISS, age, ttl)
    if ttl > 0:
        return Decision(Reuse.FRESH, age, ttl)
    return _stale_decision(freshness, age, ttl, request.max_stale)


def _stale_decision(freshness: Freshness, age: float, ttl: float, max_stale: float | None) -> Decision:
    flags = freshness.flags
    staleness = -ttl
    if flags & NO_CACHE:
        return Decision(Reuse.VALIDATE if flags & HAS_VALIDATOR else Reuse.MISS, age, ttl)
    if not flags & MUST_REVALIDATE:
        if max_stale is not None and staleness <= max_stale:
            return Decision(Reuse.STALE_OK, age, ttl)
        if staleness <= freshness.stale_while_revalidate:
            return Decision(Reuse.STALE_REVALIDATE, age, ttl)
    if flags & HAS_VALIDATOR or (freshness.stale_if_error and not flags & MUST_REVALIDATE):
        return Decision(Reuse.VALIDATE, age, ttl)
    return Decision(Reuse.MISS, age, ttl)


def may_serve_on_error(freshness: Freshness, now: float) -> bool:
    """RFC 5861 4: the origin failed (5xx or unreachable) and ``stale-if-error`` covers this staleness."""
    if freshness.flags & MUST_REVALIDATE:
        return False
    staleness = current_age(freshness, now) - freshness.lifetime
    return staleness <= freshness.stale_if_error


# ---------------------------------------------------------------------------------------------- validation


def conditional_headers(stored: Headers) -> list[tuple[bytes, bytes]]:
    """Validators to send upstream for a stored response (RFC 9111 4.3.1): If-None-Match from its ETag,
    If-Modified-Since from its Last-Modified."""
    out: list[tuple[bytes, bytes]] = []
    etag = _get(stored, b"etag")
    if etag is not None:
        out.append((b"if-none-match", etag))
    last_modified = _get(stored, b"last-modified")
    if last_modified is not None:
        out.append((b"if-modified-since", last_modified))
    return out


def weak_etag_match(header: bytes, etag: bytes) -> bool:
    """If-None-Match against one entity tag, weak comparison (RFC 9110 13.1.2)."""
    header = header.strip()
    if header == b"*":
        return True
    ours = etag.strip().removeprefix(b"W/")
    return any(tag.strip().removeprefix(b"W/") == ours for tag in header.split(b","))


def client_not_modified(request_headers: Headers, stored: Headers, status: int) -> bool:
    """A client's conditional GET/HEAD that a stored 200 answers with 304 (RFC 9110 13.1.2, 13.1.3;
    If-None-Match wins over If-Modified-Since)."""
    if status != 200:
        return False
    inm = _get(request_headers, b"if-none-match")
    if inm is not None:
        etag = _get(stored, b"etag")
        return etag is not None and weak_etag_match(inm, etag)
    ims_raw = _get(request_headers, b"if-modified-since")
    if ims_raw is None:
        return False
    ims = parse_http_date(ims_raw)
    last_modified = parse_http_date(_get(stored, b"last-modified"))
    return ims is not None and last_modified is not None and last_modified <= ims


# RFC 9110 15.4.5: a 304 carries these if a 200 would (plus Cache-Control, Expires, Vary, Content-Location).
NOT_MODIFIED_FIELDS = frozenset(
    {b"cache-control", b"content-location", b"etag", b"expires", b"vary", b"last-modified"}
)


def merge_not_modified(stored: Headers, fresh: Headers) -> list[tuple[bytes, bytes]] | None:
    """The stored headers updated from a 304 (RFC 9111 4.3.4, 3.2), or None when the 304 names a different
    strong ETag than the stored one (it validates another representation: do not merge)."""
    new_etag = _get(fresh, b"etag")
    old_etag = _get(stored, b"etag")
    if (
        new_etag is not None
        and old_etag is not None
        and not new_etag.startswith(b"W/")
        and not old_etag.startswith(b"W/")
        and new_etag != old_etag
    ):
        return None
    named = _connection_tokens(fresh)
    updates: dict[bytes, list[bytes]] = {}
    for name, value in fresh:
        if name in _NOT_STORED or name in _NOT_UPDATED or name in named or name == b"set-cookie":
            continue
        updates.setdefault(name, []).append(value)
    merged = [(n, v) for n, v in stored if n not in updates]
    for name, values in updates.items():
        merged.extend((name, v) for v in values)
    return merged


# --------------------------------------------------------------------------------------------- invalidation

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def invalidation_targets(
    method: str, status: int, scheme: str, host: str, target: str, response: Headers
) -> list[str]:
    """Targets (path + query) to invalidate after an unsafe request (RFC 9111 4.4): the request target, and
    ``Location`` / ``Content-Location`` when same-origin; only for a non-error response (2xx, 3xx)."""
    if method not in UNSAFE_METHODS or not 200 <= status < 400:
        return []
    out = [target]
    for name in (b"location", b"content-location"):
        value = _get(response, name)
        if value is None:
            continue
        path = _same_origin_path(value.decode("latin-1").strip(), scheme, host)
        if path is not None and path not in out:
            out.append(path)
    return out


def _same_origin_path(reference: str, scheme: str, host: str) -> str | None:
    if reference.startswith("/") and not reference.startswith("//"):
        return reference.split("#", 1)[0]
    prefix = f"{scheme}://"
    if not reference.lower().startswith(prefix):
        return None
    rest = reference[len(prefix) :]
    authority, slash, path = rest.partition("/")
    if authority.lower().rstrip(".") != host:
        return None
    return ("/" + path if slash else "/").split("#", 1)[0]
