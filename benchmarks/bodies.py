"""The three response bodies every origin serves: a small JSON answer, 64 KiB and 1 MiB (JSON too)."""

from __future__ import annotations


def _padded_json(size: int) -> bytes:
    prefix, suffix = b'{"data":"', b'"}'
    return prefix + b"a" * (size - len(prefix) - len(suffix)) + suffix


SMALL_JSON = b'{"message":"hello, world","ok":true}'

# Body variant name -> (request path, exact body).
BODIES: dict[str, tuple[str, bytes]] = {
    "small": ("/json", SMALL_JSON),
    "64k": ("/64k", _padded_json(64 * 1024)),
    "1m": ("/1m", _padded_json(1024 * 1024)),
}

BODY_BY_PATH: dict[str, bytes] = {path: body for path, body in BODIES.values()}
