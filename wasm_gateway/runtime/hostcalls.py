"""The host functions a Proxy-Wasm filter imports from ``env``, one registration table per ABI version.

Each implementation gets the calling instance's `HostState` and the raw i32/i64 arguments (unsigned), and
returns a Proxy-Wasm status. None of them raises into the guest: a bad pointer answers INVALID_MEMORY_ACCESS,
a forbidden pattern (an invalid header) records a protocol error that fails the filter once the callback
returns, and `fastcall` turns anything unexpected into INTERNAL_FAILURE.

Side effects that change the request's course (continue, local response, http_call) are only recorded here;
the chain applies them after the current callback has returned.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import Final

from ..exceptions import StateError
from . import fastcall
from .abi import AbiVersion, BufferType, MapType, MetricType, StreamType
from .context import Headers, HostState, HttpCallRequest, LocalResponse, PendingHttpCall, StreamContext
from .fastcall import I32, I64
from .memory import decode_pairs, encode_pairs
from .memory import pack_u32 as _pack_u32
from .properties import get_property

__all__ = ["HOST_TABLES", "HostFunction", "header_error", "pairs_to_headers"]

OK: Final = 0
NOT_FOUND: Final = 1
BAD_ARGUMENT: Final = 2
PARSE_FAILURE: Final = 4
INVALID_MEMORY_ACCESS: Final = 6
EMPTY: Final = 7
INTERNAL_FAILURE: Final = 10
UNIMPLEMENTED: Final = 12

# IntEnum members as plain ints: enum attribute access costs ~150 ns on the hot path.
_BUF_FOREIGN_FUNCTION_ARGUMENTS: Final = int(BufferType.FOREIGN_FUNCTION_ARGUMENTS)
_BUF_HTTP_CALL_RESPONSE_BODY: Final = int(BufferType.HTTP_CALL_RESPONSE_BODY)
_BUF_PLUGIN_CONFIGURATION: Final = int(BufferType.PLUGIN_CONFIGURATION)
_BUF_REQUEST_BODY: Final = int(BufferType.REQUEST_BODY)
_BUF_RESPONSE_BODY: Final = int(BufferType.RESPONSE_BODY)
_BUF_VM_CONFIGURATION: Final = int(BufferType.VM_CONFIGURATION)
_MAP_HTTP_CALL_RESPONSE_HEADERS: Final = int(MapType.HTTP_CALL_RESPONSE_HEADERS)
_MAP_HTTP_CALL_RESPONSE_TRAILERS: Final = int(MapType.HTTP_CALL_RESPONSE_TRAILERS)
_MAP_RESPONSE_TRAILERS: Final = int(MapType.RESPONSE_TRAILERS)
_STREAM_HTTP_REQUEST: Final = int(StreamType.HTTP_REQUEST)
_STREAM_HTTP_RESPONSE: Final = int(StreamType.HTTP_RESPONSE)
_STREAM_UPSTREAM: Final = int(StreamType.UPSTREAM)

_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_PSEUDO: Final = frozenset({":method", ":path", ":authority", ":scheme", ":status", ":protocol"})
_BAD_VALUE_RE: Final = re.compile(r"[\r\n\0]")


# Names already found valid (filters set the same few names over and over), bounded.
_VALID_NAMES: Final[set[str]] = set(_PSEUDO)
_VALID_NAMES_MAX: Final = 4096


def header_error(name: str, value: str) -> str | None:
    """Why (name, value) may not be set, or None when it is valid. ``name`` is already lower-case."""
    if name not in _VALID_NAMES:
        if name.startswith(":"):
            return f"unknown pseudo-header {name!r}"
        if not _TOKEN_RE.match(name):
            return f"invalid header name {name!r}"
        if len(_VALID_NAMES) < _VALID_NAMES_MAX:
            _VALID_NAMES.add(name)
    # Printable text cannot hold CR, LF or NUL; only the rest (tabs, obs-text) needs the full check.
    if not value.isprintable() and _BAD_VALUE_RE.search(value):
        return f"header {name!r} value contains CR, LF or NUL"
    return None


def pairs_to_headers(data: bytes) -> Headers | None:
    pairs = decode_pairs(data)
    if pairs is None:
        return None
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in pairs]


def _encode_headers(headers: Headers) -> bytes:
    return encode_pairs([(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])


def _stream(st: HostState) -> StreamContext | None:
    return st.current


_name_of: Final = itemgetter(0)


def _map_of(st: HostState, mtype: int) -> Headers | None:
    s = st.current
    if mtype == 0:
        return s.request_headers if s is not None else None
    if mtype == 2:
        return s.response_headers if s is not None else None
    if mtype == 1:
        return s.request_trailers if s is not None else None
    if mtype == 3:
        return s.response_trailers if s is not None else None
    r = st.http_call_response
    if mtype == _MAP_HTTP_CALL_RESPONSE_HEADERS:
        return r.headers if r is not None else None
    if mtype == _MAP_HTTP_CALL_RESPONSE_TRAILERS:
        return r.trailers if r is not None else None
    return None


def _set_map(st: HostState, mtype: int, headers: Headers) -> bool:
    s = st.current
    if s is None:
        return False
    if mtype == 0:
        s.request_headers = headers
    elif mtype == 2:
        s.response_headers = headers
    elif mtype == 1:
        s.request_trailers = headers
    elif mtype == 3:
        s.response_trailers = headers
    else:
        return False
    return True


def _protocol_error(st: HostState, message: str) -> int:
    if st.protocol_error is None:
        st.protocol_error = message
    return BAD_ARGUMENT


# ---------------------------------------------------------------------------------------------- logging, time


def proxy_log(st: HostState, level: int, ptr: int, n: int) -> int:
    mem = st.memory
    if mem is None or not mem.fits(ptr + n):
        return INVALID_MEMORY_ACCESS
    svc = st.services
    if level >= svc.log_level or st.logs is not None:
        msg = str(mem.view[ptr : ptr + n], "utf-8", "replace")
        if st.logs is not None:
            st.logs.append((level, msg))
        if level >= svc.log_level:
            svc.log_sink(svc.name, level, msg)
    return OK


def proxy_get_log_level(st: HostState, ptr: int) -> int:
    assert st.memory is not None
    return OK if st.memory.write_u32(ptr, int(st.services.log_level)) else INVALID_MEMORY_ACCESS


def proxy_get_current_time_nanoseconds(st: HostState, ptr: int) -> int:
    assert st.memory is not None
    return OK if st.memory.write_u64(ptr, time.time_ns()) else INVALID_MEMORY_ACCESS


def proxy_set_tick_period_milliseconds(st: HostState, ms: int) -> int:
    st.tick_period_ms = ms
    return OK


# ---------------------------------------------------------------------------------------------- context


def proxy_set_effective_context(st: HostState, ctx: int) -> int:
    if ctx == st.root_context_id:
        st.current = None
        st.current_id = ctx
        return OK
    s = st.streams.get(ctx)
    if s is None:
        return BAD_ARGUMENT
    st.current = s
    st.current_id = ctx
    return OK


def proxy_done(st: HostState) -> int:
    s = st.current
    if s is None:
        st.root_done = True
    else:
        s.done = True
    return OK


# ---------------------------------------------------------------------------------------------- buffers


def _buffer(st: HostState, btype: int) -> bytes | bytearray | None:
    s = st.current
    if btype == _BUF_REQUEST_BODY:
        return s.request_body if s is not None else None
    if btype == _BUF_RESPONSE_BODY:
        return s.response_body if s is not None else None
    if btype == _BUF_HTTP_CALL_RESPONSE_BODY:
        r = st.http_call_response
        return r.body if r is not None else None
    if btype == _BUF_VM_CONFIGURATION:
        return st.services.vm_configuration
    if btype == _BUF_PLUGIN_CONFIGURATION:
        return st.services.configuration
    if btype == _BUF_FOREIGN_FUNCTION_ARGUMENTS:
        return st.foreign_args
    return None


def proxy_get_buffer_bytes(
    st: HostState, btype: int, start: int, length: int, ptr_ptr: int, len_ptr: int
) -> int:
    if btype > _BUF_FOREIGN_FUNCTION_ARGUMENTS:
        return BAD_ARGUMENT
    buf = _buffer(st, btype)
    if buf is None:
        return NOT_FOUND
    if start > len(buf):
        return BAD_ARGUMENT
    data = bytes(buf[start : start + length])
    assert st.memory is not None
    return OK if st.memory.return_bytes(data, ptr_ptr, len_ptr) else INVALID_MEMORY_ACCESS


def proxy_get_buffer_status(st: HostState, btype: int, len_ptr: int, flags_ptr: int) -> int:
    if btype > _BUF_FOREIGN_FUNCTION_ARGUMENTS:
        return BAD_ARGUMENT
    buf = _buffer(st, btype)
    if buf is None:
        return NOT_FOUND
    s = st.current
    eos = 0
    if s is not None and btype == _BUF_REQUEST_BODY:
        eos = int(s.request_eos)
    elif s is not None and btype == _BUF_RESPONSE_BODY:
        eos = int(s.response_eos)
    assert st.memory is not None
    ok = st.memory.write_u32(len_ptr, len(buf)) and st.memory.write_u32(flags_ptr, eos)
    return OK if ok else INVALID_MEMORY_ACCESS


def proxy_set_buffer_bytes(st: HostState, btype: int, start: int, size: int, ptr: int, n: int) -> int:
    assert st.memory is not None
    data = st.memory.read(ptr, n)
    if data is None:
        return INVALID_MEMORY_ACCESS
    s = st.current
    if s is None or btype not in (_BUF_REQUEST_BODY, _BUF_RESPONSE_BODY):
        return BAD_ARGUMENT
    buf = s.request_body if btype == _BUF_REQUEST_BODY else s.response_body
    st.attention = True  # the body the driver releases is no longer the chunk it was given
    # Envoy's rules: (0, 0) prepends, (0, >= len) replaces, start >= len appends; we also splice in between.
    if start >= len(buf):
        buf += data
    else:
        buf[start : start + size] = data
    return OK


# ---------------------------------------------------------------------------------------------- header maps


def proxy_get_header_map_pairs(st: HostState, mtype: int, ptr_ptr: int, len_ptr: int) -> int:
    headers = _map_of(st, mtype)
    if headers is None:
        return BAD_ARGUMENT if mtype > _MAP_HTTP_CALL_RESPONSE_TRAILERS else NOT_FOUND
    assert st.memory is not None
    ok = st.memory.return_bytes(_encode_headers(headers), ptr_ptr, len_ptr)
    return OK if ok else INVALID_MEMORY_ACCESS


def proxy_set_header_map_pairs(st: HostState, mtype: int, ptr: int, n: int) -> int:
    assert st.memory is not None
    data = st.memory.read(ptr, n)
    if data is None:
        return INVALID_MEMORY_ACCESS
    headers = pairs_to_headers(data)
    if headers is None:
        return BAD_ARGUMENT
    for k, v in headers:
        err = header_error(k, v)
        if err is not None:
            return _protocol_error(st, err)
    return OK if _set_map(st, mtype, headers) else BAD_ARGUMENT


def proxy_get_header_map_size(st: HostState, mtype: int, size_ptr: int) -> int:
    headers = _map_of(st, mtype)
    if headers is None:
        return BAD_ARGUMENT
    assert st.memory is not None
    return OK if st.memory.write_u32(size_ptr, len(_encode_headers(headers))) else INVALID_MEMORY_ACCESS


def _key(st: HostState, ptr: int, n: int) -> str | None:
    assert st.memory is not None
    raw = st.memory.read_latin1(ptr, n)
    return None if raw is None else raw.lower()


def _get_value(
    st: HostState, mtype: int, kptr: int, klen: int, vptr_ptr: int, vlen_ptr: int, missing: int
) -> int:
    mem = st.memory
    assert mem is not None
    key = mem.read_latin1(kptr, klen)
    if key is None or not (mem.fits(vptr_ptr + 4) and mem.fits(vlen_ptr + 4)):
        return INVALID_MEMORY_ACCESS
    headers = _map_of(st, mtype)
    if headers is None:
        return BAD_ARGUMENT
    key = key.lower()
    value: str | None = None
    for k, v in headers:
        if k == key:
            # Envoy joins repeated headers with a comma.
            value = v if value is None else f"{value},{v}"
    if value is None:
        if missing == OK and not mem.return_bytes(b"", vptr_ptr, vlen_ptr):
            return INVALID_MEMORY_ACCESS
        return missing
    return OK if mem.return_bytes(value.encode("latin-1"), vptr_ptr, vlen_ptr) else INVALID_MEMORY_ACCESS


def proxy_get_header_map_value(st: HostState, mtype: int, kptr: int, klen: int, vpp: int, vlp: int) -> int:
    return _get_value(st, mtype, kptr, klen, vpp, vlp, NOT_FOUND)


def proxy_get_header_map_value_0_1(
    st: HostState, mtype: int, kptr: int, klen: int, vpp: int, vlp: int
) -> int:
    # ABI 0.1.0 answered OK with an empty value for a missing key.
    return _get_value(st, mtype, kptr, klen, vpp, vlp, OK)


_ARGS: Final = fastcall.ARGS
_put: Final = fastcall.put_result
_unpack5: Final = fastcall.args_unpacker(5)
_unpack3: Final = fastcall.args_unpacker(3)
_SLOT: Final = fastcall.HOST_STATE


@fastcall.raw_host_call
def raw_get_header_map_value(env: bool, caller: bool, a: int, n: bool) -> int:
    """`proxy_get_header_map_value` as one callback frame: the hot path for request/response headers of the
    current stream, falling back to `proxy_get_header_map_value` for anything else."""
    try:
        st = _SLOT.state
        mtype, kptr, klen, vpp, vlp = _unpack5(_ARGS, a)
        s = st.current
        mem = st.memory
        view = mem.view
        lv = len(view)
        if s is None or mtype & ~2 or kptr + klen > lv or vpp > lv - 4 or vlp > lv - 4:
            _put(_ARGS, a, _get_value(st, mtype, kptr, klen, vpp, vlp, NOT_FOUND))
            return 0
        key = str(view[kptr : kptr + klen], "latin-1").lower()
        headers = s.response_headers if mtype else s.request_headers
        names = list(map(_name_of, headers))  # searched in C
        if key not in names:
            _put(_ARGS, a, NOT_FOUND)
            return 0
        if names.count(key) == 1:
            value = headers[names.index(key)][1]
        else:  # Envoy joins repeated headers with a comma
            value = ",".join([v for k, v in headers if k == key])
        data = value.encode("latin-1")
        size = len(data)
        if size == 0:
            _put(_ARGS, a, OK if mem.return_bytes(data, vpp, vlp) else INVALID_MEMORY_ACCESS)
            return 0
        ptr = mem.allocate_raw(size)
        view = mem.view
        if ptr == 0 or (ptr + size > len(view) and not mem.fits(ptr + size)):
            _put(_ARGS, a, INVALID_MEMORY_ACCESS)
            return 0
        view = mem.view
        view[ptr : ptr + size] = data
        _pack_u32(view, vpp, ptr)
        _pack_u32(view, vlp, size)
        _put(_ARGS, a, OK)
        return 0
    except BaseException as exc:
        return fastcall.host_call_failed(exc, a, INTERNAL_FAILURE, "env.proxy_get_header_map_value")


@fastcall.raw_host_call
def raw_add_header_map_value(env: bool, caller: bool, a: int, n: bool) -> int:
    """`proxy_add_header_map_value` as one callback frame (request/response headers of the current stream;
    anything else goes to `proxy_add_header_map_value`)."""
    try:
        st = _SLOT.state
        mtype, kptr, klen, vptr, vlen = _unpack5(_ARGS, a)
        s = st.current
        view = st.memory.view
        lv = len(view)
        if s is None or mtype & ~2 or kptr + klen > lv or vptr + vlen > lv:
            _put(_ARGS, a, proxy_add_header_map_value(st, mtype, kptr, klen, vptr, vlen))
            return 0
        k = str(view[kptr : kptr + klen], "latin-1").lower()
        v = str(view[vptr : vptr + vlen], "latin-1")
        if (k not in _VALID_NAMES or not v.isprintable()) and (err := header_error(k, v)) is not None:
            _put(_ARGS, a, _protocol_error(st, err))
            return 0
        (s.response_headers if mtype else s.request_headers).append((k, v))
        _put(_ARGS, a, OK)
        return 0
    except BaseException as exc:
        return fastcall.host_call_failed(exc, a, INTERNAL_FAILURE, "env.proxy_add_header_map_value")


@fastcall.raw_host_call
def raw_replace_header_map_value(env: bool, caller: bool, a: int, n: bool) -> int:
    """`proxy_replace_header_map_value` as one callback frame (request/response headers of the current
    stream; anything else goes to `proxy_replace_header_map_value`)."""
    try:
        st = _SLOT.state
        mtype, kptr, klen, vptr, vlen = _unpack5(_ARGS, a)
        s = st.current
        view = st.memory.view
        lv = len(view)
        if s is None or mtype & ~2 or kptr + klen > lv or vptr + vlen > lv:
            _put(_ARGS, a, proxy_replace_header_map_value(st, mtype, kptr, klen, vptr, vlen))
            return 0
        k = str(view[kptr : kptr + klen], "latin-1").lower()
        v = str(view[vptr : vptr + vlen], "latin-1")
        if (k not in _VALID_NAMES or not v.isprintable()) and (err := header_error(k, v)) is not None:
            _put(_ARGS, a, _protocol_error(st, err))
            return 0
        _replace(s.response_headers if mtype else s.request_headers, (k, v))
        _put(_ARGS, a, OK)
        return 0
    except BaseException as exc:
        return fastcall.host_call_failed(exc, a, INTERNAL_FAILURE, "env.proxy_replace_header_map_value")


@fastcall.raw_host_call
def raw_remove_header_map_value(env: bool, caller: bool, a: int, n: bool) -> int:
    """`proxy_remove_header_map_value` as one callback frame (request/response headers of the current
    stream; anything else goes to `proxy_remove_header_map_value`)."""
    try:
        st = _SLOT.state
        mtype, kptr, klen = _unpack3(_ARGS, a)
        s = st.current
        view = st.memory.view
        if s is None or mtype & ~2 or kptr + klen > len(view):
            _put(_ARGS, a, proxy_remove_header_map_value(st, mtype, kptr, klen))
            return 0
        key = str(view[kptr : kptr + klen], "latin-1").lower()
        headers = s.response_headers if mtype else s.request_headers
        if key in map(_name_of, headers):  # usually absent (a filter clearing what a client might send)
            headers[:] = [h for h in headers if h[0] != key]
        _put(_ARGS, a, OK)
        return 0
    except BaseException as exc:
        return fastcall.host_call_failed(exc, a, INTERNAL_FAILURE, "env.proxy_remove_header_map_value")


def _replace(headers: Headers, kv: tuple[str, str]) -> None:
    """Replace the first header of kv's name (dropping any later ones), or append it."""
    key = kv[0]
    names = list(map(_name_of, headers))  # searched in C: filters set several headers per request
    if key not in names:
        headers.append(kv)
        return
    i = names.index(key)
    headers[i] = kv
    if names.count(key) > 1:
        headers[i + 1 :] = [h for h in headers[i + 1 :] if h[0] != key]


