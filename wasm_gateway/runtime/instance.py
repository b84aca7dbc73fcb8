"""A loaded filter module (linked once) and its instances (each started and configured, own Store).

Lifecycle of an instance (`InstanceState`): NEW -> READY (started, root context configured) -> BUSY (one
stream at a time, owned by a borrower) -> READY ... -> CLOSED. A trap, timeout or protocol error makes it
BROKEN; a broken instance is never reused and its owner closes it.
"""

from __future__ import annotations

import ctypes
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

import wasmtime

from ..exceptions import FilterLoadError, FilterProtocolError, FilterTimeoutError, FilterTrapError
from . import fastcall
from .abi import GUEST_EXPORTS, AbiVersion, detect_abi, export_shapes
from .context import HostState, HttpCallResponse, RequestInfo, StreamContext
from .engine import CachedModule, deadline_ticks
from .fastcall import HOST_STATE, GuestFunc, GuestTrap
from .hostcalls import HOST_TABLES, HostFunction
from .memory import GuestMemory
from .services import FilterServices
from .wasi import WASI_MODULES, WASI_TABLE

__all__ = ["FilterInstance", "FilterModule", "InstanceLimits", "InstanceState"]

_vp = ctypes.c_void_p
_set_fuel: Final = ctypes.CFUNCTYPE(_vp, _vp, ctypes.c_uint64)(("wasmtime_context_set_fuel", fastcall._dll))

ROOT_CONTEXT_ID: Final = 1


class InstanceState(enum.Enum):
    NEW = "new"
    READY = "ready"
    BUSY = "busy"
    BROKEN = "broken"
    CLOSED = "closed"


@dataclass(frozen=True)
class InstanceLimits:
    memory_limit_bytes: int = 64 * 1024 * 1024
    callback_timeout_ms: float = 100.0
    fuel: int = 0  # 0 = off (requires an engine with consume_fuel)


def _as_abort(st: HostState, msg: int, file: int, line: int, col: int) -> None:
    """AssemblyScript's default ``env.abort``: trap with the message (AS strings are UTF-16LE, length at -4)."""

    def as_string(ptr: int) -> str:
        mem = st.memory
        if mem is None or ptr < 4:
            return "?"
        n = mem.read_u32(ptr - 4)
        raw = mem.read(ptr, n) if n is not None and n < 4096 else None
        return raw.decode("utf-16-le", "replace") if raw is not None else "?"

    raise fastcall.HostTrap(f"abort: {as_string(msg)} at {as_string(file)}:{line}:{col}")


_EXTRA_ENV: Final[Mapping[str, HostFunction]] = {
    "abort": ((fastcall.I32,) * 4, (), _as_abort),
}

_LINKERS: dict[tuple[int, AbiVersion], wasmtime.Linker] = {}


def _linker(engine: wasmtime.Engine, abi: AbiVersion) -> wasmtime.Linker:
    """One linker per engine and ABI version, living for the process (its callbacks must never be freed)."""
    key = (ctypes.addressof(engine.ptr().contents), abi)
    linker = _LINKERS.get(key)
    if linker is None:
        linker = wasmtime.Linker(engine)
        for name, (params, results, impl) in {**HOST_TABLES[abi], **_EXTRA_ENV}.items():
            fastcall.define_host_func(linker, "env", name, params, results, impl)
        for module in WASI_MODULES:
            for name, (params, results, impl) in WASI_TABLE.items():
                # WASI answers an errno, not a Proxy-Wasm status, on an internal failure: 29 = EIO.
                fastcall.define_host_func(linker, module, name, params, results, impl, on_error_status=29)
        _LINKERS[key] = linker
    return linker


