"""The ``[state]`` configuration: which backend holds shared data, queues and the gateway's KV."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from ..exceptions import ConfigError

__all__ = ["Backend", "FailurePolicy", "StateConfig", "default_state_dir"]

Backend = Literal["memory", "local", "redis"]
FailurePolicy = Literal["fail_open", "fail_closed"]


def default_state_dir() -> Path:
    """Per-user cache directory for the local backend: $XDG_CACHE_HOME/wasm-gateway/state (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wasm-gateway" / "state"


@dataclass(frozen=True)
class StateConfig:
    backend: Backend = "local"
    path: Path | None = None  # local: directory for the database (None -> default_state_dir())
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "wasm-gateway:"  # redis: one per gateway cluster sharing a Redis
    timeout_ms: int = 50  # redis: connect and read timeout of every command
    on_error: FailurePolicy = "fail_closed"  # redis down or slow: see docs/state.md
    max_entries: int = 100_000  # memory, local, and the fail_open fallback (Redis bounds itself: maxmemory)
    default_ttl_seconds: float = 86_400.0  # every shared-data write; KV writes without a ttl
    max_bytes: int = 256 * 1024 * 1024  # memory, local: keys + values (+64 B per entry) before eviction
    max_value_bytes: int = 4 * 1024 * 1024  # one value or queue item; larger writes answer BAD_ARGUMENT
    max_queue_items: int = 10_000  # per shared queue; a full queue answers INTERNAL_FAILURE

    def __post_init__(self) -> None:
        errors = self.problems()
        if errors:
            raise ConfigError("invalid state configuration: " + "; ".join(errors), errors)

    def problems(self, where: str = "state") -> list[str]:
        errors: list[str] = []
        if self.backend not in get_args(Backend):
            errors.append(f"{where}.backend: {self.backend!r} is not one of memory, local, redis")
        if self.on_error not in get_args(FailurePolicy):
            errors.append(f"{where}.on_error: {self.on_error!r} is not one of fail_open, fail_closed")
        if urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            errors.append(
                f"{where}.redis_url: {self.redis_url!r} is not a redis://, rediss:// or unix:// URL"
            )
        if "{" in self.key_prefix or "}" in self.key_prefix:
            errors.append(f"{where}.key_prefix: braces are reserved (Redis Cluster hash tags)")
        for name, low in (
            ("timeout_ms", 1),
            ("max_entries", 1),
            ("max_bytes", 4096),
            ("max_value_bytes", 1),
            ("max_queue_items", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                errors.append(f"{where}.{name}: expected an integer >= {low}, got {value!r}")
        ttl = self.default_ttl_seconds
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            errors.append(f"{where}.default_ttl_seconds: expected a number > 0, got {ttl!r}")
        if not errors and self.max_value_bytes > self.max_bytes // 4:
            errors.append(f"{where}.max_value_bytes: must be at most max_bytes / 4 ({self.max_bytes // 4})")
        return errors

    @property
    def directory(self) -> Path:
        return self.path if self.path is not None else default_state_dir()

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], where: str = "state") -> StateConfig:
        """From a parsed TOML table; ConfigError naming each unknown key and bad value."""
        known = {f.name for f in fields(cls)}
        errors = [
            f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})"
            for key in data
            if key not in known
        ]
        values = {k: v for k, v in data.items() if k in known}
        if "path" in values and values["path"] is not None:
            if not isinstance(values["path"], str | Path):
                errors.append(f"{where}.path: expected a string, got {values['path']!r}")
            else:
                values["path"] = Path(values["path"]).expanduser()
        for name in ("backend", "redis_url", "key_prefix", "on_error"):
            if name in values and not isinstance(values[name], str):
                errors.append(f"{where}.{name}: expected a string, got {values[name]!r}")
        if errors:
            raise ConfigError("invalid state configuration: " + "; ".join(errors), errors)
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ConfigError as exc:
            problems = [e.replace("state.", f"{where}.", 1) for e in exc.errors]
            raise ConfigError("invalid state configuration: " + "; ".join(problems), problems) from None
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
