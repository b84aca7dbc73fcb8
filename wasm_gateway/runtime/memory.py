"""Bounds-checked access to a guest's linear memory, the guest allocator, and the pairs wire format.

Every pointer and length coming from the guest is checked against the memory's current size before it is
touched; a bad one is reported as ``None`` / ``False`` so host functions answer INVALID_MEMORY_ACCESS.
Memories never move (the engine sets ``memory_may_move = False``) and never shrink, so the base address is
read once and the size is re-read only when a check against the cached size fails.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from typing import Any, Final

from . import fastcall

__all__ = ["GuestMemory", "decode_pairs", "encode_pairs"]

_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_string_at: Final = ctypes.string_at
_memmove: Final = ctypes.memmove


class GuestMemory:
    """One instance's exported ``memory`` plus its allocator (``proxy_on_memory_allocate`` or ``malloc``)."""

    __slots__ = ("_base", "_context", "_memory", "_size", "allocator")

    def __init__(self, context: int, memory: Any, allocator: fastcall.GuestFunc | None) -> None:
        self._context = context
        self._memory = memory
        self._base = fastcall.memory_base(context, memory)
        self._size = fastcall.memory_size(context, memory)
        self.allocator = allocator

    def _ok(self, ptr: int, n: int) -> bool:
        end = ptr + n
        if end <= self._size:
            return True
        self._size = fastcall.memory_size(self._context, self._memory)
        return end <= self._size

    @property
    def size(self) -> int:
        self._size = fastcall.memory_size(self._context, self._memory)
        return self._size

    def read(self, ptr: int, n: int) -> bytes | None:
        if n == 0:
            return b""
        if not self._ok(ptr, n):
            return None
        return _string_at(self._base + ptr, n)

    def write(self, ptr: int, data: bytes) -> bool:
        n = len(data)
        if n == 0:
            return True
        if not self._ok(ptr, n):
            return False
        _memmove(self._base + ptr, data, n)
        return True

    def read_u32(self, ptr: int) -> int | None:
        if not self._ok(ptr, 4):
            return None
        return int(_U32.unpack(_string_at(self._base + ptr, 4))[0])

    def write_u32(self, ptr: int, value: int) -> bool:
        return self.write(ptr, _U32.pack(value & 0xFFFFFFFF))

    def write_u64(self, ptr: int, value: int) -> bool:
        return self.write(ptr, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))

    def allocate(self, n: int) -> int | None:
        """Guest memory for ``n`` bytes, or None when the guest has no allocator or it failed."""
        if self.allocator is None:
            return None
        ptr = self.allocator.call(n)
        if ptr == 0 or not self._ok(ptr, n):
            return None
        return ptr

    def return_bytes(self, data: bytes, ptr_out: int, len_out: int) -> bool:
        """Copy ``data`` into guest-allocated memory and store (ptr, len) at the guest's out-pointers.

        Empty data writes 0/0 without allocating. False on a bad out-pointer or a failed allocation.
        """
        if not (self._ok(ptr_out, 4) and self._ok(len_out, 4)):
            return False
        n = len(data)
        if n == 0:
            return self.write_u32(ptr_out, 0) and self.write_u32(len_out, 0)
        ptr = self.allocate(n)
        if ptr is None:
            return False
        _memmove(self._base + ptr, data, n)
        return self.write_u32(ptr_out, ptr) and self.write_u32(len_out, n)


def encode_pairs(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """u32 N, N x (u32 key_len, u32 value_len), then each key and value followed by a NUL."""
    if not pairs:
        return b""
    head = [_U32.pack(len(pairs))]
    body: list[bytes] = []
    for k, v in pairs:
        head.append(struct.pack("<II", len(k), len(v)))
        body.append(k)
        body.append(b"\0")
        body.append(v)
        body.append(b"\0")
    return b"".join(head) + b"".join(body)


def decode_pairs(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """Inverse of `encode_pairs`; None when malformed. Empty input is an empty map."""
    if len(data) == 0:
        return []
    if len(data) < 4:
        return None
    (n,) = _U32.unpack_from(data, 0)
    if n > (len(data) - 4) // 8:
        return None
    pos = 4 + 8 * n
    out: list[tuple[bytes, bytes]] = []
    for i in range(n):
        klen, vlen = struct.unpack_from("<II", data, 4 + 8 * i)
        end = pos + klen + 1 + vlen + 1
        if end > len(data):
            return None
        k = data[pos : pos + klen]
        v = data[pos + klen + 1 : pos + klen + 1 + vlen]
        out.append((k, v))
        pos = end
    return out
