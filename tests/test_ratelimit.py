"""Rate-limit policy and header values (pure)."""

from __future__ import annotations

import pytest

from gateway.config import BucketSettings, RateLimitSettings
from gateway.model import Bucket, EnforceReply, ReplyCode
from gateway.ratelimit import BucketPolicy, rate_limit_headers, retry_after_seconds


def decision(
    remaining: int, retry_us: int, full_us: int, bucket: Bucket, policy: str = "device"
) -> EnforceReply:
    return EnforceReply(ReplyCode.ALLOW, remaining, retry_us, full_us, bucket, policy)


def test_policy_picks_device_or_anonymous_bucket() -> None:
    policy = BucketPolicy(
        RateLimitSettings(
            device=BucketSettings(rate=10, burst=20), anonymous=BucketSettings(rate=1, burst=5)
        )
    )
    assert policy.for_request(True) == Bucket(rate=10, burst=20)
    assert policy.for_request(False) == Bucket(rate=1, burst=5)


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        pytest.param(
            decision(19, 100_000, 100_000, Bucket(rate=10, burst=20)),
            {
                "RateLimit-Policy": '"device";q=20;w=2',
                "RateLimit": '"device";r=19;t=1',
                "X-RateLimit-Limit": "20",
                "X-RateLimit-Remaining": "19",
                "X-RateLimit-Reset": "1",
            },
            id="one-token-used",
        ),
        pytest.param(
            decision(10, 0, 0, Bucket(rate=1, burst=10), "anonymous"),
            {
                "RateLimit-Policy": '"anonymous";q=10;w=10',
                "RateLimit": '"anonymous";r=10;t=0',
                "X-RateLimit-Limit": "10",
                "X-RateLimit-Remaining": "10",
                "X-RateLimit-Reset": "0",
            },
            id="full-bucket-anonymous",
        ),
        pytest.param(
            decision(0, 1_500_001, 6_000_000, Bucket(rate=0.5, burst=3)),
            {
                "RateLimit-Policy": '"device";q=3;w=6',
                "RateLimit": '"device";r=0;t=2',
                "X-RateLimit-Limit": "3",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "6",
            },
            id="slow-refill-rounds-up",
        ),
    ],
)
def test_headers(d: EnforceReply, expected: dict[str, str]) -> None:
    assert rate_limit_headers(d) == expected


@pytest.mark.parametrize(
    ("retry_us", "seconds"),
    [(0, 1), (1, 1), (999_999, 1), (1_000_000, 1), (1_000_001, 2), (30_000_000, 30)],
)
def test_retry_after_is_whole_seconds_at_least_one(retry_us: int, seconds: int) -> None:
    limited = EnforceReply(
        ReplyCode.LIMITED, 0, retry_us, retry_us, Bucket(rate=1, burst=1), "device"
    )
    assert retry_after_seconds(limited) == seconds
