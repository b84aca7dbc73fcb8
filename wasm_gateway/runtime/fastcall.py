"""The fast path into and out of wasmtime: unchecked calls and unchecked host functions.

wasmtime-py's convenience layer re-reads function types and boxes every value (~18 us per call). This module
binds the C API's unchecked entry points with argument types that take plain Python ints, so a guest call costs
about one foreign call plus a few slot writes, and a host call about one ctypes callback.

Everything here is deliberately small and typed loosely (ctypes): the rest of the runtime talks to it only
through `GuestFunc`, `define_host_func`, `instantiate_pre`, `export_get` and `GuestTrap`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

import wasmtime
from wasmtime import _ffi as ffi

__all__ = [
    "HOST_STATE",
    "I32",
    "I64",
    "GuestFunc",
    "GuestTrap",
    "HostTrap",
    "define_host_func",
    "epoch_deadline_setter",
    "export_func",
    "export_memory",
    "instantiate_pre",
    "memory_base",
    "memory_size",
    "raise_error_ptr",
    "trap_pointer",
]

_log = logging.getLogger("wasm_gateway.runtime")

_dll = ffi.dll
_vp = ctypes.c_void_p
_sz = ctypes.c_size_t

# Own prototypes (not the bindings' function objects, whose argtypes wasmtime-py relies on): plain ints in,
# plain ints out, no POINTER objects built per call.
_func_call_unchecked: Final = ctypes.CFUNCTYPE(_vp, _vp, _vp, _vp, _sz, _vp)(
    ("wasmtime_func_call_unchecked", _dll)
)
_memory_data: Final = ctypes.CFUNCTYPE(_vp, _vp, _vp)(("wasmtime_memory_data", _dll))
_memory_data_size: Final = ctypes.CFUNCTYPE(_sz, _vp, _vp)(("wasmtime_memory_data_size", _dll))
_instance_export_get: Final = ctypes.CFUNCTYPE(ctypes.c_bool, _vp, _vp, ctypes.c_char_p, _sz, _vp)(
    ("wasmtime_instance_export_get", _dll)
)
_instance_pre_instantiate: Final = ctypes.CFUNCTYPE(_vp, _vp, _vp, _vp, _vp)(
    ("wasmtime_instance_pre_instantiate", _dll)
)
_trap_new: Final = ctypes.CFUNCTYPE(_vp, ctypes.c_char_p, _sz)(("wasmtime_trap_new", _dll))
_define_func_unchecked: Final = ctypes.CFUNCTYPE(
    _vp, _vp, ctypes.c_char_p, _sz, ctypes.c_char_p, _sz, _vp, _vp, _vp, _vp
)(("wasmtime_linker_define_func_unchecked", _dll))

# Host callbacks see the argument slots as u32 words: slot i starts at word 4*i (a wasmtime_val_raw_t is 16
# bytes); an i32 argument is word 4*i, already unsigned; an i64 is words 4*i and 4*i+1.
_U32P = ctypes.POINTER(ctypes.c_uint32)
_CALLBACK_T: Final = ctypes.CFUNCTYPE(_vp, _vp, _vp, _U32P, _sz)

I32: Final = 0
I64: Final = 1
_RAW_SIZE: Final = ctypes.sizeof(ffi.wasmtime_val_raw_t)
assert _RAW_SIZE == 16

EXTERN_FUNC: Final = 0
EXTERN_MEMORY: Final = 3


class GuestTrap(Exception):
    """A guest call ended in a trap or error. ``kind`` is 'trap', 'timeout', 'fuel' or 'exit'."""

    def __init__(self, message: str, kind: str = "trap", exit_code: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code


class HostTrap(Exception):
    """Raised by a host function implementation to trap the guest (a broken invariant, proc_exit)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _HostStateSlot(threading.local):
    # The host state of the instance whose guest code runs on this thread. Set by the instance around
    # every entry into the guest; read by every host function. Thread-local because ctypes releases the GIL
    # while Wasm runs, so two threads may each be inside a different instance.
    state: Any = None


