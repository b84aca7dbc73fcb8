"""WASI preview 1 as filters need it, under ``wasi_snapshot_preview1`` and ``wasi_unstable``.

stdout goes to the filter's info log and stderr to its error log; clocks, random, environment variables from
the filter's configuration, zero arguments, ``proc_exit`` (a trap carrying the exit code), ``sched_yield`` and
``poll_oneoff`` (clock subscriptions complete at once: a filter must never block the event loop).

Files: only inside the directories the filter's configuration grants (``allowed_dirs``), preopened as fds
3, 4, ... and read-only: ``path_open`` (no create, truncate, exclusive or append), ``fd_read`` / ``fd_pread``,
``fd_seek`` / ``fd_tell``, ``fd_close``, ``fd_fdstat_get``, ``fd_filestat_get`` and ``path_filestat_get``.
A path that leaves its directory (``..``, an absolute path, a symlink pointing out) answers ENOTCAPABLE;
anything that would write answers EROFS or EBADF. Reads are ordinary blocking reads of local files, meant for
start-up data (a filter reading files per request blocks the event loop). The remaining functions exist so
every module links and answer ENOSYS / ENOTCAPABLE.
"""

from __future__ import annotations

import os
import stat as stat_module
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .abi import LogLevel
from .context import HostState
from .fastcall import I32, I64, HostTrap
from .hostcalls import HostFunction

__all__ = ["WASI_MODULES", "WASI_TABLE", "Preopen", "WasiFiles", "parse_preopens", "wasi_table"]

WASI_MODULES: Final = ("wasi_snapshot_preview1", "wasi_unstable")

ESUCCESS: Final = 0
EACCES: Final = 2
EBADF: Final = 8
EFAULT: Final = 21
EINVAL: Final = 28
EIO: Final = 29
EISDIR: Final = 31
ENOENT: Final = 44
ENOSYS: Final = 52
ENOTDIR: Final = 54
EROFS: Final = 69
ESPIPE: Final = 70
ENOTCAPABLE: Final = 76

_IOVEC: Final = struct.Struct("<II")

# filetype
_FT_CHARACTER_DEVICE: Final = 2
_FT_DIRECTORY: Final = 3
_FT_REGULAR_FILE: Final = 4
_FT_SYMBOLIC_LINK: Final = 7
# oflags / fdflags that would write
_O_CREAT: Final = 1
_O_DIRECTORY: Final = 2
_O_EXCL: Final = 4
_O_TRUNC: Final = 8
_FDFLAGS_WRITING: Final = 0x1 | 0x2 | 0x8 | 0x10  # append, dsync, rsync, sync
# Rights a read-only fd has: fd_read, fd_seek, fd_tell, fd_advise, path_open, fd_readdir, path_readlink,
# path_filestat_get, fd_filestat_get, poll_fd_readwrite.
_READ_RIGHTS: Final = sum(1 << b for b in (1, 2, 5, 7, 13, 14, 15, 18, 21, 27))
_FIRST_PREOPEN_FD: Final = 3
_MAX_OPEN_FILES: Final = 256


@dataclass(frozen=True)
class Preopen:
    """A granted directory: where it is on the host (resolved) and the name the filter sees."""

    host: str
    guest: str


def parse_preopens(allowed_dirs: Sequence[str]) -> tuple[Preopen, ...]:
    """``allowed_dirs`` entries are ``HOST`` (seen under the same path) or ``HOST::GUEST`` (as wasmtime's
    ``--dir``). ValueError for a directory that does not exist."""
    out: list[Preopen] = []
    for entry in allowed_dirs:
        host, sep, guest = str(entry).partition("::")
        real = os.path.realpath(host)
        if not os.path.isdir(real):
            raise ValueError(f"allowed_dirs: {host!r} is not a directory")
        out.append(Preopen(real, guest if sep else host))
    return tuple(out)


@dataclass
class _Open:
    root: str  # the granted directory it lives in (resolved): nothing opened from it may leave this
    path: str  # resolved host path
    os_fd: int  # -1 for a directory
    offset: int = 0


