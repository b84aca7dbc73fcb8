"""The fast path into and out of wasmtime: unchecked calls, unchecked host functions, epoch deadlines.

wasmtime-py's convenience layer re-reads function types and boxes every value (~18 us per call). This module
binds the C API's unchecked entry points so a guest call costs about one foreign call, and a host call about
one ctypes callback. What keeps them cheap:

- Guest calls go through a function pointer without argtypes, bound (functools.partial) to prebuilt ctypes
  arguments: ctypes skips per-argument conversion.
- When the engine's epoch ticker is a native timer (`start_native_ticker`), guest calls keep the GIL
  (PYFUNCTYPE): no GIL hand-off on the way in, and host callbacks find the GIL already held. A spinning
  guest is still interrupted, because the ticker needs no Python. Without a native ticker the calls release
  the GIL (CFUNCTYPE) so the Python ticker thread can run.
- Host callbacks take the argument array as a plain address and unpack every argument with one
  ``struct.unpack_from`` over a view of the address space (`_ADDRESS_SPACE`), instead of building a ctypes
  pointer object per call.
- Time limits use an epoch-deadline callback per store (`install_deadline_callback`) instead of setting a
  deadline before every call: the deadline is extended (or the call interrupted) only when the epoch
  actually reaches it.

The rest of the runtime talks to this module only through `GuestFunc`, `define_host_func`,
`instantiate_pre`, `export_func` / `export_memory`, the deadline/ticker functions and `GuestTrap`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn, Protocol

import wasmtime
from wasmtime import _ffi as ffi

__all__ = [
    "ARGS",
    "HOST_STATE",
    "I32",
    "I64",
    "DeadlineState",
    "EntryState",
    "GuestFunc",
    "GuestTrap",
    "HostTrap",
    "NativeTicker",
    "args_unpacker",
    "define_host_func",
    "export_extern",
    "export_func",
    "export_memory",
    "host_call_failed",
    "install_deadline_callback",
    "instantiate_pre",
    "memory_base",
    "memory_size",
    "put_result",
    "raise_error_ptr",
    "raw_host_call",
    "start_native_ticker",
    "trap_pointer",
]

_log = logging.getLogger("wasm_gateway.runtime")

_dll = ffi.dll
_vp = ctypes.c_void_p
_sz = ctypes.c_size_t

# Own prototypes (not the bindings' function objects, whose argtypes wasmtime-py relies on): plain ints in,
# plain ints out, no POINTER objects built per call.
_memory_data: Final = ctypes.CFUNCTYPE(_vp, _vp, _vp)(("wasmtime_memory_data", _dll))
_memory_data_size: Final = ctypes.CFUNCTYPE(_sz, _vp, _vp)(("wasmtime_memory_data_size", _dll))
_instance_export_get: Final = ctypes.CFUNCTYPE(ctypes.c_bool, _vp, _vp, ctypes.c_char_p, _sz, _vp)(
    ("wasmtime_instance_export_get", _dll)
)
_instance_pre_instantiate: Final = ctypes.CFUNCTYPE(_vp, _vp, _vp, _vp, _vp)(
    ("wasmtime_instance_pre_instantiate", _dll)
)
_trap_new: Final = ctypes.CFUNCTYPE(_vp, ctypes.c_char_p, _sz)(("wasmtime_trap_new", _dll))
_error_new: Final = ctypes.CFUNCTYPE(_vp, ctypes.c_char_p)(("wasmtime_error_new", _dll))
_define_func_unchecked: Final = ctypes.CFUNCTYPE(
    _vp, _vp, ctypes.c_char_p, _sz, ctypes.c_char_p, _sz, _vp, _vp, _vp, _vp
)(("wasmtime_linker_define_func_unchecked", _dll))
_set_epoch_deadline: Final = ctypes.CFUNCTYPE(None, _vp, ctypes.c_uint64)(
    ("wasmtime_context_set_epoch_deadline", _dll)
)
_engine_clone: Final = ctypes.CFUNCTYPE(_vp, _vp)(("wasmtime_engine_clone", _dll))
# (context, env, *epoch_deadline_delta, *update_kind) -> wasmtime_error_t*
_DEADLINE_CB_T: Final = ctypes.CFUNCTYPE(_vp, _vp, _vp, _vp, _vp)
_store_deadline_callback: Final = ctypes.CFUNCTYPE(None, _vp, _DEADLINE_CB_T, _vp, _vp)(
    ("wasmtime_store_epoch_deadline_callback", _dll)
)

# Host callbacks: (env, caller, args_and_results address, count) -> trap pointer or 0. Slot i of the array
# starts at byte 16*i (a wasmtime_val_raw_t is 16 bytes); an i32 is its low 4 bytes, an i64 its low 8.
# Only the array address is used: the other three are declared c_bool, which ctypes converts to the
# True/False singletons instead of allocating an int per argument per call.
_CALLBACK_T: Final = ctypes.CFUNCTYPE(_vp, ctypes.c_bool, ctypes.c_bool, _vp, ctypes.c_bool)

I32: Final = 0
I64: Final = 1
_RAW_SIZE: Final = ctypes.sizeof(ffi.wasmtime_val_raw_t)
assert _RAW_SIZE == 16

EXTERN_FUNC: Final = 0
EXTERN_MEMORY: Final = 3

_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")

# A byte view of the whole address space, used only at addresses wasmtime hands to a host callback (the
# argument/result array of that call, the deadline callback's out-parameters). Reading arguments through it
# costs one unpack_from; a ctypes pointer object per call costs four times as much. Guest memory is never
# accessed through it (`memory.GuestMemory` has a bounded view per instance).
_ADDRESS_SPACE: Final = memoryview((ctypes.c_ubyte * (1 << 62)).from_address(0)).cast("B")


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
    # every entry into the guest; read by every host function. Thread-local because two threads may each be
    # inside a different instance (the GIL is released during guest code when there is no native ticker).
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
    if _DEADLINE_MESSAGE in message:
        return GuestTrap(message, "timeout")
    return GuestTrap(message, "trap")


def raise_error_ptr(error: int | None) -> None:
    """Raise `GuestTrap` for a non-null ``wasmtime_error_t*`` returned by a C API call."""
    if error:
        raise _trap_from_pointers(error, None)


# ---------------------------------------------------------------------------------------------- epoch ticker


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):
    # Linux `struct sigevent` (64 bytes): sigval, signo, notify, then the SIGEV_THREAD function/attributes.
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("sigev_notify_function", ctypes.c_void_p),
        ("sigev_notify_attributes", ctypes.c_void_p),
        ("_pad", ctypes.c_byte * 32),
    ]


_SIGEV_THREAD: Final = 2
_CLOCK_MONOTONIC: Final = 1


class NativeTicker:
    """A POSIX timer that calls ``wasmtime_engine_increment_epoch(engine)`` itself, from a libc thread.

    ``void f(union sigval)`` and ``void wasmtime_engine_increment_epoch(const wasm_engine_t*)`` take one
    pointer-sized argument in the same register, so the timer can call wasmtime directly: no Python, no GIL.
    The timer targets a clone of the engine that is never freed, so a late tick can never touch freed memory.
    """

    def __init__(self, timer_id: ctypes.c_void_p, libc: Any) -> None:
        self._timer_id = timer_id
        self._libc = libc

    def stop(self) -> None:
        if self._timer_id.value is not None:
            self._libc.timer_delete(self._timer_id)
            self._timer_id = ctypes.c_void_p()


def start_native_ticker(engine: wasmtime.Engine, period_seconds: float) -> NativeTicker | None:
    """Advance ``engine``'s epoch every ``period_seconds`` without Python; None when unavailable."""
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timer_create = libc.timer_create
        timer_settime = libc.timer_settime
    except (OSError, AttributeError):
        return None
    timer_create.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.timer_delete.argtypes = [ctypes.c_void_p]
    target = _engine_clone(ctypes.addressof(engine.ptr().contents))  # deliberately never deleted
    if not target:
        return None
    event = _Sigevent()
    event.sigev_value = target
    event.sigev_notify = _SIGEV_THREAD
    event.sigev_notify_function = ctypes.cast(_dll.wasmtime_engine_increment_epoch, ctypes.c_void_p).value
    timer_id = ctypes.c_void_p()
    if timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer_id)) != 0:
        return None
    sec = int(period_seconds)
    nsec = int((period_seconds - sec) * 1e9)
    spec = _Itimerspec(_Timespec(sec, nsec), _Timespec(sec, nsec))
    if timer_settime(timer_id, 0, ctypes.byref(spec), None) != 0:
        libc.timer_delete(timer_id)
        return None
    return NativeTicker(timer_id, libc)


