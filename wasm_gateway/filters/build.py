"""Rebuild the bundled filters from their sources (Zig; C and JavaScript for the JS filter).

::

    python -m wasm_gateway.filters.build              # rebuild every filter into wasm_gateway/filters/
    python -m wasm_gateway.filters.build --check      # rebuild in a temp dir; exit 1 if a shipped .wasm differs
    python -m wasm_gateway.filters.build transform    # only the named filters

The compiler is the PyPI package ``ziglang`` pinned to `ZIG_VERSION` (the dev extra installs it). Builds are
reproducible: the same sources and compiler give the same bytes on any machine and in any directory (no
debug info, no paths, no timestamps), which is what lets CI check the shipped modules with ``--check``.

The JS filter (``js``) is QuickJS plus ``js/glue.c`` and ``js/prelude.js``, compiled with ``zig cc`` for
wasm32-wasi. QuickJS itself is not vendored: its sources come from the PyPI source distribution of the
``quickjs`` package (`QUICKJS_SDIST`, pinned by version and sha256), fetched with ``pip download`` into
``~/.cache/wasm-gateway/`` once, or read from the file ``$WASM_GATEWAY_QUICKJS_SDIST`` (offline builds). Small
source patches are applied (see `QUICKJS_PATCHES`); each must match exactly, so a different QuickJS fails
loudly instead of building something else. The build is two-stage: the first module compiles
``js/prelude.js`` to QuickJS bytecode (run once here, under wasmtime), the second embeds that bytecode, so
instances start without parsing the prelude.

Why not vendor QuickJS: its sources are ~2.5 MB of C that we never edit beyond the patches; the pinned sdist
(450 KB, sha256-checked) gives the same bytes reproducibly, and CI can reach PyPI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ..exceptions import GatewayError
from . import BUNDLED_FILTERS, FILTERS_DIR

__all__ = [
    "QUICKJS_SDIST",
    "ZIG_FLAGS",
    "ZIG_VERSION",
    "FilterBuildError",
    "build_all",
    "build_filter",
    "check",
    "main",
    "stale_modules",
]

ZIG_VERSION: Final = "0.14.1"
SOURCES_DIR: Final = FILTERS_DIR / "zig"
ZIG_FLAGS: Final = (
    "-target",
    "wasm32-freestanding",
    "-fno-entry",
    "-rdynamic",  # keep the Proxy-Wasm exports each filter registers
    "-fstrip",  # no debug info: smaller, and no build paths in the module
    "--stack",
    "131072",
)


# ReleaseSmall unless speed is worth the size: auth's RSA verify is 2x faster with ReleaseFast (0.86 vs 1.6 ms for
# RS256-2048, measured with tests/filters/auth_bench.py), for 428 KB instead of 256 KB.
OPTIMIZE: Final = {"auth": "ReleaseFast"}


class FilterBuildError(GatewayError):
    """The Zig toolchain is missing or a filter failed to compile."""


JS_DIR: Final = FILTERS_DIR / "js"
# (package, version, sha256 of the .tar.gz): the sdist carries upstream QuickJS 2021-03-27 in upstream-quickjs/.
QUICKJS_SDIST: Final = (
    "quickjs",
    "1.19.4",
    "1205953abc24ff757f4a795304d5d61e4bf1e555c9ef6ec96a132d4b95535484",
)
QUICKJS_VERSION: Final = "2021-03-27"
QUICKJS_FILES: Final = (
    "quickjs.c",
    "quickjs.h",
    "quickjs-atom.h",
    "quickjs-opcode.h",
    "libregexp.c",
    "libregexp.h",
    "libregexp-opcode.h",
    "libunicode.c",
    "libunicode.h",
    "libunicode-table.h",
    "cutils.c",
    "cutils.h",
    "list.h",
)
# (file, exact text, replacement, why)
QUICKJS_PATCHES: Final = (
    (
        "quickjs.c",
        "#if !defined(EMSCRIPTEN)\n#define CONFIG_ATOMICS",
        "#if 0 /* wasm-gateway: no threads in a filter */\n#define CONFIG_ATOMICS",
        "Atomics need pthreads, which a single-threaded wasm32-wasi filter does not have",
    ),
    (
        "quickjs.c",
        "    va_start(ap, fmt);\n    JS_ThrowError2(ctx, JS_SYNTAX_ERROR, fmt, ap, FALSE);",
        "    js_parse_error_ptr = s->token.ptr; /* wasm-gateway: column of syntax errors */\n"
        "    va_start(ap, fmt);\n    JS_ThrowError2(ctx, JS_SYNTAX_ERROR, fmt, ap, FALSE);",
        "syntax errors must name line and column; QuickJS 2021 reports the line only",
    ),
    (
        "quickjs.c",
        "int __attribute__((format(printf, 2, 3))) js_parse_error(JSParseState *s, const char *fmt, ...)\n{",
        "const uint8_t *js_parse_error_ptr;\n"
        "int __attribute__((format(printf, 2, 3))) js_parse_error(JSParseState *s, const char *fmt, ...)\n{",
        "the variable the previous patch sets (glue.c reads it)",
    ),
)
JS_CFLAGS: Final = (
    "-target",
    "wasm32-wasi",
    "-mexec-model=reactor",
    "-Os",
    "-s",  # no debug info or names: smaller, and no build paths in the module
    f'-DCONFIG_VERSION="{QUICKJS_VERSION}"',
    "-D_GNU_SOURCE",
    "-include",
    "wasi_compat.h",
    "-Wno-everything",  # QuickJS's own warnings are not ours to fix
    "-Wl,-z,stack-size=1048576",  # 1 MiB shadow stack; glue.c caps QuickJS's own stack check below it
)


def zig_version() -> str:
    """The installed ``ziglang`` compiler version; FilterBuildError when it is not installed."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "ziglang", "version"], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise FilterBuildError(f"cannot run the Zig compiler: {exc}") from None
    if out.returncode != 0:
        raise FilterBuildError(
            f"the Zig compiler is not available (pip install 'ziglang=={ZIG_VERSION}', or the dev extra): "
            f"{out.stderr.strip() or out.stdout.strip()}"
        )
    return out.stdout.strip()


