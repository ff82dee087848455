"""Rate-limit policy (pure): which bucket applies, and the headers that describe its state.

Headers follow draft-ietf-httpapi-ratelimit-headers-11 (`RateLimit-Policy`, `RateLimit`)
plus the widespread `X-RateLimit-*` trio:

    RateLimit-Policy: "device";q=<burst>;w=<seconds to refill the whole burst>
    RateLimit:        "device";r=<tokens remaining>;t=<seconds until a token is back>
    X-RateLimit-Limit: <burst>
    X-RateLimit-Remaining: <r>
    X-RateLimit-Reset: <seconds until the bucket is full>
"""

from __future__ import annotations

import math
from functools import lru_cache

from gateway.config import RateLimitSettings
from gateway.model import Bucket, EnforceReply
from gateway.typedefs import MICROS


class BucketPolicy:
    """The default buckets, built once from config (overrides are applied by the store)."""

    __slots__ = ("anonymous", "device")

    def __init__(self, settings: RateLimitSettings) -> None:
        self.device = Bucket(rate=settings.device.rate, burst=settings.device.burst)
        self.anonymous = Bucket(rate=settings.anonymous.rate, burst=settings.anonymous.burst)

    def for_request(self, has_device: bool) -> Bucket:
        """The default bucket: per device id, or per client address for anonymous requests."""
        return self.device if has_device else self.anonymous


def _seconds_up(us: int) -> int:
    return -(-us // MICROS)


@lru_cache(maxsize=1024)
def _policy_headers(policy: str, rate_milli: int, burst: int) -> tuple[str, str]:
    window = math.ceil(burst * 1000 / rate_milli)
    return f'"{policy}";q={burst};w={window}', str(burst)


def rate_limit_headers(reply: EnforceReply) -> dict[str, str]:
    """The rate-limit state after one request, as response headers."""
    policy, limit = _policy_headers(reply.policy, reply.bucket.rate_milli, reply.bucket.burst)
    remaining = str(reply.remaining)
    return {
        "RateLimit-Policy": policy,
        "RateLimit": (f'"{reply.policy}";r={remaining};t={_seconds_up(reply.retry_after_us)}'),
        "X-RateLimit-Limit": limit,
        "X-RateLimit-Remaining": remaining,
        "X-RateLimit-Reset": str(_seconds_up(reply.full_after_us)),
    }


def retry_after_seconds(reply: EnforceReply) -> int:
    """Whole seconds until a request can pass again (>= 1), for Retry-After."""
    return max(1, _seconds_up(reply.retry_after_us))