def _read_kv(st: HostState, kptr: int, klen: int, vptr: int, vlen: int) -> tuple[str, str] | None:
    mem = st.memory
    assert mem is not None
    k = mem.read_latin1(kptr, klen)
    v = mem.read_latin1(vptr, vlen)
    if k is None or v is None:
        return None
    return k.lower(), v


def proxy_add_header_map_value(st: HostState, mtype: int, kptr: int, klen: int, vptr: int, vlen: int) -> int:
    kv = _read_kv(st, kptr, klen, vptr, vlen)
    if kv is None:
        return INVALID_MEMORY_ACCESS
    err = header_error(*kv)
    if err is not None:
        return _protocol_error(st, err)
    s = st.current
    if mtype == 2 and s is not None:
        s.response_headers.append(kv)
        return OK
    if mtype == 0 and s is not None:
        s.request_headers.append(kv)
        return OK
    headers = _map_of(st, mtype)
    if headers is None or mtype > _MAP_RESPONSE_TRAILERS:
        return BAD_ARGUMENT
    headers.append(kv)
    return OK


def proxy_replace_header_map_value(
    st: HostState, mtype: int, kptr: int, klen: int, vptr: int, vlen: int
) -> int:
    kv = _read_kv(st, kptr, klen, vptr, vlen)
    if kv is None:
        return INVALID_MEMORY_ACCESS
    err = header_error(*kv)
    if err is not None:
        return _protocol_error(st, err)
    headers = _map_of(st, mtype)
    if headers is None or mtype > _MAP_RESPONSE_TRAILERS:
        return BAD_ARGUMENT
    _replace(headers, kv)
    return OK


