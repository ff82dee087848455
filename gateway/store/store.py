"""The Store: its two Redis clients, the scripts it registers, and the admin's calls.

`Store.enforce` is the data plane's one round trip per request (enforce.lua, run by
`gateway.store.enforce_script`); the other methods serve the admin API. Two clients: a hot
one bounded by `redis.timeout` for the data plane, and an admin one with a longer bound for
listing in chunks, so an admin list never queues in front of requests. Every Redis failure
of redis-py's clients is wrapped here, once (`Store._guard`), into `StoreUnavailable`; the
pipelined connection wraps its own (gateway.store.pipeline).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Final, TypeVar, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.config import RedisSettings
from gateway.errors import StoreUnavailable
from gateway.model import Bucket, Device, HistoryEntry, Replication
from gateway.redis_topology import parse_redis_url
from gateway.store import keys as K
from gateway.store.blocked import BlockedSet
from gateway.store.breaker import CircuitBreaker
from gateway.store.clients import (
    AckedEval,
    close_client,
    cluster_acked_eval,
    redis_client,
    script_caller,
)
from gateway.store.cluster_scripts import ClusterScripts
from gateway.store.enforce_script import EnforceScript, ScriptCaller
from gateway.store.keys import KeySchema
from gateway.store.listing import BlockedFilter, DeviceListing, ListPage, Match
from gateway.store.records import device_from_flat, device_from_hash, history_entry
from gateway.store.scripts import load_script
from gateway.typedefs import Clock

# The package's logger, as before the package was split: its log lines keep their name.
log = logging.getLogger("gateway.store")

T = TypeVar("T")

ADMIN_TIMEOUT: Final = 5.0  # seconds, per admin round trip (each is a bounded chunk)


def _script(name: str) -> str:
    return load_script(name)  # the record's field names rendered in from gateway.schema


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
        pipeline: ScriptCaller | None = None,
        breaker: CircuitBreaker | None = None,
        restore_blocks: bool = True,
        one_node: bool = True,
        write_replicas: int = 0,
        write_timeout: float = 0.5,
        acked_eval: AckedEval | None = None,
    ) -> None:
        self._hot = hot
        self._pipeline = pipeline
        self._admin = admin
        self._keys = KeySchema(key_prefix)
        self._one_node = one_node
        self.blocked = BlockedSet(
            admin,
            self._keys,
            restore=self._block_again if restore_blocks else None,
            sharded=not one_node,
        )
        self._timeout = timeout
        self._admin_timeout = admin_timeout
        self._write_timeout = write_timeout
        # The WAIT an acknowledged admin write ends with, built once (None: no wait).
        self._wait = (
            ("WAIT", write_replicas, max(1, round(write_timeout * 1000)))
            if write_replicas
            else None
        )
        self._acked_eval = acked_eval
        self._enforce = hot.register_script(_script("enforce.lua"))
        self._block = admin.register_script(_script("block.lua"))
        self._unblock = admin.register_script(_script("unblock.lua"))
        self._rename = admin.register_script(_script("rename.lua"))
        self._delete = admin.register_script(_script("delete.lua"))
        self._reindex = admin.register_script(_script("reindex.lua"))
        self._listing = DeviceListing(
            admin, self._keys, self._admin_call, node_timeout=self._admin_timeout
        )
        self._enforce_script = EnforceScript(
            self._keys,
            None if isinstance(pipeline, ClusterScripts) else (breaker or CircuitBreaker()),
            pipeline=pipeline,
            fallback=self._run_enforce,
            history_size=history_size,
            clock=clock,
            one_node=one_node,
        )
        # enforce(identity, client_ip, bucket, *, upload, registration=None) -> EnforceReply:
        # the data plane's call, compiled in the compiled build (store/enforce_script.py).
        self.enforce = self._enforce_script.enforce

    @classmethod
    def from_settings(
        cls, settings: RedisSettings, *, history_size: int = 50, clock: Clock | None = None
    ) -> Store:
        """Connect as configured (one server, a Sentinel service or a Redis Cluster:
        gateway.store.clients); `memory://` embeds an in-process Redis (fakeredis)."""
        topology = parse_redis_url(settings.url)
        if topology.kind == "memory":
            return cls.memory(
                key_prefix=settings.key_prefix, history_size=history_size, clock=clock
            )
        admin = redis_client(topology, ADMIN_TIMEOUT, decode=True)
        replicas = settings.write_replicas
        if replicas is None:
            replicas = 0 if topology.kind == "single" else 1
        return cls(
            redis_client(topology, settings.timeout, decode=False),
            admin,
            key_prefix=settings.key_prefix,
            timeout=settings.timeout,
            history_size=history_size,
            clock=clock,
            pipeline=script_caller(
                topology,
                _script("enforce.lua"),
                timeout=settings.timeout,
                batch=_script("enforce_batch.lua"),
            ),
            restore_blocks=settings.restore_blocks,
            one_node=topology.kind != "cluster",
            write_replicas=replicas,
            write_timeout=settings.write_timeout,
            acked_eval=(
                cluster_acked_eval(admin, topology, ADMIN_TIMEOUT)
                if topology.kind == "cluster"
                else None
            ),
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
        await close_client(self._hot)
        await close_client(self._admin)

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
        return device_from_hash(device_id, record) if K.FIELD_REQUESTS in record else None

    async def history(self, device_id: str) -> list[HistoryEntry] | None:
        """The device's changes, newest first; None when there is no record."""
        k = self._keys.device(device_id)
        async with self._admin.pipeline(transaction=False) as pipe:
            pipe.hexists(k.record, K.FIELD_REQUESTS)
            pipe.lrange(k.history, 0, -1)
            exists, entries = await self._admin_call(pipe.execute())
        if not exists:
            return None
        return [history_entry(raw) for raw in entries]

    async def rename(self, device_id: str, name: str | None) -> Device | None:
        """Set (or with None/"" clear) the custom name; None when there is no record."""
        k = self._keys.device(device_id)
        flat = await self._admin_call(self._rename((k.record, k.names), (device_id, name or "")))
        return device_from_flat(device_id, flat)

    async def block(self, device_id: str) -> Device:
        """Block the device (idempotent); creates the record for an id never seen."""
        return (await self.block_acked(device_id))[0]

    async def block_acked(self, device_id: str) -> tuple[Device, Replication]:
        """`block`, and how many replicas it reached before the answer (write_replicas)."""
        k = self._keys.device(device_id)
        flat, replication = await self._acked(
            self._block,
            (k.record, k.active, k.blocked, k.blocked_version),
            (self._enforce_script.now(), device_id, *self._events(device_id)),
        )
        device = device_from_flat(device_id, flat)
        assert device is not None  # block.lua always returns the record
        return device, replication

    async def _block_again(self, device_ids: Sequence[str]) -> None:
        """Block a chunk of ids in one bounded round trip (after Redis lost its data)."""
        async with self._admin.pipeline(transaction=False) as pipe:
            for device_id in device_ids:
                k = self._keys.device(device_id)
                await self._block(
                    (k.record, k.active, k.blocked, k.blocked_version),
                    (self._enforce_script.now(), device_id, *self._events(device_id)),
                    client=pipe,
                )
            await self._admin_call(pipe.execute())

    async def unblock(self, device_id: str) -> Device | None:
        """Unblock the device (idempotent); None when there is no record."""
        return (await self.unblock_acked(device_id))[0]

    async def unblock_acked(self, device_id: str) -> tuple[Device | None, Replication]:
        """`unblock`, and how many replicas it reached before the answer."""
        k = self._keys.device(device_id)
        flat, replication = await self._acked(
            self._unblock,
            (k.record, k.blocked, k.blocked_version),
            (device_id, *self._events(device_id)),
        )
        return device_from_flat(device_id, flat), replication

    async def delete(self, device_id: str) -> bool:
        """Remove the device and everything kept for it; False when there was no record."""
        return (await self.delete_acked(device_id))[0]

    async def delete_acked(self, device_id: str) -> tuple[bool, Replication]:
        """`delete`, and how many replicas it reached before the answer."""
        k = self._keys.device(device_id)
        removed, replication = await self._acked(
            self._delete,
            (k.record, k.history, k.active, k.blocked, k.names, k.blocked_version),
            (device_id, *self._events(device_id)),
        )
        return bool(removed), replication

    def _events(self, device_id: str) -> tuple[str, str]:
        """Where block.lua, unblock.lua and delete.lua publish a device's event, and how:
        its shard's channel by SPUBLISH on a cluster, else the one channel by PUBLISH."""
        sharded = not self._one_node
        channel = self._keys.device_channel(device_id, sharded=sharded)
        return channel, "SPUBLISH" if sharded else "PUBLISH"

    @staticmethod
    def _script_text(script: AsyncScript) -> str:
        text = script.script
        return text if isinstance(text, str) else bytes(text).decode()

    async def _acked(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> tuple[Any, Replication]:
        """Run an admin script; with write_replicas, then WAIT on the same connection for
        that many replicas, at most write_timeout (WAIT answers how many it reached)."""
        wait = self._wait
        if wait is None:
            return await self._admin_call(script(keys, args)), Replication(0, 0)
        if self._acked_eval is not None:  # a cluster: the slot's primary, one connection
            reply, reached = await self._admin_call(
                self._acked_eval(self._script_text(script), keys, args, wait)
            )
        else:
            async with self._admin.pipeline(transaction=False) as pipe:
                await script(keys, args, client=pipe)
                pipe.execute_command(*wait)
                reply, reached = await self._admin_call(pipe.execute())
        wanted = wait[1]
        replication = Replication(wanted, int(reached))
        if not replication.in_time:
            log.warning(
                "an admin write reached %d of %d replicas within %g s",
                replication.reached,
                wanted,
                self._write_timeout,
            )
        return reply, replication

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

    async def reindex(self, chunk: int = 500) -> int:
        """Put every device in the search indexes (records written before they existed);
        idempotent, in bounded calls of `chunk` ids. How many devices it went through."""
        done = 0
        for i in range(K.SHARDS):
            s = self._keys.shard(i)
            cursor = 0
            while True:
                cursor, entries = cast(
                    tuple[int, list[tuple[str, float]]],
                    await self._admin_call(self._admin.zscan(s.active, cursor, count=chunk)),
                )
                if entries:
                    ids = [member for member, _ in entries]
                    done += int(await self._admin_call(self._reindex((s.active, s.names), ids)))
                if cursor == 0:
                    break
        return done

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
        """One answer of the device list: its page, the total, the next page's cursor
        (gateway.store.listing says what each form costs)."""
        return await self._listing.page(
            name=name, blocked=blocked, page=page, amount=amount, after=after, match=match
        )
