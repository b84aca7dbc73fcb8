"""What host calls see: the request description the gateway fills, per-stream state, per-instance state."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .engine import EPOCH_TICK_SECONDS

if TYPE_CHECKING:
    from .memory import GuestMemory
    from .services import FilterServices
    from .wasi import WasiFiles

__all__ = [
    "Headers",
    "HostState",
    "HttpCallRequest",
    "HttpCallResponse",
    "LocalResponse",
    "PendingHttpCall",
    "RequestInfo",
    "StreamContext",
]

# Header lists are (lower-case name, value) pairs of str; bytes on the wire map to str as latin-1.
Headers = list[tuple[str, str]]


@dataclass
class RequestInfo:
    """Per-request facts the gateway knows and filters may read as properties (Envoy attribute names)."""

    source_address: str = ""
    source_port: int = 0
    destination_address: str = ""
    destination_port: int = 0
    request_id: str = ""
    protocol: str = "HTTP/1.1"
    route_name: str = ""
    connection_id: int = 0
    upstream_address: str = ""
    start_time_ns: int = field(default_factory=time.time_ns)
    # Extra properties by dotted path (e.g. "geo.country"): bytes as given, str as UTF-8, int as 8-byte LE.
    extra: Mapping[str, bytes | str | int | bool] = field(default_factory=dict)


@dataclass
class LocalResponse:
    status: int
    headers: Headers
    body: bytes
    details: str = ""
    grpc_status: int = -1


@dataclass
class HttpCallRequest:
    """What a filter asked `proxy_http_call` to send (handed to the gateway's http_call function)."""

    upstream: str
    method: str
    path: str
    authority: str
    headers: Headers
    body: bytes
    trailers: Headers
    timeout_ms: int


@dataclass
class HttpCallResponse:
    status: int
    headers: Headers
    body: bytes
    trailers: Headers = field(default_factory=list)


@dataclass
class PendingHttpCall:
    token: int
    request: HttpCallRequest
    context_id: int  # the stream context that was effective when the call was made


class StreamContext:
    """One request/response stream as a filter instance sees it.

    Trailers and filter-set properties are created on first use: most requests never touch them, and every
    object built per request counts.
    """

    __slots__ = (
        "_properties",
        "_request_trailers",
        "_response_trailers",
        "closed",
        "continue_request",
        "continue_response",
        "created",
        "done",
        "id",
        "info",
        "local_response",
        "request_body",
        "request_eos",
        "request_headers",
        "response_body",
        "response_eos",
        "response_headers",
    )

    def __init__(self, context_id: int, info: RequestInfo) -> None:
        self.id: int = context_id
        self.info: RequestInfo = info
        self.request_headers: Headers = []
        self.response_headers: Headers = []
        self.request_body: bytearray = bytearray()
        self.response_body: bytearray = bytearray()
        self.request_eos: bool = False
        self.response_eos: bool = False
        self.local_response: LocalResponse | None = None
        self.continue_request = False
        self.continue_response = False
        self.closed = False
        self.created = False  # proxy_on_context_create has run for it
        self.done = False
        self._request_trailers: Headers | None = None
        self._response_trailers: Headers | None = None
        self._properties: dict[bytes, bytes] | None = None

    @property
    def request_trailers(self) -> Headers:
        if self._request_trailers is None:
            self._request_trailers = []
        return self._request_trailers

    @request_trailers.setter
    def request_trailers(self, value: Headers) -> None:
        self._request_trailers = value

    @property
    def response_trailers(self) -> Headers:
        if self._response_trailers is None:
            self._response_trailers = []
        return self._response_trailers

    @response_trailers.setter
    def response_trailers(self, value: Headers) -> None:
        self._response_trailers = value

    @property
    def properties(self) -> dict[bytes, bytes]:
        """Properties the filter set for this stream (proxy_set_property)."""
        if self._properties is None:
            self._properties = {}
        return self._properties


class HostState:
    """Per-instance state read and written by host functions while the instance runs a callback."""

    __slots__ = (
        "attention",
        "current",
        "current_id",
        "entered",
        "exit_code",
        "files",
        "foreign_args",
        "http_call_response",
        "in_root",
        "logs",
        "memory",
        "next_token",
        "owner",
        "pending_http_calls",
        "protocol_error",
        "root_context_id",
        "root_done",
        "services",
        "status",
        "streams",
        "tick_period_ms",
        "time_limit",
    )

    def __init__(self, services: FilterServices, time_limit: float = 0.1) -> None:
        self.services = services
        # Time limit of one callback (seconds) and when the running callback was entered (monotonic).
        self.time_limit = time_limit
        self.entered = 0.0
        self.memory: GuestMemory | None = None
        self.root_context_id = 1
        self.streams: dict[int, StreamContext] = {}
        # The context host calls act on: the callback's context, or one set by proxy_set_effective_context.
        self.current: StreamContext | None = None
        self.current_id = 0
        self.in_root = True
        self.tick_period_ms = 0
        self.exit_code: int | None = None
        self.protocol_error: str | None = None
        self.pending_http_calls: list[PendingHttpCall] = []
        # Set by every host call that changes a stream's course (continue, close, local response,
        # http_call): the driver looks closer after a callback only when it is set.
        self.attention = False
        self.next_token = 1
        self.http_call_response: HttpCallResponse | None = None
        self.foreign_args = b""
        self.status: tuple[int, bytes] = (0, b"")
        self.root_done = False
        self.logs: list[tuple[int, str]] | None = None  # when set, log lines are also collected here
        self.owner: Any = None  # the FilterInstance
        self.files: WasiFiles | None = None  # WASI fds above stdio (created when directories are granted)

    def epoch_deadline_reached(self) -> int:
        """The store's epoch deadline was reached while this instance ran: ticks to extend it by, or 0 to
        interrupt the running callback (it has used up its time limit)."""
        remaining = self.entered + self.time_limit - time.monotonic()
        if remaining <= 0:
            return 0
        return int(remaining / EPOCH_TICK_SECONDS) + 1
