"""The embedded store's token buckets: enforce.lua's `take`, in Python integers, and the
buckets of client addresses, each forgotten when it would be full again.

Units are enforce.lua's: integer milli-tokens, microseconds, a request costs 1000 milli-
tokens, and a bucket's timestamp never moves backwards (it advances only by the time that
produced whole milli-tokens, so a fraction is kept). A missing bucket is a full one. The
Lua computes in doubles; every product it rounds stays below 2**53 for the rates and bursts
the config allows, so integers here give the same answers.

Compiled in the compiled build (setup.py): a known device's request runs `take` once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

COST: Final = 1000  # milli-tokens a request takes
MICROS: Final = 1_000_000
NO_BUCKET: Final = -1  # a timestamp that says: no bucket yet (a full one)
OUTCOME_ALLOWED: Final = 0  # enforce.lua's reply codes
OUTCOME_LIMITED: Final = 2
SWEEP: Final = 2  # expired address buckets forgotten per write, at most


# (outcome, tokens after, timestamp after, whole tokens left, retry after us, full after us)
Taken = tuple[int, int, int, int, int, int]


def take(tokens: int, stamp: int, now_us: int, rate: int, burst: int) -> Taken:
    """Refill a bucket of `burst` tokens at `rate` milli-tokens a second to `now_us`, then
    try to take one token; `stamp` NO_BUCKET is a full bucket. The new state counts only
    when the outcome is OUTCOME_ALLOWED (a refused request writes nothing)."""
    cap = burst * COST
    if stamp < 0:
        tokens, stamp = cap, now_us
    else:
        if tokens > cap:
            tokens = cap  # the bucket shrank (a smaller override): clipped, as the Lua does
        elapsed = now_us - stamp
        if elapsed > 0:
            if elapsed * rate >= (cap - tokens) * MICROS:
                tokens, stamp = cap, now_us
            else:
                gained = elapsed * rate // MICROS
                tokens += gained
                stamp += gained * MICROS // rate
    carried = now_us - stamp if now_us > stamp else 0
    outcome = OUTCOME_LIMITED
    if tokens >= COST:
        tokens -= COST
        outcome = OUTCOME_ALLOWED
    full_after = -((tokens - cap) * MICROS // rate) - carried
    if full_after < 0:
        full_after = 0
    retry_after = 0
    if tokens < cap:
        retry_after = -(-(COST - tokens % COST) * MICROS // rate) - carried
        if retry_after < 1:
            retry_after = 1
    return outcome, tokens, stamp, tokens // COST, retry_after, full_after


class AddressBucket:
    """One client address's bucket and when it is forgotten (monotonic seconds)."""

    def __init__(self, tokens: int, stamp: int, expires: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.expires = expires


class AddressBuckets:
    """Token buckets by client address (anonymous requests, or new devices' budget).

    A bucket written is kept until it would be full again, as enforce.lua's keys expire
    (`PX` of the time to full, in whole milliseconds, plus one): a full bucket and no bucket
    are the same. Expiry runs on `expiry_clock` (monotonic seconds), as a Redis key's runs
    on Redis's own clock whatever clock the script was given. The dict keeps the order of
    the last writes: each write forgets up to SWEEP expired buckets from its front, so the
    buckets held are at most those written within the longest time to full.
    """

    def __init__(self, expiry_clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, AddressBucket] = {}
        self._expiry_clock = expiry_clock

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, address: str, now_us: int, rate: int, burst: int) -> Taken:
        """`take` on the address's bucket; written back when a token was taken."""
        buckets = self._buckets
        now = self._expiry_clock()
        held = buckets.get(address)
        if held is not None and held.expires <= now:
            del buckets[address]  # expired: a full bucket, as a missing key is
            held = None
        if held is None:
            taken = take(0, NO_BUCKET, now_us, rate, burst)
        else:
            taken = take(held.tokens, held.stamp, now_us, rate, burst)
        if taken[0] == OUTCOME_ALLOWED:
            expires = now + (taken[5] // 1000 + 1) / 1000
            if held is not None:
                del buckets[address]  # written again: to the back of the order
            buckets[address] = AddressBucket(taken[1], taken[2], expires)
            self._sweep(now)
        return taken

    def _sweep(self, now: float) -> None:
        """Forget the oldest written buckets that expired (up to SWEEP)."""
        buckets = self._buckets
        for _ in range(SWEEP):
            oldest = next(iter(buckets))
            if buckets[oldest].expires > now:
                return
            del buckets[oldest]
            if not buckets:
                return
