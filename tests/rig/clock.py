"""The one fake clock of the suite: epoch microseconds that move only when a test says so."""

from __future__ import annotations

# 2026-11-03T23:24:19.787Z, the seed document's timestamp.
EPOCH_US = 1_793_748_259_787_000


class FakeClock:
    """An injectable clock in microseconds; tests move it with .advance(ms), never sleep.

    Called, it gives epoch microseconds (the store's and the enforcer's clock). Its bound
    methods are the same instant for code that takes another clock: `seconds` in float
    seconds (a `time.monotonic`-style clock: the admin's lockout, the circuit breaker, the
    log filter) and `millis` in whole milliseconds (the blocked ids' wall clock).

    Float seconds near the epoch resolve to about a quarter of a microsecond: a test that
    checks a bound to the exact millisecond in seconds starts the clock at a small whole
    second (`FakeClock(start_us=100_000_000)`), where whole milliseconds stay exact.
    """

    def __init__(self, start_us: int = EPOCH_US) -> None:
        self.now_us = start_us

    def __call__(self) -> int:
        return self.now_us

    def advance(self, ms: float) -> None:
        """Move time forward by `ms` milliseconds (fractions allowed)."""
        self.now_us += round(ms * 1000)

    def seconds(self) -> float:
        """The current time in float seconds."""
        return self.now_us / 1_000_000

    def millis(self) -> int:
        """The current time in whole milliseconds."""
        return self.now_us // 1000

    @property
    def now_ms(self) -> int:
        """The current time in epoch milliseconds."""
        return self.now_us // 1000
