"""A loaded filter module (linked once) and its instances (each started and configured, own Store).

Lifecycle of an instance (`InstanceState`): NEW -> READY (started, root context configured) -> BUSY (one
stream at a time, owned by a borrower) -> READY ... -> CLOSED. A trap, timeout or protocol error makes it
BROKEN; a broken instance is never reused and its owner closes it.
"""

from __future__ import annotations

import ctypes
import enum
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

import wasmtime

from ..exceptions import FilterLoadError, FilterProtocolError, FilterTimeoutError, FilterTrapError
from . import fastcall, trampoline, wasmsummary
from .abi import GUEST_EXPORTS, AbiVersion, detect_abi, export_shapes
from .context import HostState, HttpCallResponse, RequestInfo, StreamContext
from .engine import CachedModule, EngineSettings, calls_hold_gil, deadline_ticks
from .fastcall import HOST_STATE, GuestFunc, GuestTrap
from .hostcalls import HOST_TABLES, HostFunction
from .memory import GuestMemory
from .services import FilterServices
from .wasi import WASI_MODULES, WASI_TABLE, parse_preopens, wasi_table

__all__ = ["FilterInstance", "FilterModule", "InstanceLimits", "InstanceState"]

_vp = ctypes.c_void_p
_set_fuel: Final = ctypes.CFUNCTYPE(_vp, _vp, ctypes.c_uint64)(("wasmtime_context_set_fuel", fastcall._dll))

ROOT_CONTEXT_ID: Final = 1
_OPEN_NAME: Final = "proxy_on_context_create/proxy_on_request_headers"
_CLOSE_NAME: Final = "proxy_on_done/proxy_on_log/proxy_on_delete"
_monotonic: Final = time.monotonic


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
            for name, (params, results, impl) in wasi_table(module).items():
                # WASI answers an errno, not a Proxy-Wasm status, on an internal failure: 29 = EIO.
                fastcall.define_host_func(linker, module, name, params, results, impl, on_error_status=29)
        _LINKERS[key] = linker
    return linker


def _check_imports(imports: Sequence[tuple[str, str, str | None]], abi: AbiVersion, path: Path) -> None:
    """``imports``: (module, name, the type's name when it is not a function)."""
    env = {**HOST_TABLES[abi], **_EXTRA_ENV}
    for module, name, not_a_function in imports:
        if not_a_function is not None:
            raise FilterLoadError(
                f"{path}: imports {module}.{name} ({not_a_function}); "
                "wasm-gateway provides only functions to filters"
            )
        if module == "env" and name in env:
            continue
        if module in WASI_MODULES and name in WASI_TABLE:
            continue
        raise FilterLoadError(
            f"{path}: imports {module}.{name}, which wasm-gateway does not provide "
            f"(Proxy-Wasm ABI {abi.value} host functions live in 'env', WASI in {' / '.join(WASI_MODULES)})"
        )


def _facts(
    cached: CachedModule,
) -> tuple[Collection[str], list[tuple[str, str, str | None]], dict[str, tuple[int, int]]]:
    """(export names, imports, shapes of the exports the host calls), from the module's bytes when they
    were read (see wasmsummary), else from wasmtime (precompiled files)."""
    summary = cached.summary()
    if summary is not None:
        imports = [
            (m, n, None if kind == wasmsummary.FUNC else wasmsummary.EXTERN_KIND_NAMES[kind])
            for m, n, kind in summary.imports
        ]
        shapes: dict[str, tuple[int, int]] = {}
        for name in GUEST_EXPORTS:
            export = summary.exports.get(name)
            if export is None or export[1] is None:
                continue
            sig = export[1]
            i32 = wasmsummary.I32
            if all(t == i32 for t in sig.params) and all(t == i32 for t in sig.results):
                shapes[name] = (len(sig.params), len(sig.results))
            else:
                shapes[name] = (-1, -1)
        return summary.exports.keys(), imports, shapes
    module = cached.module
    # wasmtime-py builds these lists anew on every access: take them once.
    exports = {e.name: e for e in module.exports}
    imports = [
        (
            i.module or "",
            i.name or "",
            None if isinstance(i.type, wasmtime.FuncType) else type(i.type).__name__,
        )
        for i in module.imports
    ]
    return exports.keys(), imports, export_shapes(module, exports=exports, only=GUEST_EXPORTS)


