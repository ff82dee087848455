"""One device as the embedded store keeps it: a slotted object of plain fields.

What a Redis record holds in its hash (gateway.store.keys), held as attributes: the counts,
the timestamps (epoch ms, ABSENT when the Redis field would be missing), the block, the
rate-limit override, the token bucket, the six declared values (None: never declared), the
custom name and the history. Besides, where the device sits in the list: `score` is its
activity index score (enforce.lua's `active` zset: moved when last_active enters another second,
or set by a block), `listed` the score it is filed under in the embedded list's order.

Compiled in the compiled build (setup.py): a known device's request reads and writes these
fields directly.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from gateway.model import Bucket, Device, HistoryEntry
from gateway.store.native_bucket import NO_BUCKET

ABSENT: Final = -1  # a timestamp the record does not have (they are never negative)
NOT_LISTED: Final = -(1 << 62)  # `listed` of a record not (or no longer) in the order


class DeviceRecord:
    """A device's record; exists once a request or a block made it."""

    id: str
    name: str | None
    application: str | None
    application_version: str | None
    os: str | None
    os_version: str | None
    manufacturer: str | None
    model: str | None
    first_seen: int
    last_active: int
    last_upload: int
    blocked: bool
    blocked_at: int
    requests: int
    denied: int
    rate_milli: int  # the override's rate (milli-tokens a second); 0: no override
    burst: int  # the override's burst
    override: Bucket | None  # the override as the reply's bucket (rate_milli / 1000)
    tokens: int  # the token bucket, milli-tokens...
    stamp: int  # ... and its timestamp in us; NO_BUCKET (-1): none yet, a full one
    history: deque[HistoryEntry] | None  # newest first; None until the first change
    score: int
    listed: int
    queued: bool  # waiting for the list's order to file it again
    alive: bool  # False once deleted

    def __init__(self, device_id: str, requests: int, denied: int) -> None:
        self.id = device_id
        self.name = None
        self.application = None
        self.application_version = None
        self.os = None
        self.os_version = None
        self.manufacturer = None
        self.model = None
        self.first_seen = ABSENT
        self.last_active = ABSENT
        self.last_upload = ABSENT
        self.blocked = False
        self.blocked_at = ABSENT
        self.requests = requests
        self.denied = denied
        self.rate_milli = 0
        self.burst = 0
        self.override = None
        self.tokens = 0
        self.stamp = NO_BUCKET
        self.history = None
        self.score = 0
        self.listed = NOT_LISTED
        self.queued = False
        self.alive = True

    def set_override(self, rate_milli: int, burst: int) -> None:
        """Give the device its own bucket (0, 0: none)."""
        self.rate_milli = rate_milli
        self.burst = burst
        self.override = Bucket(rate=rate_milli / 1000, burst=burst) if rate_milli else None

    def declared(self) -> tuple[str | None, ...]:
        """The six declared values, in DEVICE_FIELDS order."""
        return (
            self.application,
            self.application_version,
            self.os,
            self.os_version,
            self.manufacturer,
            self.model,
        )

    def set_declared(self, values: list[str | None]) -> None:
        """Keep six declared values, in DEVICE_FIELDS order."""
        self.application = values[0]
        self.application_version = values[1]
        self.os = values[2]
        self.os_version = values[3]
        self.manufacturer = values[4]
        self.model = values[5]

    def add_history(self, entry: HistoryEntry, cap: int) -> None:
        """Keep a change, newest first, at most `cap` of them."""
        if self.history is None:
            self.history = deque(maxlen=cap)
        self.history.appendleft(entry)

    def device(self) -> Device:
        """The record as the admin API shows it."""
        return Device(
            id=self.id,
            name=self.name,
            application=self.application,
            application_version=self.application_version,
            os=self.os,
            os_version=self.os_version,
            manufacturer=self.manufacturer,
            model=self.model,
            first_seen=_ms(self.first_seen),
            last_active=_ms(self.last_active),
            last_data_upload=_ms(self.last_upload),
            blocked=self.blocked,
            blocked_at=self.blocked_at if self.blocked else None,
            request_count=self.requests,
            denied_count=self.denied,
            rate_limit=self.override,
        )


def _ms(value: int) -> int | None:
    return None if value == ABSENT else value