def proxy_remove_header_map_value(st: HostState, mtype: int, kptr: int, klen: int) -> int:
    key = _key(st, kptr, klen)
    if key is None:
        return INVALID_MEMORY_ACCESS
    headers = _map_of(st, mtype)
    if headers is None or mtype > _MAP_RESPONSE_TRAILERS:
        return BAD_ARGUMENT
    if key in map(_name_of, headers):  # usually absent (a filter clearing what a client might have sent)
        headers[:] = [h for h in headers if h[0] != key]
    return OK


# ---------------------------------------------------------------------------------------------- stream control


def proxy_continue_stream(st: HostState, stype: int) -> int:
    s = st.current
    if s is None:
        return NOT_FOUND
    if stype == _STREAM_HTTP_REQUEST:
        s.continue_request = True
        st.attention = True
    elif stype == _STREAM_HTTP_RESPONSE:
        s.continue_response = True
        st.attention = True
    else:
        return BAD_ARGUMENT
    return OK


def proxy_continue_request(st: HostState) -> int:
    return proxy_continue_stream(st, _STREAM_HTTP_REQUEST)


def proxy_continue_response(st: HostState) -> int:
    return proxy_continue_stream(st, _STREAM_HTTP_RESPONSE)


def proxy_close_stream(st: HostState, stype: int) -> int:
    s = st.current
    if s is None:
        return NOT_FOUND
    if stype > _STREAM_UPSTREAM:
        return BAD_ARGUMENT
    s.closed = True
    st.attention = True
    return OK