# ---------------------------------------------------------------------------------------------- deadlines


class DeadlineState(Protocol):
    def epoch_deadline_reached(self) -> int:
        """Ticks to extend the running call's deadline by, or 0 to interrupt it (time limit exceeded)."""
        ...


_DEADLINE_MESSAGE: Final = "wasm-gateway: callback time limit exceeded"
_UNOWNED_TICKS: Final = 1


def _on_epoch_deadline(context: int, env: int, delta_ptr: int, kind_ptr: int) -> int:
    st = HOST_STATE.state
    try:
        ticks = st.epoch_deadline_reached() if st is not None else _UNOWNED_TICKS
    except BaseException:
        _log.exception("epoch deadline callback failed")
        ticks = 0
    if ticks <= 0:
        return int(_error_new(_DEADLINE_MESSAGE.encode()) or 0)
    _U64.pack_into(_ADDRESS_SPACE, delta_ptr, ticks)
    _ADDRESS_SPACE[kind_ptr] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
    return 0


_DEADLINE_CB: Final = _DEADLINE_CB_T(_on_epoch_deadline)


def install_deadline_callback(store: wasmtime.Store, context: int, initial_ticks: int) -> None:
    """Time limits for ``store``: when the epoch reaches its deadline, ask the running instance's host state.

    The running instance is the one in `HOST_STATE` (set around every entry into the guest); its
    ``epoch_deadline_reached`` decides to extend or to interrupt. No per-call deadline setting is needed.
    """
    _store_deadline_callback(ctypes.addressof(store.ptr().contents), _DEADLINE_CB, None, None)
    _set_epoch_deadline(context, initial_ticks)


