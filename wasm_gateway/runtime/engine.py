"""The wasmtime Engine (one per settings variant per process), its epoch ticker, and compiled modules.

Compiled modules are cached on disk. A cache entry is wasmtime's serialized artifact alone
(``<module sha256>-<engine key>.cwasm``, so wasmtime can map it instead of copying it: 0.1 ms instead of 0.9 ms
for the 1.8 MB JavaScript filter) and a sidecar ``.cwasm.meta`` holding one header line::

    WGCWASM2 <module sha256> <engine key sha256> <payload crc32, 8 hex digits> <payload length>\\n

Files made by ``wasm-gateway compile`` carry that line and the artifact in one file (one file to ship).

The engine key covers the wasmtime version, the platform and every engine setting that changes generated
code, so an entry written by another version or configuration is never deserialised. Any mismatch,
truncation or deserialisation failure means "recompile and replace"; it is never fatal.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import logging
import os
import platform
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import wasmtime

from ..exceptions import FilterLoadError
from . import fastcall
from .wasmsummary import ModuleSummary, summarize

__all__ = [
    "EPOCH_TICK_SECONDS",
    "CachedModule",
    "EngineSettings",
    "LoadTimings",
    "cache_entry_path",
    "calls_hold_gil",
    "deadline_ticks",
    "get_engine",
    "load_module",
    "precompile",
    "read_cache_entry",
    "shutdown_engines",
    "write_cache_entry",
]

_log = logging.getLogger("wasm_gateway.runtime")

EPOCH_TICK_SECONDS: Final = 0.005
_MAGIC: Final = b"WGCWASM2"  # payload checked with CRC-32 (cheap enough to verify on every load)
_MAGIC_V1: Final = b"WGCWASM1"  # payload checked with SHA-256: still read
WASMTIME_VERSION: Final = importlib.metadata.version("wasmtime")


@dataclass(frozen=True)
class EngineSettings:
    """Engine options that change generated code (part of the cache key)."""

    consume_fuel: bool = False
    opt_level: str = "speed"
    max_wasm_stack: int = 512 * 1024

    def key(self) -> str:
        key = _SETTINGS_KEYS.get(self)
        if key is None:
            key = _SETTINGS_KEYS[self] = self._key()
        return key

    def _key(self) -> str:
        text = (
            f"wasmtime={WASMTIME_VERSION};machine={platform.machine()};system={platform.system()};"
            f"epoch=1;fuel={int(self.consume_fuel)};opt={self.opt_level};stack={self.max_wasm_stack};"
            "may_move=0"
        )
        return hashlib.sha256(text.encode()).hexdigest()


_SETTINGS_KEYS: dict[EngineSettings, str] = {}


class _EpochTicker:
    """Advances an engine's epoch every EPOCH_TICK_SECONDS from a Python thread (when no native timer)."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wasm-epoch-ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(EPOCH_TICK_SECONDS):
            self._engine.increment_epoch()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


@dataclass
class _EngineEntry:
    engine: wasmtime.Engine
    ticker: _EpochTicker | fastcall.NativeTicker

    @property
    def native(self) -> bool:
        return isinstance(self.ticker, fastcall.NativeTicker)


_ENGINES: dict[EngineSettings, _EngineEntry] = {}
# Engines whose ticker ran natively, by address: guest calls on them hold the GIL (see fastcall). Never
# emptied (the engines stay referenced, so an address is never reused by another engine).
_NATIVE_ENGINES: dict[int, wasmtime.Engine] = {}
_ENGINES_LOCK = threading.Lock()
# "thread" forces the Python ticker thread (and GIL-releasing guest calls), for comparison and debugging.
_TICKER_KIND: Final = os.environ.get("WASM_GATEWAY_EPOCH_TICKER", "native")


def get_engine(settings: EngineSettings = EngineSettings()) -> wasmtime.Engine:
    """The process-wide engine for ``settings``, created (with its epoch ticker) on first use."""
    with _ENGINES_LOCK:
        entry = _ENGINES.get(settings)
        if entry is None:
            cfg = wasmtime.Config()
            cfg.epoch_interruption = True
            cfg.consume_fuel = settings.consume_fuel
            cfg.cranelift_opt_level = settings.opt_level
            cfg.max_wasm_stack = settings.max_wasm_stack
            # The host caches each instance's memory base address: memories must never move.
            cfg.memory_may_move = False
            engine = wasmtime.Engine(cfg)
            ticker: _EpochTicker | fastcall.NativeTicker | None = None
            if _TICKER_KIND == "native":
                ticker = fastcall.start_native_ticker(engine, EPOCH_TICK_SECONDS)
            if ticker is None:
                ticker = _EpochTicker(engine)
            else:
                _NATIVE_ENGINES[_engine_address(engine)] = engine
            entry = _EngineEntry(engine, ticker)
            _ENGINES[settings] = entry
        return entry.engine


