"""The admin list of devices: pages by last activity, and the search by id or name.

Devices are spread over `keys.SHARDS` shards, each with its own activity index, so a page
is a k-way merge of the shards' indexes, read lazily in growing chunks; a name search scans
each shard's indexes with ZSCAN/HSCAN in bounded steps. Every round trip goes through the
admin client and the `AdminCall` the Store gives (bounded in time, failures wrapped), in
pipelines of PIPELINE_CHUNK commands, so an admin list never queues long in front of the
data plane's calls.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Literal, Protocol, TypeVar, cast

import redis.asyncio as aioredis

from gateway.model import Device
from gateway.store import keys as K
from gateway.store.keys import SHARDS, KeySchema
from gateway.store.records import device_from_hash

T = TypeVar("T")
BlockedFilter = Literal["all", "hide", "only"]

SCAN_COUNT: Final = 1000  # entries per ZSCAN/HSCAN step of a name search
SCAN_PARALLEL: Final = 8  # shards scanned at once
PIPELINE_CHUNK: Final = 64  # commands per admin pipeline


class AdminCall(Protocol):
    """One admin round trip, bounded in time; Redis failures come out as StoreUnavailable."""

    def __call__(self, call: Awaitable[T], /) -> Awaitable[T]: ...


class _Head:
    """One shard's next entry in the k-way merge: greatest (score, id) first."""

    __slots__ = ("id", "score", "shard")

    def __init__(self, score: float, id: str, shard: int) -> None:
        self.score = score
        self.id = id
        self.shard = shard

    def __lt__(self, other: _Head) -> bool:
        return (self.score, self.id) > (other.score, other.id)


