"""The embedded store's blocked ids, as the data plane and /readyz see them.

The Store on Redis keeps a copy of the blocked ids per process (gateway.store.blocked) for
when Redis cannot answer. The embedded store is in the process and always answers: its
blocked ids are the records' own, known from the start, never seeded, never lost. This is
the BlockedSet surface (gateway.store.contract.BlockedIds) over them; the source it reports
is "redis", the store's own data, as /metrics and /readyz name a copy read from the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.store.blocked import BlockedSeed, BlockedStatus, wall_ms


class NativeBlocked:
    """The blocked ids of an embedded store; the store adds and removes them."""

    def __init__(self, clock: Callable[[], int] = wall_ms) -> None:
        self._ids: set[str] = set()
        self._watchers: list[Callable[[], None]] = []
        self._clock = clock
        self.synced = asyncio.Event()  # known from the start: nothing to wait for
        self.synced.set()

    def __contains__(self, device_id: str) -> bool:
        return device_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def known(self) -> bool:
        """Always: they are the store's own."""
        return True

    @property
    def epoch(self) -> str | None:
        """None: an embedded store has no epoch marker (its data goes with the process)."""
        return None

    def ids(self) -> frozenset[str]:
        """Every blocked id."""
        return frozenset(self._ids)

    def status(self) -> BlockedStatus:
        """Known, from the store, as of now; never a reset."""
        return BlockedStatus(
            source="redis",
            count=len(self._ids),
            as_of_ms=self._clock(),
            epoch=None,
            resets=0,
            restored=0,
            last_reset=None,
        )

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every block, unblock or delete of a blocked device."""
        self._watchers.append(callback)

    def add(self, device_id: str) -> None:
        """The store blocked the device."""
        self._ids.add(device_id)
        self._changed()

    def discard(self, device_id: str) -> None:
        """The store unblocked or deleted the device."""
        self._ids.discard(device_id)
        self._changed()

    def _changed(self) -> None:
        for callback in self._watchers:
            callback()

    def seed(self, seed: BlockedSeed) -> None:
        """Ignored: the store's own ids are the truth (a worker never runs on it)."""

    def handover(self) -> BlockedSeed | None:
        """The blocked ids as a supervisor would hand them to a worker."""
        return BlockedSeed(self.ids(), None, "supervisor", self._clock())

    def suspect_reset(self) -> None:
        """Nothing to look for: an embedded store cannot lose its data and live on."""

    def start(self) -> None:
        """Nothing to follow."""

    async def close(self) -> None:
        """Nothing to stop."""