# ---------------------------------------------------------------------------------------------- guest calls


def _unprototyped(name: str, restype: Any, hold_gil: bool) -> Any:
    # A function pointer without argtypes, called with prebuilt ctypes objects bound by functools.partial:
    # ctypes then skips per-argument conversion, which is most of a call's cost.
    address = int(ctypes.cast(getattr(_dll, name), ctypes.c_void_p).value or 0)
    proto = ctypes.PYFUNCTYPE(restype) if hold_gil else ctypes.CFUNCTYPE(restype)
    fn = ctypes.cast(ctypes.c_void_p(address), proto)
    fn.argtypes = None  # type: ignore[assignment]
    return fn


def _word(value: int) -> Any:
    """A prebuilt argument passing ``value`` as one machine word.

    ctypes converts every ctypes-instance argument on every call (a lookup and a temporary object per
    argument); a ``byref()`` argument object is copied as is. Arguments here are all pointers or size_t,
    which travel in the same integer registers, so a "pointer" whose value is ``value`` passes ``value``.
    """
    return ctypes.byref(ctypes.c_char.from_address(value))


_CALL_RELEASING_GIL: Final = _unprototyped("wasmtime_func_call_unchecked", _vp, hold_gil=False)
_CALL_HOLDING_GIL: Final = _unprototyped("wasmtime_func_call_unchecked", _vp, hold_gil=True)


