"""The ``[kv.<namespace>]`` and ``[sql.<database>]`` tables: what filters may be granted (``kv = [...]``,
``sql = [...]`` in ``[filters.<name>]``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["NAME_PATTERN", "KVNamespaceConfig", "SqlDatabaseConfig"]

# Namespace and database names: they go into storage keys (never a NUL, a colon or a brace).
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# LMDB keys are at most 511 bytes: "e" + namespace (64) + NUL + key must fit, so a key is at most 400.
MAX_KEY_BYTES_LIMIT: Final = 400


@dataclass(frozen=True)
class KVNamespaceConfig:
    name: str
    max_keys: int = 1000  # live keys in the namespace; a write of one more answers ``limit``
    max_key_bytes: int = 256
    max_value_bytes: int = 64 * 1024
    default_ttl_seconds: float = 3600.0  # kv.set / kv.incr with ttl 0
    max_ttl_seconds: float = 30 * 86_400.0  # longer ttls are clamped to it
    max_list: int = 100  # keys one kv.list answers at most


@dataclass(frozen=True)
class SqlDatabaseConfig:
    name: str
    path: Path
    max_rows: int = 1000  # more rows answer ``limit`` (a query should say LIMIT)
    max_bytes: int = 1024 * 1024  # encoded result size
    timeout_ms: int = 50  # per query, enforced by SQLite's progress handler
    statement_cache: int = 64  # prepared statements kept per connection