def _engine_address(engine: wasmtime.Engine) -> int:
    return ctypes.addressof(engine.ptr().contents)


def calls_hold_gil(engine: wasmtime.Engine) -> bool:
    """Whether guest calls on ``engine`` may keep the GIL: its epoch ticker needs no Python."""
    return _engine_address(engine) in _NATIVE_ENGINES


def shutdown_engines() -> None:
    """Stop the epoch tickers (engines stay usable for already-loaded modules, without time limits)."""
    with _ENGINES_LOCK:
        for entry in _ENGINES.values():
            entry.ticker.stop()
        _ENGINES.clear()


def deadline_ticks(timeout_ms: float) -> int:
    """Epoch ticks for a callback time limit (rounded up, plus one for the partial current tick)."""
    return max(1, int(-(-timeout_ms // (EPOCH_TICK_SECONDS * 1000)))) + 1


@dataclass
class LoadTimings:
    """Seconds spent per cold-start phase of loading a module."""

    read: float = 0.0
    compile: float = 0.0
    deserialize: float = 0.0
    cache_write: float = 0.0
    source: str = "compile"  # 'compile', 'cache' or 'precompiled'


@dataclass
class CachedModule:
    module: wasmtime.Module
    sha256: str
    path: Path
    timings: LoadTimings = field(default_factory=LoadTimings)
    # The module's source bytes, kept until it is linked (None for a precompiled file)
    source: bytes | None = None

    def summary(self) -> ModuleSummary | None:
        """Imports/exports read from the source bytes (None without them or when they cannot be read:
        ask wasmtime). Linking calls this once; the bytes are dropped afterwards."""
        wasm = self.source
        self.source = None
        if wasm is None:
            return None
        try:
            return summarize(wasm)
        except (ValueError, IndexError, UnicodeDecodeError):
            return None


def _header(module_sha: str, engine_key: str, payload: bytes) -> bytes:
    return b"%s %s %s %08x %d\n" % (
        _MAGIC,
        module_sha.encode(),
        engine_key.encode(),
        zlib.crc32(payload),
        len(payload),
    )


def _parse(blob: bytes) -> tuple[str, str, bytes] | None:
    """(module sha, engine key, payload) of a well-formed, checksum-verified entry, else None."""
    nl = blob.find(b"\n", 0, 512)
    if nl < 0:
        return None
    parts = blob[:nl].split(b" ")
    if len(parts) != 5 or parts[0] not in (_MAGIC, _MAGIC_V1):
        return None
    payload = memoryview(blob)[nl + 1 :]
    try:
        length = int(parts[4])
    except ValueError:
        return None
    if length != len(payload):
        return None
    if parts[0] == _MAGIC:
        if b"%08x" % zlib.crc32(payload) != parts[3]:
            return None
    elif hashlib.sha256(payload).hexdigest().encode() != parts[3]:
        return None
    return parts[1].decode("ascii", "replace"), parts[2].decode("ascii", "replace"), bytes(payload)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _compile(engine: wasmtime.Engine, wasm: bytes, path: Path) -> wasmtime.Module:
    if wasm[:4] != b"\0asm":
        raise FilterLoadError(f"{path}: not a WebAssembly module (bad magic header)")
    try:
        return wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        raise FilterLoadError(f"{path}: invalid WebAssembly module: {exc}") from None


def precompile(
    module_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    settings: EngineSettings = EngineSettings(),
) -> Path:
    """Compile ``module_path`` ahead of time into ``out_path`` (the `wasm-gateway compile` command).

    The output can be given anywhere a module path is accepted; it only loads on the same wasmtime version,
    platform and engine settings (otherwise loading fails with a message saying so).
    """
    src = Path(module_path)
    try:
        wasm = src.read_bytes()
    except OSError as exc:
        raise FilterLoadError(f"{src}: cannot read module: {exc.strerror}") from None
    module = _compile(get_engine(settings), wasm, src)
    payload = bytes(module.serialize())
    out = Path(out_path)
    try:
        _atomic_write(out, _header(hashlib.sha256(wasm).hexdigest(), settings.key(), payload) + payload)
    except OSError as exc:
        raise FilterLoadError(f"{out}: cannot write precompiled module: {exc.strerror}") from None
    return out


def load_module(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    settings: EngineSettings = EngineSettings(),
) -> CachedModule:
    """Load a `.wasm` (through the on-disk cache when ``cache_dir`` is given) or a precompiled file.

    Raises FilterLoadError naming the file for anything that prevents loading.
    """
    p = Path(path)
    engine = get_engine(settings)
    engine_key = settings.key()
    timings = LoadTimings()
    t0 = time.perf_counter()
    try:
        blob = p.read_bytes()
    except OSError as exc:
        raise FilterLoadError(f"{p}: cannot read module: {exc.strerror}") from None
    timings.read = time.perf_counter() - t0

    if blob.startswith(_MAGIC) or blob.startswith(_MAGIC_V1):
        parsed = _parse(blob)
        if parsed is None:
            raise FilterLoadError(f"{p}: corrupt precompiled module (header or checksum mismatch)")
        module_sha, key, payload = parsed
        if key != engine_key:
            raise FilterLoadError(
                f"{p}: precompiled for another wasmtime version or engine settings "
                f"(this is wasmtime {WASMTIME_VERSION}); recompile it with `wasm-gateway compile`"
            )
        t0 = time.perf_counter()
        try:
            module = wasmtime.Module.deserialize(engine, payload)
        except wasmtime.WasmtimeError as exc:
            raise FilterLoadError(f"{p}: cannot load precompiled module: {exc}") from None
        timings.deserialize = time.perf_counter() - t0
        timings.source = "precompiled"
        return CachedModule(module, module_sha, p, timings)

    module_sha = hashlib.sha256(blob).hexdigest()
    entry = cache_entry_path(cache_dir, module_sha, settings) if cache_dir is not None else None
    if entry is not None:
        t0 = time.perf_counter()
        from_cache = _try_cache(engine, entry, module_sha, engine_key)
        if from_cache is not None:
            timings.deserialize = time.perf_counter() - t0
            timings.source = "cache"
            return CachedModule(from_cache, module_sha, p, timings, blob)

    t0 = time.perf_counter()
    module = _compile(engine, blob, p)
    timings.compile = time.perf_counter() - t0
    if entry is not None:
        t0 = time.perf_counter()
        write_cache_entry(entry, module_sha, settings, module)
        timings.cache_write = time.perf_counter() - t0
    return CachedModule(module, module_sha, p, timings, blob)


def cache_entry_path(cache_dir: str | os.PathLike[str], module_sha: str, settings: EngineSettings) -> Path:
    """Where the compiled form of the module with sha256 ``module_sha`` is cached."""
    return Path(cache_dir) / f"{module_sha}-{settings.key()[:16]}.cwasm"


def read_cache_entry(
    engine: wasmtime.Engine, entry: Path, module_sha: str, settings: EngineSettings
) -> wasmtime.Module | None:
    """The cached module, or None (absent, corrupt, foreign: the caller compiles)."""
    return _try_cache(engine, entry, module_sha, settings.key())


def write_cache_entry(
    entry: Path, module_sha: str, settings: EngineSettings, module: wasmtime.Module
) -> None:
    """Cache ``module`` (best effort: a failure is logged, never raised)."""
    try:
        payload = bytes(module.serialize())
        # The artifact first: a reader that finds the new header with an old artifact sees a CRC mismatch.
        _atomic_write(entry, payload)
        _atomic_write(_meta_path(entry), _header(module_sha, settings.key(), payload))
    except (OSError, wasmtime.WasmtimeError) as exc:
        _log.warning("cannot write module cache entry %s: %s", entry, exc)


def _meta_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".meta")


def _try_cache(
    engine: wasmtime.Engine, entry: Path, module_sha: str, engine_key: str
) -> wasmtime.Module | None:
    try:
        header = _meta_path(entry).read_bytes()
        payload = entry.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _log.warning("cannot read module cache entry %s: %s", entry, exc)
        return None
    parsed = _parse(header + payload)
    if parsed is None or parsed[0] != module_sha or parsed[1] != engine_key:
        _log.warning("module cache entry %s is corrupt or foreign; recompiling", entry)
        return None
    try:
        # Mapped, not copied: the file was just verified, and entries are only ever replaced by rename.
        return wasmtime.Module.deserialize_file(engine, str(entry))
    except wasmtime.WasmtimeError as exc:
        _log.warning("module cache entry %s failed to load (%s); recompiling", entry, exc)
        return None
