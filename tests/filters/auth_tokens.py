"""Keys and JWS tokens for the auth filter tests, made with `cryptography` (no JWT library: tests need to
craft malformed and hostile tokens byte by byte)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = [
    "SigningKey",
    "b64url",
    "hmac_key",
    "make_keys",
    "raw_token",
    "sha256_hex",
]

HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def raw_token(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """header.payload.signature; ``sign(signing_input) -> bytes`` (None: an empty signature)."""
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}"
    sig = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{b64url(sig)}"


@dataclass
class SigningKey:
    """A private key (or HMAC secret) with its JWS algorithm and public forms for the filter's config."""

    alg: str
    kid: str
    private: Any  # cryptography private key, or the secret bytes for HS*
    extra: dict[str, Any] = field(default_factory=dict)

    def sign(self, data: bytes) -> bytes:
        if self.alg in HMAC_HASHES:
            return hmac.new(self.private, data, HMAC_HASHES[self.alg]).digest()
        if self.alg == "RS256":
            sig: bytes = self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
            return sig
        if self.alg == "ES256":
            r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if self.alg == "EdDSA":
            out: bytes = self.private.sign(data)
            return out
        raise ValueError(self.alg)

    def token(self, claims: dict[str, Any], *, kid: str | bool | None = True, **header: Any) -> str:
        """A signed token; ``kid=True`` names this key, a string names another, None/False omits it."""
        h: dict[str, Any] = {"alg": self.alg, "typ": "JWT"}
        if kid is True:
            h["kid"] = self.kid
        elif isinstance(kid, str):
            h["kid"] = kid
        h.update(header)
        return raw_token(h, claims, self.sign)

    def public_pem(self) -> str:
        pem: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode()

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = {"kid": self.kid, "use": "sig"}
        pub: Any = self.private.public_key() if self.alg not in HMAC_HASHES else None
        if self.alg == "RS256":
            numbers = pub.public_numbers()
            n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
            e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
            jwk.update(kty="RSA", n=b64url(n), e=b64url(e), alg="RS256")
        elif self.alg == "ES256":
            numbers = pub.public_numbers()
            jwk.update(
                kty="EC",
                crv="P-256",
                x=b64url(numbers.x.to_bytes(32, "big")),
                y=b64url(numbers.y.to_bytes(32, "big")),
                alg="ES256",
            )
        elif self.alg == "EdDSA":
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            jwk.update(kty="OKP", crv="Ed25519", x=b64url(raw), alg="EdDSA")
        else:
            jwk.update(kty="oct", k=b64url(self.private), alg=self.alg)
        return jwk

    def config_pem(self) -> dict[str, Any]:
        """An inline jwt.keys entry for this key (PEM for public keys, the secret for HMAC)."""
        if self.alg in HMAC_HASHES:
            return {
                "kid": self.kid,
                "alg": self.alg,
                "secret_base64": base64.b64encode(self.private).decode(),
            }
        return {"kid": self.kid, "pem": self.public_pem()}


def hmac_key(alg: str, kid: str, size: int | None = None) -> SigningKey:
    n = size or {"HS256": 32, "HS384": 48, "HS512": 64}[alg]
    return SigningKey(alg, kid, hashlib.sha512(f"{alg}-{kid}".encode()).digest()[:n])


def make_keys() -> dict[str, SigningKey]:
    """One key per supported algorithm (RSA-2048 for RS256)."""
    return {
        "HS256": hmac_key("HS256", "hs256"),
        "HS384": hmac_key("HS384", "hs384"),
        "HS512": hmac_key("HS512", "hs512"),
        "RS256": SigningKey("RS256", "rs256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ES256": SigningKey("ES256", "es256", ec.generate_private_key(ec.SECP256R1())),
        "EdDSA": SigningKey("EdDSA", "ed25519", ed25519.Ed25519PrivateKey.generate()),
    }