def proxy_clear_route_cache(st: HostState) -> int:
    return OK


def proxy_get_status(st: HostState, code_ptr: int, msg_ptr_ptr: int, msg_len_ptr: int) -> int:
    assert st.memory is not None
    code, msg = st.status
    ok = st.memory.write_u32(code_ptr, code) and st.memory.return_bytes(msg, msg_ptr_ptr, msg_len_ptr)
    return OK if ok else INVALID_MEMORY_ACCESS


def proxy_send_local_response(
    st: HostState, status: int, dptr: int, dlen: int, bptr: int, blen: int, hptr: int, hlen: int, grpc: int
) -> int:
    assert st.memory is not None
    details = st.memory.read(dptr, dlen)
    body = st.memory.read(bptr, blen)
    raw_headers = st.memory.read(hptr, hlen)
    if details is None or body is None or raw_headers is None:
        return INVALID_MEMORY_ACCESS
    headers = pairs_to_headers(raw_headers)
    if headers is None:
        return BAD_ARGUMENT
    for k, v in headers:
        err = header_error(k, v)
        if err is not None:
            return _protocol_error(st, err)
    if not 100 <= status <= 999:
        return BAD_ARGUMENT
    s = st.current
    if s is None:
        return NOT_FOUND
    grpc_status = grpc if grpc < 0x80000000 else grpc - 0x100000000
    s.local_response = LocalResponse(status, headers, body, details.decode("utf-8", "replace"), grpc_status)
    st.attention = True
    return OK


