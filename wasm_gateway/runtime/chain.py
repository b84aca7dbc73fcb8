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

``finish`` runs ``proxy_on_done``; when it answers false the instance stays with the stream until the filter
calls ``proxy_done()`` (from an http_call answer or a tick) or ``FilterSpec.done_timeout`` passes, and only then
``proxy_on_log`` / ``proxy_on_delete`` run (`FilterRuntime.drain` waits for those). Callbacks a module does
not export are not called (a body then flows through untouched).

Cost: a step runs without awaiting anything unless a filter must wait for a pooled instance or paused with
http_calls pending; the stream's context is created in the guest together with the request headers, and
done + log + delete are one entry into the guest (see trampoline.py), so those pairs share one callback time
limit. Timing callbacks for ``observer.callback`` costs about as much as a cheap callback itself:
``callback_timing_every=N`` times one request in N.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, NoReturn, Protocol

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
from .instance import ROOT_CONTEXT_ID, FilterInstance, FilterModule, InstanceLimits, InstanceState
from .pool import InstancePool, PoolSettings
from .services import FilterServices, LogSink, SharedServices, default_log_sink

__all__ = [
    "OUTCOMES",
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
    kv: Sequence[str] = ()  # edge-data KV namespaces granted (SharedServices.edge serves them)
    sql: Sequence[str] = ()  # edge-data SQLite databases granted
    done_timeout: float = (
        5.0  # how long a stream whose proxy_on_done answered false may wait for proxy_done()
    )


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


@dataclass(slots=True)
class Decision:
    kind: DecisionKind
    headers: Headers | None = None  # released headers (request: with :method/:path/...; response: :status)
    body: bytes = b""  # body bytes released now
    end_of_stream: bool = False  # the released data ends this direction
    response: LocalResponse | None = None
    error: FilterError | None = None  # the failure behind a RESPOND 503 (fail_closed)
    failed_open: tuple[str, ...] = ()  # filters bypassed by fail_open during this step


_CONTINUE: Final = DecisionKind.CONTINUE
_perf_counter: Final = time.perf_counter

# What one filter did with one request (counted per filter in FilterRuntime.outcomes).
OUTCOME_CONTINUE: Final = "continue"  # passed the request on
OUTCOME_LOCAL_RESPONSE: Final = "local_response"  # answered it itself (denial, rate limit, direct answer)
OUTCOME_FAILURE: Final = "failure"  # failed (trap, timeout, ...); its failure policy decided
OUTCOME_UNFINISHED: Final = "unfinished"  # still holding the request when it ended (client gone, ...)
OUTCOMES: Final = (OUTCOME_CONTINUE, OUTCOME_LOCAL_RESPONSE, OUTCOME_FAILURE, OUTCOME_UNFINISHED)
_STOP_KIND: Final = DecisionKind.STOP


class _Direction:
    """One direction (request or response) of one stage. Built field by field in `_Stage.__init__`
    (without an __init__ call: it runs twice for every filter of every request)."""

    __slots__ = ("eos_seen", "headers_eos", "headers_released", "in_body", "in_headers", "started")

    started: bool
    headers_released: bool
    headers_eos: bool
    eos_seen: bool
    in_headers: Headers  # what this stage received (passed on as-is under fail_open)
    in_body: bytearray | None  # received body not yet released


_NO_HEADERS: Final[Headers] = []
_new_object: Final = object.__new__


class _Stage:
    """One filter's part of one request, in both directions."""

    __slots__ = ("answered", "dirs", "disabled", "failed", "instance", "name", "pool", "spec", "stream")

    def __init__(self, spec: FilterSpec, pool: InstancePool) -> None:
        self.spec = spec
        self.name = spec.name
        self.pool = pool
        self.instance: FilterInstance | None = None
        self.stream: StreamContext | None = None
        self.disabled = False
        self.answered = 0  # the status of this filter's local response, if it sent one
        self.failed = False
        req: _Direction = _new_object(_Direction)
        resp: _Direction = _new_object(_Direction)
        req.started = req.headers_released = req.headers_eos = req.eos_seen = False
        resp.started = resp.headers_released = resp.headers_eos = resp.eos_seen = False
        req.in_headers = resp.in_headers = _NO_HEADERS
        req.in_body = resp.in_body = None
        self.dirs = (req, resp)


# (headers, None, eos) or (None, body chunk, eos)
_Event = tuple[Headers | None, bytes | None, bool]


class _Respond(Exception):
    def __init__(self, decision: Decision) -> None:
        self.decision = decision


_NEED_BORROW: Final = 1  # the stage's pool had no idle instance: wait for one
_NEED_CALLS: Final = 2  # the stage paused with http_calls pending: perform them, then settle again


class _Pending:
    """Where a step stopped to await something; `ChainStream._walk` resumes from here."""

    __slots__ = ("ei", "events", "failed", "failed_open", "need", "released", "response", "resume", "si")

    def __init__(
        self,
        need: int,
        response: bool,
        si: int,
        events: list[_Event],
        ei: int,
        released: list[_Event],
        failed_open: list[str] | None,
        failed: FilterError | None = None,
    ) -> None:
        self.need = need
        self.response = response
        self.si = si
        self.events = events
        self.ei = ei
        self.released = released
        self.failed_open = failed_open
        # What to do first when resuming: None (run the stage), _NEED_CALLS (settle after the calls), or a
        # FilterError raised while awaiting (the stage's failure policy applies).
        self.resume: int | FilterError | None = None
        # Set when the fast path hit a failure: the walk applies the stage's policy to its event.
        self.failed = failed


def _error_response(error: FilterError, filter_name: str) -> LocalResponse:
    body = orjson.dumps({"error": "filter_failed", "filter": filter_name, "status": 503})
    return LocalResponse(503, [("content-type", "application/json")], body, details="filter_failed")


class ChainStream:
    """One request through a chain. Not thread-safe; one task drives it. Always call `finish`.

    Each step runs synchronously (no await) unless a filter must wait for a pooled instance or paused with
    `proxy_http_call`s pending: only then does it suspend, and it resumes where it stopped.
    """

    __slots__ = ("_background", "_chain", "_finished", "_info", "_observer", "_stages", "_timed")

    def __init__(self, chain: FilterChain, info: RequestInfo) -> None:
        self._chain = chain
        self._info = info
        self._stages = list(map(_Stage, chain.specs, chain.pools))
        self._observer = chain.observer
        self._timed = chain.time_next()
        self._finished = False
        self._background: set[asyncio.Task[None]] | None = None

    # ------------------------------------------------------------------------------------------ public

    async def on_request_headers(self, headers: Headers, end_of_stream: bool) -> Decision:
        r = self._step(False, headers, None, end_of_stream)
        return r if r.__class__ is Decision else await self._resume(r)  # type: ignore[arg-type]

    async def on_request_body(self, chunk: bytes, end_of_stream: bool) -> Decision:
        r = self._step(False, None, chunk, end_of_stream)
        return r if r.__class__ is Decision else await self._resume(r)  # type: ignore[arg-type]

    async def on_response_headers(self, headers: Headers, end_of_stream: bool) -> Decision:
        r = self._step(True, headers, None, end_of_stream)
        return r if r.__class__ is Decision else await self._resume(r)  # type: ignore[arg-type]

    async def on_response_body(self, chunk: bytes, end_of_stream: bool) -> Decision:
        r = self._step(True, None, chunk, end_of_stream)
        return r if r.__class__ is Decision else await self._resume(r)  # type: ignore[arg-type]

    def finish(self) -> None:
        """done/log/delete on every filter that saw the request; instances go back to their pools."""
        if self._finished:
            return
        self._finished = True
        if self._background:
            for task in self._background:
                task.cancel()
        outcomes = self._chain.runtime.outcomes
        for stage in self._stages:
            inst = stage.instance
            if inst is None:
                continue
            stage.instance = None
            stream = stage.stream
            if stage.answered:
                outcome = OUTCOME_LOCAL_RESPONSE
            elif stage.failed:
                outcome = OUTCOME_FAILURE
            elif stage.dirs[0].headers_released:
                outcome = OUTCOME_CONTINUE
            else:
                outcome = OUTCOME_UNFINISHED
            key = (stage.name, outcome)
            outcomes[key] = outcomes.get(key, 0) + 1
            deferred = False
            try:
                if stream is not None and not stage.disabled:
                    deferred = not inst.finish_stream(stream)
            except FilterError as exc:
                self._fault(stage, exc)
            except Exception:
                _log.exception("filter %r: finishing the stream failed", stage.name)
                inst.state = InstanceState.BROKEN
            finally:
                if deferred and stream is not None:
                    # proxy_on_done answered false: the instance stays with the stream until proxy_done().
                    self._chain.runtime.await_done(stage.pool, inst, stream, stage.spec)
                else:
                    stage.pool.give_back(inst)

    # ------------------------------------------------------------------------------------------ driver

    def _step(
        self, response: bool, headers: Headers | None, chunk: bytes | None, eos: bool
    ) -> Decision | _Pending:
        """The fast path of a step: one event through stages that each pass one event on.

        Anything else (a stage holding data or releasing several events, a failure, a wait) continues in
        the general `_walk` from the stage where it happened. The common headers case is written out here
        (it is most of a request's driver work); `_run_headers` is the same logic for the general path.
        """
        if self._finished:
            raise RuntimeError("ChainStream used after finish()")
        stages = self._stages
        if response and len(stages) > 1:
            stages = stages[::-1]
        timed = self._timed
        si = -1
        for stage in stages:
            si += 1
            if stage.disabled:
                continue
            try:
                stream = stage.stream
                inst: FilterInstance | None = stage.instance
                if stream is None:
                    if inst is None:
                        inst = stage.pool.try_borrow()
                        if inst is None:
                            return _Pending(_NEED_BORROW, response, si, [(headers, chunk, eos)], 0, [], None)
                        stage.instance = inst
                    stream = stage.stream = inst.attach_stream(self._info)
                if TYPE_CHECKING:
                    assert inst is not None
                if headers is None or timed:
                    out = (
                        self._run_headers(stage, response, headers, eos)
                        if headers is not None
                        else self._run_body(stage, response, chunk, eos)
                    )
                else:
                    # = _run_headers, untimed, up to a plain CONTINUE
                    d = stage.dirs[response]
                    d.started = True
                    d.in_headers = headers
                    d.headers_eos = d.eos_seen = eos
                    work = list(headers)
                    if response:
                        stream.response_headers = work
                        stream.response_eos = eos
                    else:
                        stream.request_headers = work
                        stream.request_eos = eos
                    # = inst.on_headers(stream, response, len(work), eos)
                    host = inst.host
                    host.current = stream
                    sid = host.current_id = stream.id
                    if stream.created:
                        fn = inst.headers_entries[response]
                        action = fn(sid, len(work), eos) if fn is not None else 0
                    elif not response:
                        stream.created = True
                        action = inst.open_entry(sid, ROOT_CONTEXT_ID, len(work), eos)  # type: ignore[misc]
                    else:
                        action = inst.on_headers(stream, response, len(work), eos)
                    if action == 0 and not host.attention:
                        d.headers_released = True
                        headers = stream.response_headers if response else stream.request_headers
                        continue
                    out = self._after_headers(stage, response, action, eos)
            except FilterError as exc:
                # Failure policies live in the general walk: it applies this stage's to the event.
                failed = _Pending(0, response, si, [], 0, [], None, failed=exc)
                return self._walk(response, [(headers, chunk, eos)], failed)
            except _Respond as r:
                return r.decision
            if out is None:
                return _Pending(_NEED_CALLS, response, si, [(headers, chunk, eos)], 0, [], None)
            if len(out) != 1:
                if not out:
                    return Decision(_STOP_KIND)
                return self._walk(response, out, _Pending(0, response, si + 1, out, 0, [], None))
            headers, chunk, eos = out[0]
        # Decision(_CONTINUE, headers, chunk or b"", eos), without the Python-level __init__ call
        decision: Decision = _new_object(Decision)
        decision.kind = _CONTINUE
        decision.headers = headers
        decision.body = chunk or b""
        decision.end_of_stream = eos
        decision.response = decision.error = None
        decision.failed_open = ()
        return decision

    def _walk(self, response: bool, events: list[_Event], p: _Pending) -> Decision | _Pending:
        """The general path: pass ``events`` through the stages from where ``p`` says.

        A Decision, or a `_Pending` when a stage must await (an instance from its pool, http_calls).
        """
        if self._finished:
            raise RuntimeError("ChainStream used after finish()")
        stages = self._stages
        if response:
            stages = stages[::-1]
        si, ei, released, failed_open, resume = p.si, p.ei, p.released, p.failed_open, p.resume
        if p.events:
            events = p.events
        failed = p.failed  # this stage's event already failed on the fast path: apply its policy
        nstages = len(stages)
        try:
            while si < nstages:
                stage = stages[si]
                if stage.disabled:
                    si += 1
                    continue
                d = stage.dirs[response]
                while ei < len(events):
                    h, body, e = events[ei]
                    held = False
                    try:
                        if failed is not None:
                            exc = failed
                            failed = None
                            raise exc
                        if resume is not None:
                            # A body chunk that waited for http_calls is already held by the stage.
                            held = p.need == _NEED_CALLS
                            failure, resume = resume, None
                            if failure.__class__ is not int:
                                raise failure  # type: ignore[misc]
                            out = self._settle(stage, response, paused=True)
                        else:
                            if stage.stream is None:
                                inst = stage.instance
                                if inst is None:
                                    inst = stage.pool.try_borrow()
                                    if inst is None:
                                        return _Pending(
                                            _NEED_BORROW, response, si, events, ei, released, failed_open
                                        )
                                    stage.instance = inst
                                stage.stream = inst.attach_stream(self._info)
                            if h is not None:
                                out = self._run_headers(stage, response, h, e)
                            else:
                                out = self._run_body(stage, response, body, e)
                        if out is None:
                            return _Pending(_NEED_CALLS, response, si, events, ei, released, failed_open)
                    except FilterError as exc:
                        # fail_closed raises _Respond; fail_open passes on what the filter was given.
                        released.extend(self._apply_policy(stage, d, exc, h, None if held else body, e))
                        released.extend(events[ei + 1 :])
                        if failed_open is None:
                            failed_open = []
                        failed_open.append(stage.name)
                        break
                    released.extend(out)
                    ei += 1
                events = released
                released = []
                ei = 0
                si += 1
                if not events:
                    break
        except _Respond as r:
            r.decision.failed_open = tuple(failed_open) if failed_open else ()
            return r.decision
        fo = tuple(failed_open) if failed_open else ()
        if not events:
            return Decision(_STOP_KIND, failed_open=fo)
        out_headers: Headers | None = None
        out_body = b""
        out_eos = False
        for h, body, e in events:
            if h is not None:
                out_headers = h
            elif body:
                out_body = out_body + body if out_body else body
            out_eos = e
        return Decision(_CONTINUE, out_headers, out_body, out_eos, None, None, fo)

    async def _resume(self, p: _Pending) -> Decision:
        """The slow path of a step: await what the walk needs, then walk on."""
        while True:
            stage = (self._stages[::-1] if p.response else self._stages)[p.si]
            try:
                if p.need == _NEED_BORROW:
                    stage.instance = await stage.pool.borrow()
                    p.resume = None
                else:
                    await self._perform_pending(stage)
                    p.resume = _NEED_CALLS
            except FilterError as exc:
                p.resume = exc
            r = self._walk(p.response, p.events, p)
            if isinstance(r, Decision):
                return r
            p = r

    def _run_headers(self, stage: _Stage, response: bool, headers: Headers, eos: bool) -> list[_Event] | None:
        """Run a headers callback; the events the stage releases, or None when http_calls must be performed."""
        inst = stage.instance
        stream = stage.stream
        assert inst is not None and stream is not None
        d = stage.dirs[response]
        timed = self._timed
        t0 = _perf_counter() if timed else 0.0
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
        if timed:
            self._observer.callback(
                stage.name, "response_headers" if response else "request_headers", _perf_counter() - t0
            )
        return self._after_headers(stage, response, action, eos)

    def _after_headers(self, stage: _Stage, response: bool, action: int, eos: bool) -> list[_Event] | None:
        stream = stage.stream
        assert stream is not None and stage.instance is not None
        if action == 0:
            stage.dirs[response].headers_released = True
            if stage.instance.host.attention:
                self._settle(stage, response, paused=False)
            return [(stream.response_headers if response else stream.request_headers, None, eos)]
        return self._settle(stage, response, paused=True)

    def _run_body(self, stage: _Stage, response: bool, chunk: bytes | None, eos: bool) -> list[_Event] | None:
        """Run a body callback; the events the stage releases, or None when http_calls must be performed."""
        inst = stage.instance
        stream = stage.stream
        assert inst is not None and stream is not None
        d = stage.dirs[response]
        if not d.started:
            return [(None, chunk, eos)]  # body without headers in this direction: pass through
        timed = self._timed
        t0 = _perf_counter() if timed else 0.0
        data = chunk or b""
        d.eos_seen = eos
        if response:
            stream.response_eos = eos
        else:
            stream.request_eos = eos
        fn = inst.body_entries[response]
        if fn is None and d.headers_released:
            # Nothing to call and nothing held: the chunk flows on untouched.
            return [(None, data, eos)]
        buf = stream.response_body if response else stream.request_body
        was_empty = not buf
        buf += data
        if fn is not None and stream.created:
            # = inst.on_body(stream, response, len(buf), eos)
            host = inst.host
            host.current = stream
            host.current_id = stream.id
            action = fn(stream.id, len(buf), eos)
        else:
            action = inst.on_body(stream, response, len(buf), eos)
        if timed:
            self._observer.callback(
                stage.name, "response_body" if response else "request_body", _perf_counter() - t0
            )
        if action == 0:
            if was_empty and d.headers_released and not inst.host.attention:
                # Nothing held, nothing changed (set_buffer_bytes raises attention): pass the chunk on.
                buf.clear()
                d.in_body = None
                return [(None, data, eos)]
            return self._release(stage, d, response)
        if len(buf) > self._chain.runtime.max_buffer_bytes:
            status = 502 if response else 413
            msg = b'{"error":"body_too_large","status":%d}' % status
            lr = LocalResponse(status, [("content-type", "application/json")], msg, "body_too_large")
            raise _Respond(Decision(DecisionKind.RESPOND, response=lr))
        out = self._settle(stage, response, paused=True)
        if not out:
            # Held (paused, or waiting for http_calls): keep what the filter received for fail_open.
            if d.in_body is None:
                d.in_body = bytearray(data)
            else:
                d.in_body += data
        return out

    def _release(self, stage: _Stage, d: _Direction, response: bool) -> list[_Event]:
        """The stage continues: pass on held headers (if any) and its buffered body."""
        stream = stage.stream
        assert stream is not None
        out: list[_Event] = []
        if not d.headers_released:
            d.headers_released = True
            out.append((stream.response_headers if response else stream.request_headers, None, d.headers_eos))
        buf = stream.response_body if response else stream.request_body
        if buf or (d.eos_seen and not d.headers_eos):
            out.append((None, bytes(buf), d.eos_seen))
            buf.clear()
        d.in_body = None
        if stage.instance.host.attention:  # type: ignore[union-attr]
            self._settle(stage, response, paused=False)
        return out

    def _settle(self, stage: _Stage, response: bool, *, paused: bool) -> list[_Event] | None:
        """After a callback: local response, closed stream, continue, or stay paused.

        None means "paused with http_calls pending": the caller performs them and settles again.
        """
        inst = stage.instance
        stream = stage.stream
        assert inst is not None and stream is not None
        host = inst.host
        host.attention = False
        if stream.local_response is not None or stream.closed:
            self._respond_locally(stage, stream)
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
                f"filter {stage.name!r} paused at end of stream with no http_call pending",
                stage.name,
            )
        return []

    def _respond_locally(self, stage: _Stage, stream: StreamContext) -> NoReturn:
        lr = stream.local_response
        stream.local_response = None
        if lr is None:
            body = orjson.dumps({"error": "stream_closed_by_filter", "filter": stage.name, "status": 503})
            lr = LocalResponse(503, [("content-type", "application/json")], body, "closed_by_filter")
        stage.answered = lr.status
        statuses = self._chain.runtime.local_responses
        key = (stage.name, lr.status)
        statuses[key] = statuses.get(key, 0) + 1
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
        if self._background is None:
            self._background = set()
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fault(self, stage: _Stage, exc: FilterError) -> None:
        stage.failed = True
        kind = type(exc).__name__.removeprefix("Filter").removesuffix("Error").lower() or "error"
        _log.error("%s", exc)
        self._chain.runtime.observer.fault(stage.name, kind)

    def _apply_policy(
        self,
        stage: _Stage,
        d: _Direction,
        exc: FilterError,
        headers: Headers | None,
        chunk: bytes | None,
        eos: bool,
    ) -> list[_Event]:
        self._fault(stage, exc)
        observer = self._chain.runtime.observer
        if (
            stage.instance is not None
            and stage.instance.state is InstanceState.BUSY
            and not isinstance(exc, FilterPoolTimeout)
        ):
            stage.instance.state = InstanceState.BROKEN
        if stage.spec.failure_policy == "fail_open":
            observer.policy(stage.name, "fail_open")
            stage.disabled = True
            # Pass on exactly what the filter was given and has not yet released.
            out: list[_Event] = []
            if headers is not None:
                return [(headers, None, eos)]
            if not d.headers_released and d.started:
                out.append((d.in_headers, None, d.headers_eos))
            body = bytes(d.in_body) if d.in_body is not None else b""
            if chunk:
                body += chunk
            if body or eos:
                out.append((None, body, eos))
            if d.in_body is not None:
                d.in_body.clear()
            return out
        observer.policy(stage.name, "fail_closed")
        raise _Respond(Decision(DecisionKind.RESPOND, response=_error_response(exc, stage.name), error=exc))