def _check_imports(module: wasmtime.Module, abi: AbiVersion, path: Path) -> None:
    env = {**HOST_TABLES[abi], **_EXTRA_ENV}
    for imp in module.imports:
        if not isinstance(imp.type, wasmtime.FuncType):
            raise FilterLoadError(
                f"{path}: imports {imp.module}.{imp.name} ({type(imp.type).__name__}); "
                "wasm-gateway provides only functions to filters"
            )
        if imp.module == "env" and imp.name in env:
            continue
        if imp.module in WASI_MODULES and imp.name in WASI_TABLE:
            continue
        raise FilterLoadError(
            f"{path}: imports {imp.module}.{imp.name}, which wasm-gateway does not provide "
            f"(Proxy-Wasm ABI {abi.value} host functions live in 'env', WASI in {' / '.join(WASI_MODULES)})"
        )


class FilterModule:
    """A compiled filter module linked against the host: ABI checked, imports resolved, `InstancePre` built.

    Owned by the filter's pool (closed with it). Every instance of one configured filter comes from here.
    """

    def __init__(
        self,
        cached: CachedModule,
        services: FilterServices,
        limits: InstanceLimits,
        engine: wasmtime.Engine,
    ) -> None:
        self.path = cached.path
        self.cached = cached
        self.services = services
        self.limits = limits
        self.engine = engine
        module = cached.module
        self.abi = detect_abi(module, self.path)
        services.abi = self.abi
        _check_imports(module, self.abi, self.path)
        shapes = export_shapes(module)
        for name, accepted in GUEST_EXPORTS.items():
            shape = shapes.get(name)
            if shape is not None and shape not in accepted:
                raise FilterLoadError(
                    f"{self.path}: export {name} has the wrong signature "
                    f"({shape[0]} params, {shape[1]} results; expected one of {list(accepted)})"
                )
        names = {e.name for e in module.exports}
        if "memory" not in names:
            raise FilterLoadError(f"{self.path}: the module exports no 'memory'")
        if "proxy_on_memory_allocate" in shapes:
            self.allocator = "proxy_on_memory_allocate"
        elif "malloc" in shapes:
            self.allocator = "malloc"
        else:
            raise FilterLoadError(
                f"{self.path}: the module exports neither proxy_on_memory_allocate nor malloc"
            )
        self.shapes = shapes
        try:
            self.pre = _linker(engine, self.abi).instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise FilterLoadError(f"{self.path}: cannot link the module: {exc}") from None
        self.deadline = deadline_ticks(limits.callback_timeout_ms)

    def instantiate(self) -> FilterInstance:
        """A new instance, started and configured (READY). FilterLoadError when any step fails."""
        inst = FilterInstance(self)
        try:
            inst.start()
        except BaseException:
            inst.close()
            raise
        return inst

    def close(self) -> None:
        self.pre.close()