# ---------------------------------------------------------------------------------------------- http_call


def proxy_http_call(
    st: HostState,
    uptr: int,
    ulen: int,
    hptr: int,
    hlen: int,
    bptr: int,
    blen: int,
    tptr: int,
    tlen: int,
    timeout_ms: int,
    token_ptr: int,
) -> int:
    mem = st.memory
    assert mem is not None
    upstream = mem.read(uptr, ulen)
    raw_h = mem.read(hptr, hlen)
    body = mem.read(bptr, blen)
    raw_t = mem.read(tptr, tlen)
    if upstream is None or raw_h is None or body is None or raw_t is None:
        return INVALID_MEMORY_ACCESS
    headers = pairs_to_headers(raw_h)
    trailers = pairs_to_headers(raw_t)
    if headers is None or trailers is None:
        return BAD_ARGUMENT
    for k, v in headers:
        if header_error(k, v) is not None:
            return BAD_ARGUMENT
    pseudo = {k: v for k, v in headers if k.startswith(":")}
    if not pseudo.get(":method") or not pseudo.get(":path") or not pseudo.get(":authority"):
        return BAD_ARGUMENT
    name = upstream.decode("utf-8", "replace")
    allowed = st.services.upstreams
    if allowed is not None and name not in allowed:
        return BAD_ARGUMENT
    token = st.next_token
    if not mem.write_u32(token_ptr, token):
        return INVALID_MEMORY_ACCESS
    st.next_token = token + 1
    request = HttpCallRequest(
        upstream=name,
        method=pseudo[":method"],
        path=pseudo[":path"],
        authority=pseudo[":authority"],
        headers=[(k, v) for k, v in headers if not k.startswith(":")],
        body=body,
        trailers=trailers,
        timeout_ms=timeout_ms,
    )
    st.pending_http_calls.append(PendingHttpCall(token, request, st.current_id))
    st.attention = True
    return OK


