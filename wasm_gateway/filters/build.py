"""Rebuild the bundled filters from their Zig sources.

::

    python -m wasm_gateway.filters.build              # rebuild every filter into wasm_gateway/filters/
    python -m wasm_gateway.filters.build --check      # rebuild in a temp dir; exit 1 if a shipped .wasm differs
    python -m wasm_gateway.filters.build transform    # only the named filters

The compiler is the PyPI package ``ziglang`` pinned to `ZIG_VERSION` (the dev extra installs it). Builds are
reproducible: the same sources and compiler give the same bytes on any machine and in any directory (no
debug info, no paths, no timestamps), which is what lets CI check the shipped modules with ``--check``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ..exceptions import GatewayError
from . import BUNDLED_FILTERS, FILTERS_DIR

__all__ = [
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


def build_filter(name: str, out_dir: Path, *, check_toolchain: bool = True) -> Path:
    """Compile ``zig/<name>.zig`` to ``out_dir/<name>.wasm``; FilterBuildError with the compiler output."""
    if check_toolchain:
        _require_toolchain()
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
        prog="python -m wasm_gateway.filters.build", description="Rebuild the bundled Zig filters."
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
