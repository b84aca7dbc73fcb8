"""What host calls see: the request description the gateway fills, per-stream state, per-instance state."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .memory import GuestMemory
    from .services import FilterServices

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
    """One request/response stream as a filter instance sees it."""

    __slots__ = (
        "closed",
        "continue_request",
        "continue_response",
        "done",
        "id",
        "info",
        "local_response",
        "properties",
        "request_body",
        "request_eos",
        "request_headers",
        "request_trailers",
        "response_body",
        "response_eos",
        "response_headers",
        "response_trailers",
    )

    def __init__(self, context_id: int, info: RequestInfo) -> None:
        self.id = context_id
        self.info = info
        self.request_headers: Headers = []
        self.request_trailers: Headers = []
        self.response_headers: Headers = []
        self.response_trailers: Headers = []
        self.request_body = bytearray()
        self.response_body = bytearray()
        self.request_eos = False
        self.response_eos = False
        self.local_response: LocalResponse | None = None
        self.continue_request = False
        self.continue_response = False
        self.closed = False
        self.done = False
        self.properties: dict[bytes, bytes] = {}


class HostState:
    """Per-instance state read and written by host functions while the instance runs a callback."""

    def __init__(self, services: FilterServices) -> None:
        self.services = services
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
        self.next_token = 1
        self.http_call_response: HttpCallResponse | None = None
        self.foreign_args = b""
        self.status: tuple[int, bytes] = (0, b"")
        self.root_done = False
        self.logs: list[tuple[int, str]] | None = None  # when set, log lines are also collected here
        self.on_queue_ready: Callable[[int], None] | None = None
        self.owner: Any = None  # the FilterInstance
