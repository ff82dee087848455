"""Each process's copy of the blocked ids, consulted only when Redis cannot decide.

While Redis answers, Redis decides (an unblock takes effect on the very next request). When
a call fails or the circuit breaker skips Redis, a device in this set still gets 403, in
both `on_error` modes. The copy follows Redis two ways:

- pub/sub: block.lua, unblock.lua and delete.lua publish "b <id>" / "u <id>" on
  `<prefix>:blocked` (immediate, but a message sent while this process was disconnected is
  lost), and
- a poll every second of the per-shard version counters `<prefix>:{dNNN}:bver` (bumped by
  the same scripts); a shard whose version moved has its `blocked` index read again. The
  first poll reads every shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.store.keys import SHARDS, KeySchema, shard_of

log = logging.getLogger(__name__)

POLL_INTERVAL: Final = 1.0
CALL_TIMEOUT: Final = 2.0


class BlockedSet:
    """The blocked ids of every shard, kept in memory and refreshed in the background."""

    def __init__(
        self, client: aioredis.Redis, keys: KeySchema, *, poll_interval: float = POLL_INTERVAL
    ) -> None:
        self._client = client
        self._keys = keys
        self._poll_interval = poll_interval
        self._shards: list[frozenset[str]] = [frozenset()] * SHARDS
        self._versions: list[Any] = [object()] * SHARDS  # matches nothing: first poll reads all
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.synced = asyncio.Event()  # set after the first complete poll

    def __contains__(self, device_id: str) -> bool:
        return device_id in self._shards[shard_of(device_id)]

    def __len__(self) -> int:
        return sum(len(s) for s in self._shards)

    def start(self) -> None:
        """Start following Redis in the background."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._poll_forever(), name="blocked-poll"),
                asyncio.create_task(self._listen_forever(), name="blocked-pubsub"),
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
        self._shards[shard] = frozenset(ids)

    async def poll(self) -> None:
        """Read the shard versions; read again the blocked index of every shard that moved."""
        async with asyncio.timeout(CALL_TIMEOUT):
            async with self._client.pipeline(transaction=False) as pipe:
                for i in range(SHARDS):
                    pipe.get(self._keys.shard(i).blocked_version)
                versions = await pipe.execute()
            moved = [i for i in range(SHARDS) if versions[i] != self._versions[i]]
            if not moved:
                return
            async with self._client.pipeline(transaction=False) as pipe:
                for i in moved:
                    pipe.zrange(self._keys.shard(i).blocked, 0, -1)
                members = await pipe.execute()
        for i, ids in zip(moved, members, strict=True):
            self._shards[i] = frozenset(m if isinstance(m, str) else m.decode() for m in ids)
            self._versions[i] = versions[i]

    async def _poll_forever(self) -> None:
        while not self._closing:
            try:
                await self.poll()
                self.synced.set()
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("blocked-set poll failed: %r", exc)
            await asyncio.sleep(self._poll_interval)

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