HOST_STATE: Final = _HostStateSlot()


def _trap_from_pointers(error: int | None, trap: int | None) -> GuestTrap:
    if trap:
        t = wasmtime.Trap._from_ptr(ctypes.cast(ctypes.c_void_p(trap), ctypes.POINTER(ffi.wasm_trap_t)))
        try:
            message = t.message
            code = t.trap_code
        finally:
            t.close()
        if code == wasmtime.TrapCode.INTERRUPT:
            return GuestTrap(message, "timeout")
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return GuestTrap(message, "fuel")
        return GuestTrap(message, "trap")
    err = wasmtime.WasmtimeError._from_ptr(
        ctypes.cast(ctypes.c_void_p(error), ctypes.POINTER(ffi.wasmtime_error_t))
    )
    try:
        message = str(err)
        if isinstance(err, wasmtime.ExitTrap):
            return GuestTrap(message, "exit", err.code)
    finally:
        err.close()
    return GuestTrap(message, "trap")


def raise_error_ptr(error: int | None) -> None:
    """Raise `GuestTrap` for a non-null ``wasmtime_error_t*`` returned by a C API call."""
    if error:
        raise _trap_from_pointers(error, None)


def _unprototyped(name: str, restype: Any) -> Any:
    # A function pointer without argtypes, called with prebuilt ctypes objects bound by functools.partial:
    # ctypes then skips per-argument conversion, which is most of a call's cost (0.9 -> 0.6 us here).
    address = int(ctypes.cast(getattr(_dll, name), ctypes.c_void_p).value or 0)
    fn = ctypes.cast(ctypes.c_void_p(address), ctypes.CFUNCTYPE(restype))
    fn.argtypes = None  # type: ignore[assignment]
    return fn


_call_unproto: Final = _unprototyped("wasmtime_func_call_unchecked", _vp)
_set_epoch_deadline_unproto: Final = _unprototyped("wasmtime_context_set_epoch_deadline", None)


def epoch_deadline_setter(context: int, ticks: int) -> Callable[[], None]:
    """A no-argument callable that sets the store's epoch deadline ``ticks`` after the current epoch."""
    return functools.partial(_set_epoch_deadline_unproto, ctypes.c_void_p(context), ctypes.c_uint64(ticks))


class GuestFunc:
    """One exported guest function, callable with ints through a preallocated raw-value array.

    i32 results are returned unsigned; callers compare against 0 or mask as they need. The caller must
    pass exactly the function's parameter count (checked at load time against the export's type).
    """

    __slots__ = ("_args", "_call", "_func", "_keep", "_slots", "_trap", "call", "name")

    def __init__(self, context: int, func: Any, n_params: int, n_results: int, name: str) -> None:
        self.name = name
        self._func = func  # keeps the wasmtime_func_t struct alive
        nslots = max(n_params, n_results, 1)
        self._args = (ffi.wasmtime_val_raw_t * nslots)()
        # A u64 view of the same array: slot i is element 2*i (a raw value is 16 bytes).
        self._slots = (ctypes.c_uint64 * (2 * nslots)).from_buffer(self._args)
        self._trap = ctypes.c_void_p()
        bound = (
            ctypes.c_void_p(context),
            ctypes.c_void_p(ctypes.addressof(func)),
            ctypes.c_void_p(ctypes.addressof(self._args)),
            ctypes.c_size_t(nslots),
            ctypes.c_void_p(ctypes.addressof(self._trap)),
        )
        self._keep = bound
        self._call = functools.partial(_call_unproto, *bound)
        # The specialised entry point: call(arg, ...) -> result (u32). Arguments must be non-negative.
        self.call: Callable[..., int] = _specialise(self, n_params)

    def __call__(self, *args: int) -> int:
        return self.call(*args)

    def call_i64(self, *args: int) -> int:
        """Call and return the first result as an unsigned 64-bit value."""
        self.call(*args)
        return int(self._slots[0])


