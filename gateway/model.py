"""Domain values shared by the layers: identities, device records, decisions (pure)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.schema import DECLARED_FIELDS

# The device fields a request declares in its identification headers, in a fixed order
# (the order of the Lua script's ARGV and of the history's field names): gateway.schema.
DEVICE_FIELDS: tuple[str, ...] = tuple(f.name for f in DECLARED_FIELDS)


def iso_ms(ms: int | None) -> str | None:
    """Epoch milliseconds -> ISO-8601 UTC with milliseconds and Z, e.g. 2026-11-03T23:24:19.787Z."""
    if ms is None:
        return None
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


# DeviceIdentity and EnforceReply are made once per request: slotted, not frozen (a frozen
# __init__ sets each field through object.__setattr__), and with an __init__ of their own
# (init=False): the one dataclasses generates is interpreted even in the compiled build.
@dataclass(slots=True, init=False)
class DeviceIdentity:
    """What a request says about its device. Fields other than `id` are None when absent."""

    id: str
    application: str | None
    application_version: str | None
    os: str | None
    os_version: str | None
    manufacturer: str | None
    model: str | None

    def __init__(
        self,
        id: str,
        application: str | None = None,
        application_version: str | None = None,
        os: str | None = None,
        os_version: str | None = None,
        manufacturer: str | None = None,
        model: str | None = None,
    ) -> None:
        self.id = id
        self.application = application
        self.application_version = application_version
        self.os = os
        self.os_version = os_version
        self.manufacturer = manufacturer
        self.model = model

    def fields(self) -> tuple[str | None, ...]:
        """The declared fields in DEVICE_FIELDS order."""
        return (
            self.application,
            self.application_version,
            self.os,
            self.os_version,
            self.manufacturer,
            self.model,
        )


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: `rate` tokens per second refill up to `burst` tokens.

    `rate_milli` is the rate in milli-tokens per second, the integer unit the Lua script
    works in (computed once: it is read on every request).
    """

    rate: float
    burst: int
    rate_milli: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate_milli", max(1, round(self.rate * 1000)))


@dataclass(frozen=True, slots=True)
class Device:
    """A device record as the admin API shows it. Timestamps are epoch milliseconds."""

    id: str
    name: str | None
    application: str | None
    application_version: str | None
    os: str | None
    os_version: str | None
    manufacturer: str | None
    model: str | None
    first_seen: int | None
    last_active: int | None
    last_data_upload: int | None
    blocked: bool
    blocked_at: int | None
    request_count: int
    denied_count: int
    rate_limit: Bucket | None = None

    @property
    def display_name(self) -> str:
        """The custom name, or the id when none was given."""
        return self.name if self.name else self.id

    @property
    def last_activity(self) -> int | None:
        """The last request, or for a device blocked without ever calling, when it was blocked."""
        return self.last_active if self.last_active is not None else self.blocked_at

    def to_json(self) -> dict[str, Any]:
        """The record as the admin API returns it."""
        return {
            "id": self.id,
            "name": self.name,
            "display_name": self.display_name,
            "application": self.application,
            "application_version": self.application_version,
            "os": self.os,
            "os_version": self.os_version,
            "manufacturer": self.manufacturer,
            "model": self.model,
            "first_seen": iso_ms(self.first_seen),
            "last_active": iso_ms(self.last_active),
            "last_data_upload": iso_ms(self.last_data_upload),
            "last_activity": iso_ms(self.last_activity),
            "blocked": self.blocked,
            "blocked_at": iso_ms(self.blocked_at),
            "request_count": self.request_count,
            "denied_count": self.denied_count,
            "rate_limit": (
                {"rate": self.rate_limit.rate, "burst": self.rate_limit.burst}
                if self.rate_limit
                else None
            ),
        }


@dataclass(frozen=True, slots=True)
class Replication:
    """How far an admin write travelled before its answer: `reached` replicas of the
    `wanted` (Redis WAIT), 0 of 0 when no wait was asked."""

    wanted: int
    reached: int

    @property
    def in_time(self) -> bool:
        """The write reached the replicas wanted within the wait."""
        return self.reached >= self.wanted


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One software or hardware change of a device."""

    at: int
    field: str
    old: str | None
    new: str | None

    def to_json(self) -> dict[str, Any]:
        """The entry as the admin API returns it."""
        return {"at": iso_ms(self.at), "field": self.field, "old": self.old, "new": self.new}


class ReplyCode(enum.IntEnum):
    """The first number of enforce.lua's reply: what it did with the request."""

    ALLOW = 0
    BLOCKED = 1
    LIMITED = 2
    UNREGISTERED = 3  # a new device its address's registration budget has to approve


@dataclass(slots=True, init=False)
class EnforceReply:
    """What enforce.lua answered for one request, typed (the store's side of a verdict).

    `remaining` whole tokens left after this request; `retry_after_us` until the next whole
    token is back (0 when the bucket is full); `full_after_us` until the bucket is full;
    `bucket` the bucket that applied (an override or the default); `policy` its name for the
    RateLimit headers ("device", "anonymous", or "registration" when the address's budget
    for new devices refused one). For BLOCKED no token was taken.
    """

    outcome: ReplyCode
    remaining: int
    retry_after_us: int
    full_after_us: int
    bucket: Bucket
    policy: str
    new_device: bool

    def __init__(
        self,
        outcome: ReplyCode,
        remaining: int,
        retry_after_us: int,
        full_after_us: int,
        bucket: Bucket,
        policy: str,
        new_device: bool = False,
    ) -> None:
        self.outcome = outcome
        self.remaining = remaining
        self.retry_after_us = retry_after_us
        self.full_after_us = full_after_us
        self.bucket = bucket
        self.policy = policy
        self.new_device = new_device