class GuestFunc:
    """One exported guest function, callable with ints through a preallocated raw-value array.

    i32 results are returned unsigned; callers compare against 0 or mask as they need. The caller must
    pass exactly the function's parameter count (checked at load time against the export's type), as
    non-negative ints below 2**32.
    """

    __slots__ = ("_args", "_call", "_func", "_keep", "_slots", "_trap", "call", "n_params", "name")

    def __init__(
        self, context: int, func: Any, n_params: int, n_results: int, name: str, *, hold_gil: bool = False
    ) -> None:
        self.name = name
        self.n_params = n_params
        self._func = func  # keeps the wasmtime_func_t struct alive
        nslots = max(n_params, n_results, 1)
        self._args = (ffi.wasmtime_val_raw_t * nslots)()
        # A u64 view of the same array: slot i is element 2*i (a raw value is 16 bytes).
        self._slots = (ctypes.c_uint64 * (2 * nslots)).from_buffer(self._args)
        self._trap = ctypes.c_void_p()
        # byref() arguments hold their objects: whoever holds `call` keeps the function struct, the value
        # array and the trap box alive (the store itself is kept by the instance that owns this export).
        bound = (
            _word(context),
            ctypes.byref(func),
            ctypes.byref(self._args),
            _word(nslots),
            ctypes.byref(self._trap),
        )
        self._keep = bound
        raw = _CALL_HOLDING_GIL if hold_gil else _CALL_RELEASING_GIL
        self._call = functools.partial(raw, *bound)
        # The specialised entry point: call(arg, ...) -> result (u32).
        self.call: Callable[..., int] = _specialise(self, n_params)

    def __call__(self, *args: int) -> int:
        return self.call(*args)

    def entry(
        self,
        state: EntryState,
        on_trap: Callable[[GuestTrap], NoReturn],
        on_protocol_error: Callable[[], None],
    ) -> Callable[..., int]:
        """A top-level entry into the guest: `call`, plus what every entry needs, in one Python frame.

        Makes ``state`` the current host state (`HOST_STATE`) for the call, starts its time limit
        (``state.entered``) and calls; a trap goes to ``on_trap`` (which raises) and a protocol error
        recorded during the call to ``on_protocol_error`` (which raises). The host state is not restored
        afterwards: entries never nest (host calls never enter another instance), and every entry sets it.
        """
        return _specialise_entry(self, state, on_trap, on_protocol_error)

    def call_i64(self, *args: int) -> int:
        """Call and return the first result as an unsigned 64-bit value."""
        self.call(*args)
        return int(self._slots[0])


def _specialise(gf: GuestFunc, n_params: int) -> Callable[..., int]:
    """A closure calling ``gf`` with exactly ``n_params`` int arguments (the hot path)."""
    raw = gf._call
    trap_box = gf._trap
    view = memoryview(gf._args).cast("B")
    slots = view.cast("I")  # u32 words: slot i's i32 is word 4*i
    pack = struct.Struct("<" + "I12x" * (n_params - 1) + "I").pack_into if n_params > 1 else _U32.pack_into

    def fail(err: int | None) -> NoReturn:
        trap = trap_box.value
        trap_box.value = None
        raise _trap_from_pointers(err, trap)

    if n_params == 0:

        def call0() -> int:
            err = raw()
            if err or trap_box.value:
                fail(err)
            return slots[0]

        return call0
    if n_params == 1:

        def call1(a: int) -> int:
            slots[0] = a
            err = raw()
            if err or trap_box.value:
                fail(err)
            return slots[0]

        return call1
    if n_params == 2:

        def call2(a: int, b: int) -> int:
            pack(view, 0, a, b)
            err = raw()
            if err or trap_box.value:
                fail(err)
            return slots[0]

        return call2
    if n_params == 3:

        def call3(a: int, b: int, c: int) -> int:
            pack(view, 0, a, b, c)
            err = raw()
            if err or trap_box.value:
                fail(err)
            return slots[0]

        return call3

    def calln(*args: int) -> int:
        pack(view, 0, *args)
        err = raw()
        if err or trap_box.value:
            fail(err)
        return slots[0]

    return calln


class EntryState(Protocol):
    entered: float
    protocol_error: str | None


