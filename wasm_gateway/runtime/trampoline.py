"""A tiny helper module, instantiated next to each filter instance, that chains guest callbacks in one entry.

Entering the guest from Python costs about a microsecond (one foreign call); a Wasm-to-Wasm call costs
nanoseconds. Envoy's order calls some callbacks back to back with nothing for the host to do in between, so
the helper does those sequences inside Wasm:

- ``open(id, root, n, eos)``: ``proxy_on_context_create(id, root)`` then ``proxy_on_request_headers``;
- ``close(id)``: ``proxy_on_done(id)``, and when it returns true, ``proxy_on_log(id)`` and
  ``proxy_on_delete(id)``; returns what ``proxy_on_done`` returned.

The helper reaches the filter's exports through a funcref table filled at instantiation (a null slot is an
export the filter does not have, and is skipped). It is generated here as text and compiled by wasmtime at
run time (once per engine, cached on disk with the filter modules): nothing is shipped prebuilt.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any, Final

import wasmtime
from wasmtime import _ffi as ffi

from . import fastcall
from .engine import EngineSettings, cache_entry_path, read_cache_entry, write_cache_entry

__all__ = ["SLOTS", "Trampoline", "helper_pre"]

_log = logging.getLogger("wasm_gateway.runtime")

# Table slot of each filter export the helper calls, with the arity it is called with.
SLOTS: Final[dict[str, int]] = {
    "proxy_on_context_create": 0,
    "proxy_on_request_headers": 1,  # (id, n, eos) -> action
    "proxy_on_request_headers/0.1": 2,  # (id, n) -> action (ABI 0.1.0)
    "proxy_on_done": 3,
    "proxy_on_log": 4,
    "proxy_on_delete": 5,
}

_WAT: Final = """(module
  (type $v_ii (func (param i32 i32)))
  (type $i_iii (func (param i32 i32 i32) (result i32)))
  (type $i_ii (func (param i32 i32) (result i32)))
  (type $i_i (func (param i32) (result i32)))
  (type $v_i (func (param i32)))
  (table $t (export "slots") 6 funcref)
  (func (export "open") (param $id i32) (param $root i32) (param $n i32) (param $eos i32) (result i32)
    (if (i32.eqz (ref.is_null (table.get $t (i32.const 0))))
      (then (call_indirect $t (type $v_ii) (local.get $id) (local.get $root) (i32.const 0))))
    (if (i32.eqz (ref.is_null (table.get $t (i32.const 1))))
      (then (return
        (call_indirect $t (type $i_iii) (local.get $id) (local.get $n) (local.get $eos) (i32.const 1)))))
    (if (i32.eqz (ref.is_null (table.get $t (i32.const 2))))
      (then (return (call_indirect $t (type $i_ii) (local.get $id) (local.get $n) (i32.const 2)))))
    (i32.const 0))
  (func (export "close") (param $id i32) (result i32)
    (if (i32.eqz (ref.is_null (table.get $t (i32.const 3))))
      (then (if (i32.eqz (call_indirect $t (type $i_i) (local.get $id) (i32.const 3)))
              (then (return (i32.const 0))))))
    (if (i32.eqz (ref.is_null (table.get $t (i32.const 4))))
      (then (call_indirect $t (type $v_i) (local.get $id) (i32.const 4))))
    (if (i32.eqz (ref.is_null (table.get $t (i32.const 5))))
      (then (call_indirect $t (type $v_i) (local.get $id) (i32.const 5))))
    (i32.const 1))
)"""

_EXTERN_TABLE: Final = 2
_WASMTIME_FUNCREF: Final = 5

_vp = ctypes.c_void_p
_table_set: Final = ctypes.CFUNCTYPE(_vp, _vp, _vp, ctypes.c_uint64, _vp)(
    ("wasmtime_table_set", fastcall._dll)
)
_instance_export_get: Final = fastcall._instance_export_get

_PRES: dict[int, wasmtime.InstancePre] = {}
_LOCK = threading.Lock()


def _compile(engine: wasmtime.Engine, settings: EngineSettings, cache_dir: Path | None) -> wasmtime.Module:
    wasm = bytes(wasmtime.wat2wasm(_WAT))
    sha = hashlib.sha256(wasm).hexdigest()
    entry = cache_entry_path(cache_dir, sha, settings) if cache_dir is not None else None
    if entry is not None:
        module = read_cache_entry(engine, entry, sha, settings)
        if module is not None:
            return module
    module = wasmtime.Module(engine, wasm)
    if entry is not None:
        write_cache_entry(entry, sha, settings, module)
    return module


def helper_pre(
    engine: wasmtime.Engine, settings: EngineSettings, cache_dir: str | Path | None
) -> wasmtime.InstancePre:
    """The helper, ready to instantiate in any store of ``engine`` (built once per engine)."""
    key = ctypes.addressof(engine.ptr().contents)
    with _LOCK:
        pre = _PRES.get(key)
        if pre is None:
            module = _compile(engine, settings, Path(cache_dir) if cache_dir is not None else None)
            pre = wasmtime.Linker(engine).instantiate_pre(module)
            _PRES[key] = pre
        return pre


class Trampoline:
    """The helper's instance in one filter instance's store, its table filled with that instance's exports.

    ``open`` and ``close`` are the helper's exported functions (``wasmtime_func_t``), for the caller to
    wrap as guest entries.
    """

    __slots__ = ("close", "open")

    def __init__(self, pre: wasmtime.InstancePre, context: int, exports: dict[str, Any]) -> None:
        instance = fastcall.instantiate_pre(pre, context)
        table = ffi.wasmtime_extern_t()
        if not _instance_export_get(
            context, ctypes.addressof(instance), b"slots", 5, ctypes.addressof(table)
        ):
            raise RuntimeError("trampoline: no 'slots' table")
        if int(table.kind) != _EXTERN_TABLE:
            raise RuntimeError("trampoline: 'slots' is not a table")
        table_addr = ctypes.addressof(table.of.table)
        val = ffi.wasmtime_val_t()
        val.kind = _WASMTIME_FUNCREF  # type: ignore[assignment]
        for name, slot in SLOTS.items():
            func = exports.get(name)
            if func is None:
                continue
            val.of.funcref = func
            fastcall.raise_error_ptr(_table_set(context, table_addr, slot, ctypes.addressof(val)))
        opener = fastcall.export_extern(context, instance, "open")
        closer = fastcall.export_extern(context, instance, "close")
        assert opener is not None and closer is not None
        self.open = opener.of.func  # open(id, root, n_headers, eos) -> action
        self.close = closer.of.func  # close(id) -> proxy_on_done's result