_BUSY: Final = InstanceState.BUSY
_READY: Final = InstanceState.READY


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
        *,
        settings: EngineSettings | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        """``settings`` are ``engine``'s (they key the helper module's cache entry under ``cache_dir``)."""
        self.path = cached.path
        self.cached = cached
        self.services = services
        self.limits = limits
        self.engine = engine
        module = cached.module
        # Shapes: of the exports the host calls (the only ones whose types matter here).
        exports, imports, shapes = _facts(cached)
        self.abi = detect_abi(
            module, self.path, export_names=exports, import_names=[(m, n) for m, n, _ in imports]
        )
        services.abi = self.abi
        _check_imports(imports, self.abi, self.path)
        for name, accepted in GUEST_EXPORTS.items():
            shape = shapes.get(name)
            if shape is not None and shape not in accepted:
                raise FilterLoadError(
                    f"{self.path}: export {name} has the wrong signature "
                    f"({shape[0]} params, {shape[1]} results; expected one of {list(accepted)})"
                )
        if "memory" not in exports:
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
        # The exports the host may call, in GUEST_EXPORTS order (each instance looks these up).
        self.callable_exports = tuple(name for name in GUEST_EXPORTS if name in shapes)
        try:
            self.pre = _linker(engine, self.abi).instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise FilterLoadError(f"{self.path}: cannot link the module: {exc}") from None
        try:
            services.preopens = parse_preopens(services.allowed_dirs)
        except ValueError as exc:
            raise FilterLoadError(f"{self.path}: {exc}") from None
        self.deadline = deadline_ticks(limits.callback_timeout_ms)
        self.hold_gil = calls_hold_gil(engine)
        self.helper = trampoline.helper_pre(engine, settings or EngineSettings(), cache_dir)

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

    __slots__ = (
        "_calls",
        "_close",
        "_context_create",
        "_ctx",
        "_fuel",
        "_funcs",
        "_guest",
        "_helper",
        "_instance",
        "_next_context_id",
        "_shapes",
        "body_entries",
        "headers_entries",
        "host",
        "last_used",
        "module",
        "name",
        "next_tick",
        "open_entry",
        "requests",
        "state",
        "store",
        "timings",
    )

    def __init__(self, fm: FilterModule) -> None:
        self.module = fm
        self.name = fm.services.name
        self.state = InstanceState.NEW
        self.requests = 0
        self.last_used = time.monotonic()
        self.next_tick = 0.0
        self.timings: dict[str, float] = {}
        host = self.host = HostState(fm.services, fm.limits.callback_timeout_ms / 1000)
        host.owner = self
        self._next_context_id = ROOT_CONTEXT_ID + 1
        self._fuel = fm.limits.fuel
        t0 = time.perf_counter()
        store = wasmtime.Store(fm.engine)
        store.set_limits(memory_size=fm.limits.memory_limit_bytes)
        self.store: wasmtime.Store | None = store
        ctx = ctypes.addressof(store._context().contents)
        self._ctx = ctx
        # Time limits: the deadline callback extends or interrupts (see fastcall); no per-call deadline.
        fastcall.install_deadline_callback(store, ctx, fm.deadline)
        if self._fuel:
            fastcall.raise_error_ptr(_set_fuel(ctx, self._fuel))
        prev = HOST_STATE.state
        HOST_STATE.state = host
        host.entered = time.monotonic()
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
        # Exports are looked up now (cheap) and wrapped as GuestFuncs and entries on first use: most are
        # called rarely or never, and every object built here counts in cold start and resident memory.
        self._funcs: dict[str, Any] = {}  # export name -> its wasmtime_func_t (kept alive by the extern)
        self._shapes: dict[str, tuple[int, int]] = dict(fm.shapes)
        for name in fm.callable_exports:
            item = fastcall.export_extern(ctx, self._instance, name)
            if item is not None:
                self._funcs[name] = item.of.func
        self._guest: dict[str, GuestFunc] = {}
        self._calls: dict[str, Callable[..., int]] = {}
        memory = fastcall.export_memory(ctx, self._instance)
        assert memory is not None
        host.memory = GuestMemory(ctx, memory, None)
        host.memory.allocate_raw = self._first_allocation
        tramp = {n: f for n, f in self._funcs.items()}
        if fm.shapes.get("proxy_on_request_headers", (3, 1))[0] == 2:
            tramp["proxy_on_request_headers/0.1"] = tramp.pop("proxy_on_request_headers")
        # context_create + request_headers and done + log + delete, each in one entry (see trampoline).
        helper = trampoline.Trampoline(fm.helper, ctx, tramp)
        self._funcs[_OPEN_NAME] = helper.open
        self._funcs[_CLOSE_NAME] = helper.close
        self._shapes[_OPEN_NAME] = (4, 1)
        self._shapes[_CLOSE_NAME] = (1, 1)
        self._helper: trampoline.Trampoline | None = helper
        lazy = self._lazy_entry
        # The per-request entries (None: not exported, so never called), each built on its first call.
        # (id, root id, n, eos) -> action: create + request headers (the driver calls it directly)
        self.open_entry = lazy(_OPEN_NAME, lambda fn: setattr(self, "open_entry", fn))
        # (id) -> proxy_on_done's result, then log + delete
        self._close = lazy(_CLOSE_NAME, lambda fn: setattr(self, "_close", fn))
        self._context_create = lazy(
            "proxy_on_context_create", lambda fn: setattr(self, "_context_create", fn)
        )
        # (stream id, n, eos) -> action, per direction.
        self.headers_entries: list[Callable[..., int] | None] = [None, None]
        self.headers_entries[0] = lazy("proxy_on_request_headers", self._set_entry(self.headers_entries, 0))
        self.headers_entries[1] = lazy("proxy_on_response_headers", self._set_entry(self.headers_entries, 1))
        # (stream id, size, eos) -> action, per direction.
        self.body_entries: list[Callable[..., int] | None] = [None, None]
        self.body_entries[0] = lazy("proxy_on_request_body", self._set_entry(self.body_entries, 0))
        self.body_entries[1] = lazy("proxy_on_response_body", self._set_entry(self.body_entries, 1))

    @staticmethod
    def _set_entry(
        table: list[Callable[..., int] | None], index: int
    ) -> Callable[[Callable[..., int]], None]:
        def put(fn: Callable[..., int]) -> None:
            table[index] = fn

        return put

    def guest(self, name: str) -> GuestFunc | None:
        """The export ``name`` as a GuestFunc (built on first use), or None when not exported."""
        g = self._guest.get(name)
        if g is None:
            func = self._funcs.get(name)
            if func is None:
                return None
            n_params, n_results = self._shapes[name]
            g = GuestFunc(self._ctx, func, n_params, n_results, name, hold_gil=self.module.hold_gil)
            self._guest[name] = g
        return g

    def _first_allocation(self, n: int) -> int:
        gf = self.guest(self.module.allocator)
        assert gf is not None and self.host.memory is not None
        self.host.memory.allocate_raw = gf.call
        return gf.call(n)

    def _lazy_entry(
        self, name: str, install: Callable[[Callable[..., int]], None]
    ) -> Callable[..., int] | None:
        """A stand-in for the entry of export ``name`` that builds it on its first call and ``install``s it
        in the stand-in's place; None when the module does not export ``name``."""
        if name not in self._funcs:
            return None
        headers_2 = name in ("proxy_on_request_headers", "proxy_on_response_headers") and (
            self._shapes[name][0] == 2
        )

        def first_call(*args: int) -> int:
            fn = self._entry(name, self.guest(name))
            assert fn is not None
            if headers_2:  # ABI 0.1.0 headers callbacks take no end_of_stream
                inner = fn

                def fn(sid: int, n: int, eos: int) -> int:
                    return inner(sid, n)

            install(fn)
            return fn(*args)

        return first_call

    def _entry(self, name: str, gf: GuestFunc | None) -> Callable[..., int] | None:
        if gf is None:
            return None

        def on_trap(exc: GuestTrap) -> NoReturn:
            self._fail(name, exc)

        def on_protocol_error() -> None:
            self._protocol_failure(name)

        fn = gf.entry(self.host, on_trap, on_protocol_error)
        if not self._fuel:
            return fn
        ctx = self._ctx
        fuel = self._fuel

        def fueled(*args: int) -> int:
            _set_fuel(ctx, fuel)
            return fn(*args)

        return fueled

    # ------------------------------------------------------------------------------------------ calling in

    def call(self, name: str, *args: int) -> int | None:
        """Call export ``name`` (None when the module does not export it) under the time/fuel limits.

        Raises FilterTrapError / FilterTimeoutError (instance BROKEN) or FilterProtocolError.
        """
        fn = self._calls.get(name)
        if fn is None:
            gf = self.guest(name)
            if gf is None:
                return None
            fn = self._calls[name] = gf.call
        return self._invoke(name, fn, *args)

    def _invoke(self, name: str, fn: Callable[..., int], *args: int) -> int:
        """Enter the guest: ``fn(*args)`` with this instance's host state current and its clock started."""
        host = self.host
        slot = HOST_STATE
        prev = slot.state
        slot.state = host
        host.entered = _monotonic()
        if self._fuel:
            _set_fuel(self._ctx, self._fuel)
        try:
            result = fn(*args)
        except GuestTrap as exc:
            self._fail(name, exc)
        finally:
            slot.state = prev
        if host.protocol_error is not None:
            self._protocol_failure(name)
        return result

    def _protocol_failure(self, callback: str) -> NoReturn:
        self.state = InstanceState.BROKEN
        host = self.host
        message = host.protocol_error
        host.protocol_error = None
        raise FilterProtocolError(f"filter {self.name!r}: {callback}: {message}", self.name)

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

    def _reasons(self) -> str:
        """The warning/error lines the filter logged during start-up, for a load error's message."""
        lines = [message for level, message in self.host.logs or () if level >= 3]
        return ": " + "; ".join(lines[-5:]) if lines else ""

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
        collected = self.host.logs
        if collected is None:
            self.host.logs = []  # what the filter logs while starting explains a refusal
        try:
            self._root()
            funcs = self._funcs
            if "_initialize" in funcs:
                self.call("_initialize")
            elif "main" in funcs or "__main_void" in funcs:
                if "__main_void" in funcs:
                    self.call("__main_void")
                else:
                    self.call("main", *([0, 0] if fm.shapes["main"][0] == 2 else []))
            elif "_start" in funcs:
                self._call_start()
            self.call("proxy_on_context_create", ROOT_CONTEXT_ID, 0)
            self._root()
            ok = self.call("proxy_on_vm_start", ROOT_CONTEXT_ID, len(svc.vm_configuration))
            if ok == 0:
                raise FilterLoadError(f"{path}: proxy_on_vm_start returned false{self._reasons()}", self.name)
            self._root()
            ok = self.call("proxy_on_configure", ROOT_CONTEXT_ID, len(svc.configuration))
            if ok == 0:
                raise FilterLoadError(
                    f"{path}: proxy_on_configure returned false (configuration rejected){self._reasons()}",
                    self.name,
                )
        except (FilterTrapError, FilterTimeoutError, FilterProtocolError) as exc:
            raise FilterLoadError(f"{path}: start-up failed: {exc}{self._reasons()}", self.name) from None
        finally:
            if collected is None:
                self.host.logs = None
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
        """A stream context, created in the guest now (`proxy_on_context_create`)."""
        stream = self.attach_stream(info)
        self._create(stream)
        return stream

    def attach_stream(self, info: RequestInfo) -> StreamContext:
        """A stream context for the next request; the guest creates it with the stream's first callback."""
        ctx_id = self._next_context_id
        self._next_context_id = ctx_id + 1 if ctx_id < 0x7FFFFFFF else ROOT_CONTEXT_ID + 1
        stream = StreamContext(ctx_id, info)
        self.host.streams[ctx_id] = stream
        return stream

    def _create(self, stream: StreamContext) -> None:
        h = self.host
        h.current = stream
        h.current_id = stream.id
        stream.created = True
        fn = self._context_create
        if fn is not None:
            fn(stream.id, ROOT_CONTEXT_ID)

    def enter(self, stream: StreamContext) -> None:
        h = self.host
        h.current = stream
        h.current_id = stream.id

    def on_headers(self, stream: StreamContext, response: bool, n: int, eos: bool) -> int:
        h = self.host
        if not stream.created:
            if not response:
                # The stream's first callback: create it and deliver the headers in one entry.
                stream.created = True
                h.current = stream
                h.current_id = stream.id
                return self.open_entry(stream.id, ROOT_CONTEXT_ID, n, eos)  # type: ignore[misc]
            self._create(stream)
        fn = self.headers_entries[response]
        if fn is None:
            return 0
        h.current = stream
        h.current_id = stream.id
        return fn(stream.id, n, eos)

    def on_body(self, stream: StreamContext, response: bool, size: int, eos: bool) -> int:
        if not stream.created:
            self._create(stream)
        fn = self.body_entries[response]
        if fn is None:
            return 0
        h = self.host
        h.current = stream
        h.current_id = stream.id
        return fn(stream.id, size, eos)

    def exports_body_callback(self, response: bool) -> bool:
        return self.body_entries[response] is not None

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

    def finish_stream(self, stream: StreamContext) -> bool:
        """proxy_on_done, then proxy_on_log and proxy_on_delete for ``stream`` (errors leave the instance
        BROKEN). False when proxy_on_done answered false: the filter finishes the stream later with
        proxy_done(), and the owner calls `complete_stream` then (the stream stays known until it does).

        Nothing is called for a stream the guest never saw (no callback created it).
        """
        h = self.host
        sid = stream.id
        deferred = False
        try:
            state = self.state
            if stream.created and (state is _BUSY or state is _READY):
                h.current = stream
                h.current_id = sid
                deferred = self._close(sid) == 0  # type: ignore[misc]
        finally:
            h.current = None
            if not deferred:
                h.streams.pop(sid, None)
                if h.pending_http_calls:
                    h.pending_http_calls.clear()
        return not deferred

    def complete_stream(self, stream: StreamContext) -> None:
        """proxy_on_log and proxy_on_delete for a stream whose proxy_on_done answered false."""
        h = self.host
        try:
            state = self.state
            if state is _BUSY or state is _READY:
                for name in ("proxy_on_log", "proxy_on_delete"):
                    self.enter(stream)
                    self.call(name, stream.id)
        finally:
            h.streams.pop(stream.id, None)
            h.current = None
            h.pending_http_calls.clear()

    def tick(self) -> None:
        self._root()
        self.call("proxy_on_tick", ROOT_CONTEXT_ID)

    def queue_ready(self, token: int) -> None:
        self._root()
        self.call("proxy_on_queue_ready", ROOT_CONTEXT_ID, token)

    def close(self) -> None:
        """Free the Store (and with it the instance's memory). Idempotent."""
        self.state = InstanceState.CLOSED
        if self.host.files is not None:
            self.host.files.close()
            self.host.files = None
        if self.host.memory is not None:
            self.host.memory.close()
        self.host.memory = None
        self.host.streams.clear()
        self._funcs = {}
        self._guest = {}
        self._calls = {}
        self._context_create = self.open_entry = self._close = None
        self._helper = None
        self.headers_entries = [None, None]
        self.body_entries = [None, None]
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def export_names(self) -> list[str]:
        return [n for n in self._funcs if n not in (_OPEN_NAME, _CLOSE_NAME)]

    def debug(self) -> dict[str, Any]:
        return {"state": self.state.value, "requests": self.requests, "streams": len(self.host.streams)}
