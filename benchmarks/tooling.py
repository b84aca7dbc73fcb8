"""What the benchmark needs from outside the repo: found on the machine, or installed once.

nginx and wrk come from Debian packages (``apt-get install -y``, with ``apt-get update`` first, only when one is
missing); Express 5 and http-proxy-middleware 3 from npm into ``benchmarks/.work/node`` (git-ignored).
Anything that cannot be had is reported with the reason, and the systems that need it are skipped.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# http-proxy-middleware 4 is ESM-only and needs node >= 22; 3.x runs on the node 20 these machines ship.
NPM_PACKAGES = ("express@5", "http-proxy-middleware@3")
DEBIAN_PACKAGE_FOR_BINARY = {"nginx": "nginx", "wrk": "wrk"}
APT_TIMEOUT_SECONDS = 600
NPM_TIMEOUT_SECONDS = 300

Log = Callable[[str], None]


@dataclass
class Tools:
    """Paths of the external programs found (None when missing) and why each missing one is missing."""

    paths: dict[str, str | None] = field(default_factory=dict)
    missing_reasons: dict[str, str] = field(default_factory=dict)
    node_modules: Path | None = None

    def path(self, name: str) -> str | None:
        return self.paths.get(name)


def find_binary(name: str) -> str | None:
    # nginx lives in /usr/sbin, which is not on every user's PATH.
    found = shutil.which(name)
    if found is None:
        for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return found


def _apt_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return env


def ensure_debian_binaries(names: list[str], tools: Tools, log: Log, allow_install: bool) -> None:
    """Find each binary; install the missing ones' Debian packages in one apt-get call when we can."""
    missing = []
    for name in names:
        tools.paths[name] = find_binary(name)
        if tools.paths[name] is None:
            missing.append(name)
    if not missing:
        return
    packages = [DEBIAN_PACKAGE_FOR_BINARY[name] for name in missing]
    reason = None
    if not allow_install:
        reason = "not installed and --no-install given"
    elif shutil.which("apt-get") is None:
        reason = "not installed and apt-get is not available"
    elif os.geteuid() != 0:
        reason = "not installed and not running as root (apt-get install needs root)"
    else:
        log(f"installing Debian packages {' '.join(packages)} (apt-get update first)")
        try:
            for command in (
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            ):
                done = subprocess.run(
                    command,
                    env=_apt_env(),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=APT_TIMEOUT_SECONDS,
                )
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                    reason = f"`{' '.join(command)}` failed ({done.returncode}): {' / '.join(tail)}"
                    break
        except subprocess.TimeoutExpired:
            reason = f"apt-get did not finish within {APT_TIMEOUT_SECONDS} s"
    for name in missing:
        tools.paths[name] = find_binary(name)
        if tools.paths[name] is None:
            tools.missing_reasons[name] = (
                reason or f"package {DEBIAN_PACKAGE_FOR_BINARY[name]} installed but no binary"
            )


def _installed_npm_version(node_modules: Path, package: str) -> str | None:
    try:
        version: str = json.loads((node_modules / package / "package.json").read_text())["version"]
        return version
    except (OSError, ValueError, KeyError):
        return None


def _npm_install_satisfied(node_modules: Path) -> bool:
    for spec in NPM_PACKAGES:
        name, _, major = spec.rpartition("@")
        version = _installed_npm_version(node_modules, name)
        if version is None or version.split(".")[0] != major:
            return False
    return True


def ensure_npm_packages(work_dir: Path, tools: Tools, log: Log, allow_install: bool) -> None:
    """Express 5 + http-proxy-middleware 3 under ``work_dir/node/node_modules``."""
    node = find_binary("node")
    npm = find_binary("npm")
    tools.paths["node"] = node
    prefix = work_dir / "node"
    node_modules = prefix / "node_modules"
    if node is None or npm is None:
        tools.missing_reasons["express"] = "node/npm not installed (Debian packages nodejs, npm)"
        return
    if _npm_install_satisfied(node_modules):
        tools.node_modules = node_modules
        return
    if not allow_install:
        tools.missing_reasons["express"] = (
            f"{' '.join(NPM_PACKAGES)} not in {node_modules} and --no-install given"
        )
        return
    log(f"installing npm packages {' '.join(NPM_PACKAGES)} into {prefix}")
    prefix.mkdir(parents=True, exist_ok=True)
    package_json = prefix / "package.json"
    if not package_json.exists():
        package_json.write_text('{"name": "wasm-gateway-bench-peers", "private": true}\n')
    try:
        done = subprocess.run(
            [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
                str(prefix),
                *NPM_PACKAGES,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        tools.missing_reasons["express"] = f"npm install did not finish within {NPM_TIMEOUT_SECONDS} s"
        return
    if done.returncode != 0 or not _npm_install_satisfied(node_modules):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        tools.missing_reasons["express"] = f"npm install failed ({done.returncode}): {' / '.join(tail)}"
        return
    tools.node_modules = node_modules


def _command_output(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else None


def _python_package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _git_revision(repo_root: Path) -> str | None:
    revision = _command_output(["git", "-C", str(repo_root), "rev-parse", "--short", "HEAD"])
    if revision is None or "fatal" in revision:
        return None
    dirty = _command_output(["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"])
    return revision + ("+dirty" if dirty else "")


def describe_machine(tools: Tools, repo_root: Path) -> dict[str, object]:
    """CPU, cores, kernel, memory and the versions of everything measured."""
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "wasm-gateway": _python_package_version("wasm-gateway"),
        "uvicorn": _python_package_version("uvicorn"),
        "uvloop": _python_package_version("uvloop"),
        "httptools": _python_package_version("httptools"),
        "aiohttp": _python_package_version("aiohttp"),
        "wasmtime": _python_package_version("wasmtime"),
    }
    if versions["wasm-gateway"] is None:
        # Not pip-installed: read the version the source tree declares.
        try:
            import tomllib

            data = tomllib.loads((repo_root / "pyproject.toml").read_text())
            versions["wasm-gateway"] = str(data["project"]["version"]) + " (source tree)"
        except (OSError, KeyError, ValueError):
            pass
    nginx = tools.path("nginx")
    if nginx:
        line = _command_output([nginx, "-v"])
        versions["nginx"] = line.split("/", 1)[-1] if line else None
    wrk = tools.path("wrk")
    if wrk:
        line = _command_output([wrk, "-v"])
        versions["wrk"] = line.split()[1] if line and len(line.split()) > 1 else line
    node = tools.path("node")
    if node:
        versions["node"] = _command_output([node, "--version"])
    if tools.node_modules is not None:
        versions["express"] = _installed_npm_version(tools.node_modules, "express")
        versions["http-proxy-middleware"] = _installed_npm_version(
            tools.node_modules, "http-proxy-middleware"
        )
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory": _memory_total(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python_executable": sys.executable,
        "git_revision": _git_revision(repo_root),
        "versions": {name: version for name, version in versions.items() if version},
    }


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def background_cpu_percent(seconds: float = 1.0) -> float | None:
    """CPU in use across the machine before the run starts anything (other users' load disturbs results)."""
    try:
        busy_before, total_before = _cpu_times()
        time.sleep(seconds)
        busy_after, total_after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    total = total_after - total_before
    return 100.0 * (busy_after - busy_before) / total if total > 0 else None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()
