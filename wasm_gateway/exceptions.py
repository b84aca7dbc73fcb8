"""Every error wasm-gateway raises, in one tree.

Library errors (OSError, httptools.HttpParserError, wasmtime.WasmtimeError, tomllib.TOMLDecodeError, ...)
are translated into these at the boundary where they happen, so callers catch one family::

    GatewayError
    ├── ConfigError                 bad configuration: file, key path, value and what is expected
    ├── EdgeDataError               a kv.* / sql.query call failed; becomes the error result the filter reads
    ├── FilterError                 anything about a Wasm filter
    │   ├── FilterLoadError         module cannot be compiled, linked, started or configured
    │   ├── FilterTrapError         the guest trapped (incl. proc_exit with a non-zero code)
    │   ├── FilterTimeoutError      a callback ran past its time (epoch) or fuel budget
    │   ├── FilterPoolTimeout       no instance became free within the borrow timeout
    │   └── FilterProtocolError     a host-call pattern the ABI forbids (e.g. invalid header set)
    ├── GeoDatabaseError            a geo database cannot be opened or read: file and what is wrong
    ├── RequestBodyError            the client's request body did not match its declared length
    ├── StateError                  a shared-state backend (local database, Redis) failed
    │   └── StateUnavailableError   the backend is down or too slow (Redis: connect/read timeout, refused)
    └── UpstreamError               talking to an origin failed
        ├── UpstreamConnectError    refused / unreachable / every target ejected  -> 502
        ├── UpstreamTimeoutError    connect or read timed out                     -> 504
        ├── UpstreamProtocolError   malformed or oversized response head          -> 502
        └── UpstreamBodyError       the response body broke off mid-stream        -> abort client response

Request-level rejections (400, 404, 413, ...) are answers, not exceptions: they are produced by the request
path directly and never surface as Python errors to the client.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EdgeDataError",
    "FilterError",
    "FilterLoadError",
    "FilterPoolTimeout",
    "FilterProtocolError",
    "FilterTimeoutError",
    "FilterTrapError",
    "GatewayError",
    "GeoDatabaseError",
    "RequestBodyError",
    "StateError",
    "StateUnavailableError",
    "UpstreamBodyError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeoutError",
]


class GatewayError(Exception):
    """Base of every error raised by wasm-gateway."""


class ConfigError(GatewayError):
    """Invalid configuration. ``str(err)`` is the full message; ``errors`` lists each problem found."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors if errors is not None else [message]


class EdgeDataError(GatewayError):
    """An edge-data call (wasm_gateway.edge) failed. Never reaches a caller: the host function answers it as
    an error result with ``code`` (an ``edge.ErrorCode``) and ``reason``, which the filter reads."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FilterError(GatewayError):
    """A Wasm filter failed. ``filter_name`` names the configured filter, when known."""

    def __init__(self, message: str, filter_name: str | None = None) -> None:
        super().__init__(message)
        self.filter_name = filter_name


class FilterLoadError(FilterError):
    """The module could not be compiled, linked, started or configured."""


class FilterTrapError(FilterError):
    """The guest trapped."""


class FilterTimeoutError(FilterError):
    """A callback exceeded its time or fuel budget."""


class FilterPoolTimeout(FilterError):
    """No pooled instance became free in time."""


class FilterProtocolError(FilterError):
    """The guest used the ABI in a way the host refuses (e.g. set an invalid header)."""


class GeoDatabaseError(GatewayError):
    """A geo database (MaxMind DB format) cannot be opened or read; the message names the file."""


class RequestBodyError(GatewayError):
    """The caller's request body did not match its declared length (usually: the client went away mid-upload).
    The upstream connection is closed; nothing was answered."""


class StateError(GatewayError):
    """A shared-state backend failed. ``backend`` is "memory", "local" or "redis"."""

    def __init__(self, message: str, backend: str = "") -> None:
        super().__init__(message)
        self.backend = backend


class StateUnavailableError(StateError):
    """The backend cannot answer now (down, refused, timed out); the configured failure policy applies."""


class UpstreamError(GatewayError):
    """Talking to an upstream failed. ``kind`` is a short, bounded label used in metrics."""

    kind = "error"

    def __init__(self, message: str, target: str | None = None) -> None:
        super().__init__(message)
        self.target = target


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamTimeoutError(UpstreamError):
    kind = "timeout"


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"


class UpstreamBodyError(UpstreamError):
    kind = "body"