class WasiFiles:
    """One instance's file descriptors above stdio: the preopened directories, then what it opened."""

    def __init__(self, preopens: Sequence[Preopen]) -> None:
        self.preopens = tuple(preopens)
        self.opened: dict[int, _Open] = {}
        self._next_fd = _FIRST_PREOPEN_FD + len(self.preopens)

    def preopen(self, fd: int) -> Preopen | None:
        i = fd - _FIRST_PREOPEN_FD
        return self.preopens[i] if 0 <= i < len(self.preopens) else None

    def directory(self, fd: int) -> tuple[str, str] | None:
        """(root, resolved path) of a directory fd (preopened or opened), else None."""
        pre = self.preopen(fd)
        if pre is not None:
            return pre.host, pre.host
        o = self.opened.get(fd)
        if o is not None and o.os_fd < 0:
            return o.root, o.path
        return None

    def add(self, opened: _Open) -> int | None:
        if len(self.opened) >= _MAX_OPEN_FILES:
            return None
        fd = self._next_fd
        self._next_fd += 1
        self.opened[fd] = opened
        return fd

    def close(self) -> None:
        for o in self.opened.values():
            if o.os_fd >= 0:
                os.close(o.os_fd)
        self.opened.clear()


def _files(st: HostState) -> WasiFiles | None:
    files = st.files
    if files is None and st.services.preopens:
        files = st.files = WasiFiles(st.services.preopens)
    return files


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


def _read_into(st: HostState, data_at: int, os_fd: int, iovs: int, iovs_len: int) -> int | None:
    """pread into the guest's iovecs from ``data_at``; bytes read, or None for a bad iovec."""
    mem = st.memory
    assert mem is not None
    raw = mem.read(iovs, 8 * iovs_len)
    if raw is None:
        return None
    total = 0
    for i in range(iovs_len):
        ptr, n = _IOVEC.unpack_from(raw, 8 * i)
        if not mem.fits(ptr + n):
            return None
        data = os.pread(os_fd, n, data_at + total)
        mem.write(ptr, data)
        total += len(data)
        if len(data) < n:
            break
    return total


def fd_read(st: HostState, fd: int, iovs: int, iovs_len: int, nread_ptr: int) -> int:
    mem = st.memory
    if mem is None:
        return EFAULT
    if fd == 0:
        return ESUCCESS if mem.write_u32(nread_ptr, 0) else EFAULT  # stdin is empty
    files = _files(st)
    o = files.opened.get(fd) if files is not None else None
    if o is None or o.os_fd < 0:
        return EBADF if o is None else EISDIR
    try:
        n = _read_into(st, o.offset, o.os_fd, iovs, iovs_len)
    except OSError:
        return EIO
    if n is None or not mem.write_u32(nread_ptr, n):
        return EFAULT
    o.offset += n
    return ESUCCESS


def fd_pread(st: HostState, fd: int, iovs: int, iovs_len: int, offset: int, nread_ptr: int) -> int:
    mem = st.memory
    files = _files(st)
    o = files.opened.get(fd) if files is not None else None
    if mem is None or o is None or o.os_fd < 0:
        return EBADF
    try:
        n = _read_into(st, offset, o.os_fd, iovs, iovs_len)
    except OSError:
        return EIO
    if n is None or not mem.write_u32(nread_ptr, n):
        return EFAULT
    return ESUCCESS


def fd_close(st: HostState, fd: int) -> int:
    files = _files(st)
    if files is None:
        return EBADF
    o = files.opened.pop(fd, None)
    if o is None:
        return ESUCCESS if files.preopen(fd) is not None else EBADF
    if o.os_fd >= 0:
        os.close(o.os_fd)
    return ESUCCESS


def _fd_seek(whence_set: int, whence_cur: int, whence_end: int) -> HostFunction:
    def fd_seek(st: HostState, fd: int, offset: int, whence: int, newoffset_ptr: int) -> int:
        if fd <= 2:
            return ESPIPE
        files = _files(st)
        o = files.opened.get(fd) if files is not None else None
        if o is None or o.os_fd < 0 or st.memory is None:
            return EBADF
        if offset >= 1 << 63:
            offset -= 1 << 64  # filedelta is signed
        if whence == whence_set:
            new = offset
        elif whence == whence_cur:
            new = o.offset + offset
        elif whence == whence_end:
            try:
                new = os.fstat(o.os_fd).st_size + offset
            except OSError:
                return EIO
        else:
            return EINVAL
        if new < 0:
            return EINVAL
        o.offset = new
        return ESUCCESS if st.memory.write_u64(newoffset_ptr, new) else EFAULT

    return ((I32, I64, I32, I32), (I32,), fd_seek)


