"""WASI preview 1 as filters need it, under ``wasi_snapshot_preview1`` and ``wasi_unstable``.

stdout goes to the filter's info log and stderr to its error log; clocks, random, environment variables from
the filter's configuration, zero arguments, ``proc_exit`` (a trap carrying the exit code), ``sched_yield`` and
``poll_oneoff`` (clock subscriptions complete at once: a filter must never block the event loop). Files: no
directory is preopened, so file access answers EBADF/ENOTCAPABLE; the remaining functions exist so every
module links and answer ENOSYS.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Mapping
from typing import Final

from .abi import LogLevel
from .context import HostState
from .fastcall import I32, I64, HostTrap
from .hostcalls import HostFunction

__all__ = ["WASI_MODULES", "WASI_TABLE"]

WASI_MODULES: Final = ("wasi_snapshot_preview1", "wasi_unstable")

ESUCCESS: Final = 0
EBADF: Final = 8
EFAULT: Final = 21
EINVAL: Final = 28
ENOSYS: Final = 52
ESPIPE: Final = 70
ENOTCAPABLE: Final = 76

_IOVEC: Final = struct.Struct("<II")


def _env(st: HostState) -> list[bytes]:
    return [f"{k}={v}".encode() + b"\0" for k, v in st.services.env.items()]


def fd_write(st: HostState, fd: int, iovs: int, iovs_len: int, nwritten_ptr: int) -> int:
    mem = st.memory
    if mem is None:
        return EFAULT
    if fd not in (1, 2):
        return EBADF
    raw = mem.read(iovs, 8 * iovs_len)
    if raw is None:
        return EFAULT
    chunks = []
    for i in range(iovs_len):
        ptr, n = _IOVEC.unpack_from(raw, 8 * i)
        data = mem.read(ptr, n)
        if data is None:
            return EFAULT
        chunks.append(data)
    data = b"".join(chunks)
    if not mem.write_u32(nwritten_ptr, len(data)):
        return EFAULT
    text = data.decode("utf-8", "replace").rstrip("\n")
    if text:
        level = LogLevel.INFO if fd == 1 else LogLevel.ERROR
        if st.logs is not None:
            st.logs.append((int(level), text))
        st.services.log_sink(st.services.name, int(level), text)
    return ESUCCESS


def fd_read(st: HostState, fd: int, iovs: int, iovs_len: int, nread_ptr: int) -> int:
    if fd != 0 or st.memory is None:
        return EBADF
    return ESUCCESS if st.memory.write_u32(nread_ptr, 0) else EFAULT  # stdin is empty


def fd_close(st: HostState, fd: int) -> int:
    return EBADF


def fd_seek(st: HostState, fd: int, offset: int, whence: int, newoffset_ptr: int) -> int:
    return ESPIPE if fd <= 2 else EBADF


def fd_fdstat_get(st: HostState, fd: int, ptr: int) -> int:
    if fd > 2 or st.memory is None:
        return EBADF
    # filetype u8 (2 = character device), flags u16 (1 = append for stdout/err), rights base, inheriting
    stat = struct.pack("<BxHxxxxQQ", 2, 0 if fd == 0 else 1, 0xFFFFFFFF, 0)
    return ESUCCESS if st.memory.write(ptr, stat) else EFAULT


def fd_fdstat_set_flags(st: HostState, fd: int, flags: int) -> int:
    return ESUCCESS if fd <= 2 else EBADF


def fd_prestat_get(st: HostState, fd: int, ptr: int) -> int:
    return EBADF  # no preopened directories


def fd_prestat_dir_name(st: HostState, fd: int, ptr: int, n: int) -> int:
    return EBADF


def environ_sizes_get(st: HostState, count_ptr: int, size_ptr: int) -> int:
    assert st.memory is not None
    env = _env(st)
    ok = st.memory.write_u32(count_ptr, len(env)) and st.memory.write_u32(size_ptr, sum(map(len, env)))
    return ESUCCESS if ok else EFAULT


def environ_get(st: HostState, environ_ptr: int, buf_ptr: int) -> int:
    mem = st.memory
    assert mem is not None
    offset = buf_ptr
    for i, item in enumerate(_env(st)):
        if not (mem.write_u32(environ_ptr + 4 * i, offset) and mem.write(offset, item)):
            return EFAULT
        offset += len(item)
    return ESUCCESS


def args_sizes_get(st: HostState, argc_ptr: int, size_ptr: int) -> int:
    assert st.memory is not None
    ok = st.memory.write_u32(argc_ptr, 0) and st.memory.write_u32(size_ptr, 0)
    return ESUCCESS if ok else EFAULT


def args_get(st: HostState, argv_ptr: int, buf_ptr: int) -> int:
    return ESUCCESS


def _clock_ns(clock_id: int) -> int | None:
    if clock_id == 0:
        return time.time_ns()
    if clock_id == 1:
        return time.monotonic_ns()
    if clock_id == 2:
        return time.process_time_ns()
    if clock_id == 3:
        return time.thread_time_ns()
    return None


def clock_time_get(st: HostState, clock_id: int, precision: int, ptr: int) -> int:
    ns = _clock_ns(clock_id)
    if ns is None:
        return EINVAL
    assert st.memory is not None
    return ESUCCESS if st.memory.write_u64(ptr, ns) else EFAULT


def clock_res_get(st: HostState, clock_id: int, ptr: int) -> int:
    if _clock_ns(clock_id) is None:
        return EINVAL
    assert st.memory is not None
    return ESUCCESS if st.memory.write_u64(ptr, 1000) else EFAULT


def random_get(st: HostState, ptr: int, n: int) -> int:
    assert st.memory is not None
    if n > 1 << 20:
        return EINVAL
    return ESUCCESS if st.memory.write(ptr, os.urandom(n)) else EFAULT


def proc_exit(st: HostState, code: int) -> None:
    raise HostTrap(f"proc_exit({code})", exit_code=code)


def sched_yield(st: HostState) -> int:
    return ESUCCESS


_EVENT: Final = struct.Struct("<QHBxxxxxQHxxxxxx")  # 32 bytes


def poll_oneoff(st: HostState, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> int:
    mem = st.memory
    assert mem is not None
    if nsubs == 0:
        return EINVAL
    subs = mem.read(in_ptr, 48 * nsubs)
    if subs is None:
        return EFAULT
    events = []
    for i in range(nsubs):
        userdata, tag = struct.unpack_from("<QB", subs, 48 * i)
        # Clocks fire at once (never block the loop); fd readiness is reported as EBADF.
        events.append(_EVENT.pack(userdata, 0 if tag == 0 else EBADF, tag, 0, 0))
    ok = mem.write(out_ptr, b"".join(events)) and mem.write_u32(nevents_ptr, len(events))
    return ESUCCESS if ok else EFAULT


def _nosys(st: HostState, *args: int) -> int:
    return ENOSYS


def _notcapable(st: HostState, *args: int) -> int:
    return ENOTCAPABLE


def _badf(st: HostState, *args: int) -> int:
    return EBADF


def _i(n: int) -> tuple[int, ...]:
    return (I32,) * n


_R: Final = (I32,)

WASI_TABLE: Final[Mapping[str, HostFunction]] = {
    "args_get": (_i(2), _R, args_get),
    "args_sizes_get": (_i(2), _R, args_sizes_get),
    "environ_get": (_i(2), _R, environ_get),
    "environ_sizes_get": (_i(2), _R, environ_sizes_get),
    "clock_res_get": (_i(2), _R, clock_res_get),
    "clock_time_get": ((I32, I64, I32), _R, clock_time_get),
    "fd_advise": ((I32, I64, I64, I32), _R, _badf),
    "fd_allocate": ((I32, I64, I64), _R, _badf),
    "fd_close": (_i(1), _R, fd_close),
    "fd_datasync": (_i(1), _R, _badf),
    "fd_fdstat_get": (_i(2), _R, fd_fdstat_get),
    "fd_fdstat_set_flags": (_i(2), _R, fd_fdstat_set_flags),
    "fd_fdstat_set_rights": ((I32, I64, I64), _R, _badf),
    "fd_filestat_get": (_i(2), _R, _badf),
    "fd_filestat_set_size": ((I32, I64), _R, _badf),
    "fd_filestat_set_times": ((I32, I64, I64, I32), _R, _badf),
    "fd_pread": ((I32, I32, I32, I64, I32), _R, _badf),
    "fd_prestat_get": (_i(2), _R, fd_prestat_get),
    "fd_prestat_dir_name": (_i(3), _R, fd_prestat_dir_name),
    "fd_pwrite": ((I32, I32, I32, I64, I32), _R, _badf),
    "fd_read": (_i(4), _R, fd_read),
    "fd_readdir": ((I32, I32, I32, I64, I32), _R, _badf),
    "fd_renumber": (_i(2), _R, _badf),
    "fd_seek": ((I32, I64, I32, I32), _R, fd_seek),
    "fd_sync": (_i(1), _R, _badf),
    "fd_tell": (_i(2), _R, _badf),
    "fd_write": (_i(4), _R, fd_write),
    "path_create_directory": (_i(3), _R, _notcapable),
    "path_filestat_get": (_i(5), _R, _notcapable),
    "path_filestat_set_times": ((I32, I32, I32, I32, I64, I64, I32), _R, _notcapable),
    "path_link": (_i(7), _R, _notcapable),
    "path_open": ((I32, I32, I32, I32, I32, I64, I64, I32, I32), _R, _notcapable),
    "path_readlink": (_i(6), _R, _notcapable),
    "path_remove_directory": (_i(3), _R, _notcapable),
    "path_rename": (_i(6), _R, _notcapable),
    "path_symlink": (_i(5), _R, _notcapable),
    "path_unlink_file": (_i(3), _R, _notcapable),
    "poll_oneoff": (_i(4), _R, poll_oneoff),
    "proc_exit": (_i(1), (), proc_exit),
    "proc_raise": (_i(1), _R, _nosys),
    "sched_yield": ((), _R, sched_yield),
    "random_get": (_i(2), _R, random_get),
    "sock_accept": (_i(3), _R, _nosys),
    "sock_recv": (_i(6), _R, _nosys),
    "sock_send": (_i(5), _R, _nosys),
    "sock_shutdown": (_i(2), _R, _nosys),
}
