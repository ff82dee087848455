"""The store: the only package that talks to Redis.

`Store.enforce` is the data plane's one round trip per request (enforce.lua, run by
`gateway.store.enforce_script`); the other methods serve the admin API. Two clients: a hot one
bounded by `redis.timeout` for the data plane, and an admin one with a longer bound for
listing in chunks, so an admin list never queues in front of requests. Every Redis failure
is wrapped here, once, into `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from typing import Any, Final, Literal, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.config import RedisSettings
from gateway.errors import StoreUnavailable
from gateway.model import (
    DEVICE_FIELDS,
    Bucket,
    Device,
    HistoryEntry,
)
from gateway.store import keys as K
from gateway.store.blocked import BlockedSet
from gateway.store.breaker import CircuitBreaker
from gateway.store.enforce_script import EnforceScript
from gateway.store.keys import SEPARATOR, SHARDS, KeySchema
from gateway.store.pipeline import ScriptPipeline
from gateway.typedefs import Clock

__all__ = ["BlockedFilter", "Store"]

log = logging.getLogger(__name__)

T = TypeVar("T")
BlockedFilter = Literal["all", "hide", "only"]

ADMIN_TIMEOUT: Final = 5.0  # seconds, per admin round trip (each is a bounded chunk)
HOT_POOL_SIZE: Final = 64
SCAN_COUNT: Final = 1000  # entries per ZSCAN/HSCAN step of a name search
SCAN_PARALLEL: Final = 8  # shards scanned at once
PIPELINE_CHUNK: Final = 64  # commands per admin pipeline


def _script(name: str) -> str:
    return resources.files("gateway.store").joinpath("lua", name).read_text(encoding="utf-8")


def _connect(url: str, timeout: float, decode: bool) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=HOT_POOL_SIZE,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        decode_responses=decode,
    )
    return aioredis.Redis(connection_pool=pool)


class _Head:
    """One shard's next entry in the k-way merge: greatest (score, id) first."""

    __slots__ = ("id", "score", "shard")

    def __init__(self, score: float, id: str, shard: int) -> None:
        self.score = score
        self.id = id
        self.shard = shard

    def __lt__(self, other: _Head) -> bool:
        return (self.score, self.id) > (other.score, other.id)


