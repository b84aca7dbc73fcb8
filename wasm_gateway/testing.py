"""Run one Proxy-Wasm filter without a server: a test harness for filter authors.

::

    from wasm_gateway.testing import FilterHarness

    h = FilterHarness.from_file("f.wasm", configuration=b'{"header": "x-hello"}')
    r = h.request(method="GET", path="/x", headers=[("host", "a")], body=b"",
                  response=(200, [("content-type", "text/plain")], b"hi"))
    assert ("x-hello", "world") in r.request_headers      # what the upstream received
    assert r.local_response is None                       # or (status, headers, body) if the filter answered
    assert r.response_status == 200                       # what the client received
    print(r.logs)                                         # [(level, message)] -- 0 trace .. 5 critical

``response=`` is what the upstream answers when the filter lets the request through. Outbound calls
(``proxy_http_call``) are answered by ``http_calls={"authz": handler}``: ``handler(req)`` gets an object with
``.method``, ``.path``, ``.authority``, ``.headers``, ``.body`` (and ``.upstream``, ``.trailers``,
``.timeout_ms``) and returns ``(status, headers, body)``; it may be a coroutine function. A call to a name
without a handler fails (the filter sees ``proxy_on_http_call_response`` with zero headers).

The harness drives the gateway's own request driver (`wasm_gateway.runtime.chain.ChainStream`), with the same
engine, limits, failure policy and module cache, so a filter behaves here as it does in the gateway.
Pseudo-headers (``:method``, ``:path``, ``:authority``, ``:scheme``) are built from the arguments and reported
separately (``r.method``, ``r.path``, ...); ``r.request_headers`` holds the regular headers only.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .exceptions import FilterError
from .runtime.chain import DecisionKind, FilterRuntime, FilterSpec
from .runtime.context import HttpCallRequest, HttpCallResponse, RequestInfo
from .runtime.services import SharedServices

__all__ = ["FilterHarness", "HarnessResult", "HttpCallHandler"]

Headers = list[tuple[str, str]]
HttpCallHandler = Callable[
    [HttpCallRequest],
    "tuple[int, Sequence[tuple[str, str]], bytes] | Awaitable[tuple[int, Sequence[tuple[str, str]], bytes]]",
]


@dataclass
class HarnessResult:
    """What happened to one request."""

    request_headers: Headers = field(default_factory=list)  # as the upstream got them (no pseudo-headers)
    request_body: bytes = b""
    method: str = ""  # pseudo-headers as the upstream got them
    path: str = ""
    authority: str = ""
    scheme: str = ""
    upstream_called: bool = False
    local_response: tuple[int, Headers, bytes] | None = None
    response_status: int = 0  # as the client got it
    response_headers: Headers = field(default_factory=list)
    response_body: bytes = b""
    logs: list[tuple[int, str]] = field(default_factory=list)
    http_calls: list[HttpCallRequest] = field(default_factory=list)
    error: FilterError | None = None  # the failure behind a fail_closed 503
    failed_open: bool = False


def _split(headers: Headers) -> tuple[dict[str, str], Headers]:
    pseudo = {k: v for k, v in headers if k.startswith(":")}
    return pseudo, [(k, v) for k, v in headers if not k.startswith(":")]


class FilterHarness:
    """One filter, loaded like the gateway loads it. Close it (or use ``with``) to free its instances."""

    def __init__(
        self,
        spec: FilterSpec,
        *,
        http_calls: Mapping[str, HttpCallHandler] | None = None,
        cache_dir: str | Path | None = None,
        shared: SharedServices | None = None,
        _tmpdir: str | None = None,
    ) -> None:
        """``shared``: the stores the filter sees (shared data, queues, edge data); a fresh in-memory set
        when None."""
        self._handlers: dict[str, HttpCallHandler] = dict(http_calls or {})
        self._tmpdir = _tmpdir
        self._logs: list[tuple[int, str]] = []
        self._calls: list[HttpCallRequest] = []
        self._lock = threading.Lock()
        self.spec = spec
        self.runtime = FilterRuntime.load(
            [spec], cache_dir=cache_dir, http_call=self._http_call, log_sink=self._log_sink, shared=shared
        )
        self._chain = self.runtime.chain([spec.name])

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        configuration: bytes | str = b"",
        root_id: str = "",
        vm_configuration: bytes | str = b"",
        *,
        http_calls: Mapping[str, HttpCallHandler] | None = None,
        name: str | None = None,
        cache_dir: str | Path | None = None,
        shared: SharedServices | None = None,
        **options: Any,
    ) -> FilterHarness:
        """Load ``path``. ``options`` are further `FilterSpec` fields (failure_policy, log_level, env, kv,
        sql, ...)."""
        options.setdefault("log_level", "trace")
        options.setdefault("pool_min", 1)
        options.setdefault("pool_max", 4)
        spec = FilterSpec(
            name=name or Path(path).stem,
            module_path=Path(path),
            configuration=configuration.encode() if isinstance(configuration, str) else configuration,
            root_id=root_id,
            vm_configuration=vm_configuration.encode()
            if isinstance(vm_configuration, str)
            else vm_configuration,
            **options,
        )
        return cls(spec, http_calls=http_calls, cache_dir=cache_dir, shared=shared)

    @classmethod
    def from_bytes(
        cls,
        wasm: bytes,
        configuration: bytes | str = b"",
        root_id: str = "",
        vm_configuration: bytes | str = b"",
        *,
        http_calls: Mapping[str, HttpCallHandler] | None = None,
        name: str = "filter",
        **options: Any,
    ) -> FilterHarness:
        """Like `from_file`, for module bytes (binary Wasm)."""
        tmp = tempfile.mkdtemp(prefix="wasm-gateway-harness-")
        try:
            path = Path(tmp) / f"{name}.wasm"
            path.write_bytes(wasm)
            h = cls.from_file(
                path, configuration, root_id, vm_configuration, http_calls=http_calls, name=name, **options
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        h._tmpdir = tmp
        return h

    # ------------------------------------------------------------------------------------------ plumbing

    def _log_sink(self, filter_name: str, level: int, message: str) -> None:
        with self._lock:
            self._logs.append((level, message))

    async def _http_call(self, req: HttpCallRequest) -> HttpCallResponse:
        with self._lock:
            self._calls.append(req)
        handler = self._handlers.get(req.upstream)
        if handler is None:
            raise LookupError(f"no http_calls handler for upstream {req.upstream!r}")
        result = handler(req)
        if inspect.isawaitable(result):
            result = await result
        status, headers, body = result
        return HttpCallResponse(int(status), [(k.lower(), v) for k, v in headers], bytes(body))

    # ------------------------------------------------------------------------------------------ requests

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        response: tuple[int, Sequence[tuple[str, str]], bytes] = (200, (), b""),
        *,
        authority: str | None = None,
        scheme: str = "http",
        info: RequestInfo | None = None,
        body_chunks: Sequence[bytes] | None = None,
        response_chunks: Sequence[bytes] | None = None,
        http_calls: Mapping[str, HttpCallHandler] | None = None,
    ) -> HarnessResult:
        """Run one request through the filter (synchronously; see `arequest` inside an event loop)."""
        coro_args = (
            method,
            path,
            headers,
            body,
            response,
            authority,
            scheme,
            info,
            body_chunks,
            response_chunks,
            http_calls,
        )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arequest(*coro_args))
        # Called from inside an event loop: run on a private loop in a helper thread.
        box: list[HarnessResult | BaseException] = []

        def run() -> None:
            try:
                box.append(asyncio.run(self.arequest(*coro_args)))
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    async def arequest(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        response: tuple[int, Sequence[tuple[str, str]], bytes] = (200, (), b""),
        authority: str | None = None,
        scheme: str = "http",
        info: RequestInfo | None = None,
        body_chunks: Sequence[bytes] | None = None,
        response_chunks: Sequence[bytes] | None = None,
        http_calls: Mapping[str, HttpCallHandler] | None = None,
    ) -> HarnessResult:
        """Async form of `request`."""
        if http_calls:
            self._handlers.update(http_calls)
        with self._lock:
            self._logs = []
            self._calls = []
        result = HarnessResult()
        regular = [(k.lower(), v) for k, v in headers]
        host = (
            authority if authority is not None else next((v for k, v in regular if k == "host"), "localhost")
        )
        req_headers = [(":method", method), (":path", path), (":authority", host), (":scheme", scheme)]
        req_headers += [(k, v) for k, v in regular if k != "host"]
        chunks = list(body_chunks) if body_chunks is not None else ([body] if body else [])
        stream = self._chain.start(info or RequestInfo(source_address="127.0.0.1", source_port=40000))
        try:
            await self._run(stream, req_headers, chunks, response, response_chunks, result)
        finally:
            stream.finish()
            # A filter whose proxy_on_done answered false finishes the stream later (proxy_done()).
            await self.runtime.drain()
            with self._lock:
                result.logs = list(self._logs)
                result.http_calls = list(self._calls)
        return result

    async def _run(
        self,
        stream: Any,
        req_headers: Headers,
        chunks: list[bytes],
        response: tuple[int, Sequence[tuple[str, str]], bytes],
        response_chunks: Sequence[bytes] | None,
        result: HarnessResult,
    ) -> None:
        up_headers: Headers | None = None
        up_body = bytearray()

        def answer_locally(d: Any) -> None:
            lr = d.response
            result.local_response = (lr.status, list(lr.headers), lr.body)
            result.response_status, result.response_headers, result.response_body = (
                lr.status,
                list(lr.headers),
                lr.body,
            )
            result.error = d.error

        d = await stream.on_request_headers(req_headers, not chunks)
        result.failed_open |= bool(d.failed_open)
        if d.kind is DecisionKind.RESPOND:
            answer_locally(d)
            return
        if d.kind is DecisionKind.CONTINUE:
            up_headers = d.headers
            up_body += d.body
        for i, chunk in enumerate(chunks):
            d = await stream.on_request_body(chunk, i == len(chunks) - 1)
            result.failed_open |= bool(d.failed_open)
            if d.kind is DecisionKind.RESPOND:
                answer_locally(d)
                return
            if d.kind is DecisionKind.CONTINUE:
                if d.headers is not None:
                    up_headers = d.headers
                up_body += d.body
        if up_headers is None:
            raise FilterError("the filter never released the request headers", self.spec.name)
        pseudo, result.request_headers = _split(up_headers)
        result.method = pseudo.get(":method", "")
        result.path = pseudo.get(":path", "")
        result.authority = pseudo.get(":authority", "")
        result.scheme = pseudo.get(":scheme", "")
        result.request_body = bytes(up_body)
        result.upstream_called = True

        status, resp_headers, resp_body = response
        rchunks = list(response_chunks) if response_chunks is not None else ([resp_body] if resp_body else [])
        down_headers: Headers | None = None
        down_body = bytearray()
        h = [(":status", str(status)), *((k.lower(), v) for k, v in resp_headers)]
        d = await stream.on_response_headers(h, not rchunks)
        result.failed_open |= bool(d.failed_open)
        if d.kind is DecisionKind.RESPOND:
            answer_locally(d)
            return
        if d.kind is DecisionKind.CONTINUE:
            down_headers = d.headers
            down_body += d.body
        for i, chunk in enumerate(rchunks):
            d = await stream.on_response_body(chunk, i == len(rchunks) - 1)
            result.failed_open |= bool(d.failed_open)
            if d.kind is DecisionKind.RESPOND:
                answer_locally(d)
                return
            if d.kind is DecisionKind.CONTINUE:
                if d.headers is not None:
                    down_headers = d.headers
                down_body += d.body
        if down_headers is None:
            raise FilterError("the filter never released the response headers", self.spec.name)
        rp, result.response_headers = _split(down_headers)
        result.response_status = int(rp.get(":status", status))
        result.response_body = bytes(down_body)

    @property
    def logs(self) -> list[tuple[int, str]]:
        return list(self._logs)

    def close(self) -> None:
        self.runtime.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> FilterHarness:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