def _specialise_entry(
    gf: GuestFunc,
    state: EntryState,
    on_trap: Callable[[GuestTrap], NoReturn],
    on_protocol_error: Callable[[], None],
) -> Callable[..., int]:
    raw = gf._call
    trap_box = gf._trap
    view = memoryview(gf._args).cast("B")
    slots = view.cast("I")  # u32 words: slot i's i32 is word 4*i
    slot = HOST_STATE
    clock = time.monotonic
    n_params = gf.n_params
    pack = struct.Struct("<" + "I12x" * (n_params - 1) + "I").pack_into if n_params else None

    def fail(err: int | None) -> NoReturn:
        trap = trap_box.value
        trap_box.value = None
        on_trap(_trap_from_pointers(err, trap))

    if n_params == 1:

        def entry1(a: int) -> int:
            slot.state = state
            state.entered = clock()
            slots[0] = a
            err = raw()
            if err or trap_box.value:
                fail(err)
            if state.protocol_error is not None:
                on_protocol_error()
            return slots[0]

        return entry1
    if n_params == 2:

        def entry2(a: int, b: int) -> int:
            slot.state = state
            state.entered = clock()
            pack(view, 0, a, b)  # type: ignore[misc]
            err = raw()
            if err or trap_box.value:
                fail(err)
            if state.protocol_error is not None:
                on_protocol_error()
            return slots[0]

        return entry2
    if n_params == 3:

        def entry3(a: int, b: int, c: int) -> int:
            slot.state = state
            state.entered = clock()
            pack(view, 0, a, b, c)  # type: ignore[misc]
            err = raw()
            if err or trap_box.value:
                fail(err)
            if state.protocol_error is not None:
                on_protocol_error()
            return slots[0]

        return entry3
    if n_params == 4:

        def entry4(a: int, b: int, c: int, d: int) -> int:
            slot.state = state
            state.entered = clock()
            pack(view, 0, a, b, c, d)  # type: ignore[misc]
            err = raw()
            if err or trap_box.value:
                fail(err)
            if state.protocol_error is not None:
                on_protocol_error()
            return slots[0]

        return entry4

    def entryn(*args: int) -> int:
        slot.state = state
        state.entered = clock()
        if pack is not None:
            pack(view, 0, *args)
        err = raw()
        if err or trap_box.value:
            fail(err)
        if state.protocol_error is not None:
            on_protocol_error()
        return slots[0]

    return entryn


def trap_pointer(message: str) -> int:
    data = message.encode("utf-8", "replace")
    ptr = _trap_new(data, len(data))
    return int(ptr or 0)


# ---------------------------------------------------------------------------------------------- host functions

# Callbacks must stay referenced for as long as any linker can call them: linkers live for the process, so
# the callbacks do too.
_KEEP_ALIVE: list[Any] = []

HostImpl = Callable[..., int | None]
RawHostCall = Callable[[bool, bool, int, bool], int]

# What raw host calls need to read their arguments and write their result themselves.
ARGS: Final = _ADDRESS_SPACE
put_result: Final = _U32.pack_into  # put_result(ARGS, a, status)


def args_unpacker(n_i32: int) -> Callable[[memoryview, int], tuple[int, ...]]:
    """``unpack(ARGS, a)``: the ``n_i32`` i32 arguments of a host call, as unsigned ints."""
    return _args_struct((I32,) * n_i32).unpack_from


def raw_host_call(fn: RawHostCall) -> RawHostCall:
    """Mark ``fn(env, caller, a, n) -> 0 | trap pointer`` as a complete callback: it reads its arguments
    (``args_unpacker``), finds its host state (`HOST_STATE`), writes its result (``put_result``) and catches
    everything itself (`host_call_failed`). One Python frame per call instead of two: for the hottest calls."""
    fn.__raw_host_call__ = True  # type: ignore[attr-defined]
    return fn


def host_call_failed(exc: BaseException, a: int | None, status: int, label: str) -> int:
    """What a raw host call returns from its ``except BaseException`` (see `_make_callback`'s ``fail``)."""
    if isinstance(exc, HostTrap):
        st = HOST_STATE.state
        if st is not None and exc.exit_code is not None:
            st.exit_code = exc.exit_code
        return trap_pointer(str(exc))
    _log.error("host function %s failed", label, exc_info=exc)
    if a:
        _U32.pack_into(_ADDRESS_SPACE, a, status)
        return 0
    return trap_pointer(f"host function {label} failed: {exc!r}")


def _args_struct(params: Sequence[int]) -> struct.Struct:
    """Unpacks every argument of a host call from its raw-value array in one call."""
    fmt = "".join("I12x" if p == I32 else "Q8x" for p in params)
    return struct.Struct("<" + fmt.removesuffix("12x").removesuffix("8x"))


