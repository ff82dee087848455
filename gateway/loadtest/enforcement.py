"""The enforcement check (pure): blocked devices never get a 2xx; no device beats its bucket.

A device's bucket starts at most full, so between its first request and its last answer
(a window that contains every moment the gateway saw one of its requests) the gateway
can have let through at most `burst + rate * window` requests; one more is allowed for
rounding. The *modelled* figure replays the device's send times through an ideal token
bucket: what the gateway should have let through, give or take the network's jitter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.loadtest.fleet import Fleet
from gateway.loadtest.results import ERROR_STATUS, DeviceTally
from gateway.model import Bucket

DENIED = frozenset({403, 429})
SLACK = 1  # one request of tolerance for rounding at the window's edges


def max_allowed(bucket: Bucket, window: float) -> int:
    """The most requests a bucket can let through in `window` seconds, plus the slack."""
    return math.floor(bucket.burst + bucket.rate * window) + SLACK


def modeled_allowed(send_times: Iterable[float], bucket: Bucket) -> int:
    """How many of the requests sent at `send_times` (sorted) an ideal full bucket lets pass."""
    tokens = float(bucket.burst)
    last: float | None = None
    allowed = 0
    for t in send_times:
        if last is not None:
            tokens = min(float(bucket.burst), tokens + bucket.rate * (t - last))
        last = t
        if tokens >= 1.0:
            tokens -= 1.0
            allowed += 1
    return allowed


@dataclass(frozen=True, slots=True)
class DeviceCheck:
    """One unblocked device's answers against its bucket."""

    id: str
    bucket: Bucket
    sent: int
    answered: int
    allowed: int  # answers that were neither 403 nor 429
    limited: int  # 429s
    window_s: float
    max_allowed: int
    modeled_allowed: int

    @property
    def ok(self) -> bool:
        """True when the device got no more than its bucket allows."""
        return self.allowed <= self.max_allowed

    @property
    def share_429(self) -> float:
        """The share of its answers that were 429."""
        return self.limited / self.answered if self.answered else 0.0

    @property
    def modeled_share_429(self) -> float:
        """The share of 429s an ideal bucket would have given."""
        return 1 - self.modeled_allowed / self.sent if self.sent else 0.0

    def as_json(self) -> dict[str, Any]:
        """The check as a JSON-ready dict."""
        return {
            "id": self.id,
            "bucket": {"rate": self.bucket.rate, "burst": self.bucket.burst},
            "sent": self.sent,
            "answered": self.answered,
            "allowed": self.allowed,
            "limited": self.limited,
            "share_429": round(self.share_429, 4),
            "modeled_allowed": self.modeled_allowed,
            "modeled_share_429": round(self.modeled_share_429, 4),
            "max_allowed": self.max_allowed,
            "window_s": round(self.window_s, 3),
            "ok": self.ok,
        }


@dataclass(frozen=True, slots=True)
class EnforcementResult:
    """The whole check: blocked devices and bucket checks."""

    blocked_ids: Sequence[str]
    blocked_answers: Mapping[int, int]  # status -> count, over every blocked device
    checks: Sequence[DeviceCheck]
    unknown_bucket: int  # unblocked devices that answered but whose bucket is unknown

    @property
    def blocked_2xx(self) -> int:
        """2xx answers to blocked devices: anything but 0 is a failure."""
        return sum(n for status, n in self.blocked_answers.items() if 200 <= status < 300)

    @property
    def over_limit(self) -> list[DeviceCheck]:
        """Devices that got more than their bucket allows."""
        return [c for c in self.checks if not c.ok]

    @property
    def passed(self) -> bool:
        """True when no blocked device got a 2xx and no device beat its bucket."""
        return self.blocked_2xx == 0 and not self.over_limit

    def as_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        answered = sum(c.answered for c in self.checks)
        limited = sum(c.limited for c in self.checks)
        sent = sum(c.sent for c in self.checks)
        modeled = sum(c.modeled_allowed for c in self.checks)
        return {
            "passed": self.passed,
            "blocked_devices": len(self.blocked_ids),
            "blocked_answers": {str(s): n for s, n in sorted(self.blocked_answers.items())},
            "blocked_2xx": self.blocked_2xx,
            "checked_devices": len(self.checks),
            "unknown_bucket_devices": self.unknown_bucket,
            "over_limit_devices": len(self.over_limit),
            "share_429": round(limited / answered, 4) if answered else 0.0,
            "modeled_share_429": round(1 - modeled / sent, 4) if sent else 0.0,
            "blocked_ids": list(self.blocked_ids),
            "devices": [c.as_json() for c in self.checks],
        }


def check(
    fleet: Fleet,
    tally: DeviceTally,
    blocked: Iterable[int],
    buckets: Mapping[int, Bucket | None],
) -> EnforcementResult:
    """Judge a run: `buckets` maps unblocked device indexes to their bucket (None: unknown)."""
    blocked_set = set(blocked)
    blocked_answers: dict[int, int] = {}
    for i in sorted(blocked_set):
        for status, n in tally.statuses.get(i, {}).items():
            if status != ERROR_STATUS:
                blocked_answers[status] = blocked_answers.get(status, 0) + n
    checks: list[DeviceCheck] = []
    unknown = 0
    for i in sorted(tally.statuses):
        answered = tally.answered(i)
        if i in blocked_set or not answered:
            continue
        bucket = buckets.get(i)
        if bucket is None:
            unknown += 1
            continue
        statuses = tally.statuses[i]
        window = tally.window(i)
        checks.append(
            DeviceCheck(
                id=fleet[i].id,
                bucket=bucket,
                sent=tally.sent[i],
                answered=answered,
                allowed=answered - sum(statuses[s] for s in DENIED),
                limited=statuses[429],
                window_s=window,
                max_allowed=max_allowed(bucket, window),
                modeled_allowed=modeled_allowed(tally.times(i), bucket),
            )
        )
    return EnforcementResult(
        blocked_ids=[fleet[i].id for i in sorted(blocked_set)],
        blocked_answers=blocked_answers,
        checks=checks,
        unknown_bucket=unknown,
    )