def _unimplemented(st: HostState, *args: int) -> int:
    return UNIMPLEMENTED


# ---------------------------------------------------------------------------------------------- shared data, queues


def _shared_key(st: HostState, key: bytes) -> bytes:
    return st.services.vm_id.encode() + b"\0" + key


def proxy_get_shared_data(st: HostState, kptr: int, klen: int, vpp: int, vlp: int, cas_ptr: int) -> int:
    mem = st.memory
    assert mem is not None
    key = mem.read(kptr, klen)
    if key is None:
        return INVALID_MEMORY_ACCESS
    try:
        entry = st.services.shared.shared_data.get(_shared_key(st, key))
    except StateError:
        return INTERNAL_FAILURE  # the backend has logged (rate limited) and counted it
    if entry is None:
        return NOT_FOUND
    value, cas = entry
    ok = mem.return_bytes(value, vpp, vlp) and mem.write_u32(cas_ptr, cas)
    return OK if ok else INVALID_MEMORY_ACCESS


def proxy_set_shared_data(st: HostState, kptr: int, klen: int, vptr: int, vlen: int, cas: int) -> int:
    mem = st.memory
    assert mem is not None
    key = mem.read(kptr, klen)
    value = mem.read(vptr, vlen)
    if key is None or value is None:
        return INVALID_MEMORY_ACCESS
    try:
        return int(st.services.shared.shared_data.set(_shared_key(st, key), value, cas))
    except StateError:
        return INTERNAL_FAILURE


def proxy_register_shared_queue(st: HostState, nptr: int, nlen: int, token_ptr: int) -> int:
    mem = st.memory
    assert mem is not None
    name = mem.read(nptr, nlen)
    if name is None:
        return INVALID_MEMORY_ACCESS
    cb = st.services.on_queue_ready or (lambda token: None)
    token = st.services.shared.queues.register(
        st.services.vm_id, name.decode("utf-8", "replace"), st.owner, cb
    )
    return OK if mem.write_u32(token_ptr, token) else INVALID_MEMORY_ACCESS