def fd_tell(st: HostState, fd: int, ptr: int) -> int:
    files = _files(st)
    o = files.opened.get(fd) if files is not None else None
    if o is None or o.os_fd < 0 or st.memory is None:
        return EBADF
    return ESUCCESS if st.memory.write_u64(ptr, o.offset) else EFAULT


def fd_fdstat_get(st: HostState, fd: int, ptr: int) -> int:
    if st.memory is None:
        return EFAULT
    # filetype u8, flags u16, rights base u64, rights inheriting u64
    if fd <= 2:
        # character device; append for stdout/err
        stat = struct.pack("<BxHxxxxQQ", _FT_CHARACTER_DEVICE, 0 if fd == 0 else 1, 0xFFFFFFFF, 0)
    else:
        files = _files(st)
        if files is None:
            return EBADF
        if files.directory(fd) is not None:
            stat = struct.pack("<BxHxxxxQQ", _FT_DIRECTORY, 0, _READ_RIGHTS, _READ_RIGHTS)
        elif fd in files.opened:
            stat = struct.pack("<BxHxxxxQQ", _FT_REGULAR_FILE, 0, _READ_RIGHTS, 0)
        else:
            return EBADF
    return ESUCCESS if st.memory.write(ptr, stat) else EFAULT


def _filetype(mode: int) -> int:
    if stat_module.S_ISDIR(mode):
        return _FT_DIRECTORY
    if stat_module.S_ISREG(mode):
        return _FT_REGULAR_FILE
    if stat_module.S_ISLNK(mode):
        return _FT_SYMBOLIC_LINK
    return 0


def _filestat_bytes(result: os.stat_result, unstable: bool) -> bytes:
    common = (result.st_dev, result.st_ino, _filetype(result.st_mode))
    times = (result.st_size, result.st_atime_ns, result.st_mtime_ns, result.st_ctime_ns)
    if unstable:  # wasi_unstable: nlink is u32 (56 bytes)
        return struct.pack("<QQBxxxIQQQQ", *common, result.st_nlink & 0xFFFFFFFF, *times)
    return struct.pack("<QQBxxxxxxxQQQQQ", *common, result.st_nlink, *times)


def _fd_filestat_get(unstable: bool) -> HostFunction:
    def fd_filestat_get(st: HostState, fd: int, ptr: int) -> int:
        files = _files(st)
        if files is None or st.memory is None:
            return EBADF
        d = files.directory(fd)
        o = files.opened.get(fd)
        try:
            if d is not None:
                result = os.stat(d[1])
            elif o is not None:
                result = os.fstat(o.os_fd)
            else:
                return EBADF
        except OSError:
            return EIO
        return ESUCCESS if st.memory.write(ptr, _filestat_bytes(result, unstable)) else EFAULT

    return ((I32, I32), (I32,), fd_filestat_get)


def fd_fdstat_set_flags(st: HostState, fd: int, flags: int) -> int:
    if fd <= 2:
        return ESUCCESS
    files = _files(st)
    if files is None or (files.directory(fd) is None and fd not in files.opened):
        return EBADF
    return EROFS if flags & _FDFLAGS_WRITING else ESUCCESS


def fd_prestat_get(st: HostState, fd: int, ptr: int) -> int:
    files = _files(st)
    pre = files.preopen(fd) if files is not None else None
    if pre is None or st.memory is None:
        return EBADF
    # prestat: tag u8 (0 = directory), then u32 name length
    data = struct.pack("<BxxxI", 0, len(pre.guest.encode()))
    return ESUCCESS if st.memory.write(ptr, data) else EFAULT


def fd_prestat_dir_name(st: HostState, fd: int, ptr: int, n: int) -> int:
    files = _files(st)
    pre = files.preopen(fd) if files is not None else None
    if pre is None or st.memory is None:
        return EBADF
    name = pre.guest.encode()
    if n < len(name):
        return EINVAL
    return ESUCCESS if st.memory.write(ptr, name) else EFAULT


def _resolve(st: HostState, dirfd: int, path_ptr: int, path_len: int) -> tuple[str, str] | int:
    """(root, resolved host path) of a path relative to a directory fd, or a WASI errno."""
    files = _files(st)
    base = files.directory(dirfd) if files is not None else None
    if base is None:
        return EBADF
    assert st.memory is not None
    raw = st.memory.read(path_ptr, path_len)
    if raw is None:
        return EFAULT
    try:
        rel = raw.decode("utf-8")
    except UnicodeDecodeError:
        return EINVAL
    if "\0" in rel or rel.startswith("/"):
        return ENOTCAPABLE
    root, directory = base
    real = os.path.realpath(os.path.join(directory, rel))
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        return ENOTCAPABLE  # .. or a symlink leading out of the granted directory
    return root, real


