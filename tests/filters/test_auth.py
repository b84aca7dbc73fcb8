"""The bundled auth filter (wasm_gateway/filters/auth.wasm) through FilterHarness.

Keys and tokens are made here with `cryptography` (tests/filters/auth_tokens.py); every rejection is checked
for its status, its challenge and that nothing reached the upstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.filters.auth_tokens import SigningKey, b64url, hmac_key, make_keys, raw_token, sha256_hex
from tests.filters.conftest import FakeClock, single, values
from wasm_gateway.exceptions import FilterLoadError
from wasm_gateway.filters import FILTERS_DIR
from wasm_gateway.runtime.chain import FilterRuntime, FilterSpec
from wasm_gateway.runtime.context import HttpCallRequest
from wasm_gateway.testing import FilterHarness, HarnessResult

AUTH_WASM = FILTERS_DIR / "auth.wasm"
DOC = Path(__file__).resolve().parents[2] / "docs" / "filters" / "auth.md"
LOG_ERROR = 4
ALGS = ("HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA")
API_KEY = "k-3f9a1c7e5b2d4f6a8c0e1b3d5f7a9c2e"

Auth = Callable[..., FilterHarness]


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return make_keys()


@pytest.fixture(scope="session")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Precompiled-module cache shared by these tests (compiling the module takes about a second)."""
    return tmp_path_factory.mktemp("auth-module-cache")


@pytest.fixture
def auth(module_cache: Path) -> Iterator[Auth]:
    """``auth(config, http_calls=...)``: a harness on the shipped module, closed after the test."""
    opened: list[FilterHarness] = []

    def open_filter(config: Any, **options: Any) -> FilterHarness:
        h = FilterHarness.from_file(
            AUTH_WASM, configuration=json.dumps(config), name="auth", cache_dir=module_cache, **options
        )
        opened.append(h)
        return h

    yield open_filter
    for h in opened:
        h.close()


def config_error(config: Any, cache_dir: Path) -> str:
    """Load the filter with a configuration it must reject; the one error it logged."""
    logs: list[tuple[int, str]] = []
    spec = FilterSpec(
        name="auth",
        module_path=AUTH_WASM,
        configuration=json.dumps(config).encode(),
        pool_min=1,
        pool_max=1,
        log_level="trace",
    )
    with pytest.raises(FilterLoadError, match="proxy_on_configure returned false"):
        FilterRuntime.load(
            [spec], cache_dir=cache_dir, log_sink=lambda _n, level, msg: logs.append((level, msg))
        ).close()
    errors = [msg for level, msg in logs if level >= LOG_ERROR]
    assert len(errors) == 1, logs
    assert errors[0].startswith("auth: invalid configuration: "), errors[0]
    return errors[0].removeprefix("auth: invalid configuration: ")


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def jwt_config(keys: dict[str, SigningKey], **jwt: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"keys": [k.config_pem() for k in keys.values()]}
    cfg.update(jwt)
    return {"jwt": cfg}


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": "user-1", "iat": now, "exp": now + 300}
    out.update(extra)
    return out


def refused(r: HarnessResult, status: int = 401, error: str | None = "invalid_token") -> dict[str, Any]:
    """Asserts a local answer with `status` and nothing sent upstream; the JSON body."""
    assert r.local_response is not None, "the request reached the upstream"
    assert not r.upstream_called
    code, headers, body = r.local_response
    assert code == status, (code, body)
    assert single(headers, "content-type") == "application/json"
    assert single(headers, "cache-control") == "no-store"
    parsed: dict[str, Any] = json.loads(body)
    assert parsed["status"] == status
    challenges = values(headers, "www-authenticate")
    if status in (401, 403):
        assert challenges, "a 401/403 must carry WWW-Authenticate"
    if error is not None:
        assert parsed["error"] == error
        if status in (401, 403) and error != "unauthorized":
            # The failing scheme's challenge names the error (RFC 6750 3.1); "missing" names none.
            assert any(f'error="{error}"' in c for c in challenges), challenges
        if error == "unauthorized":
            assert not any("error=" in c for c in challenges), challenges
    return parsed


def admitted(r: HarnessResult) -> HarnessResult:
    assert r.local_response is None, r.local_response
    assert r.upstream_called
    return r


# --- JWT: every algorithm ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_valid_token_of_every_algorithm_is_accepted(
    auth: Auth, keys: dict[str, SigningKey], alg: str
) -> None:
    h = auth(jwt_config(keys, forward_claims=[{"claim": "sub", "header": "x-user"}]))
    r = admitted(h.request(headers=bearer(keys[alg].token(claims(sub=f"u-{alg}")))))
    assert single(r.request_headers, "x-user") == f"u-{alg}"
    # Without a kid the key is found by algorithm.
    admitted(h.request(headers=bearer(keys[alg].token(claims(), kid=None))))


@pytest.mark.parametrize("alg", ALGS)
def test_inline_jwk_keys(auth: Auth, keys: dict[str, SigningKey], alg: str) -> None:
    h = auth({"jwt": {"keys": [{"jwk": keys[alg].public_jwk()}]}})
    admitted(h.request(headers=bearer(keys[alg].token(claims()))))
    other = "ES256" if alg != "ES256" else "EdDSA"
    refused(h.request(headers=bearer(keys[other].token(claims(), kid=keys[alg].kid))))