def _require_toolchain() -> None:
    version = zig_version()
    if version != ZIG_VERSION:
        raise FilterBuildError(
            f"the bundled filters are built with Zig {ZIG_VERSION}, found {version} "
            f"(pip install 'ziglang=={ZIG_VERSION}')"
        )


def quickjs_sdist() -> Path:
    """The pinned QuickJS source distribution: ``$WASM_GATEWAY_QUICKJS_SDIST``, the cache, or PyPI (cached)."""
    package, version, sha256 = QUICKJS_SDIST
    override = os.environ.get("WASM_GATEWAY_QUICKJS_SDIST")
    if override:
        path = Path(override)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wasm-gateway"
        path = cache / f"{package}-{version}.tar.gz"
        if not path.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="wasm-gateway-sdist-", dir=cache) as tmp:
                cmd = [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    f"{package}=={version}",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    "--quiet",
                    "-d",
                    tmp,
                ]
                result = subprocess.run(cmd, capture_output=True, text=True, check=False)
                fetched = Path(tmp) / path.name
                if result.returncode != 0 or not fetched.is_file():
                    raise FilterBuildError(
                        f"cannot fetch the QuickJS sources ({package}=={version} from PyPI; set "
                        f"WASM_GATEWAY_QUICKJS_SDIST to a local copy): {result.stderr.strip()[-2000:]}"
                    )
                fetched.replace(path)
    if not path.is_file():
        raise FilterBuildError(f"no QuickJS source distribution at {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise FilterBuildError(f"{path}: sha256 {digest}, expected {sha256} ({package}=={version})")
    return path


def _quickjs_sources(dest: Path) -> None:
    """Unpack the QuickJS files we compile into ``dest`` and apply `QUICKJS_PATCHES`."""
    package, version, _ = QUICKJS_SDIST
    prefix = f"{package}-{version}/upstream-quickjs/"
    with tarfile.open(quickjs_sdist()) as tar:
        version_file = tar.extractfile(prefix + "VERSION")
        found = version_file.read().decode().strip() if version_file else ""
        if found != QUICKJS_VERSION:
            raise FilterBuildError(f"the sdist carries QuickJS {found!r}, expected {QUICKJS_VERSION}")
        for name in QUICKJS_FILES:
            member = tar.extractfile(prefix + name)
            if member is None:
                raise FilterBuildError(f"the QuickJS sdist lacks {name}")
            (dest / name).write_bytes(member.read())
    _apply_patches(dest)


def _apply_patches(dest: Path) -> None:
    for name, old, new, why in QUICKJS_PATCHES:
        path = dest / name
        text = path.read_text()
        if text.count(old) != 1:
            raise FilterBuildError(f"QuickJS patch no longer applies to {name} ({why})")
        path.write_text(text.replace(old, new))


def _c_bytes(name: str, data: bytes) -> str:
    """A C array holding ``data`` plus a terminating NUL (JS_Eval wants one), and its length without it."""
    values = [str(b) for b in data + b"\0"]
    lines = [",".join(values[i : i + 32]) + "," for i in range(0, len(values), 32)]
    return (
        f"static const unsigned char {name}[] = {{\n" + "\n".join(lines) + "\n};\n"
        f"static const unsigned int {name}_len = {len(data)};\n"
    )


def _zig_cc(src: Path, out: Path, *extra: str) -> None:
    sources = ["glue.c", "quickjs.c", "libregexp.c", "libunicode.c", "cutils.c"]
    # Relative names and cwd: assert() messages carry __FILE__, which must not depend on the temp dir.
    cmd = [sys.executable, "-m", "ziglang", "cc", *JS_CFLAGS, *extra, "-o", str(out), *sources]
    env = dict(os.environ, ZIG_LOCAL_CACHE_DIR=str(src.parent / "cache"))
    result = subprocess.run(cmd, cwd=src, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0 or not out.is_file():
        raise FilterBuildError(f"building filter 'js' failed:\n{result.stderr.strip()[-4000:]}")


def _prelude_bytecode(stage1: Path) -> bytes:
    """Run the stage-1 module's ``gw_compile_prelude`` (QuickJS compiling the prelude) and return the bytecode."""
    import wasmtime

    engine = wasmtime.Engine()
    module = wasmtime.Module.from_file(engine, str(stage1))
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    for imp in module.imports:
        if imp.module == "env" and isinstance(imp.type, wasmtime.FuncType):
            # Never called while compiling; linked so the module instantiates.
            linker.define_func("env", str(imp.name), imp.type, lambda *args: 0)
    exports = linker.instantiate(store, module).exports(store)
    exports["_initialize"](store)  # type: ignore[operator]
    ptr = exports["gw_compile_prelude"](store)  # type: ignore[operator]
    memory = exports["memory"]
    assert isinstance(memory, wasmtime.Memory) and isinstance(ptr, int)
    if ptr == 0:
        raise FilterBuildError("QuickJS could not compile js/prelude.js")
    size = int.from_bytes(memory.read(store, ptr, ptr + 4), "little")
    return bytes(memory.read(store, ptr + 4, ptr + 4 + size))


def build_js(out_dir: Path) -> Path:
    """Compile QuickJS + ``js/glue.c`` + ``js/prelude.js`` (as bytecode) to ``out_dir/js.wasm``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wasm-gateway-js-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        _quickjs_sources(src)
        shutil.copyfile(JS_DIR / "glue.c", src / "glue.c")
        shutil.copyfile(JS_DIR / "wasi_compat.h", src / "wasi_compat.h")
        (src / "prelude.h").write_text(_c_bytes("prelude_js", (JS_DIR / "prelude.js").read_bytes()))
        stage1 = Path(tmp) / "stage1.wasm"
        _zig_cc(src, stage1)
        (src / "prelude_bc.h").write_text(_c_bytes("prelude_bc", _prelude_bytecode(stage1)))
        emitted = Path(tmp) / "js.wasm"
        _zig_cc(src, emitted, "-DGW_PRELUDE_BYTECODE")
        target = out_dir / "js.wasm"
        shutil.copyfile(emitted, target)
    return target


def build_filter(name: str, out_dir: Path, *, check_toolchain: bool = True) -> Path:
    """Compile ``zig/<name>.zig`` to ``out_dir/<name>.wasm``; FilterBuildError with the compiler output."""
    if check_toolchain:
        _require_toolchain()
    if name == "js":
        return build_js(out_dir)
    source = SOURCES_DIR / f"{name}.zig"
    if not source.is_file():
        raise FilterBuildError(f"no source for filter {name!r}: {source}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wasm-gateway-zig-") as tmp:
        # Built under a temp name, moved into place only when complete; relative source path and cwd
        # keep the invocation identical wherever the package lives.
        emitted = Path(tmp) / f"{name}.wasm"
        cmd = [
            sys.executable,
            "-m",
            "ziglang",
            "build-exe",
            source.name,
            *ZIG_FLAGS,
            "-O",
            OPTIMIZE.get(name, "ReleaseSmall"),
            f"-femit-bin={emitted}",
            "--cache-dir",
            str(Path(tmp) / "cache"),
        ]
        result = subprocess.run(cmd, cwd=SOURCES_DIR, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not emitted.is_file():
            raise FilterBuildError(f"building filter {name!r} failed:\n{result.stderr.strip()}")
        target = out_dir / f"{name}.wasm"
        shutil.copyfile(emitted, target)
    return target


def build_all(out_dir: Path = FILTERS_DIR, names: Sequence[str] = BUNDLED_FILTERS) -> dict[str, Path]:
    """Build every named filter into ``out_dir``."""
    _require_toolchain()
    return {name: build_filter(name, out_dir, check_toolchain=False) for name in names}


def stale_modules(fresh: dict[str, Path], shipped_dir: Path = FILTERS_DIR) -> list[str]:
    """The names whose module in ``shipped_dir`` is missing or differs from the freshly built one."""
    return [
        name
        for name, path in fresh.items()
        if not (shipped_dir / path.name).is_file()
        or (shipped_dir / path.name).read_bytes() != path.read_bytes()
    ]


def check(names: Sequence[str] = BUNDLED_FILTERS, shipped_dir: Path = FILTERS_DIR) -> list[str]:
    """Rebuild into a temp dir; the names whose module in ``shipped_dir`` is missing or differs."""
    with tempfile.TemporaryDirectory(prefix="wasm-gateway-check-") as tmp:
        return stale_modules(build_all(Path(tmp), names), shipped_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wasm_gateway.filters.build",
        description="Rebuild the bundled filters (Zig, and the QuickJS-based js filter).",
    )
    parser.add_argument(
        "filters", nargs="*", help=f"filters to build (default: {', '.join(BUNDLED_FILTERS)})"
    )
    parser.add_argument(
        "--check", action="store_true", help="rebuild in a temp dir and fail if a shipped .wasm differs"
    )
    args = parser.parse_args(argv)
    names = tuple(n.replace("-", "_") for n in args.filters) or BUNDLED_FILTERS
    unknown = [n for n in names if n not in BUNDLED_FILTERS]
    if unknown:
        parser.error(f"unknown filter(s): {', '.join(unknown)} (bundled: {', '.join(BUNDLED_FILTERS)})")
    try:
        if args.check:
            stale = check(names)
            if stale:
                print(
                    f"shipped modules differ from a fresh build: {', '.join(stale)}\n"
                    "run `python -m wasm_gateway.filters.build` and commit the .wasm files",
                    file=sys.stderr,
                )
                return 1
            print(f"shipped modules match a fresh build: {', '.join(names)}")
            return 0
        for name, path in build_all(FILTERS_DIR, names).items():
            print(f"{name}: {path} ({path.stat().st_size} bytes)")
    except FilterBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
