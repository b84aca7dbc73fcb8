"""WASI files: read-only preopened directories granted by ``allowed_dirs``, and nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from wat import LOG_IMPORT, STATUS_HELPER, filter_module

from wasm_gateway.exceptions import FilterLoadError
from wasm_gateway.testing import FilterHarness


def wasi_imports(module: str) -> str:
    return f"""
  (import "{module}" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "{module}" "fd_prestat_dir_name" (func $prestat_name (param i32 i32 i32) (result i32)))
  (import "{module}" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "{module}" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "{module}" "fd_seek" (func $seek (param i32 i64 i32 i32) (result i32)))
  (import "{module}" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "{module}" "fd_close" (func $close (param i32) (result i32)))
"""


# Scratch: 0x200 prestat, 0x208 opened fd, 0x210 iovec, 0x218 nread, 0x220 new offset, 0x300 dir name,
# 0x500 read buffer. Strings from 0x400.
BODY = """
  (data (i32.const 0x400) "hello.txt")
  (data (i32.const 0x410) "../secret.txt")
  (data (i32.const 0x420) "escape")
  (data (i32.const 0x430) "new.txt")
  (data (i32.const 0x440) "sub/inner.txt")
  (func $open_ro (param $ptr i32) (param $len i32) (result i32)
    (call $open (i32.const 3) (i32.const 0) (local.get $ptr) (local.get $len) (i32.const 0)
                (i64.const -1) (i64.const -1) (i32.const 0) (i32.const 0x208)))
  (func $read_log (param $fd i32) (param $n i32)
    (i32.store (i32.const 0x210) (i32.const 0x500))
    (i32.store (i32.const 0x214) (local.get $n))
    (call $st (call $read (local.get $fd) (i32.const 0x210) (i32.const 1) (i32.const 0x218)))
    (drop (call $proxy_log (i32.const 2) (i32.const 0x500) (i32.load (i32.const 0x218)))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (local $fd i32)
    ;; the granted directory is fd 3; its name as the filter sees it
    (call $st (call $prestat (i32.const 3) (i32.const 0x200)))
    (call $st (call $prestat_name (i32.const 3) (i32.const 0x300) (i32.load (i32.const 0x204))))
    (drop (call $proxy_log (i32.const 2) (i32.const 0x300) (i32.load (i32.const 0x204))))
    ;; only one directory is granted
    (call $st (call $prestat (i32.const 4) (i32.const 0x200)))
    ;; open, read 5 bytes, seek to 6, read the rest
    (call $st (call $open_ro (i32.const 0x400) (i32.const 9)))
    (local.set $fd (i32.load (i32.const 0x208)))
    (call $read_log (local.get $fd) (i32.const 5))
    (call $st (call $seek (local.get $fd) (i64.const 6) (global.get $SEEK_SET) (i32.const 0x220)))
    (call $read_log (local.get $fd) (i32.const 64))
    ;; the file is read-only: writing answers EBADF
    (call $st (call $write (local.get $fd) (i32.const 0x210) (i32.const 1) (i32.const 0x218)))
    (call $st (call $close (local.get $fd)))
    (call $st (call $close (local.get $fd)))
    ;; a file in a subdirectory
    (call $st (call $open_ro (i32.const 0x440) (i32.const 13)))
    (call $read_log (i32.load (i32.const 0x208)) (i32.const 64))
    ;; leaving the directory: by .., by a symlink pointing out
    (call $st (call $open_ro (i32.const 0x410) (i32.const 13)))
    (call $st (call $open_ro (i32.const 0x420) (i32.const 6)))
    ;; creating or truncating a file is refused (EROFS); so is opening from a fd that is no directory
    (call $st (call $open (i32.const 3) (i32.const 0) (i32.const 0x430) (i32.const 7) (i32.const 1)
                          (i64.const -1) (i64.const -1) (i32.const 0) (i32.const 0x208)))
    (call $st (call $open (i32.const 3) (i32.const 0) (i32.const 0x400) (i32.const 9) (i32.const 8)
                          (i64.const -1) (i64.const -1) (i32.const 0) (i32.const 0x208)))
    (call $st (call $open (i32.const 9) (i32.const 0) (i32.const 0x400) (i32.const 9) (i32.const 0)
                          (i64.const -1) (i64.const -1) (i32.const 0) (i32.const 0x208)))
    i32.const 0)
"""


@pytest.fixture
def granted(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text("hello world")
    (root / "sub" / "inner.txt").write_text("inner")
    (tmp_path / "secret.txt").write_text("do not read")
    os.symlink(tmp_path / "secret.txt", root / "escape")
    return root


@pytest.mark.parametrize(("module", "seek_set"), [("wasi_snapshot_preview1", 0), ("wasi_unstable", 2)])
def test_read_only_preopened_directory(granted: Path, module: str, seek_set: int) -> None:
    imports = LOG_IMPORT + wasi_imports(module)
    body = f"(global $SEEK_SET i32 (i32.const {seek_set}))" + STATUS_HELPER + BODY
    with FilterHarness.from_bytes(filter_module(body, imports=imports), allowed_dirs=[str(granted)]) as h:
        r = h.request()
    messages = [m for _, m in r.logs]
    assert messages == [
        "00",
        "00",
        str(granted),  # seen under its own path
        "08",  # fd 4: not preopened
        "00",
        "00",
        "hello",
        "00",
        "00",
        "world",
        "08",  # fd_write on a read-only file
        "00",
        "08",  # closed twice
        "00",
        "00",
        "inner",
        "76",  # ../secret.txt
        "76",  # symlink out of the directory
        "69",  # O_CREAT
        "69",  # O_TRUNC
        "08",  # fd 9 is not a directory fd
    ]
    assert r.upstream_called


def test_guest_name_and_no_directories_without_grant(granted: Path) -> None:
    imports = LOG_IMPORT + wasi_imports("wasi_snapshot_preview1")
    body = (
        STATUS_HELPER
        + """
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (local $status i32)
        (local.set $status (call $prestat (i32.const 3) (i32.const 0x200)))
        (call $st (local.get $status))
        (if (i32.eqz (local.get $status))
          (then
            (drop (call $prestat_name (i32.const 3) (i32.const 0x300) (i32.load (i32.const 0x204))))
            (drop (call $proxy_log (i32.const 2) (i32.const 0x300) (i32.load (i32.const 0x204))))))
        i32.const 0)
    """
    )
    wasm = filter_module(body, imports=imports)
    with FilterHarness.from_bytes(wasm, allowed_dirs=[f"{granted}::/config"]) as h:
        assert [m for _, m in h.request().logs] == ["00", "/config"]
    with FilterHarness.from_bytes(wasm) as h:
        assert [m for _, m in h.request().logs] == ["08"]


def test_missing_granted_directory_fails_load(tmp_path: Path) -> None:
    wasm = filter_module("")
    with pytest.raises(FilterLoadError, match="is not a directory"):
        FilterHarness.from_bytes(wasm, allowed_dirs=[str(tmp_path / "absent")])
