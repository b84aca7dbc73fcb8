"""An independent client-side implementation of the edge-data encoding (docs/edge-data.md), for the tests
and benchmarks: what a guest binding writes and reads."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any


def b(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return struct.pack("<I", len(raw)) + raw


def kv_get(ns: str, key: bytes | str) -> bytes:
    return b"\x01" + b(ns) + b(key)


def kv_set(ns: str, key: bytes | str, value: bytes | str, ttl_ms: int = 0) -> bytes:
    return b"\x01" + b(ns) + b(key) + b(value) + struct.pack("<I", ttl_ms)


def kv_delete(ns: str, key: bytes | str) -> bytes:
    return b"\x01" + b(ns) + b(key)


def kv_incr(ns: str, key: bytes | str, delta: int = 1, ttl_ms: int = 0) -> bytes:
    return b"\x01" + b(ns) + b(key) + struct.pack("<qI", delta, ttl_ms)


def kv_list(ns: str, prefix: bytes | str = b"", limit: int = 0) -> bytes:
    return b"\x01" + b(ns) + b(prefix) + struct.pack("<I", limit)


def value(v: Any) -> bytes:
    if v is None:
        return b"\x00"
    if isinstance(v, int):
        return b"\x01" + struct.pack("<q", int(v))
    if isinstance(v, float):
        return b"\x02" + struct.pack("<d", v)
    if isinstance(v, str):
        return b"\x03" + b(v)
    return b"\x04" + b(v)


def sql_query(db: str, sql: str, *params: Any) -> bytes:
    return b"\x01" + b(db) + b(sql) + struct.pack("<I", len(params)) + b"".join(value(p) for p in params)


@dataclass
class Result:
    code: int
    raw: bytes
    pos: int = 2

    @property
    def ok(self) -> bool:
        return self.code == 0

    def take(self, n: int) -> bytes:
        out = self.raw[self.pos : self.pos + n]
        assert len(out) == n, "result ends early"
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def bytes(self) -> bytes:
        return self.take(self.u32())

    def value(self) -> Any:
        kind = self.take(1)[0]
        if kind == 0:
            return None
        if kind == 1:
            return struct.unpack("<q", self.take(8))[0]
        if kind == 2:
            return struct.unpack("<d", self.take(8))[0]
        if kind == 3:
            return self.bytes().decode()
        assert kind == 4, kind
        return self.bytes()

    def end(self) -> None:
        assert self.pos == len(self.raw), f"{len(self.raw) - self.pos} trailing bytes"

    @property
    def reason(self) -> str:
        assert self.code >= 2, self.code
        return self.bytes().decode()


def result(raw: bytes) -> Result:
    assert raw[0] == 1, f"version {raw[0]}"
    return Result(raw[1], raw)


def get_value(raw: bytes) -> bytes | None:
    r = result(raw)
    if r.code == 1:
        r.end()
        return None
    assert r.ok, r.reason
    out = r.bytes()
    r.end()
    return out


def incr_total(raw: bytes) -> int:
    r = result(raw)
    assert r.ok, r.reason
    total = int(struct.unpack("<q", r.take(8))[0])
    r.end()
    return total


def list_keys(raw: bytes) -> tuple[list[bytes], bool]:
    r = result(raw)
    assert r.ok, r.reason
    keys = [r.bytes() for _ in range(r.u32())]
    truncated = r.take(1) == b"\x01"
    r.end()
    return keys, truncated


def rows(raw: bytes) -> tuple[list[str], list[tuple[Any, ...]]]:
    r = result(raw)
    assert r.ok, r.reason
    columns = [r.bytes().decode() for _ in range(r.u32())]
    out = [tuple(r.value() for _ in columns) for _ in range(r.u32())]
    r.end()
    return columns, out


def error(raw: bytes) -> tuple[int, str]:
    r = result(raw)
    assert r.code >= 2, f"expected an error, got code {r.code}"
    reason = r.reason
    r.end()
    return r.code, reason
