"""Inline WAT Proxy-Wasm filters for the runtime tests.

`filter_module(body)` wraps ``body`` (WAT module fields) with what every test filter needs: a memory, a
bump allocator exported as ``proxy_on_memory_allocate``, the ABI version marker, and default callbacks that
``body`` may replace by defining the same export name (defaults are omitted when ``body`` exports them).

Conventions inside ``body``: scratch out-pointers live at 0x100..0x1ff (``$RET_PTR`` = 0x100,
``$RET_LEN`` = 0x104, ``$RET_U32`` = 0x108); constant strings go in ``(data (i32.const 0x400) "...")`` and up.
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

DEFAULTS = {
    "proxy_on_context_create": '(func (export "proxy_on_context_create") (param i32 i32))',
    "proxy_on_vm_start": '(func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)',
    "proxy_on_configure": '(func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)',
    "proxy_on_request_headers": (
        '(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 0)'
    ),
    "proxy_on_request_body": '(func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) i32.const 0)',
    "proxy_on_response_headers": (
        '(func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) i32.const 0)'
    ),
    "proxy_on_response_body": (
        '(func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) i32.const 0)'
    ),
    "proxy_on_done": '(func (export "proxy_on_done") (param i32) (result i32) i32.const 1)',
    "proxy_on_log": '(func (export "proxy_on_log") (param i32))',
    "proxy_on_delete": '(func (export "proxy_on_delete") (param i32))',
}

ALLOCATOR = """
  (global $heap (mut i32) (i32.const 0x10000))
  (func $alloc (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    global.get $heap
    local.set $p
    global.get $heap
    local.get $n
    i32.add
    i32.const 7
    i32.add
    i32.const -8
    i32.and
    global.set $heap
    local.get $p)
"""


def filter_wat(
    body: str,
    *,
    imports: str = "",
    abi: str = "0_2_1",
    memory_pages: int = 2,
    allocator: str = ALLOCATOR,
    memory_max: int | None = None,
) -> str:
    defaults = "\n  ".join(v for k, v in DEFAULTS.items() if f'(export "{k}")' not in body)
    limits = f"{memory_pages} {memory_max}" if memory_max is not None else f"{memory_pages}"
    return f"""(module
  {imports}
  (memory (export "memory") {limits})
  {allocator}
  (func (export "proxy_abi_version_{abi}"))
  {defaults}
  {body}
)"""


def filter_module(body: str, **kw: object) -> bytes:
    return wasmtime.wat2wasm(filter_wat(body, **kw))  # type: ignore[arg-type]


def write_filter(tmp: Path, body: str, name: str = "f.wasm", **kw: object) -> Path:
    path = tmp / name
    path.write_bytes(filter_module(body, **kw))
    return path


def imp(name: str, params: int, results: int = 1, module: str = "env") -> str:
    """An import line: ``(import "env" "name" (func $name (param i32 ...) (result i32)))``."""
    p = " ".join(["i32"] * params)
    r = "(result i32)" if results else ""
    return f'(import "{module}" "{name}" (func ${name} (param {p}) {r}))'


# `(call $st (status))` logs the status as two digits at level 2 ("06" for INVALID_MEMORY_ACCESS).
STATUS_HELPER = """
  (func $st (param $s i32)
    (i32.store8 (i32.const 0x1f0) (i32.add (i32.const 48) (i32.div_u (local.get $s) (i32.const 10))))
    (i32.store8 (i32.const 0x1f1) (i32.add (i32.const 48) (i32.rem_u (local.get $s) (i32.const 10))))
    (drop (call $proxy_log (i32.const 2) (i32.const 0x1f0) (i32.const 2))))
  (func $log_ret (drop (call $proxy_log (i32.const 2) (i32.load (i32.const 0x100)) (i32.load (i32.const 0x104)))))
"""

LOG_IMPORT = imp("proxy_log", 3)


def statuses(logs: list[tuple[int, str]]) -> list[int]:
    return [int(m) for _, m in logs if len(m) == 2 and m.isdigit()]
