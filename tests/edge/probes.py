"""Building the Zig edge-data probe filter (tests/edge/zig/edge_probe.zig) against the bundled binding, with
the bundled filters' flags: for the tests and benchmarks/micro_edge.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from wasm_gateway.filters.build import SOURCES_DIR, ZIG_FLAGS, ZIG_VERSION, FilterBuildError, zig_version

ZIG_DIR = Path(__file__).parent / "zig"


class ZigUnavailable(RuntimeError):
    """The pinned Zig compiler is not installed."""


def require_zig() -> None:
    """ZigUnavailable unless the pinned compiler is installed."""
    try:
        version = zig_version()
    except FilterBuildError as exc:
        raise ZigUnavailable(f"the Zig compiler (ziglang=={ZIG_VERSION}) is not installed: {exc}") from None
    if version != ZIG_VERSION:
        raise ZigUnavailable(f"ziglang {version} is installed; the binding is built with {ZIG_VERSION}")


def build_zig_probe(out_dir: Path) -> Path:
    require_zig()
    src = out_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SOURCES_DIR / "proxy_wasm.zig", src / "proxy_wasm.zig")
    shutil.copyfile(ZIG_DIR / "edge_probe.zig", src / "edge_probe.zig")
    out = out_dir / "edge_probe.wasm"
    cmd = [sys.executable, "-m", "ziglang", "build-exe", "edge_probe.zig", *ZIG_FLAGS, "-O", "ReleaseSmall"]
    cmd += [f"-femit-bin={out}", "--cache-dir", str(out_dir / "cache")]
    result = subprocess.run(cmd, cwd=src, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building edge_probe.zig failed:\n{result.stderr}")
    return out
