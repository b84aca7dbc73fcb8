"""Running a route's filters over one request: the API the request path uses.

Build once at start-up::

    runtime = FilterRuntime.load(specs, cache_dir=..., http_call=fetch)   # FilterLoadError on a bad module
    chain = runtime.chain(["auth", "headers"])                           # per route, reusable

Per request::

    stream = chain.start(RequestInfo(source_address=..., ...))
    try:
        d = await stream.on_request_headers(headers, end_of_stream)      # headers incl. :method :path ...
        ...  d.kind is CONTINUE -> forward d.headers (when not None) and d.body;
        ...  STOP -> nothing to forward yet, feed more body; RESPOND -> answer d.response, stop.
        d = await stream.on_request_body(chunk, end_of_stream)           # for each chunk
        d = await stream.on_response_headers(headers_with_status, end_of_stream)
        d = await stream.on_response_body(chunk, end_of_stream)
    finally:
        stream.finish()                                                  # always; also on client disconnect

Semantics follow Envoy: request filters run in route order, response filters in reverse. PAUSE on headers
holds the headers (the filter still sees the body); PAUSE on a body callback buffers (bounded: 413 for a
request, 502 for a response past ``max_buffer_bytes``); ``proxy_continue_stream`` or a local response ends a
pause; `proxy_http_call`s made by a paused filter are performed here (through the gateway's ``http_call``
function) and answered with ``proxy_on_http_call_response`` before the stream moves on. A filter that fails
(trap, timeout, invalid header, pool timeout) is handled by its failure policy: ``fail_closed`` answers 503
JSON and nothing of that filter's partial edit is applied; ``fail_open`` passes on exactly what the filter
received, and the rest of the request bypasses it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn, Protocol

import orjson

from ..exceptions import FilterError, FilterLoadError, FilterPoolTimeout, FilterProtocolError
from .abi import AbiVersion, LogLevel
from .context import (
    Headers,
    HttpCallRequest,
    HttpCallResponse,
    LocalResponse,
    PendingHttpCall,
    RequestInfo,
    StreamContext,
)
from .engine import EngineSettings, get_engine, load_module
from .instance import FilterInstance, FilterModule, InstanceLimits, InstanceState
from .pool import InstancePool, PoolSettings
from .services import FilterServices, LogSink, SharedServices, default_log_sink

__all__ = [
    "ChainStream",
    "Decision",
    "DecisionKind",
    "FilterChain",
    "FilterRuntime",
    "FilterSpec",
    "HttpCallFn",
    "RuntimeObserver",
]

_log = logging.getLogger("wasm_gateway.runtime")

HttpCallFn = Callable[[HttpCallRequest], Awaitable[HttpCallResponse]]
"""Performs a filter's outbound call to a named upstream. Raise (anything) for a failed call; the chain
applies ``request.timeout_ms``."""

_LEVELS: Mapping[str, LogLevel] = {
    "trace": LogLevel.TRACE,
    "debug": LogLevel.DEBUG,
    "info": LogLevel.INFO,
    "warn": LogLevel.WARN,
    "warning": LogLevel.WARN,
    "error": LogLevel.ERROR,
    "critical": LogLevel.CRITICAL,
}


@dataclass(frozen=True)
class FilterSpec:
    """One configured filter (the gateway's config builds these)."""

    name: str
    module_path: str | Path
    configuration: bytes = b""
    root_id: str = ""
    vm_configuration: bytes = b""
    vm_id: str = ""
    failure_policy: Literal["fail_closed", "fail_open"] = "fail_closed"
    pool_min: int = 1
    pool_max: int = 64
    pool_idle_seconds: float = 60.0
    pool_recycle_after: int = 0
    pool_borrow_timeout: float = 1.0
    memory_limit_bytes: int = 64 * 1024 * 1024
    callback_timeout_ms: float = 100.0
    fuel: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    allowed_dirs: Sequence[str] = ()
    log_level: str = "info"
    upstreams: frozenset[str] | None = None  # names http_call may target; None = any (http_call decides)


class RuntimeObserver(Protocol):
    """Hooks for metrics (the gateway implements them with Prometheus); every method must be cheap."""

    def cold_start(self, filter_name: str, phase: str, seconds: float) -> None: ...
    def callback(self, filter_name: str, phase: str, seconds: float) -> None: ...
    def fault(self, filter_name: str, kind: str) -> None: ...
    def policy(self, filter_name: str, decision: str) -> None: ...


class _NullObserver:
    def cold_start(self, filter_name: str, phase: str, seconds: float) -> None:
        pass

    def callback(self, filter_name: str, phase: str, seconds: float) -> None:
        pass

    def fault(self, filter_name: str, kind: str) -> None:
        pass

    def policy(self, filter_name: str, decision: str) -> None:
        pass


class DecisionKind(enum.Enum):
    CONTINUE = "continue"  # forward `headers` (if not None) and `body` now
    STOP = "stop"  # nothing to forward yet: keep feeding data
    RESPOND = "respond"  # answer `response` to the client; stop processing this request


@dataclass
class Decision:
    kind: DecisionKind
    headers: Headers | None = None  # released headers (request: with :method/:path/...; response: :status)
    body: bytes = b""  # body bytes released now
    end_of_stream: bool = False  # the released data ends this direction
    response: LocalResponse | None = None
    error: FilterError | None = None  # the failure behind a RESPOND 503 (fail_closed)
    failed_open: tuple[str, ...] = ()  # filters bypassed by fail_open during this step


_STOP = Decision(DecisionKind.STOP)


class _Stage:
    """One filter's part of one request, in both directions."""

    __slots__ = ("dirs", "disabled", "instance", "pool", "spec", "stream")

    def __init__(self, spec: FilterSpec, pool: InstancePool) -> None:
        self.spec = spec
        self.pool = pool
        self.instance: FilterInstance | None = None
        self.stream: StreamContext | None = None
        self.disabled = False
        self.dirs = (_Direction(), _Direction())


class _Direction:
    __slots__ = ("eos_seen", "headers_eos", "headers_released", "in_body", "in_headers", "started")

    def __init__(self) -> None:
        self.started = False
        self.headers_released = False
        self.headers_eos = False
        self.eos_seen = False
        self.in_headers: Headers = []  # what this stage received (passed on as-is under fail_open)
        self.in_body = bytearray()  # received body not yet released


# (headers, None, eos) or (None, body chunk, eos)
_Event = tuple[Headers | None, bytes | None, bool]


class _Respond(Exception):
    def __init__(self, decision: Decision) -> None:
        self.decision = decision


def _error_response(error: FilterError, filter_name: str) -> LocalResponse:
    body = orjson.dumps({"error": "filter_failed", "filter": filter_name, "status": 503})
    return LocalResponse(503, [("content-type", "application/json")], body, details="filter_failed")


class ChainStream:
    """One request through a chain. Not thread-safe; one task drives it. Always call `finish`."""

    def __init__(self, chain: FilterChain, info: RequestInfo) -> None:
        self._chain = chain
        self._info = info
        self._stages = [_Stage(spec, pool) for spec, pool in chain.entries]
        self._reversed = self._stages[::-1]
        self._observer = chain.runtime.observer
        self._finished = False
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------------------------------ public

    async def on_request_headers(self, headers: Headers, end_of_stream: bool) -> Decision:
        return await self._step(False, headers, b"", end_of_stream)

    async def on_request_body(self, chunk: bytes, end_of_stream: bool) -> Decision:
        return await self._step(False, None, chunk, end_of_stream)

    async def on_response_headers(self, headers: Headers, end_of_stream: bool) -> Decision:
        return await self._step(True, headers, b"", end_of_stream)

    async def on_response_body(self, chunk: bytes, end_of_stream: bool) -> Decision:
        return await self._step(True, None, chunk, end_of_stream)

    def finish(self) -> None:
        """done/log/delete on every filter that saw the request; instances go back to their pools."""
        if self._finished:
            return
        self._finished = True
        for task in self._background:
            task.cancel()
        for stage in self._stages:
            inst = stage.instance
            if inst is None:
                continue
            stage.instance = None
            try:
                if stage.stream is not None and not stage.disabled:
                    inst.finish_stream(stage.stream)
            except FilterError as exc:
                self._fault(stage, exc)
            except Exception:
                _log.exception("filter %r: finishing the stream failed", stage.spec.name)
                inst.state = InstanceState.BROKEN
            finally:
                stage.pool.give_back(inst)

    # ------------------------------------------------------------------------------------------ driver

    async def _step(self, response: bool, headers: Headers | None, chunk: bytes, eos: bool) -> Decision:
        """Pass one event through the stages in order; only http_calls and pool waits leave the fast path."""
        if self._finished:
            raise RuntimeError("ChainStream used after finish()")
        stages = self._reversed if response else self._stages
        events: list[_Event] = [(headers, None, eos) if headers is not None else (None, chunk, eos)]
        failed_open: list[str] = []
        try:
            for stage in stages:
                if stage.disabled:
                    continue
                d = stage.dirs[1 if response else 0]
                released: list[_Event] = []
                for idx, (h, body, e) in enumerate(events):
                    try:
                        if stage.instance is None:
                            await self._borrow(stage)
                        out = self._run_stage(stage, d, response, h, body, e)
                        while out is None:  # http_calls pending while paused
                            await self._perform_pending(stage)
                            out = self._settle(stage, response, paused=True)
                    except FilterError as exc:
                        # fail_closed raises _Respond; fail_open passes on what the filter was given.
                        released.extend(self._apply_policy(stage, d, exc, h, body, e))
                        released.extend(events[idx + 1 :])
                        failed_open.append(stage.spec.name)
                        break
                    released.extend(out)
                events = released
                if not events:
                    break
        except _Respond as r:
            r.decision.failed_open = tuple(failed_open)
            return r.decision
        if not events:
            return Decision(DecisionKind.STOP, failed_open=tuple(failed_open)) if failed_open else _STOP
        out_headers: Headers | None = None
        out_body = b""
        out_eos = False
        for h, body, e in events:
            if h is not None:
                out_headers = h
            elif body:
                out_body = out_body + body if out_body else body
            out_eos = e
        return Decision(
            DecisionKind.CONTINUE,
            headers=out_headers,
            body=out_body,
            end_of_stream=out_eos,
            failed_open=tuple(failed_open),
        )

    def _run_stage(
        self,
        stage: _Stage,
        d: _Direction,
        response: bool,
        headers: Headers | None,
        chunk: bytes | None,
        eos: bool,
    ) -> list[_Event] | None:
        """Run one callback; the events the stage releases, or None when http_calls must be performed."""
        inst = stage.instance
        stream = stage.stream
        assert inst is not None and stream is not None
        observer = self._observer
        t0 = time.perf_counter()
        if headers is not None:
            d.started = True
            d.in_headers = headers
            d.headers_eos = eos
            d.eos_seen = eos
            work = list(headers)
            if response:
                stream.response_headers = work
                stream.response_eos = eos
            else:
                stream.request_headers = work
                stream.request_eos = eos
            action = inst.on_headers(stream, response, len(work), eos)
            observer.callback(
                stage.spec.name,
                "response_headers" if response else "request_headers",
                time.perf_counter() - t0,
            )
            if action == 0:
                d.headers_released = True
                self._settle(stage, response, paused=False)
                return [(self._headers(stream, response), None, eos)]
            return self._settle(stage, response, paused=True)

        if not d.started:
            return [(None, chunk, eos)]  # body without headers in this direction: pass through
        data = chunk or b""
        d.in_body += data
        d.eos_seen = eos
        buf = stream.response_body if response else stream.request_body
        buf += data
        if response:
            stream.response_eos = eos
        else:
            stream.request_eos = eos
        action = inst.on_body(stream, response, len(buf), eos)
        observer.callback(
            stage.spec.name, "response_body" if response else "request_body", time.perf_counter() - t0
        )
        if action == 0:
            return self._release(stage, d, response)
        if len(buf) > self._chain.runtime.max_buffer_bytes:
            status = 502 if response else 413
            msg = b'{"error":"body_too_large","status":%d}' % status
            lr = LocalResponse(status, [("content-type", "application/json")], msg, "body_too_large")
            raise _Respond(Decision(DecisionKind.RESPOND, response=lr))
        return self._settle(stage, response, paused=True)

    def _headers(self, stream: StreamContext, response: bool) -> Headers:
        return stream.response_headers if response else stream.request_headers

    def _release(self, stage: _Stage, d: _Direction, response: bool) -> list[_Event]:
        """The stage continues: pass on held headers (if any) and its buffered body."""
        stream = stage.stream
        assert stream is not None
        out: list[_Event] = []
        if not d.headers_released:
            d.headers_released = True
            out.append((self._headers(stream, response), None, d.headers_eos))
        buf = stream.response_body if response else stream.request_body
        if buf or (d.eos_seen and not d.headers_eos):
            out.append((None, bytes(buf), d.eos_seen))
        buf.clear()
        d.in_body.clear()
        self._settle(stage, response, paused=False)
        return out

    def _settle(self, stage: _Stage, response: bool, *, paused: bool) -> list[_Event] | None:
        """After a callback: local response, closed stream, continue, or stay paused.

        None means "paused with http_calls pending": the caller performs them and settles again.
        """
        inst = stage.instance
        stream = stage.stream
        assert inst is not None and stream is not None
        if stream.local_response is not None or stream.closed:
            self._respond_locally(stage, stream)
        host = inst.host
        if not paused:
            stream.continue_request = stream.continue_response = False
            if host.pending_http_calls:
                self._spawn_calls(stage, inst)
            return []
        if stream.continue_response if response else stream.continue_request:
            stream.continue_request = stream.continue_response = False
            return self._release(stage, stage.dirs[1 if response else 0], response)
        if host.pending_http_calls:
            return None
        if stage.dirs[1 if response else 0].eos_seen:
            raise FilterProtocolError(
                f"filter {stage.spec.name!r} paused at end of stream with no http_call pending",
                stage.spec.name,
            )
        return []

    def _respond_locally(self, stage: _Stage, stream: StreamContext) -> NoReturn:
        lr = stream.local_response
        stream.local_response = None
        if lr is None:
            body = orjson.dumps(
                {"error": "stream_closed_by_filter", "filter": stage.spec.name, "status": 503}
            )
            lr = LocalResponse(503, [("content-type", "application/json")], body, "closed_by_filter")
        raise _Respond(Decision(DecisionKind.RESPOND, response=lr))

    async def _perform_pending(self, stage: _Stage) -> None:
        inst = stage.instance
        assert inst is not None
        calls = list(inst.host.pending_http_calls)
        inst.host.pending_http_calls.clear()
        await self._perform_calls(inst, calls)

    async def _perform_calls(self, inst: FilterInstance, calls: list[PendingHttpCall]) -> None:
        results = await asyncio.gather(*(self._chain.runtime.perform_http_call(c) for c in calls))
        for call, result in zip(calls, results, strict=True):
            if inst.state is not InstanceState.BUSY:
                return
            inst.on_http_call_response(call.token, result)

    def _spawn_calls(self, stage: _Stage, inst: FilterInstance) -> None:
        # Calls made by a filter that did not pause: the request goes on; answers are delivered while the
        # stream lives (their effects on this request, if any, are ignored).
        calls = list(inst.host.pending_http_calls)
        inst.host.pending_http_calls.clear()

        async def run() -> None:
            try:
                await self._perform_calls(inst, calls)
                if stage.stream is not None:
                    stage.stream.local_response = None
            except FilterError as exc:
                self._fault(stage, exc)
                stage.disabled = True

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _borrow(self, stage: _Stage) -> None:
        pool = stage.pool
        inst = pool.try_borrow()
        if inst is None:
            inst = await pool.borrow()
        stage.instance = inst
        stage.stream = inst.new_stream(self._info)

    def _fault(self, stage: _Stage, exc: FilterError) -> None:
        kind = type(exc).__name__.removeprefix("Filter").removesuffix("Error").lower() or "error"
        _log.error("%s", exc)
        self._chain.runtime.observer.fault(stage.spec.name, kind)

    def _apply_policy(
        self,
        stage: _Stage,
        d: _Direction,
        exc: FilterError,
        headers: Headers | None,
        chunk: bytes | None,
        eos: bool,
    ) -> list[tuple[Headers | None, bytes | None, bool]]:
        self._fault(stage, exc)
        observer = self._chain.runtime.observer
        if (
            stage.instance is not None
            and stage.instance.state is InstanceState.BUSY
            and not isinstance(exc, FilterPoolTimeout)
        ):
            stage.instance.state = InstanceState.BROKEN
        if stage.spec.failure_policy == "fail_open":
            observer.policy(stage.spec.name, "fail_open")
            stage.disabled = True
            # Pass on exactly what the filter was given and has not yet released.
            out: list[tuple[Headers | None, bytes | None, bool]] = []
            if headers is not None:
                return [(headers, None, eos)]
            if not d.headers_released and d.started:
                out.append((d.in_headers, None, d.headers_eos))
            body = bytes(d.in_body)
            if body or eos:
                out.append((None, body, eos))
            d.in_body.clear()
            return out
        observer.policy(stage.spec.name, "fail_closed")
        raise _Respond(
            Decision(DecisionKind.RESPOND, response=_error_response(exc, stage.spec.name), error=exc)
        )


class FilterChain:
    """A route's filters, in route order. Reusable and cheap: `start` one stream per request."""

    def __init__(self, runtime: FilterRuntime, entries: Sequence[tuple[FilterSpec, InstancePool]]) -> None:
        self.runtime = runtime
        self.entries = tuple(entries)
        self.names = tuple(spec.name for spec, _ in entries)

    def start(self, request: RequestInfo) -> ChainStream:
        return ChainStream(self, request)


class FilterRuntime:
    """Owns the engine, modules and pools of every configured filter. Build once; `close` at shutdown."""

    def __init__(
        self,
        *,
        http_call: HttpCallFn | None = None,
        observer: RuntimeObserver | None = None,
        shared: SharedServices | None = None,
        max_buffer_bytes: int = 1024 * 1024,
    ) -> None:
        self._http_call = http_call
        self.observer: RuntimeObserver = observer or _NullObserver()
        self.shared = shared or SharedServices()
        self.max_buffer_bytes = max_buffer_bytes
        self.specs: dict[str, FilterSpec] = {}
        self.modules: dict[str, FilterModule] = {}
        self.pools: dict[str, InstancePool] = {}
        self._chains: dict[tuple[str, ...], FilterChain] = {}
        self._closed = False

    @classmethod
    def load(
        cls,
        filters: Sequence[FilterSpec],
        *,
        cache_dir: str | Path | None = None,
        http_call: HttpCallFn | None = None,
        observer: RuntimeObserver | None = None,
        shared: SharedServices | None = None,
        log_sink: LogSink = default_log_sink,
        max_buffer_bytes: int = 1024 * 1024,
        preload: bool = True,
    ) -> FilterRuntime:
        """Load, link and preload every filter. FilterLoadError (naming the file) on the first failure."""
        rt = cls(http_call=http_call, observer=observer, shared=shared, max_buffer_bytes=max_buffer_bytes)
        try:
            for spec in filters:
                rt.add_filter(spec, cache_dir=cache_dir, log_sink=log_sink, preload=preload)
        except BaseException:
            rt.close()
            raise
        return rt

    def add_filter(
        self,
        spec: FilterSpec,
        *,
        cache_dir: str | Path | None = None,
        log_sink: LogSink = default_log_sink,
        preload: bool = True,
    ) -> None:
        if spec.name in self.specs:
            raise FilterLoadError(f"filter {spec.name!r} is defined twice", spec.name)
        level = _LEVELS.get(spec.log_level.lower())
        if level is None:
            raise FilterLoadError(f"filter {spec.name!r}: unknown log_level {spec.log_level!r}", spec.name)
        if spec.failure_policy not in ("fail_closed", "fail_open"):
            raise FilterLoadError(
                f"filter {spec.name!r}: unknown failure_policy {spec.failure_policy!r}", spec.name
            )
        settings = EngineSettings(consume_fuel=spec.fuel > 0)
        cached = load_module(spec.module_path, cache_dir, settings=settings)
        t = cached.timings
        obs = self.observer
        if t.source == "compile":
            obs.cold_start(spec.name, "compile", t.compile)
        else:
            obs.cold_start(spec.name, "deserialize", t.deserialize)
        services = FilterServices(
            name=spec.name,
            abi=AbiVersion.V0_2_1,
            root_id=spec.root_id,
            vm_id=spec.vm_id,
            configuration=spec.configuration,
            vm_configuration=spec.vm_configuration,
            log_level=level,
            log_sink=log_sink,
            shared=self.shared,
            env=dict(spec.env),
            allowed_dirs=tuple(spec.allowed_dirs),
            upstreams=spec.upstreams,
        )
        limits = InstanceLimits(spec.memory_limit_bytes, spec.callback_timeout_ms, spec.fuel)
        module = FilterModule(cached, services, limits, get_engine(settings))

        def created(inst: FilterInstance) -> None:
            obs.cold_start(spec.name, "instantiate", inst.timings.get("instantiate", 0.0))
            obs.cold_start(spec.name, "start_configure", inst.timings.get("start_configure", 0.0))

        pool = InstancePool(
            module,
            PoolSettings(
                min_size=spec.pool_min,
                max_size=max(spec.pool_max, 1),
                idle_seconds=spec.pool_idle_seconds,
                recycle_after=spec.pool_recycle_after,
                borrow_timeout=spec.pool_borrow_timeout,
            ),
            on_created=created,
        )
        self.specs[spec.name] = spec
        self.modules[spec.name] = module
        self.pools[spec.name] = pool
        if preload:
            pool.preload()
        else:
            # Still prove the module starts and accepts its configuration.
            probe = module.instantiate()
            probe.close()

    def chain(self, names: Sequence[str]) -> FilterChain:
        key = tuple(names)
        chain = self._chains.get(key)
        if chain is None:
            missing = [n for n in key if n not in self.pools]
            if missing:
                raise KeyError(f"unknown filter(s): {', '.join(missing)}")
            chain = FilterChain(self, [(self.specs[n], self.pools[n]) for n in key])
            self._chains[key] = chain
        return chain

    async def perform_http_call(self, call: PendingHttpCall) -> HttpCallResponse | None:
        """Run one outbound call through the gateway's function; None when it failed or timed out."""
        fn = self._http_call
        if fn is None:
            return None
        try:
            return await asyncio.wait_for(fn(call.request), max(call.request.timeout_ms, 1) / 1000)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning("http_call to %r failed: %r", call.request.upstream, exc)
            return None

    async def run_background(self, interval: float = 0.05) -> None:
        """Ticks, queue notifications and idle eviction for every pool; run as a task until cancelled."""
        next_evict = time.monotonic() + 1.0
        while not self._closed:
            await self.background_once()
            now = time.monotonic()
            if now >= next_evict:
                for pool in self.pools.values():
                    pool.evict_idle(now)
                next_evict = now + 1.0
            await asyncio.sleep(interval)

    async def background_once(self) -> None:
        """Deliver due ticks to idle instances (one pass)."""
        now = time.monotonic()
        for pool in self.pools.values():
            for inst in pool.idle_instances():
                period = inst.host.tick_period_ms
                if period <= 0 or now < inst.next_tick or not pool.take(inst):
                    continue
                inst.next_tick = now + period / 1000
                try:
                    inst.tick()
                    calls = list(inst.host.pending_http_calls)
                    inst.host.pending_http_calls.clear()
                    for call in calls:
                        result = await self.perform_http_call(call)
                        if inst.state is InstanceState.BUSY:
                            inst.on_http_call_response(call.token, result)
                except FilterError as exc:
                    _log.error("%s", exc)
                    self.observer.fault(pool.name, "tick")
                finally:
                    inst.requests -= 1  # a tick is not a request (give_back counts one)
                    pool.give_back(inst)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pool in self.pools.values():
            pool.close()
        for module in self.modules.values():
            module.close()
        self._chains.clear()
