"""``sql.query``: read-only SQLite databases declared in config.

Read-only four times over: the file is opened with ``mode=ro``, ``PRAGMA query_only`` is on, an authorizer
admits only what a SELECT (or WITH ... SELECT) needs (so writes, ATTACH, PRAGMA and transactions are refused
when the statement is prepared), and the connection runs in autocommit mode (no implicit BEGIN).

One connection per process, opened on first use (and again after a fork), with SQLite's own LRU of
prepared statements (``statement_cache``). Before each query the file is stat-ed: when its inode changed
(replaced by an atomic rename), the connection is reopened, so a new database is live on the next query
without a restart. A query runs under a deadline checked by the progress handler every 1000 VM steps, and
its result is bounded by ``max_rows`` and ``max_bytes``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import quote

from .codec import ArgReader, EdgeDataError, ErrorCode, SqlValue, encode_columns, encode_rows, encode_value
from .config import SqlDatabaseConfig

__all__ = ["SqlDatabase"]

# sqlite3 authorizer action codes a read needs; every other action (INSERT, UPDATE, DELETE, ATTACH, PRAGMA,
# CREATE, TRANSACTION, ...) is denied.
_READ_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        getattr(sqlite3, "SQLITE_RECURSIVE", 33),
    }
)
_PROGRESS_STEPS = 1000


def _authorize(action: int, *_: object) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


class SqlDatabase:
    """One declared database; `query` takes the encoded arguments after the name and returns the result."""

    def __init__(self, config: SqlDatabaseConfig) -> None:
        self.config = config
        self.path = str(config.path)  # a str: os.stat of a Path costs a conversion per query
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._pid = 0
        self._deadline = 0.0
        self._lock = threading.Lock()
        # SQL text -> the result's encoded column names (the same statement always has the same columns)
        self._headers: dict[str, bytes] = {}
        self.reopened = 0  # times a replaced file was picked up (tests and logs)

    def _open(self, identity: tuple[int, int]) -> sqlite3.Connection:
        uri = "file:" + quote(str(Path(self.path).resolve())) + "?mode=ro"
        self._headers.clear()
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=self.config.statement_cache,
            )
            conn.execute("PRAGMA query_only = 1")
        except sqlite3.Error as exc:
            raise EdgeDataError(
                ErrorCode.UNAVAILABLE, f"database {self.config.name!r} ({self.path}) cannot be opened: {exc}"
            ) from None
        # No string or blob (a stored one, or zeroblob(1e9) / printf padding made by the query) larger than a
        # whole result may be: SQLite refuses it before allocating it.
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max(self.config.max_bytes, 1024))
        conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 100_000)
        conn.set_authorizer(_authorize)
        conn.set_progress_handler(self._progress, _PROGRESS_STEPS)
        self._conn, self._identity, self._pid = conn, identity, os.getpid()
        return conn

    def _progress(self) -> int:
        return 1 if time.monotonic() > self._deadline else 0

    def _connection(self) -> sqlite3.Connection:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise EdgeDataError(
                ErrorCode.UNAVAILABLE, f"database {self.config.name!r} ({self.path}): {exc.strerror}"
            ) from None
        identity = (st.st_dev, st.st_ino)
        conn = self._conn
        if conn is not None and identity == self._identity and self._pid == os.getpid():
            return conn
        if conn is not None:
            if self._pid == os.getpid():
                conn.close()
            self.reopened += 1
            self._conn = None
        return self._open(identity)

    def query(self, args: ArgReader) -> bytes:
        sql = args.text("sql")
        count = args.u32("parameter count")
        if count > 999:
            raise EdgeDataError(ErrorCode.LIMIT, f"{count} parameters (at most 999)")
        params: list[SqlValue] = [args.value(f"parameter {i + 1}") for i in range(count)]
        args.end()
        cfg = self.config
        with self._lock:
            conn = self._connection()
            self._deadline = time.monotonic() + cfg.timeout_ms / 1000
            try:
                cursor = conn.execute(sql, params)
                header = self._headers.get(sql)
                if header is None:
                    header = encode_columns([d[0] for d in cursor.description or ()])
                    if len(self._headers) >= 256:
                        self._headers.clear()
                    self._headers[sql] = header
                rows: list[bytes] = []
                size = 0
                for row in cursor:
                    if len(rows) == cfg.max_rows:
                        raise EdgeDataError(
                            ErrorCode.LIMIT, f"more than sql.{cfg.name}.max_rows ({cfg.max_rows}) rows"
                        )
                    encoded = b"".join(map(encode_value, row))
                    size += len(encoded)
                    if size > cfg.max_bytes:
                        raise EdgeDataError(
                            ErrorCode.LIMIT, f"result exceeds sql.{cfg.name}.max_bytes ({cfg.max_bytes})"
                        )
                    rows.append(encoded)
            except (sqlite3.Error, sqlite3.Warning) as exc:
                raise _translate(exc, cfg) from None
        return encode_rows(header, rows)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                conn.close()


def _translate(exc: Exception, cfg: SqlDatabaseConfig) -> EdgeDataError:
    message = str(exc)
    if "not authorized" in message or "authorization denied" in message or "readonly" in message:
        return EdgeDataError(ErrorCode.DENIED, f"only statements that read are allowed ({message})")
    if "too big" in message:
        return EdgeDataError(
            ErrorCode.LIMIT, f"a value exceeds sql.{cfg.name}.max_bytes ({cfg.max_bytes}): {message}"
        )
    if "interrupted" in message:
        return EdgeDataError(
            ErrorCode.TIMEOUT, f"query ran past sql.{cfg.name}.timeout_ms ({cfg.timeout_ms})"
        )
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.OperationalError | sqlite3.ProgrammingError
    ):
        return EdgeDataError(ErrorCode.UNAVAILABLE, f"database {cfg.name!r}: {message}")
    return EdgeDataError(ErrorCode.BAD_REQUEST, message)