class FilterInstance:
    """One instance of a filter: its own Store (memory, limits), exports, host state and root context."""

    def __init__(self, fm: FilterModule) -> None:
        self.module = fm
        self.name = fm.services.name
        self.state = InstanceState.NEW
        self.requests = 0
        self.last_used = time.monotonic()
        self.next_tick = 0.0
        self.timings: dict[str, float] = {}
        self.host = HostState(fm.services)
        self.host.owner = self
        self._next_context_id = ROOT_CONTEXT_ID + 1
        self._deadline = fm.deadline
        self._fuel = fm.limits.fuel
        t0 = time.perf_counter()
        store = wasmtime.Store(fm.engine)
        store.set_limits(memory_size=fm.limits.memory_limit_bytes)
        self.store: wasmtime.Store | None = store
        ctx = ctypes.addressof(store._context().contents)
        self._ctx = ctx
        self._arm = fastcall.epoch_deadline_setter(ctx, self._deadline)
        self._prepare()
        prev = HOST_STATE.state
        HOST_STATE.state = self.host
        try:
            self._instance = fastcall.instantiate_pre(fm.pre, ctx)
        except GuestTrap as exc:
            store.close()
            self.store = None
            self.state = InstanceState.CLOSED
            raise FilterLoadError(f"{fm.path}: instantiation failed: {exc}", self.name) from None
        finally:
            HOST_STATE.state = prev
        self.timings["instantiate"] = time.perf_counter() - t0
        shapes = fm.shapes

        def func(name: str) -> GuestFunc | None:
            shape = shapes.get(name)
            if shape is None:
                return None
            return fastcall.export_func(ctx, self._instance, name, shape[0], shape[1])

        self.f: dict[str, GuestFunc | None] = {name: func(name) for name in GUEST_EXPORTS}
        self._calls: dict[str, Callable[..., int]] = {n: g.call for n, g in self.f.items() if g is not None}
        memory = fastcall.export_memory(ctx, self._instance)
        assert memory is not None
        self.host.memory = GuestMemory(ctx, memory, self.f[fm.allocator])
        self._req_headers_arity = shapes.get("proxy_on_request_headers", (3, 1))[0]
        self._resp_headers_arity = shapes.get("proxy_on_response_headers", (3, 1))[0]

    # ------------------------------------------------------------------------------------------ calling in

    def _prepare(self) -> None:
        self._arm()
        if self._fuel:
            err = _set_fuel(self._ctx, self._fuel)
            fastcall.raise_error_ptr(err)

    def call(self, name: str, *args: int) -> int | None:
        """Call export ``name`` (None when the module does not export it) under the time/fuel limits.

        Raises FilterTrapError / FilterTimeoutError (instance BROKEN) or FilterProtocolError.
        """
        fn = self._calls.get(name)
        if fn is None:
            return None
        host = self.host
        self._arm()
        if self._fuel:
            _set_fuel(self._ctx, self._fuel)
        prev = HOST_STATE.state
        HOST_STATE.state = host
        try:
            result = fn(*args)
        except GuestTrap as exc:
            self._fail(name, exc)
        finally:
            HOST_STATE.state = prev
        if host.protocol_error is not None:
            self.state = InstanceState.BROKEN
            message = host.protocol_error
            host.protocol_error = None
            raise FilterProtocolError(f"filter {self.name!r}: {name}: {message}", self.name)
        return result

    def _fail(self, callback: str, exc: GuestTrap) -> NoReturn:
        self.state = InstanceState.BROKEN
        if exc.kind == "timeout":
            raise FilterTimeoutError(
                f"filter {self.name!r}: {callback} exceeded its time limit "
                f"({self.module.limits.callback_timeout_ms:g} ms)",
                self.name,
            ) from None
        if exc.kind == "fuel":
            raise FilterTimeoutError(f"filter {self.name!r}: {callback} ran out of fuel", self.name) from None
        code = self.host.exit_code if self.host.exit_code is not None else exc.exit_code
        if code is not None:
            raise FilterTrapError(f"filter {self.name!r}: {callback}: proc_exit({code})", self.name) from None
        raise FilterTrapError(f"filter {self.name!r}: wasm trap in {callback}: {exc}", self.name) from None

    def _root(self) -> None:
        h = self.host
        h.current = None
        h.current_id = ROOT_CONTEXT_ID

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start function, root context, vm_start, configure (Envoy's order). FilterLoadError on failure."""
        fm = self.module
        svc = fm.services
        path = fm.path
        t0 = time.perf_counter()
        try:
            self._root()
            if self.f["_initialize"] is not None:
                self.call("_initialize")
            elif self.f["main"] is not None or self.f["__main_void"] is not None:
                if self.f["__main_void"] is not None:
                    self.call("__main_void")
                else:
                    self.call("main", *([0, 0] if fm.shapes["main"][0] == 2 else []))
            elif self.f["_start"] is not None:
                self._call_start()
            self.call("proxy_on_context_create", ROOT_CONTEXT_ID, 0)
            self._root()
            ok = self.call("proxy_on_vm_start", ROOT_CONTEXT_ID, len(svc.vm_configuration))
            if ok == 0:
                raise FilterLoadError(f"{path}: proxy_on_vm_start returned false", self.name)
            self._root()
            ok = self.call("proxy_on_configure", ROOT_CONTEXT_ID, len(svc.configuration))
            if ok == 0:
                raise FilterLoadError(
                    f"{path}: proxy_on_configure returned false (configuration rejected)", self.name
                )
        except (FilterTrapError, FilterTimeoutError, FilterProtocolError) as exc:
            raise FilterLoadError(f"{path}: start-up failed: {exc}", self.name) from None
        self.timings["start_configure"] = time.perf_counter() - t0
        self.state = InstanceState.READY

    def _call_start(self) -> None:
        # TinyGo's _start may end in proc_exit(0): a clean exit, not a failure.
        try:
            self.call("_start")
        except FilterTrapError:
            if self.host.exit_code == 0:
                self.host.exit_code = None
                self.state = InstanceState.NEW
                return
            raise

    def new_stream(self, info: RequestInfo) -> StreamContext:
        ctx_id = self._next_context_id
        self._next_context_id = ctx_id + 1 if ctx_id < 0x7FFFFFFF else ROOT_CONTEXT_ID + 1
        stream = StreamContext(ctx_id, info)
        self.host.streams[ctx_id] = stream
        self.enter(stream)
        self.call("proxy_on_context_create", ctx_id, ROOT_CONTEXT_ID)
        return stream

    def enter(self, stream: StreamContext) -> None:
        h = self.host
        h.current = stream
        h.current_id = stream.id

    def on_headers(self, stream: StreamContext, response: bool, n: int, eos: bool) -> int:
        self.enter(stream)
        name = "proxy_on_response_headers" if response else "proxy_on_request_headers"
        arity = self._resp_headers_arity if response else self._req_headers_arity
        r = self.call(name, stream.id, n, int(eos)) if arity == 3 else self.call(name, stream.id, n)
        return 0 if r is None else r

    def on_body(self, stream: StreamContext, response: bool, size: int, eos: bool) -> int:
        self.enter(stream)
        r = self.call(
            "proxy_on_response_body" if response else "proxy_on_request_body", stream.id, size, int(eos)
        )
        return 0 if r is None else r

    def on_http_call_response(self, token: int, response: HttpCallResponse | None) -> None:
        h = self.host
        self._root()
        h.http_call_response = response
        if response is None:
            h.status = (1, b"http call failed")
            args = (ROOT_CONTEXT_ID, token, 0, 0, 0)
        else:
            h.status = (0, b"")
            n_headers = len(response.headers) + 1  # + :status
            response.headers = [(":status", str(response.status)), *response.headers]
            args = (ROOT_CONTEXT_ID, token, n_headers, len(response.body), len(response.trailers))
        try:
            self.call("proxy_on_http_call_response", *args)
        finally:
            h.http_call_response = None

    def finish_stream(self, stream: StreamContext) -> None:
        """proxy_on_done, proxy_on_log, proxy_on_delete for ``stream`` (errors leave the instance BROKEN)."""
        try:
            if self.state is InstanceState.BUSY or self.state is InstanceState.READY:
                self.enter(stream)
                self.call("proxy_on_done", stream.id)
                self.enter(stream)
                self.call("proxy_on_log", stream.id)
                self.enter(stream)
                self.call("proxy_on_delete", stream.id)
        finally:
            self.host.streams.pop(stream.id, None)
            self.host.current = None
            self.host.pending_http_calls.clear()

    def tick(self) -> None:
        self._root()
        self.call("proxy_on_tick", ROOT_CONTEXT_ID)

    def queue_ready(self, token: int) -> None:
        self._root()
        self.call("proxy_on_queue_ready", ROOT_CONTEXT_ID, token)

    def close(self) -> None:
        """Free the Store (and with it the instance's memory). Idempotent."""
        self.state = InstanceState.CLOSED
        self.host.memory = None
        self.host.streams.clear()
        self.f = {}
        self._calls = {}
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def export_names(self) -> list[str]:
        return [n for n, f in self.f.items() if f is not None]

    def debug(self) -> dict[str, Any]:
        return {"state": self.state.value, "requests": self.requests, "streams": len(self.host.streams)}