class DeviceListing:
    """Lists the devices of one key schema, through the admin client."""

    def __init__(self, admin: aioredis.Redis, keys: KeySchema, call: AdminCall) -> None:
        self._admin = admin
        self._keys = keys
        self._call = call

    async def page(
        self, *, name: str | None, blocked: BlockedFilter, page: int, amount: int
    ) -> tuple[list[Device], int]:
        """One page of devices, most recent activity first, and the total that match."""
        offset = (page - 1) * amount
        if name:
            matches = await self._search(name.lower(), blocked)
            total = len(matches)
            ids = [device_id for _, device_id in matches[offset : offset + amount]]
        else:
            total = await self._count(blocked)
            ids = await self._merged_page(blocked, offset, amount) if offset < total else []
        return await self._records(ids), total

    async def _pipelined(
        self, build: Callable[[Any, int], None], items: Iterable[int]
    ) -> list[Any]:
        """Run one command per item in pipelines of PIPELINE_CHUNK commands."""
        out: list[Any] = []
        batch = list(items)
        for start in range(0, len(batch), PIPELINE_CHUNK):
            async with self._admin.pipeline(transaction=False) as pipe:
                for item in batch[start : start + PIPELINE_CHUNK]:
                    build(pipe, item)
                out.extend(await self._call(pipe.execute()))
        return out

    async def _count(self, blocked: BlockedFilter) -> int:
        shards = [self._keys.shard(i) for i in range(SHARDS)]
        blocked_count: int = sum(
            await self._pipelined(lambda p, i: p.zcard(shards[i].blocked), range(SHARDS))
        )
        if blocked == "only":
            return blocked_count
        active_count: int = sum(
            await self._pipelined(lambda p, i: p.zcard(shards[i].active), range(SHARDS))
        )
        return active_count - blocked_count if blocked == "hide" else active_count

    async def _merged_page(self, blocked: BlockedFilter, offset: int, amount: int) -> list[str]:
        """K-way merge of the shards' indexes, fetched lazily in chunks, newest first."""
        want = offset + amount
        # Ids spread evenly over the shards, so the first `want` entries overall hold about
        # want / SHARDS of each shard: ask for twice that, and double a shard's step each
        # time it runs dry.
        chunk = [min(SCAN_COUNT, 2 * want // SHARDS + 16)] * SHARDS
        shards = [self._keys.shard(i) for i in range(SHARDS)]
        index = [s.blocked if blocked == "only" else s.active for s in shards]
        buffers: list[deque[tuple[float, str]]] = [deque() for _ in range(SHARDS)]
        cursor = [0] * SHARDS
        done = [False] * SHARDS

        async def refill(indices: list[int]) -> None:
            replies = await self._pipelined(
                lambda p, i: p.zrevrange(
                    index[i], cursor[i], cursor[i] + chunk[i] - 1, withscores=True
                ),
                indices,
            )
            hidden: list[set[str]] = [set() for _ in indices]
            if blocked == "hide":
                members = [[m for m, _ in reply] for reply in replies]
                asked = [j for j in range(len(indices)) if members[j]]
                flags = await self._pipelined(
                    lambda p, j: p.zmscore(shards[indices[j]].blocked, members[j]), asked
                )
                for j, got in zip(asked, flags, strict=True):
                    hidden[j] = {m for m, f in zip(members[j], got, strict=True) if f is not None}
            for j, (i, reply) in enumerate(zip(indices, replies, strict=True)):
                cursor[i] += len(reply)
                done[i] = len(reply) < chunk[i]
                chunk[i] = min(SCAN_COUNT, chunk[i] * 2)
                buffers[i].extend((s, m) for m, s in reply if m not in hidden[j])

        async def head_of(i: int) -> _Head | None:
            while not buffers[i] and not done[i]:
                await refill([i])
            if not buffers[i]:
                return None
            score, member = buffers[i].popleft()
            return _Head(score, member, i)

        await refill(list(range(SHARDS)))
        heap = [h for i in range(SHARDS) if (h := await head_of(i)) is not None]
        heapq.heapify(heap)
        ids: list[str] = []
        while heap and len(ids) < want:
            top = heapq.heappop(heap)
            ids.append(top.id)
            nxt = await head_of(top.shard)
            if nxt is not None:
                heapq.heappush(heap, nxt)
        return ids[offset:]

    async def _search(self, needle: str, blocked: BlockedFilter) -> list[tuple[float, str]]:
        """Devices whose id or custom name contains `needle` (case-insensitive), newest first.

        Scans each shard's indexes with ZSCAN/HSCAN in bounded steps (never KEYS, never one
        long script), a few shards at a time, so Redis keeps serving the data plane.
        """
        found: dict[str, float] = {}
        gate = asyncio.Semaphore(SCAN_PARALLEL)

        async def scan_shard(i: int) -> None:
            s = self._keys.shard(i)
            async with gate:
                cursor = 0
                while True:
                    cursor, entries = cast(
                        tuple[int, list[tuple[str, float]]],
                        await self._call(self._admin.zscan(s.active, cursor, count=SCAN_COUNT)),
                    )
                    for member, score in entries:
                        if needle in member.lower():
                            found[member] = score
                    if cursor == 0:
                        break
                named: list[str] = []
                cursor = 0
                while True:
                    cursor, pairs = cast(
                        tuple[int, dict[str, str]],
                        await self._call(self._admin.hscan(s.names, cursor, count=SCAN_COUNT)),
                    )
                    named.extend(m for m, n in pairs.items() if needle in n.lower())
                    if cursor == 0:
                        break
                named = [m for m in named if m not in found]
                if named:
                    scores = await self._call(self._admin.zmscore(s.active, named))
                    found.update(
                        (m, sc) for m, sc in zip(named, scores, strict=True) if sc is not None
                    )
                if blocked != "all" and found:
                    mine = [m for m in found if K.shard_of(m) == i]
                    if mine:
                        flags = await self._call(self._admin.zmscore(s.blocked, mine))
                        for m, flag in zip(mine, flags, strict=True):
                            if (flag is None) == (blocked == "only"):
                                del found[m]

        await asyncio.gather(*(scan_shard(i) for i in range(SHARDS)))
        return sorted(((score, m) for m, score in found.items()), reverse=True)

    async def _records(self, ids: list[str]) -> list[Device]:
        if not ids:
            return []
        records = await self._pipelined(
            lambda p, j: p.hgetall(self._keys.device(ids[j]).record), range(len(ids))
        )
        return [
            device_from_hash(device_id, record)
            for device_id, record in zip(ids, records, strict=True)
            if K.FIELD_REQUESTS in record  # deleted between the index read and now
        ]
