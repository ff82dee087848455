"""A circuit breaker for the store (pure): during an outage, skip Redis instead of waiting.

    closed --(THRESHOLD failures in a row)--> open --(COOLDOWN elapsed)--> half-open
    half-open: one call is let through as a probe; success -> closed, failure -> open

While open, a request does not pay `redis.timeout`: the store answers StoreUnavailable at
once and `on_error` (and the local blocked set) decide. The clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

THRESHOLD: Final = 3  # consecutive failures that open the breaker
COOLDOWN: Final = 0.5  # seconds open before a probe is let through (half-open within 1 s)


class CircuitBreaker:
    """Counts consecutive failures; opens, then lets one probe through after a cool-down."""

    __slots__ = ("_clock", "_failures", "_opened_at", "_probing", "cooldown", "threshold")

    def __init__(
        self,
        *,
        threshold: int = THRESHOLD,
        cooldown: float = COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        """closed, open or half-open."""
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self.cooldown:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """May a call go to Redis now? In half-open, only the one probe may."""
        if self._opened_at is None:
            return True
        if self._probing or self._clock() - self._opened_at < self.cooldown:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        """A call succeeded: close."""
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def abandon(self) -> None:
        """A call ended without an answer either way (cancelled): free the probe slot."""
        self._probing = False

    def failure(self) -> None:
        """A call failed: open after THRESHOLD in a row (or at once when the probe fails)."""
        self._failures += 1
        if self._probing or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._probing = False