class Store:
    """Device records, blocking, rate-limit state and indexes in Redis."""

    def __init__(
        self,
        hot: aioredis.Redis,
        admin: aioredis.Redis,
        *,
        key_prefix: str = "dg",
        timeout: float = 0.1,
        admin_timeout: float = ADMIN_TIMEOUT,
        history_size: int = 50,
        clock: Clock | None = None,
        pipeline: ScriptPipeline | None = None,
        breaker: CircuitBreaker | None = None,
        restore_blocks: bool = True,
    ) -> None:
        self._hot = hot
        self._pipeline = pipeline
        self._admin = admin
        self._keys = KeySchema(key_prefix)
        self.blocked = BlockedSet(
            admin, self._keys, restore=self._block_again if restore_blocks else None
        )
        self._timeout = timeout
        self._admin_timeout = admin_timeout
        self._enforce = hot.register_script(_script("enforce.lua"))
        self._block = admin.register_script(_script("block.lua"))
        self._unblock = admin.register_script(_script("unblock.lua"))
        self._rename = admin.register_script(_script("rename.lua"))
        self._delete = admin.register_script(_script("delete.lua"))
        self._enforce_script = EnforceScript(
            self._keys,
            breaker or CircuitBreaker(),
            pipeline=pipeline,
            fallback=self._run_enforce,
            history_size=history_size,
            clock=clock,
        )
        # enforce(identity, client_ip, bucket, *, upload, registration=None) -> Decision:
        # the data plane's call, compiled in the compiled build (gateway/store/enforce_script.py).
        self.enforce = self._enforce_script.enforce

    @classmethod
    def from_settings(
        cls, settings: RedisSettings, *, history_size: int = 50, clock: Clock | None = None
    ) -> Store:
        """Connect as configured: `memory://` embeds an in-process Redis (fakeredis)."""
        if settings.url.startswith("memory:"):
            return cls.memory(
                key_prefix=settings.key_prefix, history_size=history_size, clock=clock
            )
        return cls(
            _connect(settings.url, settings.timeout, decode=False),
            _connect(settings.url, ADMIN_TIMEOUT, decode=True),
            key_prefix=settings.key_prefix,
            timeout=settings.timeout,
            history_size=history_size,
            clock=clock,
            pipeline=ScriptPipeline(settings.url, _script("enforce.lua"), timeout=settings.timeout),
            restore_blocks=settings.restore_blocks,
        )

    @classmethod
    def memory(
        cls,
        *,
        key_prefix: str = "dg",
        history_size: int = 50,
        clock: Clock | None = None,
        server: Any = None,
        timeout: float = 1.0,
    ) -> Store:
        """An embedded store on fakeredis (same Lua scripts); `server` shares one between stores."""
        import fakeredis  # only the embedded store needs it

        server = server or fakeredis.FakeServer()
        return cls(
            fakeredis.FakeAsyncRedis(server=server),
            fakeredis.FakeAsyncRedis(server=server, decode_responses=True),
            key_prefix=key_prefix,
            # The embedded engine runs Lua in-process; give it more room than a network hop.
            timeout=timeout,
            history_size=history_size,
            clock=clock,
        )

    @property
    def keys(self) -> KeySchema:
        """The key schema in use."""
        return self._keys

    async def start(self, *, follow_blocked: bool = False) -> None:
        """Load the scripts; tolerates a Redis that is down (they load on first use).

        `follow_blocked` keeps a local copy of the blocked ids (`self.blocked`) for when
        Redis cannot answer: the data plane's processes follow, the admin side need not.
        """
        if follow_blocked:
            self.blocked.start()
        try:
            if self._pipeline is not None:
                await self._pipeline.connect()
            else:
                await self._guard(self._hot.script_load(self._enforce.script), self._timeout)
        except StoreUnavailable as exc:
            log.warning("store not reachable at start, will retry per request: %s", exc)

    async def close(self) -> None:
        """Close both clients' connections."""
        await self.blocked.close()
        if self._pipeline is not None:
            await self._pipeline.close()
        await self._hot.aclose(close_connection_pool=True)
        await self._admin.aclose(close_connection_pool=True)

    async def ping(self) -> bool:
        """True when Redis answers in time; never raises."""
        try:
            return bool(await self._guard(self._hot.ping(), self._timeout))
        except StoreUnavailable:
            return False

    async def _guard(self, call: Awaitable[T], timeout: float) -> T:
        """Bound a call in time and turn every Redis failure into StoreUnavailable."""
        try:
            async with asyncio.timeout(timeout):
                return await call
        except TimeoutError as exc:
            raise StoreUnavailable(f"Redis did not answer within {timeout:g} s") from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis failed: {exc}") from exc

    async def _run_enforce(self, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """enforce.lua through redis-py (the embedded store, which has no pipeline)."""
        return await self._guard(self._enforce(keys, args), self._timeout)

    # -- admin: one device -----------------------------------------------------------

    async def _admin_call(self, call: Awaitable[T]) -> T:
        return await self._guard(call, self._admin_timeout)

    async def get_device(self, device_id: str) -> Device | None:
        """The device's record, or None when there is none."""
        record = cast(
            dict[str, str],
            await self._admin_call(self._admin.hgetall(self._keys.device(device_id).record)),
        )
        return _device(device_id, record) if K.FIELD_REQUESTS in record else None

    async def history(self, device_id: str) -> list[HistoryEntry] | None:
        """The device's changes, newest first; None when there is no record."""
        k = self._keys.device(device_id)
        async with self._admin.pipeline(transaction=False) as pipe:
            pipe.hexists(k.record, K.FIELD_REQUESTS)
            pipe.lrange(k.history, 0, -1)
            exists, entries = await self._admin_call(pipe.execute())
        if not exists:
            return None
        return [_history_entry(raw) for raw in entries]

    async def rename(self, device_id: str, name: str | None) -> Device | None:
        """Set (or with None/"" clear) the custom name; None when there is no record."""
        k = self._keys.device(device_id)
        flat = await self._admin_call(self._rename((k.record, k.names), (device_id, name or "")))
        return _from_flat(device_id, flat)

    async def block(self, device_id: str) -> Device:
        """Block the device (idempotent); creates the record for an id never seen."""
        k = self._keys.device(device_id)
        flat = await self._admin_call(
            self._block(
                (k.record, k.active, k.blocked, k.blocked_version),
                (self._enforce_script.now(), device_id, self._keys.blocked_channel),
            )
        )
        device = _from_flat(device_id, flat)
        assert device is not None  # block.lua always returns the record
        return device

    async def _block_again(self, device_ids: Sequence[str]) -> None:
        """Block a chunk of ids in one bounded round trip (after Redis lost its data)."""
        async with self._admin.pipeline(transaction=False) as pipe:
            for device_id in device_ids:
                k = self._keys.device(device_id)
                await self._block(
                    (k.record, k.active, k.blocked, k.blocked_version),
                    (self._enforce_script.now(), device_id, self._keys.blocked_channel),
                    client=pipe,
                )
            await self._admin_call(pipe.execute())

    async def unblock(self, device_id: str) -> Device | None:
        """Unblock the device (idempotent); None when there is no record."""
        k = self._keys.device(device_id)
        flat = await self._admin_call(
            self._unblock(
                (k.record, k.blocked, k.blocked_version), (device_id, self._keys.blocked_channel)
            )
        )
        return _from_flat(device_id, flat)

    async def delete(self, device_id: str) -> bool:
        """Remove the device and everything kept for it; False when there was no record."""
        k = self._keys.device(device_id)
        removed = await self._admin_call(
            self._delete(
                (k.record, k.history, k.active, k.blocked, k.names, k.blocked_version),
                (device_id, self._keys.blocked_channel),
            )
        )
        return bool(removed)

    async def set_rate_limit(self, device_id: str, bucket: Bucket) -> None:
        """Give the device its own bucket (also for an id not seen yet: no record is made)."""
        k = self._keys.device(device_id)
        await self._admin_call(
            self._admin.hset(
                k.record,
                mapping={
                    K.FIELD_OVERRIDE_RATE: bucket.rate_milli,
                    K.FIELD_OVERRIDE_BURST: bucket.burst,
                },
            )
        )

    async def delete_rate_limit(self, device_id: str) -> bool:
        """Remove the device's own bucket; False when it had none."""
        k = self._keys.device(device_id)
        removed = await self._admin_call(
            self._admin.hdel(k.record, K.FIELD_OVERRIDE_RATE, K.FIELD_OVERRIDE_BURST)
        )
        return bool(removed)

    # -- admin: lists ----------------------------------------------------------------

    async def list_devices(
        self,
        *,
        name: str | None = None,
        blocked: BlockedFilter = "all",
        page: int = 1,
        amount: int = 20,
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
                out.extend(await self._admin_call(pipe.execute()))
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
                        await self._admin_call(
                            self._admin.zscan(s.active, cursor, count=SCAN_COUNT)
                        ),
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
                        await self._admin_call(
                            self._admin.hscan(s.names, cursor, count=SCAN_COUNT)
                        ),
                    )
                    named.extend(m for m, n in pairs.items() if needle in n.lower())
                    if cursor == 0:
                        break
                named = [m for m in named if m not in found]
                if named:
                    scores = await self._admin_call(self._admin.zmscore(s.active, named))
                    found.update(
                        (m, sc) for m, sc in zip(named, scores, strict=True) if sc is not None
                    )
                if blocked != "all" and found:
                    mine = [m for m in found if K.shard_of(m) == i]
                    if mine:
                        flags = await self._admin_call(self._admin.zmscore(s.blocked, mine))
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
            _device(device_id, record)
            for device_id, record in zip(ids, records, strict=True)
            if K.FIELD_REQUESTS in record  # deleted between the index read and now
        ]


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _from_flat(device_id: str, flat: list[str] | None) -> Device | None:
    """A record from a script's flat HGETALL reply (None: no record)."""
    if not flat:
        return None
    return _device(device_id, dict(zip(flat[::2], flat[1::2], strict=True)))


