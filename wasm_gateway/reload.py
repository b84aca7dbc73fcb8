"""What sets a reload or a drain off: the config file, process signals, and a file watch.

* ``read_config(path)``: the file's bytes, parsed, and their digest (the version shown in /readyz and metrics).
* ``ProcessSignals``: in a process run by ``wasm-gateway serve`` (``WASM_GATEWAY_PROCESS_SIGNALS=1``), SIGHUP
  reloads and SIGTERM drains: /readyz answers 503 at once, the listener keeps serving for ``drain_delay``, then
  the server's own SIGTERM handling (stop accepting, let in-flight requests finish within the grace period)
  runs. Embedded gateways (middleware mode, other servers) leave process signals alone.
* ``watch_files``: polls the config file and the filter modules (stat only) and calls back when one changes.

``wasm-gateway serve`` starts with SIGHUP blocked (and so does every worker it spawns, which inherit the mask):
a SIGHUP that arrives before the gateway installed its handler waits, instead of killing the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from .config import GatewayConfig, parse_config
from .exceptions import ConfigError
from .generation import config_digest

__all__ = [
    "PROCESS_SIGNALS_ENV",
    "ProcessSignals",
    "digest_of",
    "module_paths",
    "read_config",
    "sighup_blocked",
    "watch_files",
]

logger = logging.getLogger("wasm_gateway")

PROCESS_SIGNALS_ENV = "WASM_GATEWAY_PROCESS_SIGNALS"


def module_paths(config: GatewayConfig) -> dict[str, Path]:
    """Every file a filter is loaded from: its module, and the files its configuration was read from (a JS
    filter's script), so a change to any of them is a new version of the config."""
    paths = {name: f.module for name, f in config.filters.items()}
    for name, f in config.filters.items():
        for i, source in enumerate(f.sources):
            paths[f"{name}\0source{i}"] = source
    return paths


def read_config(path: Path) -> tuple[GatewayConfig, str]:
    """Parse the file and compute its digest from the same bytes (a file replaced meanwhile cannot mix)."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    config = parse_config(text, source=str(path), base_dir=path.parent)
    return config, config_digest(data, module_paths(config))


def digest_of(config: GatewayConfig) -> str:
    """The digest of a config object: from its source file when it came from one, else from its value."""
    source = Path(config.source)
    try:
        data = source.read_bytes()
    except OSError:
        data = repr(config).encode()
    return config_digest(data, module_paths(config))


class ProcessSignals:
    """SIGHUP -> ``on_reload()``; SIGTERM -> ``on_drain()``, then after ``drain_delay`` the SIGTERM handler
    that was installed before (uvicorn's). A second SIGTERM skips the rest of the delay."""

    def __init__(
        self, on_reload: Callable[[], None], on_drain: Callable[[], None], drain_delay: float
    ) -> None:
        self._on_reload = on_reload
        self._on_drain = on_drain
        self._drain_delay = drain_delay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[int, Any] = {}
        self._pending_term: asyncio.TimerHandle | None = None

    def install(self) -> bool:
        """Take SIGHUP and SIGTERM (main thread only); False when it cannot."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._loop = asyncio.get_running_loop()
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._term)
        self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        return True

    def restore(self) -> None:
        if self._pending_term is not None:
            self._pending_term.cancel()
            self._pending_term = None
        for signum, handler in self._previous.items():
            if handler is not None and signal.getsignal(signum) in (self._term, self._hup):
                signal.signal(signum, handler)
        self._previous.clear()

    def _hup(self, signum: int, frame: FrameType | None) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._on_reload)

    def _term(self, signum: int, frame: FrameType | None) -> None:
        self._on_drain()
        loop = self._loop
        if self._drain_delay <= 0 or self._pending_term is not None or loop is None:
            if self._pending_term is not None:
                self._pending_term.cancel()
                self._pending_term = None
            self._forward(signum)
            return
        logger.info("SIGTERM: /readyz answers 503; serving %g s more before shutting down", self._drain_delay)
        self._pending_term = loop.call_later(self._drain_delay, self._forward, signum)

    def _forward(self, signum: int) -> None:
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)
            return
        # No Python handler before ours: restore what was there and deliver the signal again.
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signum)


async def watch_files(
    paths: Callable[[], list[Path]], interval: float, on_change: Callable[[], Awaitable[object]]
) -> None:
    """Poll ``paths()`` every ``interval`` seconds; await ``on_change()`` when one appears, goes or changes.

    Stat only (inode, size, mtime), following symlinks: a Kubernetes ConfigMap update (an atomic symlink swap)
    shows as a new inode."""
    last = _fingerprint(paths())
    while True:
        await asyncio.sleep(interval)
        now = _fingerprint(paths())
        if now != last:
            last = now
            try:
                await on_change()
            except Exception:  # the reload logs its own failures; the watch goes on
                logger.exception("config watch: reload failed")


def _fingerprint(paths: list[Path]) -> Mapping[Path, tuple[int, int, int] | None]:
    result: dict[Path, tuple[int, int, int] | None] = {}
    for path in paths:
        try:
            st = path.stat()
            result[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            result[path] = None
    return result


@contextlib.contextmanager
def sighup_blocked() -> Any:
    """Block SIGHUP in this thread for the block (spawned processes inherit the mask); a SIGHUP arriving
    meanwhile is delivered afterwards."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        if signal.SIGHUP not in previous:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
