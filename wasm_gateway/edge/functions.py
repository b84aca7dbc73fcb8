"""The foreign functions of edge data, bound per filter to the namespaces and databases it is granted."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from ..exceptions import ConfigError
from ..state.base import EdgeStore
from .codec import ArgReader, EdgeDataError, ErrorCode, encode_error
from .config import KVNamespaceConfig, SqlDatabaseConfig
from .kv import EdgeKV
from .sql import SqlDatabase

__all__ = ["FUNCTION_NAMES", "EdgeData", "edge_data"]

_log = logging.getLogger("wasm_gateway.edge")
FUNCTION_NAMES = ("kv.get", "kv.set", "kv.delete", "kv.incr", "kv.list", "sql.query")


class EdgeData:
    """The declared KV namespaces (on one shared-state store) and SQLite databases of a gateway."""

    def __init__(
        self,
        store: EdgeStore | None,
        namespaces: Mapping[str, KVNamespaceConfig],
        databases: Mapping[str, SqlDatabaseConfig],
    ) -> None:
        if namespaces and store is None:
            raise ConfigError("[kv] namespaces need a shared-state backend that offers them")
        missing = [
            f"sql.{n}.path: {c.path} does not exist" for n, c in databases.items() if not c.path.is_file()
        ]
        if missing:
            raise ConfigError(
                "; ".join(missing) + " (a database is opened read-only: create it first)", missing
            )
        self.kv = EdgeKV(store, namespaces) if store is not None else None
        self.databases = {name: SqlDatabase(cfg) for name, cfg in databases.items()}

    def functions(
        self, filter_name: str, kv: Iterable[str] = (), sql: Iterable[str] = ()
    ) -> dict[str, Callable[[bytes], bytes]]:
        """``kv.*`` and ``sql.query`` for one filter. They never raise: every failure is an error result."""
        granted_kv = frozenset(n.encode() for n in kv)
        granted_sql = frozenset(sql)
        out: dict[str, Callable[[bytes], bytes]] = {}
        edge_kv = self.kv
        for op in ("get", "set", "delete", "incr", "list"):
            if edge_kv is None:
                out["kv." + op] = _total(filter_name, "kv." + op, _no_kv)
            else:
                out["kv." + op] = _total(
                    filter_name, "kv." + op, _bind(getattr(edge_kv, op), granted_kv, filter_name)
                )
        databases = self.databases

        def query(data: bytes) -> bytes:
            args = ArgReader(data)
            name = args.text("database")
            db = databases.get(name) if name in granted_sql else None
            if db is None:
                if name in databases:
                    raise EdgeDataError(
                        ErrorCode.DENIED, f"database {name!r} is not granted to filter {filter_name!r}"
                    )
                raise EdgeDataError(ErrorCode.DENIED, f"no database {name!r} is declared (add [sql.{name}])")
            return db.query(args)

        out["sql.query"] = _total(filter_name, "sql.query", query)
        return out

    def close(self) -> None:
        for db in self.databases.values():
            db.close()


def _bind(
    method: Callable[[bytes, frozenset[bytes], str], bytes], granted: frozenset[bytes], filter_name: str
) -> Callable[[bytes], bytes]:
    def call(data: bytes) -> bytes:
        return method(data, granted, filter_name)

    return call


def _no_kv(data: bytes) -> bytes:
    raise EdgeDataError(ErrorCode.DENIED, "no KV namespace is declared (add [kv.<namespace>])")


def _total(filter_name: str, name: str, fn: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    def call(data: bytes) -> bytes:
        try:
            return fn(data)
        except EdgeDataError as exc:
            return encode_error(exc.code, exc.reason)
        except Exception as exc:  # a bug must not trap the guest: it gets a reason, the log gets the trace
            _log.exception("%s from filter %r failed", name, filter_name)
            return encode_error(ErrorCode.INTERNAL, f"{name}: {type(exc).__name__}: {exc}")

    return call


def edge_data(config: _HasEdgeConfig, store: _HasEdgeStore) -> EdgeData | None:
    """The gateway's edge data from its config (None when nothing is declared)."""
    if not config.kv and not config.sql:
        return None
    return EdgeData(store.edge, config.kv, config.sql)


class _HasEdgeConfig(Protocol):
    @property
    def kv(self) -> Mapping[str, KVNamespaceConfig]: ...
    @property
    def sql(self) -> Mapping[str, SqlDatabaseConfig]: ...


class _HasEdgeStore(Protocol):
    @property
    def edge(self) -> EdgeStore | None: ...
