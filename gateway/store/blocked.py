"""Each process's copy of the blocked ids, consulted only when Redis cannot decide.

While Redis answers, Redis decides (an unblock takes effect on the very next request). When
a call fails or the circuit breaker skips Redis, a device in this set still gets 403, in
both `on_error` modes. The copy follows Redis two ways:

- pub/sub: block.lua, unblock.lua and delete.lua publish "b <id>" / "u <id>" on
  `<prefix>:blocked` (immediate, but a message sent while this process was disconnected is
  lost); on a cluster, on the shard's own channel `<prefix>:{dNNN}:bev` (SPUBLISH: the
  message stays within the shard's primary and replicas, never on the cluster bus), which
  this process reads over one connection per primary (SSUBSCRIBE), and
- a poll every second of the epoch marker and the per-shard version counters
  `<prefix>:{dNNN}:bver` (bumped by the same scripts); a shard whose version moved has its
  `blocked` index read again. The first poll reads every shard.

The set *knows* the blocked ids once it holds them whole: from a complete poll ("redis"),
or before Redis ever answered, from the supervisor of a worker ("supervisor") or a snapshot
file ("snapshot", gateway.store.snapshot). Until then the data plane must not forward a
request unenforced (gateway.enforce). When the epoch marker is gone, Redis lost the
gateway's data (gateway.store.epoch): the set is kept, not emptied by that poll, and, with
`redis.restore_blocks`, every id in it is blocked again (gateway.store.reset). When it is
another marker, another process handled the loss: the set follows Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway.errors import StoreError
from gateway.store.epoch import EpochCheck, check_epoch, new_epoch
from gateway.store.keys import SHARDS, KeySchema, shard_of
from gateway.store.reset import ResetRecovery, Restore, StoreReset
from gateway.store.shard_events import follow_shard_channels

log = logging.getLogger(__name__)

POLL_INTERVAL: Final = 1.0
MIN_POLL_GAP: Final = 0.05  # seconds between two polls, however often one is asked for
CALL_TIMEOUT: Final = 2.0

Source = Literal["redis", "supervisor", "snapshot"]
SOURCES: Final[tuple[Source, ...]] = ("redis", "supervisor", "snapshot")

_FOLLOW_ERRORS: Final = (RedisError, OSError, TimeoutError, StoreError)


def wall_ms() -> int:
    """The wall clock in epoch milliseconds (what snapshots and resets are stamped with)."""
    return time.time_ns() // 1_000_000


def _text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else bytes(value).decode()


@dataclass(frozen=True, slots=True)
class BlockedSeed:
    """The blocked ids a process starts with, before Redis has answered it."""

    ids: frozenset[str]
    epoch: str | None
    source: Source
    as_of_ms: int  # when they were last read from Redis (epoch ms), as far as the giver knows


@dataclass(frozen=True, slots=True)
class BlockedStatus:
    """What this process knows of the blocked ids, for /readyz and /metrics."""

    source: Source | None
    count: int
    as_of_ms: int | None
    epoch: str | None
    resets: int
    restored: int
    last_reset: StoreReset | None

    @property
    def known(self) -> bool:
        """Whether the process holds the blocked ids whole."""
        return self.source is not None


class BlockedSet:
    """The blocked ids of every shard, kept in memory and refreshed in the background."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: KeySchema,
        *,
        poll_interval: float = POLL_INTERVAL,
        restore: Restore | None = None,
        clock: Callable[[], int] = wall_ms,
        sharded: bool = False,
    ) -> None:
        self._client = client
        self._sharded = sharded  # a cluster: the shards' own channels (SSUBSCRIBE)
        self._keys = keys
        # What a poll reads, in order: the epoch marker, then every shard's version counter.
        self._poll_keys = [keys.epoch, *(keys.shard(i).blocked_version for i in range(SHARDS))]
        self._poll_interval = poll_interval
        self._clock = clock
        self._shards: list[frozenset[str]] = [frozenset()] * SHARDS
        self._versions: list[Any] = [object()] * SHARDS  # matches nothing: first poll reads all
        self._source: Source | None = None
        self._as_of_ms: int | None = None
        self._epoch: str | None = None
        self._watchers: list[Callable[[], None]] = []
        self._reset = ResetRecovery(restore, clock=clock, changed=self._changed)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._wake = asyncio.Event()
        self.synced = asyncio.Event()  # set after the first complete poll

    def __contains__(self, device_id: str) -> bool:
        return device_id in self._shards[shard_of(device_id)]

    def __len__(self) -> int:
        return sum(len(s) for s in self._shards)

    @property
    def known(self) -> bool:
        """Whether the blocked ids are known whole (from Redis, the supervisor or a snapshot)."""
        return self._source is not None

    @property
    def epoch(self) -> str | None:
        """The epoch marker this process last saw in Redis (or was given)."""
        return self._epoch

    def ids(self) -> frozenset[str]:
        """Every blocked id held."""
        return frozenset().union(*self._shards)

    def status(self) -> BlockedStatus:
        """A consistent view of what this process knows."""
        return BlockedStatus(
            source=self._source,
            count=len(self),
            as_of_ms=self._as_of_ms,
            epoch=self._epoch,
            resets=self._reset.resets,
            restored=self._reset.restored,
            last_reset=self._reset.last,
        )

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every change of the ids, the epoch, the source or a reset."""
        self._watchers.append(callback)

    def _changed(self) -> None:
        for callback in self._watchers:
            callback()

    def seed(self, seed: BlockedSeed) -> None:
        """Start from ids known elsewhere; ignored once Redis itself has been read."""
        if self._source == "redis":
            return
        shards: list[set[str]] = [set() for _ in range(SHARDS)]
        for device_id in seed.ids:
            shards[shard_of(device_id)].add(device_id)
        self._shards = [frozenset(s) for s in shards]
        self._epoch = seed.epoch
        self._source = seed.source
        self._as_of_ms = seed.as_of_ms
        self._changed()

    def handover(self) -> BlockedSeed | None:
        """What a worker started now should begin with; None while this process knows nothing."""
        if self._source is None:
            return None
        return BlockedSeed(self.ids(), self._epoch, "supervisor", self._as_of_ms or self._clock())

    def suspect_reset(self) -> None:
        """Poll now rather than at the next interval: Redis answered as if it had lost the
        gateway's data (no record for an id this process knows blocked)."""
        self._wake.set()

    def start(self) -> None:
        """Start following Redis in the background."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._poll_forever(), name="blocked-poll"),
                asyncio.create_task(
                    self._listen_sharded() if self._sharded else self._listen_forever(),
                    name="blocked-pubsub",
                ),
            ]

    async def close(self) -> None:
        """Stop following Redis (bounded: a stop must never hang on a follower)."""
        self._closing = True
        tasks, self._tasks = self._tasks, []
        # On Python 3.11 a cancel can be swallowed by an asyncio.wait_for inside redis-py
        # (gh-86296): cancel again until the tasks end; the loops also check _closing.
        for _ in range(20):
            pending = [t for t in tasks if not t.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: never "exception was never retrieved"

    def apply(self, message: str) -> None:
        """One pub/sub message: "b <id>" adds, "u <id>" removes."""
        kind, _, device_id = message.partition(" ")
        if not device_id or kind not in ("b", "u"):
            return
        shard = shard_of(device_id)
        ids = set(self._shards[shard])
        if kind == "b":
            ids.add(device_id)
        else:
            ids.discard(device_id)
        if ids != self._shards[shard]:
            self._shards[shard] = frozenset(ids)
            self._changed()

    async def poll(self) -> None:
        """Read the epoch marker and the shard versions; read again every shard that moved.

        Once a second in every process: on one node (a server, Sentinel) the 257 keys are one
        MGET, whose reply hiredis parses, not 257 commands through redis-py's pipeline (5 ms
        of interpreted Python a poll, one stall a second in the data plane's loop); a
        cluster's keys span every slot, so its poll stays a pipeline, split by node."""
        keys = self._keys
        async with asyncio.timeout(CALL_TIMEOUT):
            if self._sharded:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key in self._poll_keys:
                        pipe.get(key)
                    replies = await pipe.execute()
            else:
                replies = await self._client.mget(self._poll_keys)
        read, versions = _text(replies[0]), replies[1:]
        check = check_epoch(self._epoch, read)
        if check is EpochCheck.LOST:
            # The indexes this poll would read are empty or rebuilt: the set stays as it is.
            await self._recover(read)
            return
        if check is EpochCheck.REPLACED:
            self._replaced(read)
        if check is EpochCheck.FIRST:
            read = await self._claim_epoch()
        changed = read != self._epoch
        self._epoch = read
        moved = [i for i in range(SHARDS) if versions[i] != self._versions[i]]
        if moved:
            async with asyncio.timeout(CALL_TIMEOUT):
                async with self._client.pipeline(transaction=False) as pipe:
                    for i in moved:
                        pipe.zrange(keys.shard(i).blocked, 0, -1)
                    pipe.get(keys.epoch)  # after the reads: were they of the same dataset?
                    *members, again = await pipe.execute()
            if _text(again) != self._epoch:
                return  # flushed meanwhile: the next poll notices, with the set untouched
            for i, raw in zip(moved, members, strict=True):
                ids = frozenset(m if isinstance(m, str) else m.decode() for m in raw)
                if ids != self._shards[i]:
                    self._shards[i] = ids
                    changed = True
                self._versions[i] = versions[i]
        if self._source != "redis":
            self._source = "redis"
            changed = True
        self._as_of_ms = self._clock()
        if changed:
            self._changed()

    def _replaced(self, found: str | None) -> None:
        """Another process saw the loss first and marked the new dataset (and restored what
        it knew): follow Redis, never what this process remembers, which may be old."""
        assert self._epoch is not None  # REPLACED means a remembered epoch
        self._reset.replaced(self._epoch, found, known=len(self))
        self._versions = [object()] * SHARDS  # every shard is read again, below
        self._changed()

    async def _claim_epoch(self) -> str | None:
        """Set a new epoch marker unless one exists (SET NX), and return the one Redis holds."""
        async with asyncio.timeout(CALL_TIMEOUT):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self._keys.epoch, new_epoch(), nx=True)
                pipe.get(self._keys.epoch)
                _, held = await pipe.execute()
        return _text(held)

    async def _recover(self, found: str | None) -> None:
        """Redis lost the gateway's data: block the known ids again (gateway.store.reset),
        then take the epoch Redis holds and read every shard again at the next poll."""
        assert self._epoch is not None  # LOST means a remembered epoch
        self._epoch = await self._reset.recover(self._epoch, found, self.ids, self._claim_epoch)
        self._versions = [object()] * SHARDS
        self._changed()

    async def _poll_forever(self) -> None:
        while not self._closing:
            try:
                await self.poll()
                self.synced.set()
            except _FOLLOW_ERRORS as exc:
                log.debug("blocked-set poll failed: %r", exc)
            await asyncio.sleep(MIN_POLL_GAP)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval - MIN_POLL_GAP):
                    await self._wake.wait()
            self._wake.clear()

    async def _listen_sharded(self) -> None:
        """On a cluster: the shards' own channels, one connection per primary."""
        channels = [self._keys.shard_channel(i) for i in range(SHARDS)]
        await follow_shard_channels(
            cast(RedisCluster, self._client),
            channels,
            self.apply,
            closing=lambda: self._closing,
            interval=self._poll_interval,
            call_timeout=CALL_TIMEOUT,
        )

    async def _listen_forever(self) -> None:
        channel = self._keys.blocked_channel
        while not self._closing:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                while not self._closing:
                    message = await pubsub.get_message(timeout=self._poll_interval)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self.apply(data if isinstance(data, str) else data.decode())
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("blocked-set subscription lost: %r", exc)
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis 7
            await asyncio.sleep(self._poll_interval)  # the poll covers the gap meanwhile
