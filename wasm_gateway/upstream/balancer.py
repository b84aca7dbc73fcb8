"""Round robin over an upstream's targets, with passive ejection of failing ones.

Policy (what the request path relies on):

- Targets are taken in turn. A *failure* is what the pool reports: a connect error, a connect timeout, a
  response-head timeout, or a fresh connection closed before any response byte. A response head received is a
  *success* and resets the target's count.
- ``eject_after_failures`` consecutive failures take a target out of rotation for ``eject_seconds``. When the
  time is up it is back in rotation with its count kept, so it is on probation: one more failure ejects it
  again at once, one success clears it (a circuit breaker's half-open state). ``eject_after_failures <= 0``
  disables ejection.
- Panic mode: when every candidate is ejected, ejection is ignored and the turn order decides (Envoy's panic
  threshold at 100%). Trying a target that may be down beats failing a request without trying anything.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

__all__ = ["RoundRobinBalancer"]


class RoundRobinBalancer:
    """Picks target indexes ``0 .. size-1`` in turn, skipping ejected ones."""

    __slots__ = (
        "_clock",
        "_cursor",
        "_eject_after",
        "_eject_seconds",
        "_ejected_count",
        "_ejected_until",
        "_failures",
        "_size",
        "ejections",
    )

    def __init__(
        self,
        size: int,
        *,
        eject_after_failures: int,
        eject_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        if size < 1:
            raise ValueError("a balancer needs at least one target")
        self._size = size
        self._eject_after = eject_after_failures
        self._eject_seconds = eject_seconds
        self._clock = clock
        self._cursor = 0
        self._failures = [0] * size
        # 0.0 = in rotation; otherwise the clock time at which the ejection ends.
        self._ejected_until = [0.0] * size
        # How many entries of _ejected_until are non-zero: lets the common case skip reading the clock.
        self._ejected_count = 0
        # Times a target was taken out of rotation (for metrics).
        self.ejections = 0

    @property
    def size(self) -> int:
        return self._size

    def pick(self, exclude: Collection[int] = ()) -> int:
        """Return the next target index, skipping ejected targets and those in ``exclude``.

        When every target not excluded is ejected, the first of them in turn order is returned (panic mode).
        When every target is excluded (e.g. a retry with a single target), exclusion is ignored.
        """
        size = self._size
        start = self._cursor
        if not self._ejected_count and not exclude:
            self._cursor = start + 1 if start + 1 < size else 0
            return start
        now = self._clock() if self._ejected_count else 0.0
        panic_choice = -1
        for step in range(size):
            index = (start + step) % size
            if index in exclude:
                continue
            if self._ejected_count and self._is_ejected(index, now):
                if panic_choice < 0:
                    panic_choice = index
                continue
            self._cursor = (index + 1) % size
            return index
        index = panic_choice if panic_choice >= 0 else start
        self._cursor = (index + 1) % size
        return index

    def record_failure(self, index: int) -> None:
        failures = self._failures[index] + 1
        self._failures[index] = failures
        if 0 < self._eject_after <= failures and not self._ejected_until[index]:
            self._ejected_until[index] = self._clock() + self._eject_seconds
            self._ejected_count += 1
            self.ejections += 1

    def record_success(self, index: int) -> None:
        if self._failures[index]:
            self._failures[index] = 0
            if self._ejected_until[index]:
                # A success while ejected (panic mode) brings the target straight back.
                self._ejected_until[index] = 0.0
                self._ejected_count -= 1

    def is_ejected(self, index: int) -> bool:
        return bool(self._ejected_until[index]) and self._is_ejected(index, self._clock())

    def healthy(self) -> int:
        """How many targets are in rotation now (ejections that have run out count as healthy)."""
        if not self._ejected_count:
            return self._size
        now = self._clock()
        return sum(1 for index in range(self._size) if not self._is_ejected(index, now))

    def failures(self, index: int) -> int:
        """Consecutive failures recorded for the target since its last success."""
        return self._failures[index]

    def _is_ejected(self, index: int, now: float) -> bool:
        until = self._ejected_until[index]
        if not until:
            return False
        if until > now:
            return True
        self._ejected_until[index] = 0.0
        self._ejected_count -= 1
        return False