def proxy_resolve_shared_queue(
    st: HostState, vptr: int, vlen: int, nptr: int, nlen: int, token_ptr: int
) -> int:
    mem = st.memory
    assert mem is not None
    vm_id = mem.read(vptr, vlen)
    name = mem.read(nptr, nlen)
    if vm_id is None or name is None:
        return INVALID_MEMORY_ACCESS
    vm = vm_id.decode("utf-8", "replace") or st.services.vm_id
    token = st.services.shared.queues.resolve(vm, name.decode("utf-8", "replace"))
    if token is None:
        return NOT_FOUND
    return OK if mem.write_u32(token_ptr, token) else INVALID_MEMORY_ACCESS


def proxy_enqueue_shared_queue(st: HostState, token: int, ptr: int, n: int) -> int:
    assert st.memory is not None
    data = st.memory.read(ptr, n)
    if data is None:
        return INVALID_MEMORY_ACCESS
    return int(st.services.shared.queues.enqueue(token, data))


def proxy_dequeue_shared_queue(st: HostState, token: int, dpp: int, dlp: int) -> int:
    assert st.memory is not None
    item = st.services.shared.queues.dequeue(token)
    if not isinstance(item, bytes):
        return int(item)
    return OK if st.memory.return_bytes(item, dpp, dlp) else INVALID_MEMORY_ACCESS


# ---------------------------------------------------------------------------------------------- metrics


def proxy_define_metric(st: HostState, mtype: int, nptr: int, nlen: int, id_ptr: int) -> int:
    mem = st.memory
    assert mem is not None
    name = mem.read(nptr, nlen)
    if name is None:
        return INVALID_MEMORY_ACCESS
    if mtype > MetricType.HISTOGRAM:
        return BAD_ARGUMENT
    mid = st.services.shared.metrics.define(
        st.services.name, name.decode("utf-8", "replace"), MetricType(mtype)
    )
    return OK if mem.write_u32(id_ptr, mid) else INVALID_MEMORY_ACCESS


def proxy_increment_metric(st: HostState, mid: int, delta: int) -> int:
    if delta >= 1 << 63:
        delta -= 1 << 64
    return int(st.services.shared.metrics.increment(mid, delta))


def proxy_record_metric(st: HostState, mid: int, value: int) -> int:
    return int(st.services.shared.metrics.record(mid, value))


def proxy_get_metric(st: HostState, mid: int, ptr: int) -> int:
    m = st.services.shared.metrics.get(mid)
    if m is None:
        return NOT_FOUND
    assert st.memory is not None
    value = m.count if m.type == MetricType.HISTOGRAM else m.value
    return OK if st.memory.write_u64(ptr, value) else INVALID_MEMORY_ACCESS


# ---------------------------------------------------------------------------------------------- properties, foreign


def proxy_get_property(st: HostState, pptr: int, plen: int, vpp: int, vlp: int) -> int:
    mem = st.memory
    assert mem is not None
    path = mem.read(pptr, plen)
    if path is None:
        return INVALID_MEMORY_ACCESS
    value = get_property(st, path)
    if value is None:
        return NOT_FOUND
    return OK if mem.return_bytes(value, vpp, vlp) else INVALID_MEMORY_ACCESS


def proxy_set_property(st: HostState, pptr: int, plen: int, vptr: int, vlen: int) -> int:
    mem = st.memory
    assert mem is not None
    path = mem.read(pptr, plen)
    value = mem.read(vptr, vlen)
    if path is None or value is None:
        return INVALID_MEMORY_ACCESS
    s = st.current
    if s is None:
        return NOT_FOUND
    s.properties[path.rstrip(b"\0")] = value
    return OK


def proxy_call_foreign_function(
    st: HostState, nptr: int, nlen: int, aptr: int, alen: int, rpp: int, rlp: int
) -> int:
    mem = st.memory
    assert mem is not None
    name = mem.read(nptr, nlen)
    args = mem.read(aptr, alen)
    if name is None or args is None:
        return INVALID_MEMORY_ACCESS
    fn = st.services.foreign_functions.get(name.decode("utf-8", "replace"))
    if fn is None:
        return NOT_FOUND
    try:
        result = fn(args)
    except ValueError:
        return BAD_ARGUMENT
    return OK if mem.return_bytes(result, rpp, rlp) else INVALID_MEMORY_ACCESS


def proxy_get_configuration(st: HostState, ptr_ptr: int, len_ptr: int) -> int:
    assert st.memory is not None
    ok = st.memory.return_bytes(st.services.configuration, ptr_ptr, len_ptr)
    return OK if ok else INVALID_MEMORY_ACCESS


def _noop(st: HostState, *args: int) -> int | None:
    return None


# ---------------------------------------------------------------------------------------------- tables


HostFunction = tuple[tuple[int, ...], tuple[int, ...], Callable[..., int | None]]


def _i(n: int) -> tuple[int, ...]:
    return (I32,) * n


_R: Final = (I32,)

