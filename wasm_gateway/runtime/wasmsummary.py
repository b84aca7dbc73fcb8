"""What linking needs to know about a module (imports, exports, function signatures), read from its bytes.

wasmtime-py answers the same questions through one ctypes object per import, export, type and value type,
which made linking a small filter cost a few hundred microseconds. Reading the four sections involved
(type, import, function, export) from the binary takes a fraction of that. Only modules wasmtime has
already accepted are read here; anything this reader does not know (GC proposal types, an unexpected
layout) raises ValueError and the caller asks wasmtime instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["EXTERN_KIND_NAMES", "FUNC", "I32", "MEMORY", "ModuleSummary", "Signature", "summarize"]

FUNC: Final = 0
TABLE: Final = 1
MEMORY: Final = 2
GLOBAL: Final = 3
TAG: Final = 4
# Names as wasmtime-py's type classes (used in messages).
EXTERN_KIND_NAMES: Final = {
    FUNC: "FuncType",
    TABLE: "TableType",
    MEMORY: "MemoryType",
    GLOBAL: "GlobalType",
    TAG: "TagType",
}

I32: Final = 0x7F
_VALTYPES: Final = frozenset({0x7F, 0x7E, 0x7D, 0x7C, 0x7B, 0x70, 0x6F})  # numbers, v128, funcref, externref


@dataclass(frozen=True)
class Signature:
    params: tuple[int, ...]  # value type codes (0x7f = i32, ...)
    results: tuple[int, ...]


@dataclass(frozen=True)
class ModuleSummary:
    imports: tuple[tuple[str, str, int], ...]  # (module, name, extern kind)
    exports: dict[str, tuple[int, Signature | None]]  # name -> (extern kind, signature of a function)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u32(self) -> int:
        b = self.data[self.pos]
        if b < 0x80:  # most values fit in one byte
            self.pos += 1
            return b
        result = 0
        shift = 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 35:
                raise ValueError("LEB128 too long")

    def name(self) -> str:
        n = self.u32()
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8")

    def valtype(self) -> int:
        t = self.byte()
        if t not in _VALTYPES:
            raise ValueError(f"value type 0x{t:02x}")
        return t

    def limits(self) -> None:
        flags = self.byte()
        if flags & ~0x07:
            raise ValueError(f"limits flags 0x{flags:02x}")
        self.u64()
        if flags & 0x01:
            self.u64()

    def u64(self) -> int:
        result = 0
        shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("LEB128 too long")


def summarize(wasm: bytes) -> ModuleSummary:
    """The module's imports and exports (with function signatures); ValueError when it cannot tell."""
    if wasm[:8] != b"\0asm\x01\x00\x00\x00":
        raise ValueError("not a core wasm module (version 1)")
    data = bytes(wasm)
    r = _Reader(data, 8)
    types: list[Signature] = []
    imports: list[tuple[str, str, int]] = []
    func_types: list[int] = []  # type index of every function (imported first)
    exports_raw: list[tuple[str, int, int]] = []
    end_all = len(data)
    while r.pos < end_all:
        section = r.byte()
        size = r.u32()
        end = r.pos + size
        if section == 1:
            for _ in range(r.u32()):
                form = r.byte()
                if form != 0x60:
                    raise ValueError(f"type form 0x{form:02x}")
                params = tuple(r.valtype() for _ in range(r.u32()))
                results = tuple(r.valtype() for _ in range(r.u32()))
                types.append(Signature(params, results))
        elif section == 2:
            for _ in range(r.u32()):
                module = r.name()
                name = r.name()
                kind = r.byte()
                if kind == FUNC:
                    func_types.append(r.u32())
                elif kind == TABLE:
                    r.valtype()
                    r.limits()
                elif kind == MEMORY:
                    r.limits()
                elif kind == GLOBAL:
                    r.valtype()
                    r.byte()
                elif kind == TAG:
                    r.byte()
                    r.u32()
                else:
                    raise ValueError(f"import kind {kind}")
                imports.append((module, name, kind))
        elif section == 3:
            count = r.u32()
            body = data[r.pos : end]
            if len(body) == count and body.isascii():
                func_types.extend(body)  # every type index is a one-byte LEB128
            else:
                func_types.extend(r.u32() for _ in range(count))
        elif section == 7:
            for _ in range(r.u32()):
                name = r.name()
                kind = r.byte()
                exports_raw.append((name, kind, r.u32()))
        r.pos = end
        if r.pos > end_all:
            raise ValueError("truncated section")
    exports: dict[str, tuple[int, Signature | None]] = {}
    for name, kind, index in exports_raw:
        exports[name] = (kind, types[func_types[index]] if kind == FUNC else None)
    return ModuleSummary(tuple(imports), exports)
