"""Typed keys and small shared types."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

# A clock returns the current time in integer microseconds since the epoch.
# Production passes no clock to the store, which then reads Redis TIME (one clock
# for every gateway process); tests inject a FakeClock so that nothing ever sleeps.
Clock = Callable[[], int]


def system_clock() -> int:
    """The local wall clock in microseconds (used only where Redis cannot be asked)."""
    return time.time_ns() // 1000


MICROS: Final = 1_000_000
