"""Per-filter pools of ready instances built from one `InstancePre`.

A request borrows one READY instance (BUSY while borrowed) and gives it back when its stream is finished.
Pool lifecycle: OPEN -> CLOSED. The pool owns every instance it created and closes them: broken ones at
once, recycled ones after ``recycle_after`` requests, idle ones beyond ``min_size`` after ``idle_seconds``,
all of them at `close`.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..exceptions import FilterPoolTimeout
from .instance import FilterInstance, FilterModule, InstanceState

__all__ = ["InstancePool", "PoolSettings", "PoolState", "PoolStats"]

_log = logging.getLogger("wasm_gateway.runtime")

# Enum members as module constants: attribute access on an Enum class costs ~150 ns on the hot path.
_READY: Final = InstanceState.READY
_BUSY: Final = InstanceState.BUSY
_monotonic: Final = time.monotonic


@dataclass(frozen=True)
class PoolSettings:
    min_size: int = 1
    max_size: int = 64
    idle_seconds: float = 60.0
    recycle_after: int = 0  # 0 = never
    borrow_timeout: float = 1.0


@dataclass
class PoolStats:
    size: int
    busy: int
    idle: int
    created: int
    discarded: int
    waiting: int
    max_size: int = 0
    memory_bytes: int = 0
    """Linear memory of every instance, summed."""


class PoolState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


_CLOSED: Final = PoolState.CLOSED


class InstancePool:
    __slots__ = (
        "_all",
        "_idle",
        "_on_created",
        "_recycle_after",
        "_waiters",
        "created",
        "discarded",
        "module",
        "name",
        "settings",
        "state",
    )

    def __init__(
        self,
        module: FilterModule,
        settings: PoolSettings,
        *,
        on_created: Callable[[FilterInstance], None] | None = None,
    ) -> None:
        self.module = module
        self.name = module.services.name
        self.settings = settings
        self.state = PoolState.OPEN
        self._idle: collections.deque[FilterInstance] = collections.deque()
        self._all: set[FilterInstance] = set()
        self._waiters: collections.deque[asyncio.Future[FilterInstance]] = collections.deque()
        self._on_created = on_created
        self._recycle_after = settings.recycle_after
        self.created = 0
        self.discarded = 0

    # ------------------------------------------------------------------------------------------ creation

    def _new(self) -> FilterInstance:
        inst = self.module.instantiate()
        self._all.add(inst)
        self.created += 1
        if self._on_created is not None:
            self._on_created(inst)
        return inst

    def preload(self) -> None:
        """Create ``min_size`` instances now (FilterLoadError if the module cannot start)."""
        while len(self._all) < max(self.settings.min_size, 0):
            self._idle.append(self._new())

    # ------------------------------------------------------------------------------------------ borrowing

    def try_borrow(self) -> FilterInstance | None:
        """A READY instance now (idle, or newly created below max_size), else None. Never waits."""
        idle = self._idle
        while idle:
            inst = idle.pop()  # LIFO: the most recently used instance is the warmest
            if inst.state is _READY:
                inst.state = _BUSY
                return inst
            self._discard(inst)
        if self.state is _CLOSED:
            raise FilterPoolTimeout(f"filter {self.name!r}: pool is closed", self.name)
        if len(self._all) < self.settings.max_size:
            inst = self._new()
            inst.state = _BUSY
            return inst
        return None

    async def borrow(self) -> FilterInstance:
        """A READY instance, waiting up to ``borrow_timeout`` for one; FilterPoolTimeout after that."""
        inst = self.try_borrow()
        if inst is not None:
            return inst
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[FilterInstance] = loop.create_future()
        self._waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, self.settings.borrow_timeout)
        except TimeoutError:
            raise FilterPoolTimeout(
                f"filter {self.name!r}: no instance free within {self.settings.borrow_timeout:g} s "
                f"(max_size {self.settings.max_size})",
                self.name,
            ) from None
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def take(self, inst: FilterInstance) -> bool:
        """Borrow this particular idle instance (for root-level events such as ticks); False if not idle."""
        if inst.state is not InstanceState.READY or inst not in self._idle:
            return False
        self._idle.remove(inst)
        inst.state = InstanceState.BUSY
        return True

    def give_back(self, inst: FilterInstance) -> None:
        """Return a borrowed instance; broken, recycled or surplus instances are closed here."""
        inst.requests += 1
        inst.last_used = _monotonic()
        if inst.state is not _BUSY or self.state is _CLOSED:
            self._discard(inst)
            self._refill_for_waiter()
            return
        recycle = self._recycle_after
        if recycle and inst.requests >= recycle:
            self._discard(inst)
            self._refill_for_waiter()
            return
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(inst)  # stays BUSY: ownership moves to the waiter
                return
        inst.state = _READY
        self._idle.append(inst)

    def _refill_for_waiter(self) -> None:
        while self._waiters and self.state is PoolState.OPEN and len(self._all) < self.settings.max_size:
            fut = self._waiters.popleft()
            if fut.done():
                continue
            try:
                inst = self._new()
            except Exception as exc:
                fut.set_exception(exc)
                return
            inst.state = InstanceState.BUSY
            fut.set_result(inst)
            return

    def _discard(self, inst: FilterInstance) -> None:
        if inst in self._all:
            self._all.discard(inst)
            self.discarded += 1
        inst.close()

    # ------------------------------------------------------------------------------------------ upkeep

    def evict_idle(self, now: float | None = None) -> int:
        """Close idle instances unused for ``idle_seconds`` beyond ``min_size``; top up to ``min_size``."""
        now = time.monotonic() if now is None else now
        evicted = 0
        keep: collections.deque[FilterInstance] = collections.deque()
        for inst in self._idle:  # oldest first
            if len(self._all) > self.settings.min_size and now - inst.last_used >= self.settings.idle_seconds:
                self._discard(inst)
                evicted += 1
            else:
                keep.append(inst)
        self._idle = keep
        if self.state is PoolState.OPEN:
            try:
                self.preload()
            except Exception as exc:
                _log.error("filter %r: cannot refill pool: %s", self.name, exc)
        return evicted

    def idle_instances(self) -> list[FilterInstance]:
        return list(self._idle)

    def stats(self) -> PoolStats:
        busy = sum(1 for i in self._all if i.state is InstanceState.BUSY)
        memory = sum(i.host.memory.current_size() for i in self._all if i.host.memory is not None)
        return PoolStats(
            len(self._all),
            busy,
            len(self._idle),
            self.created,
            self.discarded,
            len(self._waiters),
            self.settings.max_size,
            memory,
        )

    def close(self) -> None:
        """Close every idle instance now; busy ones are closed when given back."""
        self.state = PoolState.CLOSED
        for inst in list(self._idle):
            self._discard(inst)
        self._idle.clear()
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(FilterPoolTimeout(f"filter {self.name!r}: pool closed", self.name))
        self._waiters.clear()