def path_open(
    st: HostState,
    dirfd: int,
    dirflags: int,
    path_ptr: int,
    path_len: int,
    oflags: int,
    rights_base: int,
    rights_inheriting: int,
    fdflags: int,
    fd_ptr: int,
) -> int:
    if oflags & (_O_CREAT | _O_EXCL | _O_TRUNC) or fdflags & _FDFLAGS_WRITING:
        return EROFS
    resolved = _resolve(st, dirfd, path_ptr, path_len)
    if isinstance(resolved, int):
        return resolved
    root, real = resolved
    files = _files(st)
    assert files is not None and st.memory is not None
    if not st.memory.fits(fd_ptr + 4):
        return EFAULT
    try:
        if os.path.isdir(real):
            opened = _Open(root, real, -1)
        elif oflags & _O_DIRECTORY:
            return ENOTDIR if os.path.exists(real) else ENOENT
        else:
            opened = _Open(root, real, os.open(real, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
    except FileNotFoundError:
        return ENOENT
    except PermissionError:
        return EACCES
    except OSError:
        return EIO
    fd = files.add(opened)
    if fd is None:
        if opened.os_fd >= 0:
            os.close(opened.os_fd)
        return ENOSYS  # too many open files (WASI has no EMFILE in every libc's table; ENOSYS is safe)
    st.memory.write_u32(fd_ptr, fd)
    return ESUCCESS


def _path_filestat_get(unstable: bool) -> HostFunction:
    def path_filestat_get(
        st: HostState, dirfd: int, flags: int, path_ptr: int, path_len: int, ptr: int
    ) -> int:
        resolved = _resolve(st, dirfd, path_ptr, path_len)
        if isinstance(resolved, int):
            return resolved
        try:
            result = os.stat(resolved[1])
        except FileNotFoundError:
            return ENOENT
        except OSError:
            return EIO
        assert st.memory is not None
        return ESUCCESS if st.memory.write(ptr, _filestat_bytes(result, unstable)) else EFAULT

    return ((I32,) * 5, (I32,), path_filestat_get)


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
    "fd_filestat_get": _fd_filestat_get(unstable=False),
    "fd_filestat_set_size": ((I32, I64), _R, _badf),
    "fd_filestat_set_times": ((I32, I64, I64, I32), _R, _badf),
    "fd_pread": ((I32, I32, I32, I64, I32), _R, fd_pread),
    "fd_prestat_get": (_i(2), _R, fd_prestat_get),
    "fd_prestat_dir_name": (_i(3), _R, fd_prestat_dir_name),
    "fd_pwrite": ((I32, I32, I32, I64, I32), _R, _badf),
    "fd_read": (_i(4), _R, fd_read),
    "fd_readdir": ((I32, I32, I32, I64, I32), _R, _badf),
    "fd_renumber": (_i(2), _R, _badf),
    "fd_seek": _fd_seek(whence_set=0, whence_cur=1, whence_end=2),
    "fd_sync": (_i(1), _R, _badf),
    "fd_tell": (_i(2), _R, fd_tell),
    "fd_write": (_i(4), _R, fd_write),
    "path_create_directory": (_i(3), _R, _notcapable),
    "path_filestat_get": _path_filestat_get(unstable=False),
    "path_filestat_set_times": ((I32, I32, I32, I32, I64, I64, I32), _R, _notcapable),
    "path_link": (_i(7), _R, _notcapable),
    "path_open": ((I32, I32, I32, I32, I32, I64, I64, I32, I32), _R, path_open),
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

# wasi_unstable (preview 0) differs where it matters here: whence values and the filestat layout.
_UNSTABLE: Final[Mapping[str, HostFunction]] = {
    **WASI_TABLE,
    "fd_seek": _fd_seek(whence_set=2, whence_cur=0, whence_end=1),
    "fd_filestat_get": _fd_filestat_get(unstable=True),
    "path_filestat_get": _path_filestat_get(unstable=True),
}


def wasi_table(module: str) -> Mapping[str, HostFunction]:
    """The host functions linked under WASI module ``module`` (one of WASI_MODULES)."""
    return _UNSTABLE if module == "wasi_unstable" else WASI_TABLE
