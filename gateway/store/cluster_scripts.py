"""enforce.lua on a Redis Cluster: each call goes to the primary that owns its keys' slot,
over that primary's own pipelined connection (gateway.store.pipeline).

Every key of one call shares a hash tag (gateway.store.keys), so one slot, one node. The slot
map is asked of the cluster (CLUSTER SLOTS, any node that answers: the known ones first, then
the seeds) at the first call, and again, in the background and at most every
`REFRESH_GAP` seconds, after a MOVED reply or a failed call: while it is being learnt, a
call to a node that is gone fails as `StoreUnavailable` (on_error decides), never waits.

Each primary has its own circuit breaker (gateway.store.breaker): a primary that fails is
skipped at once, while the others serve their devices as before.

Redirects: MOVED (the slot has a new owner: the map is corrected at once and the call sent
there, once: a second MOVED fails the call), ASK (the slot is migrating and these keys have
left: the call goes to the importing node behind ASKING), TRYAGAIN (a migration holds some of
the keys: the call is sent to the slot's owner again after a short pause). ASK and TRYAGAIN
are followed while the call's time budget (`timeout`) lasts, then the call fails as
StoreUnavailable and `on_error` decides. A slot being migrated answers TRYAGAIN to every
call whose keys are not all on one side (a device's history or the shard's blocked index
often does not exist at all), so its devices wait for the migration's end, or the budget's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

from gateway.errors import StoreRedirect, StoreUnavailable
from gateway.redis_topology import NodeAddress, RedisTopology
from gateway.store.breaker import CircuitBreaker
from gateway.store.node_query import SLOTS_COUNT, ask, slot_map
from gateway.store.pipeline import Batching, ConnectTo, ScriptPipeline
from gateway.store.scripts import CROSS_SLOT
from gateway.store.slots import key_slot

log = logging.getLogger(__name__)

REFRESH_GAP: Final = 0.25  # seconds between two slot-map refreshes, however often asked
TRYAGAIN_PAUSE: Final = 0.005  # seconds before a TRYAGAIN call is sent again


class ClusterScripts:
    """Calls one script on a Redis Cluster, one pipelined connection per primary."""

    def __init__(
        self, topology: RedisTopology, script: str, *, timeout: float, batch: str | None = None
    ) -> None:
        self._topology = topology
        self._script = script
        # A node's batch spans its slots: flagged to reach them all, its keys in ARGV.
        self._batch = None if batch is None else Batching(CROSS_SLOT + batch, cross_slot=True)
        self._timeout = timeout
        self._slots: list[NodeAddress | None] = [None] * SLOTS_COUNT
        self._nodes: dict[NodeAddress, ScriptPipeline] = {}
        # One circuit breaker per primary: one failing node is skipped, not the cluster.
        self._breakers: dict[NodeAddress, CircuitBreaker] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = -REFRESH_GAP
        self._closed = False
        self._closing: set[asyncio.Future[None]] = set()

    async def connect(self) -> None:
        """Learn the slot map now (it is learnt at the first call otherwise)."""
        await self._learn()

    async def close(self) -> None:
        """Close every node's connection; calls in flight fail."""
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        for pipeline in self._nodes.values():
            await pipeline.close()

    async def call(self, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run the script on the node that owns the keys' slot; StoreUnavailable when the
        cluster cannot answer in time (each step bounded by the pipeline's timeout)."""
        slot = key_slot(keys[0])
        address = self._slots[slot]
        if address is None:
            await self._learn()
            address = self._slots[slot]
            if address is None:
                raise StoreUnavailable(f"no Redis Cluster node serves slot {slot}")
        breaker = self._breakers.get(address)
        if breaker is None:
            breaker = self._breakers[address] = CircuitBreaker()
        if not breaker.allow():
            self.refresh_soon()  # its slots may have a new primary by now
            raise StoreUnavailable(f"Redis node {address} is failing; its breaker skips it")
        try:
            reply = await self._pipeline(address).call(keys, args)
        except StoreRedirect as redirect:
            breaker.success()  # the node answered
            return await self._follow(redirect, keys, args)
        except StoreUnavailable:
            breaker.failure()
            self.refresh_soon()  # the node may be gone: learn who serves its slots now
            raise
        except BaseException:
            breaker.abandon()  # cancelled: neither a success nor a failure of the node
            raise
        breaker.success()
        return reply

    async def _follow(
        self, redirect: StoreRedirect, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        """Follow redirects while the call's time budget lasts: MOVED once (a second one
        fails the call), ASK and TRYAGAIN for as long as a migration of the slot goes on."""
        deadline = time.monotonic() + self._timeout
        moved = False
        while True:
            if redirect.kind == "MOVED":
                if moved:
                    raise redirect
                moved = True
                target = NodeAddress(redirect.host, redirect.port)
                if 0 <= redirect.slot < SLOTS_COUNT:
                    self._slots[redirect.slot] = target
                self.refresh_soon()  # one MOVED often means many slots moved
                call = self._pipeline(target).call(keys, args)
            elif redirect.kind == "ASK":
                target = NodeAddress(redirect.host, redirect.port)
                call = self._pipeline(target).call(keys, args, asking=True)
            else:  # TRYAGAIN: the slot is half moved; ask its owner again shortly
                if time.monotonic() + TRYAGAIN_PAUSE >= deadline:
                    raise redirect
                await asyncio.sleep(TRYAGAIN_PAUSE)
                owner = self._slots[key_slot(keys[0])]
                if owner is None:
                    raise redirect
                call = self._pipeline(owner).call(keys, args)
            try:
                return await call
            except StoreRedirect as again:
                if time.monotonic() >= deadline:
                    raise
                redirect = again

    def _pipeline(self, address: NodeAddress) -> ScriptPipeline:
        pipeline = self._nodes.get(address)
        if pipeline is None:
            t = self._topology
            to = ConnectTo(
                address.host, address.port, tls=t.tls, username=t.username, password=t.password
            )
            pipeline = self._nodes[address] = ScriptPipeline.fixed(
                to, self._script, timeout=self._timeout, batch=self._batch
            )
        return pipeline

    # -- the slot map ----------------------------------------------------------------------

    def refresh_soon(self) -> None:
        """Learn the slot map again in the background (at most once per REFRESH_GAP)."""
        if self._closed or self._refreshing is not None:
            return
        if time.monotonic() - self._last_refresh < REFRESH_GAP:
            return
        self._start_refresh()

    async def _learn(self) -> None:
        """Learn the slot map now: callers that ask together share one refresh."""
        if self._closed:
            raise StoreUnavailable("store closed")
        refreshing = self._refreshing or self._start_refresh()
        await asyncio.shield(refreshing)

    def _start_refresh(self) -> asyncio.Future[None]:
        self._last_refresh = time.monotonic()
        task = self._refreshing = asyncio.ensure_future(self._refresh())
        task.add_done_callback(self._refreshed)
        return task

    def _refreshed(self, task: asyncio.Future[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("the Redis Cluster's slot map could not be learnt: %s", exc)

    async def _refresh(self) -> None:
        """Ask the known primaries, then the seeds, for CLUSTER SLOTS. The first answer that
        covers every slot replaces the map; failing that, the one that covers most.
        StoreUnavailable when no node answers."""
        t = self._topology
        known = [a for a in dict.fromkeys(self._slots) if a is not None]
        best: list[NodeAddress | None] | None = None
        last: StoreUnavailable | None = None
        for address in dict.fromkeys([*known, *t.seeds]):
            try:
                (reply,) = await ask(
                    address,
                    [("CLUSTER", "SLOTS")],
                    timeout=self._timeout,
                    tls=t.tls,
                    username=t.username,
                    password=t.password,
                )
            except StoreUnavailable as exc:
                last = exc
                continue
            slots = slot_map(reply, address)
            if None not in slots:
                self._apply(slots)
                return
            if best is None or slots.count(None) < best.count(None):
                best = slots  # a node that lost touch with part of the cluster
        if best is not None:
            self._apply(best)
            return
        raise last or StoreUnavailable("no Redis Cluster node answered")

    def _apply(self, slots: list[NodeAddress | None]) -> None:
        self._slots = slots
        serving = set(slots)
        for address in [a for a in self._nodes if a not in serving]:
            # A node that serves no slot any more (failed over, removed): close it.
            closing = asyncio.ensure_future(self._nodes.pop(address).close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