def _specialise(gf: GuestFunc, n_params: int) -> Callable[..., int]:
    """A closure calling ``gf`` with exactly ``n_params`` non-negative int arguments (the hot path)."""
    slots = gf._slots
    raw = gf._call
    trap_box = gf._trap

    def fail(err: int | None) -> NoReturn:
        trap = trap_box.value
        trap_box.value = None
        raise _trap_from_pointers(err, trap)

    if n_params == 0:

        def call0() -> int:
            err = raw()
            if err or trap_box.value:
                fail(err)
            return slots[0] & 0xFFFFFFFF

        return call0
    if n_params == 1:

        def call1(a: int) -> int:
            slots[0] = a
            err = raw()
            if err or trap_box.value:
                fail(err)
            return slots[0] & 0xFFFFFFFF

        return call1
    if n_params == 2:

        def call2(a: int, b: int) -> int:
            slots[0] = a
            slots[2] = b
            err = raw()
            if err or trap_box.value:
                fail(err)
            return slots[0] & 0xFFFFFFFF

        return call2
    if n_params == 3:

        def call3(a: int, b: int, c: int) -> int:
            slots[0] = a
            slots[2] = b
            slots[4] = c
            err = raw()
            if err or trap_box.value:
                fail(err)
            return slots[0] & 0xFFFFFFFF

        return call3

    def calln(*args: int) -> int:
        i = 0
        for a in args:
            slots[i] = a
            i += 2
        err = raw()
        if err or trap_box.value:
            fail(err)
        return slots[0] & 0xFFFFFFFF

    return calln


def trap_pointer(message: str) -> int:
    data = message.encode("utf-8", "replace")
    ptr = _trap_new(data, len(data))
    return int(ptr or 0)


# Callbacks must stay referenced for as long as any linker can call them: linkers live for the process, so
# the callbacks do too.
_KEEP_ALIVE: list[Any] = []

HostImpl = Callable[..., int | None]


def _make_callback(
    impl: HostImpl, params: Sequence[int], has_result: bool, on_error_status: int, label: str
) -> Any:
    slot = HOST_STATE
    n = len(params)
    simple = all(p == I32 for p in params)

    def fail(exc: BaseException, a: Any) -> int:
        if isinstance(exc, HostTrap):
            st = slot.state
            if st is not None and exc.exit_code is not None:
                st.exit_code = exc.exit_code
            return trap_pointer(str(exc))
        _log.error("host function %s failed", label, exc_info=exc)
        if has_result:
            a[0] = on_error_status
            return 0
        return trap_pointer(f"host function {label} failed: {exc!r}")

    cb: Callable[..., int]
    if simple and has_result and n <= 12:
        # Specialised unpacking for the common shapes: only i32 parameters and one i32 result.
        if n == 0:

            def cb(env: int, caller: int, a: Any, _n: int) -> int:
                try:
                    a[0] = impl(slot.state) & 0xFFFFFFFF  # type: ignore[operator]
                    return 0
                except BaseException as exc:
                    return fail(exc, a)
        elif n == 1:

            def cb(env: int, caller: int, a: Any, _n: int) -> int:
                try:
                    a[0] = impl(slot.state, a[0]) & 0xFFFFFFFF  # type: ignore[operator]
                    return 0
                except BaseException as exc:
                    return fail(exc, a)
        elif n == 2:

            def cb(env: int, caller: int, a: Any, _n: int) -> int:
                try:
                    a[0] = impl(slot.state, a[0], a[4]) & 0xFFFFFFFF  # type: ignore[operator]
                    return 0
                except BaseException as exc:
                    return fail(exc, a)
        elif n == 3:

            def cb(env: int, caller: int, a: Any, _n: int) -> int:
                try:
                    a[0] = impl(slot.state, a[0], a[4], a[8]) & 0xFFFFFFFF  # type: ignore[operator]
                    return 0
                except BaseException as exc:
                    return fail(exc, a)
        elif n == 4:

            def cb(env: int, caller: int, a: Any, _n: int) -> int:
                try:
                    a[0] = impl(slot.state, a[0], a[4], a[8], a[12]) & 0xFFFFFFFF  # type: ignore[operator]
                    return 0
                except BaseException as exc:
                    return fail(exc, a)
        else:
            idx = tuple(range(0, 4 * n, 4))

            def cb(env: int, caller: int, a: Any, _n: int) -> int:
                try:
                    a[0] = impl(slot.state, *[a[i] for i in idx]) & 0xFFFFFFFF  # type: ignore[operator]
                    return 0
                except BaseException as exc:
                    return fail(exc, a)
    else:
        kinds = tuple(params)

        def cb(env: int, caller: int, a: Any, _n: int) -> int:
            try:
                vals = []
                for i, k in enumerate(kinds):
                    if k == I32:
                        vals.append(a[4 * i])
                    else:
                        vals.append(a[4 * i] | (a[4 * i + 1] << 32))
                r = impl(slot.state, *vals)
                if has_result:
                    a[0] = (r or 0) & 0xFFFFFFFF
                return 0
            except BaseException as exc:
                return fail(exc, a)

    return _CALLBACK_T(cb)