class FilterChain:
    """A route's filters, in route order. Reusable and cheap: `start` one stream per request."""

    def __init__(self, runtime: FilterRuntime, entries: Sequence[tuple[FilterSpec, InstancePool]]) -> None:
        self.runtime = runtime
        self.entries = tuple(entries)
        self.names = tuple(spec.name for spec, _ in entries)
        self.specs = tuple(spec for spec, _ in entries)
        self.pools = tuple(pool for _, pool in entries)
        self.observer = runtime.observer
        self.timed = runtime.observer.__class__ is not _NullObserver  # callbacks are timed for the observer
        self._timing_every = runtime.callback_timing_every
        self._started = 0

    def start(self, request: RequestInfo) -> ChainStream:
        return ChainStream(self, request)

    def time_next(self) -> bool:
        """Whether the request starting now has its callbacks timed (one in ``callback_timing_every``)."""
        if not self.timed:
            return False
        every = self._timing_every
        if every == 1:
            return True
        self._started += 1
        return self._started % every == 0


class FilterRuntime:
    """Owns the engine, modules and pools of every configured filter. Build once; `close` at shutdown."""

    def __init__(
        self,
        *,
        http_call: HttpCallFn | None = None,
        observer: RuntimeObserver | None = None,
        shared: SharedServices | None = None,
        max_buffer_bytes: int = 1024 * 1024,
        callback_timing_every: int = 1,
    ) -> None:
        """``callback_timing_every``: time (and report to ``observer.callback``) the callbacks of one request
        in N. Timing and recording a callback costs more than a cheap callback itself (a Prometheus
        histogram observation is ~2 us); sampling keeps the distribution at a fraction of the cost."""
        self._http_call = http_call
        self.observer: RuntimeObserver = observer or _NullObserver()
        self.callback_timing_every = max(1, callback_timing_every)
        self.shared = shared or SharedServices()
        self.max_buffer_bytes = max_buffer_bytes
        self.specs: dict[str, FilterSpec] = {}
        self.modules: dict[str, FilterModule] = {}
        self.pools: dict[str, InstancePool] = {}
        self._chains: dict[tuple[str, ...], FilterChain] = {}
        self._closed = False
        # Per-request counts, (filter, outcome) and (filter, local response status): plain ints on the hot
        # path; the gateway copies them into Prometheus (filtering.sync_runtime_metrics).
        self.outcomes: dict[tuple[str, str], int] = {}
        self.local_responses: dict[tuple[str, int], int] = {}
        # Streams whose proxy_on_done answered false, waiting for proxy_done() (see await_done).
        self._deferred: set[asyncio.Task[None]] = set()
        # Queue notifications waiting for an instance: (filter name, token), in arrival order.
        self._queue_pending: dict[tuple[str, int], None] = {}
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

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
        callback_timing_every: int = 1,
    ) -> FilterRuntime:
        """Load, link and preload every filter. FilterLoadError (naming the file) on the first failure."""
        rt = cls(
            http_call=http_call,
            observer=observer,
            shared=shared,
            max_buffer_bytes=max_buffer_bytes,
            callback_timing_every=callback_timing_every,
        )
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
            on_queue_ready=functools.partial(self._queue_ready, spec.name),
        )
        if self.shared.edge is not None:
            edge = self.shared.edge.functions(spec.name, tuple(spec.kv), tuple(spec.sql))
            services.foreign_functions = {**services.foreign_functions, **edge}
        limits = InstanceLimits(spec.memory_limit_bytes, spec.callback_timeout_ms, spec.fuel)
        module = FilterModule(
            cached, services, limits, get_engine(settings), settings=settings, cache_dir=cache_dir
        )

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
        """Ticks, queue notifications and idle eviction for every pool; run as a task until cancelled.

        Wakes at once when something is enqueued to a queue a filter registered, else every ``interval``.
        """
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._wake = (loop, wake)
        next_evict = time.monotonic() + 1.0
        try:
            while not self._closed:
                await self.background_once()
                now = time.monotonic()
                if now >= next_evict:
                    for pool in self.pools.values():
                        pool.evict_idle(now)
                    next_evict = now + 1.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), interval)
                wake.clear()
        finally:
            self._wake = None

    def await_done(
        self, pool: InstancePool, inst: FilterInstance, stream: StreamContext, spec: FilterSpec
    ) -> None:
        """Keep ``inst`` (its proxy_on_done answered false) until the filter calls proxy_done() for
        ``stream`` or ``spec.done_timeout`` passes; then proxy_on_log, proxy_on_delete, back to the pool.

        Meanwhile the instance's http_calls are performed and its ticks delivered: those are the callbacks
        from which a filter calls proxy_done(). Without a running event loop it is finished at once.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self._finish_deferred(pool, inst, stream, waited=False)
            return
        task = loop.create_task(self._await_done(pool, inst, stream, spec.done_timeout))
        self._deferred.add(task)
        task.add_done_callback(self._deferred.discard)

    async def _await_done(
        self, pool: InstancePool, inst: FilterInstance, stream: StreamContext, limit: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        waited = False
        try:
            while not stream.done and inst.state is InstanceState.BUSY and loop.time() < deadline:
                host = inst.host
                if host.pending_http_calls:
                    calls = list(host.pending_http_calls)
                    host.pending_http_calls.clear()
                    results = await asyncio.gather(*(self.perform_http_call(c) for c in calls))
                    for call, result in zip(calls, results, strict=True):
                        if inst.state is InstanceState.BUSY:
                            inst.on_http_call_response(call.token, result)
                    continue
                now = time.monotonic()
                if host.tick_period_ms > 0 and now >= inst.next_tick:
                    inst.next_tick = now + host.tick_period_ms / 1000
                    inst.tick()
                    continue
                await asyncio.sleep(min(0.005, max(deadline - loop.time(), 0)))
            waited = True
        except FilterError as exc:
            _log.error("%s", exc)
            self.observer.fault(pool.name, "done")
        finally:
            self._finish_deferred(pool, inst, stream, waited=waited)

    def _finish_deferred(
        self, pool: InstancePool, inst: FilterInstance, stream: StreamContext, *, waited: bool
    ) -> None:
        try:
            if waited and not stream.done and inst.state is InstanceState.BUSY:
                _log.warning(
                    "filter %r: proxy_on_done answered false and proxy_done() did not follow in time",
                    pool.name,
                )
            inst.complete_stream(stream)
        except FilterError as exc:
            _log.error("%s", exc)
            self.observer.fault(pool.name, "done")
        finally:
            pool.give_back(inst)

    async def drain(self) -> None:
        """Wait until every stream whose proxy_on_done answered false is finished (bounded by their
        ``done_timeout``)."""
        while self._deferred:
            await asyncio.gather(*list(self._deferred), return_exceptions=True)

    def _queue_ready(self, filter_name: str, token: int) -> None:
        """A queue registered by ``filter_name``'s root context got an item (called by the queue store,
        possibly from inside another filter's host call): note it; `background_once` delivers it."""
        self._queue_pending[(filter_name, token)] = None
        waker = self._wake
        if waker is not None:
            loop, event = waker
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(event.set)

    async def _root_call(
        self, pool: InstancePool, inst: FilterInstance, kind: str, call: Callable[[], None]
    ) -> None:
        """Run a root-context callback on a borrowed instance, then its http_calls; give it back."""
        try:
            call()
            calls = list(inst.host.pending_http_calls)
            inst.host.pending_http_calls.clear()
            for pending in calls:
                result = await self.perform_http_call(pending)
                if inst.state is InstanceState.BUSY:
                    inst.on_http_call_response(pending.token, result)
        except FilterError as exc:
            _log.error("%s", exc)
            self.observer.fault(pool.name, kind)
        finally:
            inst.requests -= 1  # not a request (give_back counts one)
            pool.give_back(inst)

    async def background_once(self) -> None:
        """Deliver due ticks to idle instances and pending queue notifications (one pass)."""
        now = time.monotonic()
        for pool in self.pools.values():
            for inst in pool.idle_instances():
                period = inst.host.tick_period_ms
                if period <= 0 or now < inst.next_tick or not pool.take(inst):
                    continue
                inst.next_tick = now + period / 1000
                await self._root_call(pool, inst, "tick", inst.tick)
        for key in list(self._queue_pending):
            name, token = key
            queue_pool = self.pools.get(name)
            if queue_pool is None:
                del self._queue_pending[key]
                continue
            try:
                ready = queue_pool.try_borrow()  # any instance: each one's root context registered the queue
            except FilterError as exc:
                _log.error("%s", exc)
                ready = None
            if ready is None:
                continue  # all busy: next pass
            del self._queue_pending[key]
            await self._root_call(
                queue_pool, ready, "queue_ready", functools.partial(ready.queue_ready, token)
            )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pool in self.pools.values():
            pool.close()
        for module in self.modules.values():
            module.close()
        self._chains.clear()
        if self.shared.edge is not None:
            self.shared.edge.close()
