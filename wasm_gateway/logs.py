"""Logging set-up and the access log.

The access log writes one line per request (JSON or logfmt) into a buffer flushed every 200 ms or at 64 KiB,
like nginx's ``access_log ... buffer=``: going through :mod:`logging` per request would cost more than the proxy
itself at tens of thousands of requests per second.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import IO

import orjson

from .config import LogConfig

__all__ = ["AccessLog", "configure_logging"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()


class _LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"time={self.formatTime(record, '%Y-%m-%dT%H:%M:%S%z')} level={record.levelname.lower()} "
            f"logger={record.name} msg={_logfmt_value(record.getMessage())}"
        )
        if record.exc_info:
            line += " exception=" + _logfmt_value(self.formatException(record.exc_info))
        return line


def _logfmt_value(value: object) -> str:
    s = str(value)
    if s and all(c > " " and c not in '"=' for c in s):
        return s
    return orjson.dumps(s).decode()


def configure_logging(config: LogConfig) -> None:
    """Point the ``wasm_gateway`` logger at the configured stream/file and format (idempotent)."""
    logger = logging.getLogger("wasm_gateway")
    logger.setLevel(_LEVELS.get(config.level, logging.INFO))
    for handler in list(logger.handlers):
        if getattr(handler, "_wasm_gateway", False):
            logger.removeHandler(handler)
    new: logging.Handler = (
        logging.FileHandler(config.path) if config.path else logging.StreamHandler(sys.stderr)
    )
    new.setFormatter(_JsonFormatter() if config.format == "json" else _LogfmtFormatter())
    new._wasm_gateway = True  # type: ignore[attr-defined]
    logger.addHandler(new)
    logger.propagate = False


class AccessLog:
    """Buffered access-log writer; ``record`` is cheap, writes happen in batches on the event loop."""

    FLUSH_SECONDS = 0.2
    FLUSH_BYTES = 64 * 1024

    def __init__(self, config: LogConfig, stream: IO[bytes] | None = None) -> None:
        self.json = config.format == "json"
        self._owned = False
        if stream is not None:
            self._stream = stream
        elif config.path:
            self._stream = open(config.path, "ab")  # noqa: SIM115 - owned and closed by close()
            self._owned = True
        else:
            self._stream = sys.stderr.buffer
        self._buffer: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def record(
        self,
        *,
        request_id: bytes,
        client: str,
        method: str,
        path: str,
        route: str,
        status: int,
        bytes_sent: int,
        duration: float,
        upstream_duration: float | None,
    ) -> None:
        now = time.time()
        if self.json:
            line = orjson.dumps(
                {
                    "time": now,
                    "request_id": request_id.decode("latin-1"),
                    "client": client,
                    "method": method,
                    "path": path,
                    "route": route,
                    "status": status,
                    "bytes": bytes_sent,
                    "duration_ms": round(duration * 1000, 3),
                    "upstream_ms": None if upstream_duration is None else round(upstream_duration * 1000, 3),
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        else:
            upstream = "-" if upstream_duration is None else f"{upstream_duration * 1000:.3f}"
            line = (
                f"time={now:.3f} request_id={request_id.decode('latin-1')} client={client} method={method} "
                f"path={_logfmt_value(path)} route={route} status={status} bytes={bytes_sent} "
                f"duration_ms={duration * 1000:.3f} upstream_ms={upstream}\n"
            ).encode()
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= self.FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full log stream must never fail a request

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()