def _device(device_id: str, h: dict[str, str]) -> Device:
    declared = dict(zip(DEVICE_FIELDS, (h.get(f) for f in K.DEVICE_FIELD_KEYS), strict=True))
    rate, burst = h.get(K.FIELD_OVERRIDE_RATE), h.get(K.FIELD_OVERRIDE_BURST)
    return Device(
        id=device_id,
        name=h.get(K.FIELD_NAME),
        first_seen=_int(h.get(K.FIELD_FIRST_SEEN)),
        last_active=_int(h.get(K.FIELD_LAST_ACTIVE)),
        last_data_upload=_int(h.get(K.FIELD_LAST_UPLOAD)),
        blocked=K.FIELD_BLOCKED_AT in h,
        blocked_at=_int(h.get(K.FIELD_BLOCKED_AT)),
        request_count=int(h.get(K.FIELD_REQUESTS, 0)),
        denied_count=int(h.get(K.FIELD_DENIED, 0)),
        rate_limit=(
            Bucket(rate=int(rate) / 1000, burst=int(burst))
            if rate is not None and burst is not None
            else None
        ),
        **cast(dict[str, Any], declared),
    )


_FIELD_BY_KEY: Final = dict(zip(K.DEVICE_FIELD_KEYS, DEVICE_FIELDS, strict=True))


def _history_entry(raw: str) -> HistoryEntry:
    at, field, old, new = raw.split(SEPARATOR)
    return HistoryEntry(at=int(at), field=_FIELD_BY_KEY.get(field, field), old=old, new=new)
