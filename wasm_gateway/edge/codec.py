"""The binary encoding of the edge-data foreign functions, version 1 (docs/edge-data.md is the reference).

Pure functions, no I/O. Little-endian throughout, like the rest of Proxy-Wasm. ``bytes`` below is a u32
length followed by that many bytes.

Arguments start with the version byte (1), then per function::

    kv.get     bytes ns, bytes key
    kv.set     bytes ns, bytes key, bytes value, u32 ttl_ms (0: the namespace's default)
    kv.delete  bytes ns, bytes key
    kv.incr    bytes ns, bytes key, i64 delta, u32 ttl_ms (applies when the key is created)
    kv.list    bytes ns, bytes prefix, u32 limit (0: the namespace's max_list)
    sql.query  bytes db, bytes sql, u32 count, count x value

A value is a type byte then its payload: 0 null, 1 integer (i64), 2 real (f64), 3 text (bytes, UTF-8),
4 blob (bytes).

Results start with the version byte (1) and a code byte. Code 0 (ok) is followed by the payload::

    kv.get     bytes value
    kv.set     (nothing)
    kv.delete  u8 existed
    kv.incr    i64 total
    kv.list    u32 count, count x bytes key, u8 truncated
    sql.query  u32 columns, columns x bytes name, u32 rows, rows x columns x value

Code 1 (not_found, kv.get only) has no payload. Every other code is an error followed by ``bytes reason``
(UTF-8, for people): see `ErrorCode`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Final

from ..exceptions import EdgeDataError

__all__ = [
    "VERSION",
    "ArgReader",
    "EdgeDataError",
    "ErrorCode",
    "SqlValue",
    "encode_columns",
    "encode_error",
    "encode_i64",
    "encode_kv_list",
    "encode_ok",
    "encode_rows",
    "encode_value",
    "pack_bytes",
]

VERSION: Final = 1
SqlValue = int | float | str | bytes | None

_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class ErrorCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_REQUEST = 2  # malformed arguments, unknown version, SQL that does not compile
    DENIED = 3  # namespace or database not granted to the filter; a statement that is not a read
    LIMIT = 4  # a key, value, namespace, row or byte limit
    TIMEOUT = 5  # a query ran past its time limit
    UNAVAILABLE = 6  # the backend (Redis, the database file) cannot be reached
    CONFLICT = 7  # kv.incr on a value that is not an integer, or a total outside i64
    INTERNAL = 8  # a bug: the reason says what


def _bad(reason: str) -> EdgeDataError:
    return EdgeDataError(ErrorCode.BAD_REQUEST, reason)


class ArgReader:
    """Reads one function's arguments; every malformation raises `EdgeDataError` (BAD_REQUEST)."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        if not data:
            raise _bad("empty arguments (expected the version byte 1)")
        if data[0] != VERSION:
            raise _bad(f"encoding version {data[0]} is not supported (this gateway speaks {VERSION})")
        self._data = data
        self._pos = 1

    def _take(self, n: int, what: str) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._data):
            raise _bad(f"arguments end inside {what}")
        self._pos = end
        return self._data[pos:end]

    def u8(self, what: str) -> int:
        pos = self._pos
        if pos >= len(self._data):
            raise _bad(f"arguments end inside {what}")
        self._pos = pos + 1
        return self._data[pos]

    def u32(self, what: str) -> int:
        pos = self._pos
        if pos + 4 > len(self._data):
            raise _bad(f"arguments end inside {what}")
        self._pos = pos + 4
        return int(_U32.unpack_from(self._data, pos)[0])

    def i64(self, what: str) -> int:
        pos = self._pos
        if pos + 8 > len(self._data):
            raise _bad(f"arguments end inside {what}")
        self._pos = pos + 8
        return int(_I64.unpack_from(self._data, pos)[0])

    def bytes(self, what: str) -> bytes:
        return self._take(self.u32(what), what)

    def text(self, what: str) -> str:
        try:
            return self.bytes(what).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"{what} is not UTF-8") from None

    def value(self, what: str) -> SqlValue:
        kind = self.u8(what)
        if kind == 0:
            return None
        if kind == 1:
            return self.i64(what)
        if kind == 2:
            return float(_F64.unpack(self._take(8, what))[0])
        if kind == 3:
            return self.text(what)
        if kind == 4:
            return self.bytes(what)
        raise _bad(f"{what}: unknown value type {kind}")

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _bad(f"{len(self._data) - self._pos} unexpected bytes after the arguments")


def pack_bytes(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


_HEAD_OK: Final = bytes((VERSION, ErrorCode.OK))


def encode_ok(payload: bytes = b"") -> bytes:
    return _HEAD_OK + payload


def encode_error(code: int, reason: str) -> bytes:
    return bytes((VERSION, code)) + pack_bytes(reason.encode("utf-8", "replace"))


def encode_i64(value: int) -> bytes:
    if not _I64_MIN <= value <= _I64_MAX:
        raise EdgeDataError(ErrorCode.CONFLICT, f"{value} does not fit in a signed 64-bit integer")
    return _I64.pack(value)


def encode_value(value: object) -> bytes:
    """One SQL value; integers beyond i64 cannot come out of SQLite."""
    # Exact-type checks first: SQLite hands out exactly int, str, float, bytes or None.
    if type(value) is int:
        return b"\x01" + _I64.pack(value)
    if type(value) is str:
        return b"\x03" + pack_bytes(value.encode("utf-8", "surrogatepass"))
    if value is None:
        return b"\x00"
    if isinstance(value, int):
        return b"\x01" + _I64.pack(value)
    if isinstance(value, float):
        return b"\x02" + _F64.pack(value)
    if isinstance(value, str):
        return b"\x03" + pack_bytes(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray | memoryview):
        return b"\x04" + pack_bytes(bytes(value))
    raise EdgeDataError(ErrorCode.INTERNAL, f"unexpected value type {type(value).__name__}")


def encode_kv_list(keys: Sequence[bytes], truncated: bool) -> bytes:
    parts = [_HEAD_OK, _U32.pack(len(keys))]
    parts += [pack_bytes(k) for k in keys]
    parts.append(b"\x01" if truncated else b"\x00")
    return b"".join(parts)


def encode_columns(columns: Sequence[str]) -> bytes:
    """The column part of a sql.query result (its count and names)."""
    return _U32.pack(len(columns)) + b"".join(pack_bytes(c.encode("utf-8", "replace")) for c in columns)


def encode_rows(columns: bytes, rows: Sequence[bytes]) -> bytes:
    """``columns`` from `encode_columns`; ``rows`` already encoded (the caller counts their bytes against the
    limit as it goes)."""
    return b"".join((_HEAD_OK, columns, _U32.pack(len(rows)), *rows))