def _make_callback(
    impl: HostImpl, params: Sequence[int], has_result: bool, on_error_status: int, label: str
) -> Any:
    slot = HOST_STATE
    space = _ADDRESS_SPACE
    put = _U32.pack_into
    unpack = _args_struct(params).unpack_from

    def fail(exc: BaseException, a: int | None) -> int:
        if isinstance(exc, HostTrap):
            st = slot.state
            if st is not None and exc.exit_code is not None:
                st.exit_code = exc.exit_code
            return trap_pointer(str(exc))
        _log.error("host function %s failed", label, exc_info=exc)
        if has_result and a:
            put(space, a, on_error_status)
            return 0
        return trap_pointer(f"host function {label} failed: {exc!r}")

    cb: Callable[[bool, bool, int, bool], int]
    if getattr(impl, "__raw_host_call__", False):
        return _CALLBACK_T(impl)
    n = len(params)
    # Arity-specialised: `impl(st, x, y, z)` is an inlined Python-to-Python call in 3.11, `impl(st, *t)` is not.
    if has_result and n == 0:

        def cb(env: bool, caller: bool, a: int, _n: bool) -> int:
            try:
                put(space, a, impl(slot.state) & 0xFFFFFFFF)  # type: ignore[operator]
                return 0
            except BaseException as exc:
                return fail(exc, a)

    elif has_result and n == 1:

        def cb(env: bool, caller: bool, a: int, _n: bool) -> int:
            try:
                (x,) = unpack(space, a)
                put(space, a, impl(slot.state, x) & 0xFFFFFFFF)  # type: ignore[operator]
                return 0
            except BaseException as exc:
                return fail(exc, a)

    elif has_result and n == 2:

        def cb(env: bool, caller: bool, a: int, _n: bool) -> int:
            try:
                x, y = unpack(space, a)
                put(space, a, impl(slot.state, x, y) & 0xFFFFFFFF)  # type: ignore[operator]
                return 0
            except BaseException as exc:
                return fail(exc, a)

    elif has_result and n == 3:

        def cb(env: bool, caller: bool, a: int, _n: bool) -> int:
            try:
                x, y, z = unpack(space, a)
                put(space, a, impl(slot.state, x, y, z) & 0xFFFFFFFF)  # type: ignore[operator]
                return 0
            except BaseException as exc:
                return fail(exc, a)

    elif has_result and n == 4:

        def cb(env: bool, caller: bool, a: int, _n: bool) -> int:
            try:
                x, y, z, w = unpack(space, a)
                put(space, a, impl(slot.state, x, y, z, w) & 0xFFFFFFFF)  # type: ignore[operator]
                return 0
            except BaseException as exc:
                return fail(exc, a)

    elif has_result and n == 5:

        def cb(env: bool, caller: bool, a: int, _n: bool) -> int:
            try:
                x, y, z, w, v = unpack(space, a)
                put(space, a, impl(slot.state, x, y, z, w, v) & 0xFFFFFFFF)  # type: ignore[operator]
                return 0
            except BaseException as exc:
                return fail(exc, a)

    elif has_result:

        def cb(env: bool, caller: bool, a: int, _n: bool) -> int:
            try:
                put(space, a, impl(slot.state, *unpack(space, a)) & 0xFFFFFFFF)  # type: ignore[operator]
                return 0
            except BaseException as exc:
                return fail(exc, a)

    elif n:

        def cb(env: bool, caller: bool, a: int, _n: bool) -> int:
            try:
                impl(slot.state, *unpack(space, a))
                return 0
            except BaseException as exc:
                return fail(exc, a)

    else:

        def cb(env: bool, caller: bool, a: int, _n: bool) -> int:
            try:
                impl(slot.state)
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


# ---------------------------------------------------------------------------------------------- instances


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


def export_extern(context: int, instance: Any, name: str) -> Any | None:
    """The export ``name`` of ``instance`` as a ``wasmtime_extern_t`` (None when there is none)."""
    return _export_get(context, instance, name)


def export_func(
    context: int, instance: Any, name: str, n_params: int, n_results: int, *, hold_gil: bool = False
) -> GuestFunc | None:
    item = _export_get(context, instance, name)
    if item is None or item.kind != EXTERN_FUNC:
        return None
    return GuestFunc(context, item.of.func, n_params, n_results, name, hold_gil=hold_gil)


def export_memory(context: int, instance: Any, name: str = "memory") -> Any | None:
    item = _export_get(context, instance, name)
    if item is None or item.kind != EXTERN_MEMORY:
        return None
    return item.of.memory


def memory_base(context: int, memory: Any) -> int:
    return int(_memory_data(context, ctypes.addressof(memory)) or 0)


def memory_size(context: int, memory: Any) -> int:
    return int(_memory_data_size(context, ctypes.addressof(memory)))
