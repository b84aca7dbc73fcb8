"""Everything one configured filter shares across its instances: identity, config, log sink, stores."""

from __future__ import annotations

import base64
import hashlib
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .abi import AbiVersion, LogLevel
from .shared import LocalSharedData, LocalSharedQueues, MetricsRegistry, SharedDataStore, SharedQueueStore

if TYPE_CHECKING:
    from .wasi import Preopen

__all__ = ["FOREIGN_FUNCTIONS", "EdgeFunctions", "FilterServices", "ForeignFunction", "SharedServices"]

# A foreign function maps argument bytes to result bytes; raising ValueError answers BAD_ARGUMENT.
ForeignFunction = Callable[[bytes], bytes]


def _sha256(args: bytes) -> bytes:
    return hashlib.sha256(args).digest()


def _b64enc(args: bytes) -> bytes:
    return base64.b64encode(args)


def _b64dec(args: bytes) -> bytes:
    try:
        return base64.b64decode(args, validate=True)
    except ValueError as exc:
        raise ValueError(f"invalid base64: {exc}") from None


def _b64urldec(args: bytes) -> bytes:
    try:
        return base64.urlsafe_b64decode(args + b"=" * (-len(args) % 4))
    except ValueError as exc:
        raise ValueError(f"invalid base64url: {exc}") from None


def _gzip(args: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(args) + c.flush()


def _gunzip(args: bytes) -> bytes:
    try:
        d = zlib.decompressobj(47)  # gzip or zlib header
        out = d.decompress(args, 64 * 1024 * 1024)
        if d.unconsumed_tail:
            raise ValueError("decompressed size exceeds 64 MiB")
        return out
    except zlib.error as exc:
        raise ValueError(f"invalid compressed data: {exc}") from None


# Foreign functions every filter may call with proxy_call_foreign_function(name, args): things a filter author
# otherwise compiles into every module (hashing, base64, gzip), done natively.
FOREIGN_FUNCTIONS: Mapping[str, ForeignFunction] = {
    "sha256": _sha256,
    "base64_encode": _b64enc,
    "base64_decode": _b64dec,
    "base64url_decode": _b64urldec,
    "gzip_compress": _gzip,
    "gzip_decompress": _gunzip,
}


class EdgeFunctions(Protocol):
    """Where a filter's edge-data foreign functions come from (wasm_gateway.edge.EdgeData)."""

    def functions(
        self, filter_name: str, kv: Sequence[str] = (), sql: Sequence[str] = ()
    ) -> Mapping[str, ForeignFunction]: ...

    def close(self) -> None: ...


@dataclass
class SharedServices:
    """Process-wide stores shared by every filter (shared data and queues are keyed by vm_id like Envoy)."""

    shared_data: SharedDataStore = field(default_factory=LocalSharedData)
    queues: SharedQueueStore = field(default_factory=LocalSharedQueues)
    metrics: MetricsRegistry = field(default_factory=MetricsRegistry)
    edge: EdgeFunctions | None = None  # kv.* / sql.query, bound per filter to its grants


LogSink = Callable[[str, int, str], None]  # (filter name, proxy-wasm level, message)


def default_log_sink(filter_name: str, level: int, message: str) -> None:
    py_level = (logging.DEBUG, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)[
        min(max(level, 0), 5)
    ]
    logging.getLogger("wasm_gateway.filter").log(py_level, "[%s] %s", filter_name, message)


@dataclass
class FilterServices:
    name: str
    abi: AbiVersion
    root_id: str = ""
    vm_id: str = ""
    configuration: bytes = b""
    vm_configuration: bytes = b""
    log_level: LogLevel = LogLevel.INFO
    log_sink: LogSink = default_log_sink
    shared: SharedServices = field(default_factory=SharedServices)
    foreign_functions: Mapping[str, ForeignFunction] = field(default_factory=lambda: dict(FOREIGN_FUNCTIONS))
    env: Mapping[str, str] = field(default_factory=dict)
    allowed_dirs: Sequence[str] = ()
    # allowed_dirs resolved (filled when the module is linked): WASI's preopened directories
    preopens: tuple[Preopen, ...] = ()
    # Called (with the queue token) when an item is enqueued to a queue this filter registered; the runtime
    # delivers proxy_on_queue_ready from it later, outside any guest call.
    on_queue_ready: Callable[[int], None] | None = None
    upstreams: frozenset[str] | None = None  # http_call targets allowed (None: any name; the gateway decides)