def define_host_func(
    linker: wasmtime.Linker,
    module: str,
    name: str,
    params: Sequence[int],
    results: Sequence[int],
    impl: HostImpl,
    *,
    on_error_status: int = 10,
) -> None:
    """Define ``module.name`` on ``linker`` as an unchecked host function calling ``impl(state, *args)``.

    ``impl`` gets the calling instance's host state (`HOST_STATE.state`) and the arguments as unsigned ints
    (i64 arguments as unsigned 64-bit); it returns the i32 result (or None when there is no result). A
    `HostTrap` traps the guest; any other exception is logged and answered with ``on_error_status``.
    """
    vt = {I32: wasmtime.ValType.i32(), I64: wasmtime.ValType.i64()}
    functype = wasmtime.FuncType([vt[p] for p in params], [vt[r] for r in results])
    cb = _make_callback(impl, params, bool(results), on_error_status, f"{module}.{name}")
    _KEEP_ALIVE.append(cb)
    m = module.encode()
    n = name.encode()
    err = _define_func_unchecked(
        ctypes.addressof(linker.ptr().contents),
        m,
        len(m),
        n,
        len(n),
        ctypes.addressof(functype.ptr().contents),
        ctypes.cast(cb, ctypes.c_void_p).value,
        None,
        None,
    )
    raise_error_ptr(err)


def instantiate_pre(pre: wasmtime.InstancePre, context: int) -> Any:
    """Instantiate ``pre`` in the store whose context address is ``context``; returns the raw instance."""
    instance = ffi.wasmtime_instance_t()
    trap = ctypes.c_void_p()
    err = _instance_pre_instantiate(
        ctypes.addressof(pre.ptr().contents), context, ctypes.addressof(instance), ctypes.addressof(trap)
    )
    if err or trap.value:
        raise _trap_from_pointers(err, trap.value)
    return instance


def _export_get(context: int, instance: Any, name: str) -> Any | None:
    item = ffi.wasmtime_extern_t()
    n = name.encode()
    if not _instance_export_get(context, ctypes.addressof(instance), n, len(n), ctypes.addressof(item)):
        return None
    return item


def export_func(context: int, instance: Any, name: str, n_params: int, n_results: int) -> GuestFunc | None:
    item = _export_get(context, instance, name)
    if item is None or item.kind != EXTERN_FUNC:
        return None
    return GuestFunc(context, item.of.func, n_params, n_results, name)


def export_memory(context: int, instance: Any, name: str = "memory") -> Any | None:
    item = _export_get(context, instance, name)
    if item is None or item.kind != EXTERN_MEMORY:
        return None
    return item.of.memory


def memory_base(context: int, memory: Any) -> int:
    return int(_memory_data(context, ctypes.addressof(memory)) or 0)


def memory_size(context: int, memory: Any) -> int:
    return int(_memory_data_size(context, ctypes.addressof(memory)))
