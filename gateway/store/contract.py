"""What callers may ask of a store, as Protocols: the Store on Redis (gateway.store.store)
and the embedded NativeStore (gateway.store.native) both satisfy them.

`DeviceStore` is the data plane's one call per request (`enforce`) and the admin's calls;
`BlockedIds` is what a process knows of the blocked ids (`DeviceStore.blocked`): the Store
keeps a copy that follows Redis (gateway.store.blocked.BlockedSet), the NativeStore is its
own authority and always knows them. Only types are imported here, so that reading the
contract loads no Redis client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

    from gateway.model import (
        Bucket,
        Device,
        DeviceIdentity,
        EnforceReply,
        HistoryEntry,
        Replication,
    )
    from gateway.store.blocked import BlockedSeed, BlockedStatus
    from gateway.store.keys import KeySchema
    from gateway.store.listing import ListPage, Match
    from gateway.store.listing_types import BlockedFilter


class BlockedIds(Protocol):
    """A process's hold on the blocked ids: consulted when the store cannot decide."""

    @property
    def synced(self) -> asyncio.Event:
        """Set once the ids have been read whole from the store."""
        ...

    @property
    def known(self) -> bool:
        """Whether the blocked ids are known whole."""
        ...

    @property
    def epoch(self) -> str | None:
        """The epoch marker of the data they were read from (None: none)."""
        ...

    def __contains__(self, device_id: str) -> bool: ...

    def __len__(self) -> int: ...

    def ids(self) -> frozenset[str]:
        """Every blocked id held."""
        ...

    def status(self) -> BlockedStatus:
        """What this process knows, for /readyz and /metrics."""
        ...

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every change of what `status` reports."""
        ...

    def seed(self, seed: BlockedSeed) -> None:
        """Start from ids known elsewhere (a supervisor's, a snapshot's)."""
        ...

    def handover(self) -> BlockedSeed | None:
        """What a worker started now should begin with; None while nothing is known."""
        ...

    def suspect_reset(self) -> None:
        """The store answered as if it had lost its data: look now."""
        ...

    def start(self) -> None:
        """Start following the store."""
        ...

    async def close(self) -> None:
        """Stop following the store."""
        ...


class DeviceStore(Protocol):
    """Device records, blocking, rate-limit state and the device list."""

    @property
    def blocked(self) -> BlockedIds:
        """This process's hold on the blocked ids."""
        ...

    @property
    def keys(self) -> KeySchema:
        """The key schema in use (its prefix names the snapshot and the channels)."""
        ...

    async def enforce(
        self,
        identity: DeviceIdentity | None,
        client_ip: str,
        bucket: Bucket,
        *,
        upload: bool,
        registration: Bucket | None = None,
    ) -> EnforceReply:
        """Block check, token bucket, upsert, history and indexes for one request."""
        ...

    async def start(self, *, follow_blocked: bool = False) -> None:
        """Make ready; `follow_blocked` keeps `blocked` up to date."""
        ...

    async def close(self) -> None:
        """Release what the store holds."""
        ...

    async def ping(self) -> bool:
        """True when the store answers in time; never raises."""
        ...

    async def get_device(self, device_id: str) -> Device | None:
        """The device's record, or None when there is none."""
        ...

    async def history(self, device_id: str) -> list[HistoryEntry] | None:
        """The device's changes, newest first; None when there is no record."""
        ...

    async def rename(self, device_id: str, name: str | None) -> Device | None:
        """Set (or with None/"" clear) the custom name; None when there is no record."""
        ...

    async def block(self, device_id: str) -> Device:
        """Block the device (idempotent); creates the record for an id never seen."""
        ...

    async def block_acked(self, device_id: str) -> tuple[Device, Replication]:
        """`block`, and how many replicas it reached before the answer."""
        ...

    async def unblock(self, device_id: str) -> Device | None:
        """Unblock the device (idempotent); None when there is no record."""
        ...

    async def unblock_acked(self, device_id: str) -> tuple[Device | None, Replication]:
        """`unblock`, and how many replicas it reached before the answer."""
        ...

    async def delete(self, device_id: str) -> bool:
        """Remove the device and everything kept for it; False when there was no record."""
        ...

    async def delete_acked(self, device_id: str) -> tuple[bool, Replication]:
        """`delete`, and how many replicas it reached before the answer."""
        ...

    async def set_rate_limit(self, device_id: str, bucket: Bucket) -> None:
        """Give the device its own bucket (also for an id not seen yet)."""
        ...

    async def delete_rate_limit(self, device_id: str) -> bool:
        """Remove the device's own bucket; False when it had none."""
        ...

    async def reindex(self, chunk: int = 500) -> int:
        """Put every device in the search indexes; how many devices it went through."""
        ...

    async def list_devices(
        self,
        *,
        name: str | None = None,
        blocked: BlockedFilter = "all",
        page: int = 1,
        amount: int = 20,
    ) -> tuple[list[Device], int]:
        """One page of devices, most recent activity first, and the total that match."""
        ...

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
        """One answer of the device list: its page, the total, the next page's cursor."""
        ...