_COMMON: Final[dict[str, HostFunction]] = {
    "proxy_log": (_i(3), _R, proxy_log),
    "proxy_get_current_time_nanoseconds": (_i(1), _R, proxy_get_current_time_nanoseconds),
    "proxy_set_tick_period_milliseconds": (_i(1), _R, proxy_set_tick_period_milliseconds),
    "proxy_set_effective_context": (_i(1), _R, proxy_set_effective_context),
    "proxy_done": ((), _R, proxy_done),
    "proxy_get_buffer_bytes": (_i(5), _R, proxy_get_buffer_bytes),
    "proxy_get_buffer_status": (_i(3), _R, proxy_get_buffer_status),
    "proxy_set_buffer_bytes": (_i(5), _R, proxy_set_buffer_bytes),
    "proxy_get_header_map_pairs": (_i(3), _R, proxy_get_header_map_pairs),
    "proxy_set_header_map_pairs": (_i(3), _R, proxy_set_header_map_pairs),
    "proxy_get_header_map_size": (_i(2), _R, proxy_get_header_map_size),
    "proxy_get_header_map_value": (_i(5), _R, raw_get_header_map_value),
    "proxy_add_header_map_value": (_i(5), _R, raw_add_header_map_value),
    "proxy_replace_header_map_value": (_i(5), _R, raw_replace_header_map_value),
    "proxy_remove_header_map_value": (_i(3), _R, raw_remove_header_map_value),
    "proxy_get_status": (_i(3), _R, proxy_get_status),
    "proxy_send_local_response": (_i(8), _R, proxy_send_local_response),
    "proxy_http_call": (_i(10), _R, proxy_http_call),
    "proxy_get_shared_data": (_i(5), _R, proxy_get_shared_data),
    "proxy_set_shared_data": (_i(5), _R, proxy_set_shared_data),
    "proxy_register_shared_queue": (_i(3), _R, proxy_register_shared_queue),
    "proxy_resolve_shared_queue": (_i(5), _R, proxy_resolve_shared_queue),
    "proxy_enqueue_shared_queue": (_i(3), _R, proxy_enqueue_shared_queue),
    "proxy_dequeue_shared_queue": (_i(3), _R, proxy_dequeue_shared_queue),
    "proxy_define_metric": (_i(4), _R, proxy_define_metric),
    "proxy_increment_metric": ((I32, I64), _R, proxy_increment_metric),
    "proxy_record_metric": ((I32, I64), _R, proxy_record_metric),
    "proxy_get_metric": (_i(2), _R, proxy_get_metric),
    "proxy_get_property": (_i(4), _R, proxy_get_property),
    "proxy_set_property": (_i(4), _R, proxy_set_property),
    "proxy_call_foreign_function": (_i(6), _R, proxy_call_foreign_function),
    # gRPC is not offered: the functions exist so every SDK's module links.
    "proxy_grpc_call": (_i(12), _R, _unimplemented),
    "proxy_grpc_stream": (_i(9), _R, _unimplemented),
    "proxy_grpc_send": (_i(4), _R, _unimplemented),
    "proxy_grpc_cancel": (_i(1), _R, _unimplemented),
    "proxy_grpc_close": (_i(1), _R, _unimplemented),
    # Emscripten-built (C++ SDK) modules call this after memory.grow; nothing to do (memories never move).
    "emscripten_notify_memory_growth": (_i(1), (), _noop),
}

_V0_2: Final[dict[str, HostFunction]] = {
    "proxy_continue_stream": (_i(1), _R, proxy_continue_stream),
    "proxy_close_stream": (_i(1), _R, proxy_close_stream),
}

_V0_1: Final[dict[str, HostFunction]] = {
    "proxy_get_configuration": (_i(2), _R, proxy_get_configuration),
    "proxy_continue_request": ((), _R, proxy_continue_request),
    "proxy_continue_response": ((), _R, proxy_continue_response),
    "proxy_clear_route_cache": ((), _R, proxy_clear_route_cache),
    "proxy_get_header_map_value": (_i(5), _R, proxy_get_header_map_value_0_1),
}

# Version -> the `env` functions linked for modules of that version. Older names stay linked for newer
# versions (Envoy does the same), so a module mixing them still instantiates.
HOST_TABLES: Final[Mapping[AbiVersion, Mapping[str, HostFunction]]] = {
    AbiVersion.V0_2_1: {
        **_COMMON,
        **{k: v for k, v in _V0_1.items() if k != "proxy_get_header_map_value"},
        **_V0_2,
        "proxy_get_log_level": (_i(1), _R, proxy_get_log_level),
    },
    AbiVersion.V0_2_0: {
        **_COMMON,
        **{k: v for k, v in _V0_1.items() if k != "proxy_get_header_map_value"},
        **_V0_2,
    },
    AbiVersion.V0_1_0: {**_COMMON, **_V0_2, **_V0_1},
}
