"""The embedded store's device list order: most recent activity first, then id.

A request whose device's activity score moved only queues the record (`touch`: a flag and
a list append); the order files the queued records when a list is asked for (`sync`), so
a request never pays for the ordering. A deleted record leaves the order at once (`drop`),
and the queue sheds the deleted records it holds whenever it has doubled since it last did:
deletes with no list in between do not pile up. The order is a sorted list of (score, id) keys in
chunks of a few hundred (the layout of sortedcontainers' SortedList): a key moves in
O(log n) plus a short memmove, and a page walks down from the top or from a cursor. When
more than a quarter of the devices are queued, the order is sorted again from scratch.

Compiled in the compiled build (setup.py): `touch` runs in requests.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from typing import Final

from gateway.store.native_record import NOT_LISTED, DeviceRecord

Key = tuple[int, str]  # (activity score in ms, id): the list runs from the largest down
CHUNK: Final = 512  # keys a chunk holds before it is split in two
SHED_AT: Final = 1024  # the queue's length at which deleted records are shed, at first


class ActivityOrder:
    """Device records filed by (score, id), read from the largest key down."""

    def __init__(self) -> None:
        self._chunks: list[list[Key]] = []
        self._maxes: list[Key] = []  # the last (largest) key of each chunk
        self._queue: list[DeviceRecord] = []
        self._shed_at = SHED_AT  # the queue's length past which deleted records are shed
        self._size = 0

    def touch(self, record: DeviceRecord) -> None:
        """The record was made or its score changed: file it at the next sync."""
        if not record.queued:
            record.queued = True
            self._queue.append(record)
            if len(self._queue) > self._shed_at:
                self._shed()

    def drop(self, record: DeviceRecord) -> None:
        """The record was deleted: out of the order now."""
        record.alive = False
        if record.listed != NOT_LISTED:
            self._remove((record.listed, record.id))
            record.listed = NOT_LISTED

    def _shed(self) -> None:
        """Forget the deleted records queued; shed again at twice what is left."""
        kept: list[DeviceRecord] = []
        for record in self._queue:
            if record.alive:
                kept.append(record)
            else:
                record.queued = False
        self._queue = kept
        self._shed_at = 2 * len(kept) + SHED_AT

    def sync(self, records: Iterable[DeviceRecord], count: int) -> None:
        """File every queued record (`records`, `count` of them: every live record)."""
        queue, self._queue = self._queue, []
        self._shed_at = SHED_AT
        if len(queue) * 4 > max(count, 256):
            self._rebuild(records, queue)
            return
        for record in queue:  # the keys filed before out first, then the new ones in
            if record.listed != NOT_LISTED:
                self._remove((record.listed, record.id))
                record.listed = NOT_LISTED
        for record in queue:
            record.queued = False
            if record.alive:
                self._add((record.score, record.id))
                record.listed = record.score

    def _rebuild(self, records: Iterable[DeviceRecord], queue: list[DeviceRecord]) -> None:
        for record in queue:
            record.queued = False
            record.listed = NOT_LISTED
        keys: list[Key] = []
        for record in records:
            keys.append((record.score, record.id))
            record.listed = record.score
        keys.sort()
        self._chunks = [keys[i : i + CHUNK] for i in range(0, len(keys), CHUNK)]
        self._maxes = [chunk[-1] for chunk in self._chunks]
        self._size = len(keys)

    def __len__(self) -> int:
        return self._size

    def _add(self, key: Key) -> None:
        chunks, maxes = self._chunks, self._maxes
        self._size += 1
        if not maxes:
            chunks.append([key])
            maxes.append(key)
            return
        at = bisect_left(maxes, key)
        if at == len(maxes):
            at -= 1
            chunks[at].append(key)
            maxes[at] = key
        else:
            insort(chunks[at], key)
        chunk = chunks[at]
        if len(chunk) > 2 * CHUNK:
            chunks.insert(at + 1, chunk[CHUNK:])
            del chunk[CHUNK:]
            maxes.insert(at, chunk[-1])

    def _remove(self, key: Key) -> None:
        chunks, maxes = self._chunks, self._maxes
        at = bisect_left(maxes, key)
        chunk = chunks[at]
        del chunk[bisect_left(chunk, key)]
        self._size -= 1
        if not chunk:
            del chunks[at]
            del maxes[at]
        else:
            maxes[at] = chunk[-1]

    def below(self, key: Key | None) -> Iterator[Key]:
        """The keys strictly below `key` (None: every key), from the largest down."""
        chunks = self._chunks
        if not chunks:
            return
        if key is None:
            at = len(chunks) - 1
            i = len(chunks[at])
        else:
            at = bisect_left(self._maxes, key)
            if at == len(chunks):
                at -= 1
                i = len(chunks[at])
            else:
                i = bisect_left(chunks[at], key)
        while at >= 0:
            chunk = chunks[at]
            while i > 0:
                i -= 1
                yield chunk[i]
            at -= 1
            if at >= 0:
                i = len(chunks[at])
