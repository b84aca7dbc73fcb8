"""Bounds-checked access to a guest's linear memory, the guest allocator, and the pairs wire format.

Every pointer and length coming from the guest is checked against the memory's current size before it is
touched; a bad one is reported as ``None`` / ``False`` so host functions answer INVALID_MEMORY_ACCESS.
Memories never move (the engine sets ``memory_may_move = False``) and never shrink, so one memoryview over
the memory is valid until the memory grows: it is rebuilt only when a check against its length fails. Its
length is also a second bound: slicing or packing past it can never reach beyond the guest's memory.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from typing import Any, Final

from . import fastcall

__all__ = ["GuestMemory", "decode_pairs", "encode_pairs", "pack_u32"]

_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_pack_u32: Final = _U32.pack_into
pack_u32: Final = _pack_u32  # (buffer, offset, value): for host calls that inline their memory access
_pack_u64: Final = _U64.pack_into
_unpack_u32: Final = _U32.unpack_from


def _view(base: int, size: int) -> memoryview:
    if size <= 0 or not base:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * size).from_address(base)).cast("B")


class GuestMemory:
    """One instance's exported ``memory`` plus its allocator (``proxy_on_memory_allocate`` or ``malloc``).

    ``view`` is a byte view of the memory as large as it was when last checked; `fits` refreshes it.
    """

    __slots__ = ("_base", "_closed", "_context", "_memory", "allocate_raw", "allocator", "view")

    def __init__(self, context: int, memory: Any, allocator: fastcall.GuestFunc | None) -> None:
        self._context = context
        self._memory = memory
        self._base = fastcall.memory_base(context, memory)
        self.view = _view(self._base, fastcall.memory_size(context, memory))
        self.allocator = allocator
        self.allocate_raw = allocator.call if allocator is not None else None
        self._closed = False

    def fits(self, end: int) -> bool:
        """Whether bytes up to ``end`` are inside the memory (re-reading its size once when not)."""
        if end <= len(self.view):
            return True
        size = fastcall.memory_size(self._context, self._memory)
        if size > len(self.view):
            self.view = _view(self._base, size)
        return end <= size

    @property
    def size(self) -> int:
        self.fits(0)
        return len(self.view)

    def current_size(self) -> int:
        """The memory's size now, re-read (it may have grown since `view` was taken); 0 once closed."""
        if self._closed:
            return 0
        return fastcall.memory_size(self._context, self._memory)

    def close(self) -> None:
        """Drop the view (the memory goes away with its store)."""
        self._closed = True
        self.view = memoryview(bytearray())
        self.allocator = None
        self.allocate_raw = None

    def read(self, ptr: int, n: int) -> bytes | None:
        end = ptr + n
        if end > len(self.view) and not self.fits(end):
            return None
        return self.view[ptr:end].tobytes()

    def read_latin1(self, ptr: int, n: int) -> str | None:
        end = ptr + n
        if end > len(self.view) and not self.fits(end):
            return None
        return str(self.view[ptr:end], "latin-1")

    def write(self, ptr: int, data: bytes | bytearray) -> bool:
        end = ptr + len(data)
        if end > len(self.view) and not self.fits(end):
            return False
        self.view[ptr:end] = data
        return True

    def read_u32(self, ptr: int) -> int | None:
        if ptr + 4 > len(self.view) and not self.fits(ptr + 4):
            return None
        return int(_unpack_u32(self.view, ptr)[0])

    def write_u32(self, ptr: int, value: int) -> bool:
        if ptr + 4 > len(self.view) and not self.fits(ptr + 4):
            return False
        _pack_u32(self.view, ptr, value & 0xFFFFFFFF)
        return True

    def write_u64(self, ptr: int, value: int) -> bool:
        if ptr + 8 > len(self.view) and not self.fits(ptr + 8):
            return False
        _pack_u64(self.view, ptr, value & 0xFFFFFFFFFFFFFFFF)
        return True

    def allocate(self, n: int) -> int | None:
        """Guest memory for ``n`` bytes, or None when the guest has no allocator or it failed."""
        alloc = self.allocate_raw
        if alloc is None:
            return None
        ptr = alloc(n)
        if ptr == 0 or (ptr + n > len(self.view) and not self.fits(ptr + n)):
            return None
        return ptr

    def return_bytes(self, data: bytes, ptr_out: int, len_out: int) -> bool:
        """Copy ``data`` into guest-allocated memory and store (ptr, len) at the guest's out-pointers.

        Empty data writes 0/0 without allocating. False on a bad out-pointer or a failed allocation.
        """
        top = (ptr_out if ptr_out > len_out else len_out) + 4
        if top > len(self.view) and not self.fits(top):
            return False
        n = len(data)
        if n == 0:
            ptr = 0
        else:
            alloc = self.allocate_raw
            if alloc is None:
                return False
            ptr = alloc(n)
            end = ptr + n
            if ptr == 0 or (end > len(self.view) and not self.fits(end)):
                return False
            self.view[ptr:end] = data
        view = self.view
        _pack_u32(view, ptr_out, ptr)
        _pack_u32(view, len_out, n)
        return True


def encode_pairs(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """u32 N, N x (u32 key_len, u32 value_len), then each key and value followed by a NUL."""
    if not pairs:
        return b""
    sizes: list[int] = [len(pairs)]
    body: list[bytes] = []
    for k, v in pairs:
        sizes.append(len(k))
        sizes.append(len(v))
        body.append(k)
        body.append(v)
    body.append(b"")
    return struct.pack(f"<{len(sizes)}I", *sizes) + b"\0".join(body)


def decode_pairs(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """Inverse of `encode_pairs`; None when malformed. Empty input is an empty map."""
    if len(data) == 0:
        return []
    if len(data) < 4:
        return None
    (n,) = _U32.unpack_from(data, 0)
    if n > (len(data) - 4) // 8:
        return None
    sizes = struct.unpack_from(f"<{2 * n}I", data, 4)
    pos = 4 + 8 * n
    out: list[tuple[bytes, bytes]] = []
    for i in range(n):
        klen = sizes[2 * i]
        vlen = sizes[2 * i + 1]
        end = pos + klen + 1 + vlen + 1
        if end > len(data):
            return None
        out.append((data[pos : pos + klen], data[pos + klen + 1 : end - 1]))
        pos = end
    return out
