"""Proxy-Wasm constants and ABI version detection (spec: proxy-wasm/spec, abi-versions/v0.2.1)."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from typing import Final

import wasmtime

from ..exceptions import FilterLoadError

__all__ = [
    "GUEST_EXPORTS",
    "AbiVersion",
    "Action",
    "BufferType",
    "LogLevel",
    "MapType",
    "MetricType",
    "Status",
    "StreamType",
    "detect_abi",
    "export_shapes",
]


class Status(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    INTERNAL_FAILURE = 10
    UNIMPLEMENTED = 12


class Action(enum.IntEnum):
    CONTINUE = 0
    PAUSE = 1


class BufferType(enum.IntEnum):
    REQUEST_BODY = 0
    RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_MESSAGE = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    FOREIGN_FUNCTION_ARGUMENTS = 8


class MapType(enum.IntEnum):
    REQUEST_HEADERS = 0
    REQUEST_TRAILERS = 1
    RESPONSE_HEADERS = 2
    RESPONSE_TRAILERS = 3
    GRPC_INITIAL_METADATA = 4
    GRPC_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class StreamType(enum.IntEnum):
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class LogLevel(enum.IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


class MetricType(enum.IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


class AbiVersion(enum.Enum):
    V0_2_1 = "0.2.1"
    V0_2_0 = "0.2.0"
    V0_1_0 = "0.1.0"


_VERSION_EXPORTS: Final = (
    ("proxy_abi_version_0_2_1", AbiVersion.V0_2_1),
    ("proxy_abi_version_0_2_0", AbiVersion.V0_2_0),
    ("proxy_abi_version_0_1_0", AbiVersion.V0_1_0),
)

# Guest exports the host calls: name -> accepted (params, results) shapes (all i32). 0.1.0 header callbacks
# lack end_of_stream; some SDKs declare void returns where the spec has a bool.
GUEST_EXPORTS: Final[Mapping[str, tuple[tuple[int, int], ...]]] = {
    "proxy_on_memory_allocate": ((1, 1),),
    "malloc": ((1, 1),),
    "proxy_on_context_create": ((2, 0),),
    "proxy_on_vm_start": ((2, 1),),
    "proxy_on_configure": ((2, 1),),
    "proxy_on_tick": ((1, 0),),
    "proxy_on_request_headers": ((3, 1), (2, 1)),
    "proxy_on_request_body": ((3, 1),),
    "proxy_on_request_trailers": ((2, 1),),
    "proxy_on_response_headers": ((3, 1), (2, 1)),
    "proxy_on_response_body": ((3, 1),),
    "proxy_on_response_trailers": ((2, 1),),
    "proxy_on_done": ((1, 1),),
    "proxy_on_log": ((1, 0),),
    "proxy_on_delete": ((1, 0),),
    "proxy_on_http_call_response": ((5, 0),),
    "proxy_on_queue_ready": ((2, 0),),
    "proxy_on_foreign_function": ((3, 0), (3, 1)),
    "_initialize": ((0, 0),),
    "_start": ((0, 0),),
    "main": ((0, 0), (2, 1)),
    "__main_void": ((0, 1),),
}


def export_shapes(
    module: wasmtime.Module,
    *,
    exports: Mapping[str, wasmtime.ExportType] | None = None,
    only: Collection[str] | None = None,
) -> dict[str, tuple[int, int]]:
    """(param count, result count) of every exported function whose types are all i32 ((-1, -1) for a
    function with other types). ``exports``: the module's by name, when the caller has them (they are
    slow to list); ``only``: look at these export names only (reading a type is slow too)."""
    shapes: dict[str, tuple[int, int]] = {}
    i32 = wasmtime.ValType.i32()
    by_name = {e.name: e for e in module.exports} if exports is None else exports
    for name, exp in by_name.items():
        if only is not None and name not in only:
            continue
        ty = exp.type
        if isinstance(ty, wasmtime.FuncType):
            params = ty.params
            results = ty.results
            if all(p == i32 for p in params) and all(r == i32 for r in results):
                shapes[name] = (len(params), len(results))
            else:
                shapes[name] = (-1, -1)
    return shapes


def detect_abi(
    module: wasmtime.Module,
    path: object,
    *,
    export_names: Collection[str] | None = None,
    import_names: Collection[tuple[str, str]] | None = None,
) -> AbiVersion:
    """The module's Proxy-Wasm ABI version; FilterLoadError naming ``path`` for anything else.

    ``export_names`` / ``import_names`` ((module, name) pairs): the module's, when the caller already has
    them (slow to list).
    """
    names = {e.name for e in module.exports} if export_names is None else export_names
    for export, version in _VERSION_EXPORTS:
        if export in names:
            return version
    imported = {(i.module, i.name) for i in module.imports} if import_names is None else import_names
    if "handle_request" in names or any(m == "http_handler" for m, _ in imported):
        raise FilterLoadError(
            f"{path}: this is an http-wasm module (exports handle_request / imports http_handler.*), "
            "not a Proxy-Wasm filter; wasm-gateway runs Proxy-Wasm filters (ABI 0.1.0, 0.2.0, 0.2.1)"
        )
    raise FilterLoadError(
        f"{path}: not a Proxy-Wasm filter: no proxy_abi_version_0_2_1 / _0_2_0 / _0_1_0 export"
    )
