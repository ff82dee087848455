"""A pure-Python model of enforce.lua's token bucket, for the property test.

Written from the documented rule, in exact integer arithmetic: milli-tokens, microseconds,
a request costs 1000, the timestamp never moves backwards and keeps the fraction of a
milli-token that has not been credited yet. Key expiry is not modelled: a device's bucket
lives in its record and never expires; an address's bucket key expires on Redis's own
clock, not the test's, so the property test keeps that key persistent and
tests/test_store.py checks the expiry itself.
"""

from __future__ import annotations

from dataclasses import dataclass

COST = 1000
MICROS = 1_000_000


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Result:
    """What one call answers."""

    allowed: bool
    remaining: int
    retry_after_us: int
    full_after_us: int


class BucketModel:
    """One bucket of `burst` tokens refilled at `rate_milli` milli-tokens per second."""

    def __init__(self, rate_milli: int, burst: int) -> None:
        self.rate = rate_milli
        self.cap = burst * COST
        self.state: tuple[int, int] | None = None  # (tokens, ts); None: full (no key)

    def take(self, now_us: int) -> Result:
        """Refill to `now_us`, then try to take one token."""
        tokens, ts = self.cap, now_us
        if self.state is not None:
            tokens, ts = min(self.state[0], self.cap), self.state[1]
            elapsed = now_us - ts
            if elapsed > 0:
                if elapsed * self.rate >= (self.cap - tokens) * MICROS:
                    tokens, ts = self.cap, now_us
                else:
                    gained = elapsed * self.rate // MICROS
                    tokens += gained
                    ts += gained * MICROS // self.rate
        carried = max(now_us - ts, 0)
        allowed = tokens >= COST
        if allowed:
            tokens -= COST
        full_after = max(_ceil_div((self.cap - tokens) * MICROS, self.rate) - carried, 0)
        retry_after = 0
        if tokens < self.cap:
            need = COST - tokens % COST
            retry_after = max(_ceil_div(need * MICROS, self.rate) - carried, 1)
        if allowed:
            self.state = (tokens, ts)
        return Result(allowed, tokens // COST, retry_after, full_after)
