"""Request coalescing within one process: concurrent misses for one key make one upstream request.

The first miss for a key leads (fetches and stores); later misses for the same key wait for the leader to
finish, then look the store up again. When the leader could not store (uncacheable, too large, an error),
the key is remembered as "pass" for a few seconds so the next misses go straight upstream instead of queueing
one behind another (Varnish's hit-for-miss).

Scope: one event loop (one worker process). Workers and nodes sharing an LMDB or Redis store do not wait for
each other: at most one upstream request per key per process, which bounds a stampede by the number of
processes. A cross-process lock would cost a store round trip on every miss and a poll while waiting.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["Coalescer"]

PASS_SECONDS = 5.0


class Coalescer:
    def __init__(self, pass_seconds: float = PASS_SECONDS) -> None:
        self._inflight: dict[bytes, asyncio.Event] = {}
        self._pass: dict[bytes, float] = {}
        self._pass_seconds = pass_seconds

    def join(self, key: bytes) -> asyncio.Event | None:
        """None: the caller leads and must call `done` (in a finally). Else the event to wait for."""
        event = self._inflight.get(key)
        if event is not None:
            return event
        if self._pass:
            until = self._pass.get(key)
            if until is not None:
                if until > time.monotonic():
                    return None  # known uncacheable: every request goes upstream without waiting
                del self._pass[key]
        self._inflight[key] = asyncio.Event()
        return None

    def leads(self, key: bytes) -> bool:
        return key in self._inflight

    def done(self, key: bytes, stored: bool) -> None:
        """The leader finished: wake the waiters. ``stored`` False marks the key "pass" for a while."""
        event = self._inflight.pop(key, None)
        if event is not None:
            event.set()
        if not stored:
            if len(self._pass) > 10_000:
                self._pass.clear()
            self._pass[key] = time.monotonic() + self._pass_seconds
        elif self._pass:
            self._pass.pop(key, None)

    def __len__(self) -> int:
        return len(self._inflight)