def test_rsa_3072_and_4096_keys(auth: Auth) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    pair = [SigningKey("RS256", f"rsa{bits}", rsa.generate_private_key(65537, bits)) for bits in (3072, 4096)]
    h = auth({"jwt": {"keys": [k.config_pem() for k in pair]}})
    for k in pair:
        admitted(h.request(headers=bearer(k.token(claims()))))


def test_tampered_signature_and_payload_are_rejected(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(jwt_config(keys))
    for alg in ALGS:
        good = keys[alg].token(claims())
        head, payload, sig = good.split(".")
        flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
        assert refused(h.request(headers=bearer(f"{head}.{payload}.{flipped}")))["error_description"] in (
            "the token signature is invalid",
            "the token signature is not base64url",
        )
        other = b64url(json.dumps(claims(sub="admin")).encode())
        body = refused(h.request(headers=bearer(f"{head}.{other}.{sig}")))
        assert body["error_description"] == "the token signature is invalid"


def test_degenerate_signatures_are_rejected(auth: Auth, keys: dict[str, SigningKey]) -> None:
    # All-zero signatures of the right length ("psychic signatures" for ECDSA: r = s = 0), and the curve
    # order as r and s: never valid whatever the message.
    h = auth(jwt_config(keys))
    p256_order = bytes.fromhex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551")
    lengths = {"HS256": 32, "HS384": 48, "HS512": 64, "RS256": 256, "ES256": 64, "EdDSA": 64}
    for alg, n in lengths.items():
        for sig in (b"\0" * n, b"\xff" * n):
            r = h.request(
                headers=bearer(raw_token({"alg": alg, "kid": keys[alg].kid}, claims(), lambda _m, s=sig: s))
            )
            assert refused(r)["error_description"] == "the token signature is invalid", alg
    r = h.request(headers=bearer(raw_token({"alg": "ES256"}, claims(), lambda _m: p256_order * 2)))
    assert refused(r)["error_description"] == "the token signature is invalid"


def test_unknown_kid_without_jwks_is_rejected_without_lookups(
    auth: Auth, keys: dict[str, SigningKey]
) -> None:
    h = auth(jwt_config(keys))
    r = h.request(headers=bearer(keys["RS256"].token(claims(), kid="https://evil.example/key")))
    assert refused(r)["error_description"] == "the token key id is unknown"
    assert r.http_calls == []


# --- JWT: the algorithm comes from the key -----------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_casing_is_rejected(auth: Auth, keys: dict[str, SigningKey], alg: str) -> None:
    h = auth(jwt_config(keys))
    unsigned = raw_token({"alg": alg, "typ": "JWT"}, claims())
    assert unsigned.endswith(".")
    r = h.request(headers=bearer(unsigned))
    refused(r)
    # With a signature segment present (some libraries only look at the alg).
    with_sig = raw_token({"alg": alg, "kid": "hs256"}, claims(), keys["HS256"].sign)
    assert (
        refused(h.request(headers=bearer(with_sig)))["error_description"]
        == "unsigned tokens are not accepted"
    )


def test_hs256_signed_with_the_rsa_public_key_is_rejected(auth: Auth, keys: dict[str, SigningKey]) -> None:
    rsa_key = keys["RS256"]
    h = auth({"jwt": {"keys": [rsa_key.config_pem()]}})
    pem = rsa_key.public_pem().encode()
    der = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (pem, pem.strip(), der):
        forged = SigningKey("HS256", rsa_key.kid, secret)
        body = refused(h.request(headers=bearer(forged.token(claims()))))
        assert body["error_description"] == "the token alg does not match its key"
        body = refused(h.request(headers=bearer(forged.token(claims(), kid=None))))
        assert body["error_description"] == "no key for the token alg"
    admitted(h.request(headers=bearer(rsa_key.token(claims()))))


def test_embedded_jwk_jku_and_x5u_are_ignored(auth: Auth, keys: dict[str, SigningKey]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    attacker = SigningKey("ES256", "evil", ec.generate_private_key(ec.SECP256R1()))
    calls: list[HttpCallRequest] = []

    def idp(req: HttpCallRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        calls.append(req)
        return 200, [], json.dumps({"keys": [keys["ES256"].public_jwk()]}).encode()

    h = auth({"jwt": {"keys": [keys["ES256"].config_pem()]}}, http_calls={"evil.example": idp})
    token = attacker.token(
        claims(),
        kid=keys["ES256"].kid,
        jwk=attacker.public_jwk(),
        jku="http://evil.example/jwks.json",
        x5u="http://evil.example/cert.pem",
    )
    r = h.request(headers=bearer(token))
    assert refused(r)["error_description"] == "the token signature is invalid"
    assert r.http_calls == [] and calls == []


def test_critical_header_extensions_are_rejected(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(jwt_config(keys))
    token = keys["HS256"].token(claims(), crit=["exp"])
    assert refused(h.request(headers=bearer(token)))["error_description"] == (
        "the token has critical header extensions"
    )


# --- JWT: time claims ---------------------------------------------------------------------------------


def test_expiry_outside_the_leeway_is_rejected_inside_accepted(
    auth: Auth, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    h = auth(jwt_config(keys, leeway=30, cache={"max_entries": 0}))
    now = clock.now_ns // 10**9
    k = keys["ES256"]
    admitted(h.request(headers=bearer(k.token({"sub": "a", "exp": now - 29}))))
    r = h.request(headers=bearer(k.token({"sub": "a", "exp": now - 30})))
    assert refused(r)["error_description"] == "the token has expired"
    assert refused(h.request(headers=bearer(k.token({"sub": "a", "exp": now - 3600}))))


def test_not_yet_valid_and_future_iat(auth: Auth, keys: dict[str, SigningKey], clock: FakeClock) -> None:
    h = auth(jwt_config(keys, leeway="1m"))
    now = clock.now_ns // 10**9
    k = keys["HS256"]
    exp = now + 3600
    admitted(h.request(headers=bearer(k.token({"nbf": now + 60, "exp": exp}))))
    r = h.request(headers=bearer(k.token({"nbf": now + 61, "exp": exp})))
    assert refused(r)["error_description"] == "the token is not valid yet"
    admitted(h.request(headers=bearer(k.token({"iat": now + 60, "exp": exp}))))
    r = h.request(headers=bearer(k.token({"iat": now + 61, "exp": exp})))
    assert refused(r)["error_description"] == "the token was issued in the future"


def test_exp_is_required_by_default(auth: Auth, keys: dict[str, SigningKey]) -> None:
    no_exp = keys["HS256"].token({"sub": "a"})
    assert refused(auth(jwt_config(keys)).request(headers=bearer(no_exp)))["error_description"] == (
        "the token has no exp"
    )
    admitted(auth(jwt_config(keys, require_exp=False)).request(headers=bearer(no_exp)))
    bad = keys["HS256"].token({"exp": "tomorrow"})
    assert refused(auth(jwt_config(keys)).request(headers=bearer(bad)))["error_description"] == (
        "the token exp is not a number"
    )


def test_max_age(auth: Auth, keys: dict[str, SigningKey], clock: FakeClock) -> None:
    h = auth(jwt_config(keys, max_age="10m", leeway=0))
    now = clock.now_ns // 10**9
    k = keys["HS256"]
    admitted(h.request(headers=bearer(k.token({"iat": now - 599, "exp": now + 60}))))
    assert refused(h.request(headers=bearer(k.token({"iat": now - 600, "exp": now + 60}))))
    assert refused(h.request(headers=bearer(k.token({"exp": now + 60}))))["error_description"] == (
        "the token has no iat"
    )


def test_a_cached_token_still_expires(auth: Auth, keys: dict[str, SigningKey], clock: FakeClock) -> None:
    h = auth(jwt_config(keys, leeway=0))
    now = clock.now_ns // 10**9
    token = keys["RS256"].token({"sub": "a", "exp": now + 10})
    admitted(h.request(headers=bearer(token)))
    r = admitted(h.request(headers=bearer(token)))
    assert (0, "auth: token cache hit") in r.logs
    clock.advance(10)
    assert refused(h.request(headers=bearer(token)))["error_description"] == "the token has expired"


# --- JWT: issuer, audience, claims ------------------------------------------------------------------------


def test_issuer_and_audience(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(jwt_config(keys, issuers=["https://idp.example/"], audiences=["orders", "billing"]))
    k = keys["ES256"]
    ok = {"iss": "https://idp.example/"}
    admitted(h.request(headers=bearer(k.token(claims(**ok, aud="orders")))))
    admitted(h.request(headers=bearer(k.token(claims(**ok, aud=["other", "billing"])))))
    cases = {
        "the token issuer is not accepted": claims(iss="https://evil.example/", aud="orders"),
        "the token has no iss": claims(aud="orders"),
        "the token audience is not accepted": claims(**ok, aud="other"),
        "the token has no aud": claims(**ok),
    }
    for description, c in cases.items():
        assert refused(h.request(headers=bearer(k.token(c))))["error_description"] == description
    assert refused(h.request(headers=bearer(k.token(claims(**ok, aud=["other"])))))


def test_required_claims(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(jwt_config(keys, required_claims=["email", ["org", "id"]]))
    k = keys["EdDSA"]
    admitted(h.request(headers=bearer(k.token(claims(email="a@b.c", org={"id": 7})))))
    for c in (claims(org={"id": 7}), claims(email="a@b.c"), claims(email=None, org={"id": 7})):
        body = refused(h.request(headers=bearer(k.token(c))))
        assert body["error_description"] == "the token lacks a required claim"


def test_missing_scope_is_403(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(
        jwt_config(
            keys,
            required_scopes=["orders:read"],
            required_claim_values=[{"claim": ["realm", "roles"], "values": ["admin", "ops"]}],
        )
    )
    k = keys["ES256"]
    roles = {"realm": {"roles": ["ops"]}}
    admitted(h.request(headers=bearer(k.token(claims(scope="profile orders:read", **roles)))))
    admitted(h.request(headers=bearer(k.token(claims(scp=["orders:read"], **roles)))))
    r = h.request(headers=bearer(k.token(claims(scope="profile orders:write", **roles))))
    body = refused(r, 403, "insufficient_scope")
    assert body["error_description"] == "the token lacks a required scope"
    assert r.local_response is not None
    challenge = single(r.local_response[1], "www-authenticate")
    assert challenge.endswith('scope="orders:read"')
    r = h.request(headers=bearer(k.token(claims(scope="orders:read", realm={"roles": ["user"]}))))
    assert (
        refused(r, 403, "insufficient_scope")["error_description"] == "the token lacks a required claim value"
    )


def test_claims_forwarded_as_headers(auth: Auth, keys: dict[str, SigningKey]) -> None:
    forward = [
        {"claim": "sub", "header": "x-user-id"},
        {"claim": "https://example.com/tenant", "header": "x-tenant"},
        {"claim": ["realm", "roles"], "header": "x-roles"},
        {"claim": "level", "header": "x-level"},
        {"claim": "absent", "header": "x-absent"},
        {"claim": "evil", "header": "x-evil"},
    ]
    h = auth(jwt_config(keys, forward_claims=forward))
    c = claims(
        sub="u-42",
        realm={"roles": ["admin", "ops"]},
        level=3,
        evil="a\r\nx-injected: 1",
        **{"https://example.com/tenant": "acme"},
    )
    r = admitted(h.request(headers=bearer(keys["RS256"].token(c))))
    up = r.request_headers
    assert single(up, "x-user-id") == "u-42"
    assert single(up, "x-tenant") == "acme"
    assert single(up, "x-roles") == "admin,ops"
    assert single(up, "x-level") == "3"
    assert values(up, "x-absent") == [] and values(up, "x-evil") == [] and values(up, "x-injected") == []
    # The same headers come from the token cache.
    r2 = admitted(h.request(headers=bearer(keys["RS256"].token(c))))
    assert [(k, v) for k, v in r2.request_headers if k.startswith("x-")] == [
        (k, v) for k, v in up if k.startswith("x-")
    ]


def test_forwarded_identity_headers_cannot_be_injected(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(
        {
            "api_keys": {"keys": [{"name": "mobile", "sha256": sha256_hex(API_KEY)}]},
            "jwt": {
                "keys": [keys["HS256"].config_pem()],
                "forward_claims": [{"claim": "sub", "header": "x-user"}, {"claim": "org", "header": "x-org"}],
            },
        }
    )
    spoofed = [("X-User", "admin"), ("x-user", "root"), ("X-Org", "evil"), ("X-Consumer", "partner")]
    r = admitted(h.request(headers=[*spoofed, *bearer(keys["HS256"].token(claims(sub="alice")))]))
    assert values(r.request_headers, "x-user") == ["alice"]
    assert values(r.request_headers, "x-org") == []  # the token has no org: the client's copy is gone too
    assert values(r.request_headers, "x-consumer") == []
    r = admitted(h.request(headers=[*spoofed, ("x-api-key", API_KEY)]))
    assert values(r.request_headers, "x-consumer") == ["mobile"]
    assert values(r.request_headers, "x-user") == [] and values(r.request_headers, "x-org") == []


# --- JWT: malformed tokens ---------------------------------------------------------------------------------


def test_malformed_tokens(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(jwt_config(keys))
    good = keys["HS256"].token(claims())
    head, payload, sig = good.split(".")
    dup_alg = b64url(b'{"alg":"HS256","alg":"none"}')
    no_alg = b64url(b'{"typ":"JWT"}')
    cases = {
        "two segments": (f"{head}.{payload}", "the token is malformed"),
        "four segments": (f"{good}.{sig}", "the token is malformed (JWE is not supported)"),
        "five segments (JWE)": (
            f"{head}.{payload}.{sig}.{sig}.{sig}",
            "the token is malformed (JWE is not supported)",
        ),
        "empty payload": (f"{head}..{sig}", "the token is malformed"),
        "impossible base64url length": (f"abcde.{payload}.{sig}", "the token header is not base64url"),
        "standard base64 characters": (f"{head}.{payload}+/.{sig}", "the token is malformed"),
        "padding": (f"{head}.{payload}.{sig}=", "the token is malformed"),
        "non-canonical trailing bits": (
            f"{non_canonical_header()}.{payload}.{sig}",
            "the token header is not base64url",
        ),
        "header not JSON": (
            f"{b64url(b'not json')}.{payload}.{sig}",
            "the token header is not a JSON object",
        ),
        "header a JSON list": (f"{b64url(b'[1]')}.{payload}.{sig}", "the token header is not a JSON object"),
        "duplicate alg": (f"{dup_alg}.{payload}.{sig}", "the token header is not a JSON object"),
        "no alg": (f"{no_alg}.{payload}.{sig}", "the token has no alg"),
        "unknown alg": (
            raw_token({"alg": "HS1024"}, claims(), keys["HS256"].sign),
            "the token alg is not supported",
        ),
        "lower-case alg": (
            raw_token({"alg": "hs256"}, claims(), keys["HS256"].sign),
            "the token alg is not supported",
        ),
    }
    for name, (token, description) in cases.items():
        body = refused(h.request(headers=bearer(token)))
        assert body["error_description"] == description, name
    # Payload that is not JSON, correctly signed.
    signed_garbage = f"{head}.{b64url(b'garbage')}"
    token = f"{signed_garbage}.{b64url(keys['HS256'].sign(signed_garbage.encode()))}"
    assert refused(h.request(headers=bearer(token)))["error_description"] == (
        "the token payload is not a JSON object"
    )


def non_canonical_header() -> str:
    """A header segment whose last character has non-zero unused bits (decodes like the canonical one)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    header = b'{"alg":"HS256","kid":"hs256"}'
    while len(header) % 3 == 0:
        header = header[:-1] + b" }"
    canonical = b64url(header)
    assert base64.urlsafe_b64decode(canonical + "==") == header
    return canonical[:-1] + alphabet[alphabet.index(canonical[-1]) + 1]


def test_huge_token_is_rejected(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(jwt_config(keys, forward_claims=[{"claim": "sub", "header": "x-user"}]))
    huge = keys["HS256"].token(claims(pad="x" * 9000))
    assert len(huge) > 8192
    r = h.request(headers=bearer(huge))
    assert refused(r)["error_description"] == "the token is too large"
    assert refused(
        auth(jwt_config(keys, max_token_bytes=512)).request(
            headers=bearer(keys["HS256"].token(claims(pad="x" * 600)))
        )
    )
    admitted(auth(jwt_config(keys, max_token_bytes=16384)).request(headers=bearer(huge)))


def test_credentials_missing_repeated_or_of_another_scheme(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(jwt_config(keys))
    for headers in ([], [("authorization", "Basic dXNlcjpwYXNz")], [("authorization", "Bearer ")]):
        r = h.request(headers=headers)
        body = refused(r, 401, "unauthorized")
        assert body["error_description"] == "credentials are missing"
        assert r.local_response is not None
        assert single(r.local_response[1], "www-authenticate") == 'Bearer realm="api"'
    token = keys["HS256"].token(claims())
    r = h.request(headers=[*bearer(token), *bearer(token)])
    refused(r, 401, "invalid_request")
    admitted(h.request(headers=[("authorization", f"bearer   {token}")]))  # the scheme is case-insensitive


def test_custom_header_and_query_param_sources(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(jwt_config(keys, header="x-jwt", query_param="access_token"))
    token = keys["ES256"].token(claims())
    admitted(h.request(headers=[("x-jwt", token)]))
    admitted(h.request(headers=[("x-jwt", f"Bearer {token}")]))
    r = admitted(h.request(path=f"/x?a=1&access_token={token}"))
    assert r.path == f"/x?a=1&access_token={token}"  # not stripped unless configured
    refused(h.request(path=f"/x?access_token={token}&access_token={token}"), 401, "invalid_request")
    refused(h.request(headers=bearer(token)), 401, "unauthorized")  # Authorization is not a source here


def test_credential_stripped_when_configured(auth: Auth, keys: dict[str, SigningKey]) -> None:
    cfg = jwt_config(keys, query_param="access_token")
    cfg["strip_credential"] = True
    cfg["api_keys"] = {
        "keys": [{"name": "cli", "sha256": sha256_hex(API_KEY)}],
        "header": "x-api-key",
        "query_param": "key",
    }
    h = auth(cfg)
    token = keys["HS256"].token(claims())
    r = admitted(h.request(headers=[*bearer(token), ("x-other", "1")]))
    assert values(r.request_headers, "authorization") == [] and values(r.request_headers, "x-other") == ["1"]
    r = admitted(h.request(path=f"/items?access_token={token}&page=2"))
    assert r.path == "/items?page=2"
    r = admitted(h.request(path=f"/items?access_token={token}"))
    assert r.path == "/items"
    r = admitted(h.request(headers=[("x-api-key", API_KEY)]))
    assert values(r.request_headers, "x-api-key") == []
    r = admitted(h.request(path=f"/a?b=1&key={API_KEY}&c=2"))
    assert r.path == "/a?b=1&c=2"
    # Cached tokens are stripped too.
    r = admitted(h.request(headers=bearer(token)))
    assert values(r.request_headers, "authorization") == []


# --- forged tokens never ride on cached ones -------------------------------------------------------------


def test_token_cache_is_keyed_by_the_whole_token(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth(jwt_config(keys, forward_claims=[{"claim": "sub", "header": "x-user"}]))
    k = keys["RS256"]
    token = k.token(claims(sub="alice"))
    head, payload, sig = token.split(".")
    r = admitted(h.request(headers=bearer(token)))
    assert (0, "auth: token cache hit") not in r.logs
    r = admitted(h.request(headers=bearer(token)))
    assert (0, "auth: token cache hit") in r.logs and single(r.request_headers, "x-user") == "alice"
    forged_payload = b64url(json.dumps(claims(sub="admin")).encode())
    for forged in (
        f"{head}.{forged_payload}.{sig}",  # same signature, other claims
        f"{head}.{payload}.{sig[:-1]}{'A' if sig[-1] != 'A' else 'Q'}",  # same claims, altered signature
        f"{head}.{payload}.{sig[:-4]}",
    ):
        r = h.request(headers=bearer(forged))
        refused(r)
        assert (0, "auth: token cache hit") not in r.logs


# --- API keys -------------------------------------------------------------------------------------------------


def test_api_key_from_header(auth: Auth) -> None:
    cfg = {
        "api_keys": {
            "keys": [
                {"name": "mobile-app", "sha256": sha256_hex(API_KEY)},
                {"name": "partner", "sha256": sha256_hex("another-key-0123456789")},
            ]
        }
    }
    h = auth(cfg)
    r = admitted(h.request(headers=[("x-api-key", API_KEY)]))
    assert single(r.request_headers, "x-consumer") == "mobile-app"
    r = admitted(h.request(headers=[("X-Api-Key", "another-key-0123456789")]))
    assert single(r.request_headers, "x-consumer") == "partner"
    for wrong in (API_KEY[:-1], API_KEY + "x", API_KEY.upper(), sha256_hex(API_KEY), "x" * 5000):
        r = h.request(headers=[("x-api-key", wrong)])
        body = refused(r, 401, "invalid_api_key")
        assert r.local_response is not None
        assert 'ApiKey realm="api", error="invalid_api_key"' in values(
            r.local_response[1], "www-authenticate"
        )
        assert body["error_description"] == "the API key is not valid"
    r = h.request()
    refused(r, 401, "unauthorized")
    assert r.local_response is not None
    assert values(r.local_response[1], "www-authenticate") == ['ApiKey realm="api"']
    refused(h.request(headers=[("x-api-key", API_KEY), ("x-api-key", API_KEY)]), 401, "invalid_request")


def test_api_key_in_query_param(auth: Auth) -> None:
    h = auth(
        {
            "realm": "shop",
            "api_keys": {
                "query_param": "api_key",
                "forward_header": "x-client",
                "keys": [{"name": "cli", "sha256": sha256_hex("a b/c+d")}],
            },
        }
    )
    r = admitted(h.request(path="/items?page=1&api_key=a%20b%2Fc%2Bd"))
    assert single(r.request_headers, "x-client") == "cli"
    assert r.path == "/items?page=1&api_key=a%20b%2Fc%2Bd"
    r = h.request(path="/items?api_key=wrong")
    refused(r, 401, "invalid_api_key")
    assert r.local_response is not None
    assert values(r.local_response[1], "www-authenticate") == ['ApiKey realm="shop", error="invalid_api_key"']
    refused(h.request(path="/items?api_key=%zz"), 401, "invalid_api_key")
    refused(h.request(path="/items", headers=[("x-api-key", "a b/c+d")]), 401, "unauthorized")


def test_api_key_decides_when_both_are_sent(auth: Auth, keys: dict[str, SigningKey]) -> None:
    h = auth({"api_keys": {"keys": [{"name": "m", "sha256": sha256_hex(API_KEY)}]}, **jwt_config(keys)})
    token = keys["HS256"].token(claims())
    refused(h.request(headers=[("x-api-key", "wrong"), *bearer(token)]), 401, "invalid_api_key")
    admitted(h.request(headers=[("x-api-key", API_KEY), *bearer("garbage")]))
    admitted(h.request(headers=bearer(token)))


# --- JWKS ------------------------------------------------------------------------------------------------------


class Idp:
    """A JWKS endpoint for http_calls: serves the current key set and counts requests."""

    def __init__(self, *signing: SigningKey, status: int = 200) -> None:
        self.keys = list(signing)
        self.status = status
        self.calls: list[HttpCallRequest] = []

    def __call__(self, req: HttpCallRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        self.calls.append(req)
        doc = {"keys": [k.public_jwk() for k in self.keys]}
        return self.status, [("content-type", "application/json")], json.dumps(doc).encode()


def jwks_config(**jwks: Any) -> dict[str, Any]:
    src: dict[str, Any] = {"upstream": "idp", "path": "/oauth/jwks", "authority": "idp.example"}
    src.update(jwks)
    return {"jwt": {"jwks": src, "forward_claims": [{"claim": "sub", "header": "x-user"}]}}


def test_jwks_is_fetched_once_and_shared(auth: Auth, keys: dict[str, SigningKey]) -> None:
    idp = Idp(keys["RS256"], keys["ES256"], keys["EdDSA"], keys["HS256"])  # the oct key is ignored
    h = auth(jwks_config(), http_calls={"idp": idp})
    r = admitted(h.request(headers=bearer(keys["RS256"].token(claims(sub="a")))))
    assert single(r.request_headers, "x-user") == "a"
    assert len(r.http_calls) == 1
    call = r.http_calls[0]
    assert (call.upstream, call.method, call.path, call.authority) == (
        "idp",
        "GET",
        "/oauth/jwks",
        "idp.example",
    )
    for alg in ("ES256", "EdDSA", "RS256"):
        r = admitted(h.request(headers=bearer(keys[alg].token(claims(sub=alg)))))
        assert r.http_calls == [] and single(r.request_headers, "x-user") == alg
    assert len(idp.calls) == 1
    # HMAC keys never come from a key set.
    r = h.request(headers=bearer(keys["HS256"].token(claims())))
    refused(r)
    assert len(idp.calls) == 1  # unknown kid, but a refetch is not due yet


async def test_instances_share_one_fetch(auth: Auth, keys: dict[str, SigningKey]) -> None:
    fetches = 0

    async def slow_idp(req: HttpCallRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        nonlocal fetches
        fetches += 1
        await asyncio.sleep(0.2)  # the second request arrives while the first waits for the keys
        return 200, [], json.dumps({"keys": [keys["ES256"].public_jwk()]}).encode()

    h = auth(jwks_config(), http_calls={"idp": slow_idp}, pool_min=2, pool_max=2)
    token = bearer(keys["ES256"].token(claims()))

    async def later() -> HarnessResult:
        await asyncio.sleep(0.05)
        return await h.arequest(headers=token)

    first, second = await asyncio.gather(h.arequest(headers=token), later())
    admitted(first)
    # The other instance may not fetch too (one fetch per min_refetch_interval): it answers 503 with a
    # short Retry-After unless the keys arrived before it looked.
    if second.local_response is not None:
        refused(second, 503, "jwks_unavailable")
        assert single(second.local_response[1], "retry-after") == "1"
    # Both instances now verify with the shared copy; still one fetch.
    for r in await asyncio.gather(h.arequest(headers=token), later()):
        admitted(r)
    assert fetches == 1


def test_unknown_kid_refetch_is_rate_limited(
    auth: Auth, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    idp = Idp(keys["ES256"])
    h = auth(jwks_config(min_refetch_interval="30s"), http_calls={"idp": idp})
    admitted(h.request(headers=bearer(keys["ES256"].token({"exp": clock.now_ns // 10**9 + 3600}))))
    assert len(idp.calls) == 1
    clock.advance(31)
    exp = clock.now_ns // 10**9 + 3600
    # A burst of tokens with made-up kids: one refetch, then none until the interval has passed.
    for i in range(20):
        r = h.request(headers=bearer(keys["ES256"].token({"exp": exp}, kid=f"made-up-{i}")))
        assert refused(r)["error_description"] == "the token key id is unknown"
    assert len(idp.calls) == 2
    clock.advance(29)
    refused(h.request(headers=bearer(keys["ES256"].token({"exp": exp}, kid="again"))))
    assert len(idp.calls) == 2
    clock.advance(2)
    refused(h.request(headers=bearer(keys["ES256"].token({"exp": exp}, kid="again"))))
    assert len(idp.calls) == 3
    # Known keys keep working throughout, without fetches.
    admitted(h.request(headers=bearer(keys["ES256"].token({"exp": exp}))))
    assert len(idp.calls) == 3


def test_rotated_key_is_picked_up_by_the_refetch(
    auth: Auth, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    idp = Idp(keys["ES256"])
    h = auth(jwks_config(), http_calls={"idp": idp})
    exp = clock.now_ns // 10**9 + 3600
    admitted(h.request(headers=bearer(keys["ES256"].token({"exp": exp}))))
    idp.keys = [keys["ES256"], keys["EdDSA"]]  # the issuer adds a key
    refused(h.request(headers=bearer(keys["EdDSA"].token({"exp": exp}))))  # within min_refetch_interval
    clock.advance(31)
    r = admitted(h.request(headers=bearer(keys["EdDSA"].token({"sub": "new", "exp": exp}))))
    assert len(r.http_calls) == 1 and single(r.request_headers, "x-user") == "new"


def test_jwks_refreshed_after_refresh_interval(
    auth: Auth, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    idp = Idp(keys["ES256"], keys["RS256"])
    h = auth(jwks_config(refresh_interval="5m"), http_calls={"idp": idp})
    exp = clock.now_ns // 10**9 + 86400
    admitted(h.request(headers=bearer(keys["ES256"].token({"exp": exp}))))
    idp.keys = [keys["RS256"]]  # ES256 retired
    clock.advance(299)
    admitted(h.request(headers=bearer(keys["ES256"].token({"exp": exp, "n": 1}))))
    assert len(idp.calls) == 1
    clock.advance(1)
    r = h.request(headers=bearer(keys["ES256"].token({"exp": exp, "n": 2})))
    refused(r)
    assert len(r.http_calls) == 1
    admitted(h.request(headers=bearer(keys["RS256"].token({"exp": exp}))))


def test_jwks_unavailable_is_503_and_not_refetched_per_request(
    auth: Auth, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    idp = Idp(keys["ES256"], status=500)
    h = auth(jwks_config(min_refetch_interval="10s"), http_calls={"idp": idp})
    token = keys["ES256"].token({"exp": clock.now_ns // 10**9 + 3600})
    r = h.request(headers=bearer(token))
    body = refused(r, 503, "jwks_unavailable")
    assert body["error_description"] == "token signing keys are not available yet"
    assert r.local_response is not None and single(r.local_response[1], "retry-after") == "10"
    assert any("answered 500" in m for _, m in r.logs)
    for _ in range(5):
        refused(h.request(headers=bearer(token)), 503, "jwks_unavailable")
    assert len(idp.calls) == 1
    idp.status = 200
    clock.advance(10)
    admitted(h.request(headers=bearer(token)))
    assert len(idp.calls) == 2


def test_jwks_call_failure_and_bad_documents(
    auth: Auth, keys: dict[str, SigningKey], clock: FakeClock
) -> None:
    # No handler for the upstream: the call fails (the filter sees zero headers).
    h = auth(jwks_config())
    r = h.request(headers=bearer(keys["ES256"].token({"exp": clock.now_ns // 10**9 + 60})))
    refused(r, 503, "jwks_unavailable")
    assert any('fetching the JWKS from upstream "idp" failed' in m for _, m in r.logs)
    for doc in (b"not json", b'{"keys": []}', b'{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}', b"[]"):
        h = auth(jwks_config(), http_calls={"idp": lambda _req, d=doc: (200, [], d)})
        r = h.request(headers=bearer(keys["ES256"].token({"exp": clock.now_ns // 10**9 + 60})))
        refused(r, 503, "jwks_unavailable")
        assert any("unusable" in m for _, m in r.logs)


def test_inline_keys_and_jwks_together(auth: Auth, keys: dict[str, SigningKey]) -> None:
    idp = Idp(keys["RS256"])
    cfg = jwks_config()
    cfg["jwt"]["keys"] = [keys["HS512"].config_pem()]
    h = auth(cfg, http_calls={"idp": idp})
    admitted(h.request(headers=bearer(keys["HS512"].token(claims()))))
    assert idp.calls == []  # inline keys need no fetch
    admitted(h.request(headers=bearer(keys["RS256"].token(claims()))))
    assert len(idp.calls) == 1


# --- configuration errors ----------------------------------------------------------------------------------------


def test_configuration_errors_name_the_field(keys: dict[str, SigningKey], module_cache: Path) -> None:
    rsa_pem = keys["RS256"].public_pem()
    private_pem = (
        keys["ES256"]
        .private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    cases: list[tuple[Any, str]] = [
        ({}, "nothing to check"),
        ({"jwt": {}, "extra": 1}, 'configuration: unknown field "extra"'),
        (
            {"api_keys": {"keys": [{"name": "a", "sha256": "abc"}]}},
            "api_keys.keys[0].sha256: expected 64 hex digits",
        ),
        (
            {"api_keys": {"keys": [{"name": "a", "sha256": "z" * 64}]}},
            "api_keys.keys[0].sha256: not a hex string",
        ),
        ({"api_keys": {"keys": []}}, "api_keys.keys: at least one key is needed"),
        (
            {"api_keys": {"keys": [{"name": "a", "sha256": "0" * 64}, {"name": "b", "sha256": "0" * 64}]}},
            "api_keys.keys[1].sha256: same hash as api_keys.keys[0]",
        ),
        ({"jwt": {}}, "jwt: no verification keys"),
        (
            {"jwt": {"keys": [{"alg": "HS256", "secret": "short"}]}},
            "jwt.keys[0]: an HS256 secret must be at least 32 bytes",
        ),
        ({"jwt": {"keys": [{"secret": "x" * 64}]}}, "jwt.keys[0].alg: required with a shared secret"),
        (
            {"jwt": {"keys": [{"alg": "none", "secret": "x" * 64}]}},
            'jwt.keys[0].alg: "none" is not supported',
        ),
        (
            {"jwt": {"keys": [{"alg": "HS256", "pem": rsa_pem}]}},
            "jwt.keys[0]: an RSA key can only be used with alg RS256",
        ),
        ({"jwt": {"keys": [{"pem": private_pem}]}}, "jwt.keys[0]: this is a private key"),
        ({"jwt": {"keys": [{"pem": "garbage"}]}}, 'jwt.keys[0]: no "-----BEGIN ...-----" line'),
        ({"jwt": {"keys": [{"pem": rsa_pem, "secret": "x" * 64}]}}, "jwt.keys[0]: give exactly one of"),
        (
            {"jwt": {"keys": [{"jwk": {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}}]}},
            "jwt.keys[0]: EC JWK: only crv P-256",
        ),
        (
            {"jwt": {"keys": [{"kid": "a", "pem": rsa_pem}, {"kid": "a", "pem": rsa_pem}]}},
            'jwt.keys[1].kid: "a" is also the kid of jwt.keys[0]',
        ),
        ({"jwt": {"jwks": {"path": "/x"}}}, "jwt.jwks.upstream: missing"),
        ({"jwt": {"jwks": {"upstream": "idp", "path": "x"}}}, "jwt.jwks.path: must start with '/'"),
        (
            {"jwt": {"jwks": {"upstream": "idp", "refresh_interval": "soon"}}},
            "jwt.jwks.refresh_interval: expected seconds",
        ),
        ({"jwt": {"jwks": {"upstream": "idp"}, "leeway": 7200}}, "jwt.leeway: must be between"),
        (
            {"jwt": {"jwks": {"upstream": "idp"}, "forward_claims": [{"claim": "sub", "header": "host"}]}},
            'forwarded header "host" is reserved',
        ),
        (
            {
                "jwt": {
                    "jwks": {"upstream": "idp"},
                    "forward_claims": [{"claim": "sub", "header": "bad header"}],
                }
            },
            'jwt.forward_claims[0].header: "bad header" is not a valid header name',
        ),
        (
            {
                "api_keys": {"keys": [{"name": "a", "sha256": "0" * 64}]},
                "jwt": {
                    "jwks": {"upstream": "idp"},
                    "forward_claims": [{"claim": "sub", "header": "X-Consumer"}],
                },
            },
            'forwarded header "x-consumer" is configured twice',
        ),
        ({"jwt": {"jwks": {"upstream": "idp"}, "required_scopes": ["a b"]}}, "jwt.required_scopes[0]"),
        ({"jwt": {"jwks": {"upstream": "idp"}}, "realm": 'a"b'}, "realm: only printable ASCII"),
        ("{not json", "not valid JSON"),
    ]
    for config, expected in cases:
        if isinstance(config, str):
            message = _config_error_text(config, module_cache)
        else:
            message = config_error(config, module_cache)
        assert expected in message, (config, message)


def _config_error_text(text: str, cache_dir: Path) -> str:
    logs: list[tuple[int, str]] = []
    spec = FilterSpec(name="auth", module_path=AUTH_WASM, configuration=text.encode(), pool_min=1, pool_max=1)
    with pytest.raises(FilterLoadError):
        FilterRuntime.load(
            [spec], cache_dir=cache_dir, log_sink=lambda _n, level, msg: logs.append((level, msg))
        ).close()
    return " ".join(msg for level, msg in logs if level >= LOG_ERROR)


# --- docs ----------------------------------------------------------------------------------------------------------


def test_docs_python_example_runs() -> None:
    (example,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    exec(compile(example, str(DOC), "exec"), {})


def test_docs_toml_example_is_accepted(auth: Auth) -> None:
    import tomllib

    (example,) = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.S)
    config = tomllib.loads(example)
    filter_config = config["filters"]["auth"]
    assert filter_config["module"] == "builtin:auth"
    from wasm_gateway.config import parse_config

    parse_config(example, env={})  # the whole example is a valid gateway config
    h = auth(filter_config["configuration"])
    refused(h.request(path="/api/orders"), 401, "unauthorized")
    r = admitted(h.request(path="/api/orders", headers=[("x-api-key", "demo-key-please-change")]))
    assert single(r.request_headers, "x-consumer") == "demo-cli"


def test_secret_base64_and_short_hmac_keys(auth: Auth) -> None:
    k = hmac_key("HS384", "b64")
    h = auth({"jwt": {"keys": [{"alg": "HS384", "secret_base64": base64.b64encode(k.private).decode()}]}})
    admitted(h.request(headers=bearer(k.token(claims()))))
