"""Edge data for filters: KV namespaces with TTL and read-only SQLite, as Proxy-Wasm foreign functions.

A filter calls ``proxy_call_foreign_function("kv.get", args)`` (and ``kv.set``, ``kv.delete``, ``kv.incr``,
``kv.list``, ``sql.query``) with arguments and results in the versioned binary encoding of `codec`
(docs/edge-data.md). Namespaces (``[kv.<name>]``) live on the shared-state backend; databases
(``[sql.<name>]``) are SQLite files opened read-only. A filter sees only what its ``kv`` / ``sql`` grant lists.
"""

from __future__ import annotations

from .codec import VERSION, EdgeDataError, ErrorCode
from .config import KVNamespaceConfig, SqlDatabaseConfig
from .functions import FUNCTION_NAMES, EdgeData

__all__ = [
    "FUNCTION_NAMES",
    "VERSION",
    "EdgeData",
    "EdgeDataError",
    "ErrorCode",
    "KVNamespaceConfig",
    "SqlDatabaseConfig",
]
