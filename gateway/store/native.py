"""NativeStore: the embedded store (`memory://`), the Store's contract in plain Python.

What the Lua scripts do to Redis, done to objects in this process: a dict of device
records (gateway.store.native_record), a bucket per client address that is forgotten when
full (gateway.store.native_bucket), the list's order (gateway.store.native_order) and the
list itself (gateway.store.native_listing). Every answer is the one the Store on Redis
gives for the same calls at the same clock: enforce.lua, block.lua, unblock.lua,
rename.lua, delete.lua and the list's scripts are the specification
(tests/test_native_differential.py runs both side by side); where Redis's shards show
through (the bounds of the two searches), gateway.store.native_listing says what differs.

A known device's request is a dict lookup and a few integer operations: no await, no
copy. Its activity score moves only when last_active enters another second (as
enforce.lua's index write: at most once a second however often the device calls), and then
only queues the record for the list's order. Time is the injected clock (epoch
microseconds, the scripts' ARGV[1]), else the wall clock. Everything lives as long as the
process: one process only (gateway run runs one worker on it), and nothing survives a
restart.

Compiled in the compiled build (setup.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from gateway.model import (
    DEVICE_FIELDS,
    Bucket,
    Device,
    DeviceIdentity,
    EnforceReply,
    HistoryEntry,
    Replication,
    ReplyCode,
)
from gateway.store.keys import KeySchema
from gateway.store.listing import ListPage, Match
from gateway.store.listing_types import BlockedFilter
from gateway.store.native_blocked import NativeBlocked
from gateway.store.native_bucket import OUTCOME_ALLOWED, AddressBuckets, take
from gateway.store.native_listing import NativeListing
from gateway.store.native_order import ActivityOrder
from gateway.store.native_record import ABSENT, DeviceRecord
from gateway.typedefs import Clock

INDEX_STEP_MS: Final = 1000  # the activity score moves when last_active enters another second
_POLICY_DEVICE: Final = "device"
_POLICY_ANONYMOUS: Final = "anonymous"
_POLICY_REGISTRATION: Final = "registration"
_NOT_REPLICATED: Final = Replication(0, 0)  # one process: there is no replica to wait for


def wall_us() -> int:
    """The wall clock in epoch microseconds (the scripts' Redis TIME)."""
    return time.time_ns() // 1000


class NativeStore:
    """Device records, blocking, rate-limit state and the device list, in this process.

    `clock` gives epoch microseconds (default: the wall clock); `expiry_clock`, monotonic
    seconds, times the forgetting of full address buckets (a Redis key's own clock).
    """

    def __init__(
        self,
        *,
        key_prefix: str = "dg",
        history_size: int = 50,
        clock: Clock | None = None,
        expiry_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = KeySchema(key_prefix)
        self._history_size = history_size
        self._clock: Clock = clock if clock is not None else wall_us
        self._records: dict[str, DeviceRecord] = {}
        # Rate-limit overrides of ids with no record yet (a Redis hash of `rr`/`rb` only):
        # a record made later starts with it.
        self._overrides: dict[str, tuple[int, int]] = {}
        self._anonymous = AddressBuckets(expiry_clock)
        self._registrations = AddressBuckets(expiry_clock)
        self._order = ActivityOrder()
        self._blocked = NativeBlocked()
        self._listing = NativeListing(self._records, self._order, self._blocked)

    @property
    def blocked(self) -> NativeBlocked:
        """The blocked ids: the records' own, always known."""
        return self._blocked

    @property
    def keys(self) -> KeySchema:
        """The key schema of the prefix (it names nothing stored here; snapshots and
        channels of a Redis store are named after it)."""
        return self._keys

    async def start(self, *, follow_blocked: bool = False) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release: the data goes with the object."""

    async def ping(self) -> bool:
        """Always: the store is in the process."""
        return True

    # -- the data plane ---------------------------------------------------------------

    async def enforce(
        self,
        identity: DeviceIdentity | None,
        client_ip: str,
        bucket: Bucket,
        *,
        upload: bool,
        registration: Bucket | None = None,
    ) -> EnforceReply:
        """Block check, token bucket, upsert, history and the list's order, as enforce.lua.

        With a `registration` budget, a device never seen is charged to its address's budget
        first; refused, it leaves no record."""
        now_us = self._clock()
        if identity is None:
            return self._anonymous_request(client_ip, bucket, now_us)
        record = self._records.get(identity.id)
        if record is None:
            return self._new_device(identity, client_ip, bucket, upload, registration, now_us)
        return self._known_device(record, identity, bucket, upload, now_us)

    def _anonymous_request(self, client_ip: str, bucket: Bucket, now_us: int) -> EnforceReply:
        taken = self._anonymous.take(client_ip, now_us, bucket.rate_milli, bucket.burst)
        return EnforceReply(
            ReplyCode.ALLOW if taken[0] == OUTCOME_ALLOWED else ReplyCode.LIMITED,
            taken[3],
            taken[4],
            taken[5],
            bucket,
            _POLICY_ANONYMOUS,
            False,
        )

    def _known_device(
        self,
        record: DeviceRecord,
        identity: DeviceIdentity,
        bucket: Bucket,
        upload: bool,
        now_us: int,
    ) -> EnforceReply:
        reply = self._take(record, bucket, now_us, False)
        last = record.last_active if record.last_active != ABSENT else 0
        now_ms = now_us // 1000
        stamp = now_ms if now_ms > last else last  # last_active never moves backwards
        record.requests += 1
        record.last_active = stamp
        if upload:
            record.last_upload = stamp
        if (
            (identity.application and identity.application != record.application)
            or (
                identity.application_version
                and identity.application_version != record.application_version
            )
            or (identity.os and identity.os != record.os)
            or (identity.os_version and identity.os_version != record.os_version)
            or (identity.manufacturer and identity.manufacturer != record.manufacturer)
            or (identity.model and identity.model != record.model)
        ):
            self._declare(record, identity, stamp)
        if stamp // INDEX_STEP_MS != last // INDEX_STEP_MS:  # into another second: it moves
            record.score = stamp
            self._order.touch(record)
        return reply

    def _take(self, record: DeviceRecord, bucket: Bucket, now_us: int, new: bool) -> EnforceReply:
        """The device's verdict: blocked (no token taken), or its bucket (its override's,
        when it has one); counts a denial."""
        if record.blocked:
            record.denied += 1
            return EnforceReply(ReplyCode.BLOCKED, 0, 0, 0, bucket, _POLICY_DEVICE, new)
        applied = bucket
        rate, burst = bucket.rate_milli, bucket.burst
        if record.rate_milli:
            rate, burst = record.rate_milli, record.burst
            override = record.override
            if override is not None and (rate != bucket.rate_milli or burst != bucket.burst):
                applied = override
        taken = take(record.tokens, record.stamp, now_us, rate, burst)
        if taken[0] == OUTCOME_ALLOWED:
            record.tokens = taken[1]
            record.stamp = taken[2]
            outcome = ReplyCode.ALLOW
        else:
            record.denied += 1
            outcome = ReplyCode.LIMITED
        return EnforceReply(outcome, taken[3], taken[4], taken[5], applied, _POLICY_DEVICE, new)

    def _new_device(
        self,
        identity: DeviceIdentity,
        client_ip: str,
        bucket: Bucket,
        upload: bool,
        registration: Bucket | None,
        now_us: int,
    ) -> EnforceReply:
        if registration is not None:
            budget = self._registrations.take(
                client_ip, now_us, registration.rate_milli, registration.burst
            )
            if budget[0] != OUTCOME_ALLOWED:  # refused: no trace but the budget
                return EnforceReply(
                    ReplyCode.LIMITED,
                    budget[3],
                    budget[4],
                    budget[5],
                    registration,
                    _POLICY_REGISTRATION,
                    False,
                )
        record = self._make(identity.id)
        reply = self._take(record, bucket, now_us, True)
        now_ms = now_us // 1000
        stamp = now_ms if now_ms > 0 else 0
        record.requests = 1
        record.first_seen = stamp
        record.last_active = stamp
        if upload:
            record.last_upload = stamp
        self._declare(record, identity, stamp)
        record.score = stamp
        self._order.touch(record)
        return reply

    def _make(self, device_id: str) -> DeviceRecord:
        """A new record (no request yet), with an override set before it existed."""
        record = DeviceRecord(device_id, 0, 0)
        override = self._overrides.pop(device_id, None)
        if override is not None:
            record.set_override(override[0], override[1])
        self._records[device_id] = record
        return record

    def _declare(self, record: DeviceRecord, identity: DeviceIdentity, stamp: int) -> None:
        """Merge what the request declared into the record: a value not declared keeps the
        stored one; a declared value that differs from a stored one is a change, kept in
        the history (a first value is information, not a change)."""
        declared = identity.fields()
        stored = record.declared()
        cap = self._history_size
        merged: list[str | None] = []
        for i in range(len(stored)):
            new = declared[i]
            old = stored[i]
            if new and new != old:
                merged.append(new)
                if old is not None and cap > 0:
                    record.add_history(HistoryEntry(stamp, DEVICE_FIELDS[i], old, new), cap)
            else:
                merged.append(old)
        record.set_declared(merged)

    # -- the admin's calls on one device ----------------------------------------------

    async def get_device(self, device_id: str) -> Device | None:
        """The device's record, or None when there is none."""
        record = self._records.get(device_id)
        return None if record is None else record.device()

    async def history(self, device_id: str) -> list[HistoryEntry] | None:
        """The device's changes, newest first; None when there is no record."""
        record = self._records.get(device_id)
        if record is None:
            return None
        return [] if record.history is None else list(record.history)

    async def rename(self, device_id: str, name: str | None) -> Device | None:
        """Set (or with None/"" clear) the custom name; None when there is no record."""
        record = self._records.get(device_id)
        if record is None:
            return None
        record.name = name or None
        return record.device()

    async def block(self, device_id: str) -> Device:
        """Block the device (idempotent: the first blocked_at stays); creates the record
        for an id never seen, ordered by the time it was blocked."""
        return self._block(device_id).device()

    async def block_acked(self, device_id: str) -> tuple[Device, Replication]:
        """`block`; there are no replicas to reach."""
        return self._block(device_id).device(), _NOT_REPLICATED

    def _block(self, device_id: str) -> DeviceRecord:
        now_ms = self._clock() // 1000
        record = self._records.get(device_id)
        if record is None:
            record = self._make(device_id)
        if not record.blocked:
            record.blocked = True
            record.blocked_at = now_ms
            # Last activity is the last request, or the time it was blocked if none.
            record.score = record.last_active if record.last_active != ABSENT else now_ms
            self._order.touch(record)
            self._blocked.add(device_id)
        return record

    async def unblock(self, device_id: str) -> Device | None:
        """Unblock the device (idempotent); None when there is no record."""
        return (await self.unblock_acked(device_id))[0]

    async def unblock_acked(self, device_id: str) -> tuple[Device | None, Replication]:
        """`unblock`; there are no replicas to reach."""
        record = self._records.get(device_id)
        if record is None:
            return None, _NOT_REPLICATED
        if record.blocked:
            record.blocked = False
            record.blocked_at = ABSENT
            self._blocked.discard(device_id)
        return record.device(), _NOT_REPLICATED

    async def delete(self, device_id: str) -> bool:
        """Remove the device and everything kept for it; False when there was no record
        (an override set for an id never seen stays, as in Redis)."""
        return (await self.delete_acked(device_id))[0]

    async def delete_acked(self, device_id: str) -> tuple[bool, Replication]:
        """`delete`; there are no replicas to reach."""
        record = self._records.pop(device_id, None)
        if record is None:
            return False, _NOT_REPLICATED
        self._order.drop(record)
        if record.blocked:
            self._blocked.discard(device_id)
        return True, _NOT_REPLICATED

    async def set_rate_limit(self, device_id: str, bucket: Bucket) -> None:
        """Give the device its own bucket (also for an id not seen yet: no record is made)."""
        record = self._records.get(device_id)
        if record is None:
            self._overrides[device_id] = (bucket.rate_milli, bucket.burst)
        else:
            record.set_override(bucket.rate_milli, bucket.burst)

    async def delete_rate_limit(self, device_id: str) -> bool:
        """Remove the device's own bucket; False when it had none."""
        record = self._records.get(device_id)
        if record is None:
            return self._overrides.pop(device_id, None) is not None
        had = record.rate_milli != 0
        record.set_override(0, 0)
        return had

    # -- the admin's lists ------------------------------------------------------------

    async def reindex(self, chunk: int = 500) -> int:
        """Nothing to do (the embedded indexes are never behind); how many devices there are."""
        return len(self._records)

    async def list_devices(
        self,
        *,
        name: str | None = None,
        blocked: BlockedFilter = "all",
        page: int = 1,
        amount: int = 20,
    ) -> tuple[list[Device], int]:
        """One page of devices, most recent activity first, and the total that match."""
        answer = await self.list_page(name=name, blocked=blocked, page=page, amount=amount)
        return answer.devices, answer.total or 0

    async def list_page(
        self,
        *,
        name: str | None = None,
        blocked: BlockedFilter = "all",
        page: int = 1,
        amount: int = 20,
        after: str | None = None,
        match: Match = "contains",
    ) -> ListPage:
        """One answer of the device list (gateway.store.native_listing)."""
        return self._listing.page(
            name=name, blocked=blocked, page=page, amount=amount, after=after, match=match
        )
