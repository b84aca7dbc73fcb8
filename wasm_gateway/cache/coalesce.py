"""Request coalescing within one process: concurrent misses for one key make one upstream request.

The first miss for a key leads (fetches and stores); later misses for the same key wait for the leader to
finish, then use the entry the leader hands over (bodies up to the store's chunk size, so waiters are served
even when the store itself is failing) or look the store up again. When the leader could not store (uncacheable, too large, an error),
the key is remembered as "pass" for a few seconds so the next misses go straight upstream instead of queueing
one behind another (Varnish's hit-for-miss).

Scope: one event loop (one worker process). Workers and nodes sharing an LMDB or Redis store do not wait for
each other: at most one upstream request per key per process, which bounds a stampede by the number of
processes. A cross-process lock would cost a store round trip on every miss and a poll while waiting.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

__all__ = ["Coalescer", "Flight"]

PASS_SECONDS = 5.0


class Flight:
    """One leader's fetch: waiters wait on ``event``; ``entry`` is what the leader stored, when it could
    hand it over whole."""

    __slots__ = ("entry", "event")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.entry: Any = None

    async def wait(self) -> None:
        await self.event.wait()

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


class Coalescer:
    def __init__(self, pass_seconds: float = PASS_SECONDS) -> None:
        self._inflight: dict[bytes, Flight] = {}
        self._pass: dict[bytes, float] = {}
        self._pass_seconds = pass_seconds

    def join(self, key: bytes) -> Flight | None:
        """None: the caller leads and must call `done` (in a finally). Else the flight to wait for."""
        event = self._inflight.get(key)
        if event is not None:
            return event
        if self._pass:
            until = self._pass.get(key)
            if until is not None:
                if until > time.monotonic():
                    return None  # known uncacheable: every request goes upstream without waiting
                del self._pass[key]
        self._inflight[key] = Flight()
        return None

    def leads(self, key: bytes) -> bool:
        return key in self._inflight

    def hand_over(self, key: bytes, entry: Any) -> None:
        """The leader's stored entry, for its waiters."""
        flight = self._inflight.get(key)
        if flight is not None:
            flight.entry = entry

    def done(self, key: bytes, stored: bool) -> None:
        """The leader finished: wake the waiters. ``stored`` False marks the key "pass" for a while."""
        flight = self._inflight.pop(key, None)
        if flight is not None:
            flight.set()
        if not stored:
            if len(self._pass) > 10_000:
                self._pass.clear()
            self._pass[key] = time.monotonic() + self._pass_seconds
        elif self._pass:
            self._pass.pop(key, None)

    def __len__(self) -> int:
        return len(self._inflight)
