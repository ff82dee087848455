"""Blocked stays blocked when Redis cannot answer; the breaker spares the timeout in an outage."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal, cast

import aiohttp
import pytest
import redis

from gateway.config import RedisSettings, parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.errors import StoreUnavailable
from gateway.store import Store
from gateway.store.blocked import BlockedSeed, BlockedSet, BlockedStatus
from gateway.store.keys import SHARDS, KeySchema
from gateway.store.reset import RESTORE_CHUNK, StoreReset
from tests.rig.clock import FakeClock
from tests.rig.engine_fixtures import RedisEngine, all_ports, primary_port_for
from tests.rig.redis_cluster import RedisCluster
from tests.rig.redis_server import RedisServer, calls, command_stats
from tests.rig.upstream import CountingUpstream
from tests.rig.waits import until, until_async

pytestmark = pytest.mark.integration

WAIT = 10.0


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


def fewest_subscribers(engine: RedisEngine, keys: KeySchema) -> int:
    """The fewest subscribers any channel of block events has, over every node of the
    engine (the shards' own channels on a cluster, the one channel elsewhere)."""
    sharded = isinstance(engine, RedisCluster)
    channels = [keys.shard_channel(i) for i in range(SHARDS)] if sharded else [keys.blocked_channel]
    counts = dict.fromkeys(channels, 0)
    for port in all_ports(engine):
        with redis.Redis(port=port, socket_timeout=WAIT) as raw:
            command = "SHARDNUMSUB" if sharded else "NUMSUB"
            reply = raw.execute_command("PUBSUB", command, *channels)
        for name, count in zip(reply[::2], reply[1::2], strict=True):
            counts[name.decode()] += int(count)
    return min(counts.values())


@pytest.mark.timing
async def test_blocks_reach_other_processes_at_once_through_pubsub(
    redis_engine: RedisEngine,
) -> None:
    """On each engine: a block, an unblock and the delete of a blocked device reach a
    following process through pub/sub (its poll is out of the way)."""
    settings = RedisSettings(url=redis_engine.url, timeout=1.0, write_replicas=0)
    follower = Store.from_settings(settings)
    follower.blocked._poll_interval = 30.0  # only the first poll: the rest is pub/sub
    admin = Store.from_settings(settings)
    await follower.start(follow_blocked=True)
    await asyncio.wait_for(follower.blocked.synced.wait(), WAIT)
    await until(lambda: fewest_subscribers(redis_engine, admin.keys) > 0, "the subscription")
    await admin.block("phone-1")
    assert await until(lambda: "phone-1" in follower.blocked, "the block") < 0.5
    await admin.unblock("phone-1")
    assert await until(lambda: "phone-1" not in follower.blocked, "the unblock") < 0.5
    await admin.block("phone-2")
    await until(lambda: "phone-2" in follower.blocked, "the second block")
    await admin.delete("phone-2")
    assert await until(lambda: "phone-2" not in follower.blocked, "the delete") < 0.5
    await follower.close()
    await admin.close()


@pytest.mark.timing
async def test_a_missed_message_is_caught_up_by_the_poll(redis_engine: RedisEngine) -> None:
    """On each engine: a block whose message never arrived is learnt by the poll."""
    settings = RedisSettings(url=redis_engine.url, timeout=1.0, write_replicas=0)
    admin = Store.from_settings(settings)
    await admin.block("early")  # blocked before the follower starts: the first poll reads it
    follower = Store.from_settings(settings)
    await follower.start(follow_blocked=True)
    await asyncio.wait_for(follower.blocked.synced.wait(), WAIT)
    assert "early" in follower.blocked
    # A block whose message never arrived: the index and the shard version, no publish,
    # written on the node that holds the device's keys.
    keys = admin.keys.device("quiet")
    with redis.Redis(port=primary_port_for(redis_engine, keys.record)) as raw:
        raw.hset(keys.record, mapping={"rc": 0, "dc": 0, "b": 1})
        raw.zadd(keys.blocked, {"quiet": 1})
        raw.incr(keys.blocked_version)
    took = await until(lambda: "quiet" in follower.blocked, "the poll")
    assert took < 1.5
    assert len(follower.blocked) == 2
    await follower.close()
    await admin.close()


async def test_a_poll_on_one_node_is_one_mget(own_redis: RedisServer) -> None:
    """Every process polls once a second: on one server (and Sentinel) the epoch marker and
    the 256 shard versions are one MGET, not 257 commands through redis-py's pipeline, and
    a block whose message was missed is still found by it."""
    store = Store.from_settings(RedisSettings(url=own_redis.url, timeout=1.0))
    await store.blocked.poll()  # the first: sets the epoch marker
    keys = store.keys.device("missed")
    with redis.Redis(port=own_redis.port) as raw:
        raw.hset(keys.record, mapping={"rc": 0, "b": 1})
        raw.zadd(keys.blocked, {"missed": 1})
        raw.incr(keys.blocked_version)
        raw.config_resetstat()
    await store.blocked.poll()
    assert "missed" in store.blocked
    stats = command_stats(own_redis)
    assert calls(stats, "mget") == 1
    assert calls(stats, "get") <= 1  # the epoch, read again after the shard that moved
    assert calls(stats, "zrange") == 1  # only the shard that moved
    await store.close()


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_a_blocked_device_stays_blocked_while_redis_is_down(
    own_redis: RedisServer,
    upstream: CountingUpstream,
    on_error: Literal["open", "closed"],
) -> None:
    origin = upstream.url
    settings = parse_config(
        f"upstream: {{url: '{origin}'}}\nredis: {{url: '{own_redis.url}', timeout: 0.1, "
        f"on_error: {on_error}}}",
        "test",
    )
    store = Store.from_settings(settings.redis)
    await store.start(follow_blocked=True)
    plane = DataPlane(settings, store)
    server = await start_public(plane, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
    try:
        await store.block("stolen")
        await until(lambda: "stolen" in store.blocked, "the local copy")
        await asyncio.to_thread(own_redis.kill)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
            statuses = []
            for _ in range(20):
                async with http.get(url, headers={"X-Device-Id": "stolen"}) as r:
                    statuses.append(r.status)
            async with http.get(url, headers={"X-Device-Id": "honest"}) as r:
                honest = r.status
        assert statuses == [403] * 20
        assert "stolen" not in [s.device_id for s in upstream.seen]  # none reached it
        assert honest == (200 if on_error == "open" else 503)
    finally:
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
        await store.close()


@pytest.mark.timing
async def test_the_breaker_spares_requests_the_timeout_and_recovers_within_a_second(
    own_redis: RedisServer, upstream: CountingUpstream
) -> None:
    origin = upstream.url
    settings = parse_config(
        f"upstream: {{url: '{origin}'}}\nredis: {{url: '{own_redis.url}', timeout: 0.2}}",
        "test",
    )
    store = Store.from_settings(settings.redis)
    await store.start(follow_blocked=True)  # known blocked ids: on_error decides in the outage
    await asyncio.wait_for(store.blocked.synced.wait(), WAIT)
    plane = DataPlane(settings, store)
    server = await start_public(plane, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
    headers = {"X-Device-Id": "d1"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
            async with http.get(url, headers=headers) as r:
                assert "RateLimit" in r.headers
            own_redis.freeze()
            try:
                took = []
                for _ in range(10):
                    started = time.monotonic()
                    async with http.get(url, headers=headers) as r:
                        assert r.status == 200  # on_error: open
                    took.append(time.monotonic() - started)
            finally:
                own_redis.thaw()
            assert all(t < 0.2 + 0.15 for t in took)  # never more than the timeout
            assert sum(t > 0.15 for t in took) <= 4  # after 3 failures: the breaker skips
            assert max(took[4:]) < 0.1

            # Redis is back: within a second a probe goes through and enforcement resumes.
            async def enforced() -> bool:
                async with http.get(url, headers=headers) as r:
                    return "RateLimit" in r.headers

            await until_async(enforced, "enforcement to resume", timeout=1.5, every=0.05)
    finally:
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
        await store.close()


# ---------------------------------------------------------------- knowing the ids, resets


@pytest.fixture
async def shared() -> AsyncIterator[tuple[Store, Any]]:
    """An embedded store, and a raw client of the same fakeredis server (to flush it)."""
    import fakeredis

    server = fakeredis.FakeServer()
    store = Store.memory(server=server)
    raw = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    yield store, raw
    await store.close()
    await raw.aclose()


def follower(store: Store, *, restore: bool = True) -> BlockedSet:
    """A BlockedSet over the store's Redis that is polled by hand (never started)."""
    return BlockedSet(
        store._admin,
        store.keys,
        restore=store._block_again if restore else None,
        clock=FakeClock().millis,
    )


def test_unknown_until_seeded_then_known_from_the_seed() -> None:
    blocked = BlockedSet(cast(Any, None), KeySchema("dg"), clock=FakeClock().millis)
    changes: list[BlockedStatus] = []
    blocked.watch(lambda: changes.append(blocked.status()))
    assert not blocked.known and blocked.handover() is None
    blocked.seed(BlockedSeed(frozenset({"a", "b"}), "e1", "snapshot", 1000))
    assert blocked.status().known and "a" in blocked and len(blocked) == 2
    assert [(c.source, c.count, c.epoch) for c in changes] == [("snapshot", 2, "e1")]
    assert blocked.handover() == BlockedSeed(frozenset({"a", "b"}), "e1", "supervisor", 1000)


async def test_the_first_poll_of_a_new_redis_sets_the_epoch_and_knows_the_ids(
    shared: tuple[Store, Any],
) -> None:
    store, raw = shared
    await store.block("b1")
    blocked = follower(store)
    await blocked.poll()
    status = blocked.status()
    assert (status.source, status.count, status.resets) == ("redis", 1, 0)
    assert status.epoch is not None and status.epoch == await raw.get(store.keys.epoch)
    other = follower(store)
    await other.poll()
    assert other.epoch == blocked.epoch  # a second process adopts the first one's marker
    blocked.seed(BlockedSeed(frozenset(), None, "snapshot", 0))
    assert blocked.status().source == "redis" and "b1" in blocked  # Redis outranks a seed


async def test_a_reset_is_reported_once_the_ids_kept_and_blocked_again(
    shared: tuple[Store, Any], caplog: pytest.LogCaptureFixture
) -> None:
    store, raw = shared
    for device_id in ("b1", "b2", "b3"):
        await store.block(device_id)
    blocked = follower(store)
    await blocked.poll()
    before = blocked.epoch
    await raw.flushall()
    with caplog.at_level(logging.INFO, logger="gateway.store.blocked"):
        await blocked.poll()
        await blocked.poll()  # the next poll reads the restored indexes: no new detection
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "3 blocked ids known here" in errors[0].getMessage()
    status = blocked.status()
    assert (status.resets, status.restored, status.count) == (1, 3, 3)
    assert status.last_reset == StoreReset(FakeClock().now_ms, before or "", None, 3, True, 3, True)
    assert status.epoch == await raw.get(store.keys.epoch) != before
    for device_id in ("b1", "b2", "b3"):
        device = await store.get_device(device_id)
        assert device is not None and device.blocked


async def test_a_marker_set_by_another_process_means_follow_redis_never_restore(
    shared: tuple[Store, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # What this process remembers may be old (a snapshot written before operators
    # unblocked devices): whoever marked the new dataset restored what it knew.
    store, raw = shared
    for device_id in ("b1", "b2"):
        await store.block(device_id)
    blocked = follower(store)
    await blocked.poll()
    await raw.flushall()
    await raw.set(store.keys.epoch, "someone-else")
    await store.block("b3")  # blocked in the new dataset; b1 and b2 were not restored
    with caplog.at_level(logging.INFO, logger="gateway.store.blocked"):
        await blocked.poll()
    assert [r for r in caplog.records if r.levelno == logging.ERROR] == []
    assert any("another dataset" in r.getMessage() for r in caplog.records)
    status = blocked.status()
    assert (status.resets, status.restored, status.epoch) == (1, 0, "someone-else")
    assert sorted(blocked.ids()) == ["b3"]  # Redis, not the old memory
    assert await store.get_device("b1") is None


async def test_without_restore_blocks_a_reset_is_only_reported(
    shared: tuple[Store, Any], caplog: pytest.LogCaptureFixture
) -> None:
    store, raw = shared
    await store.block("b1")
    blocked = follower(store, restore=False)
    await blocked.poll()
    await raw.flushall()
    with caplog.at_level(logging.ERROR, logger="gateway.store.blocked"):
        await blocked.poll()
    assert "not restored (redis.restore_blocks is false)" in caplog.records[0].getMessage()
    assert await store.get_device("b1") is None
    status = blocked.status()
    assert (status.resets, status.restored) == (1, 0)
    assert status.last_reset is not None and status.last_reset.done
    await blocked.poll()  # the new dataset is followed: Redis holds no block any more
    assert blocked.status().count == 0 and blocked.status().resets == 1


async def test_a_restore_that_fails_is_retried_without_a_second_report(
    shared: tuple[Store, Any], caplog: pytest.LogCaptureFixture
) -> None:
    store, raw = shared
    ids = [f"b{i}" for i in range(RESTORE_CHUNK + 5)]  # two chunks
    for device_id in ids:
        await store.block(device_id)
    failures = [StoreUnavailable("Redis did not answer within 5 s")]

    async def flaky(chunk: Sequence[str]) -> None:
        if len(chunk) < RESTORE_CHUNK and failures:  # the second chunk fails once
            raise failures.pop()
        await store._block_again(chunk)

    blocked = BlockedSet(store._admin, store.keys, restore=flaky, clock=FakeClock().millis)
    await blocked.poll()
    await raw.flushall()
    with caplog.at_level(logging.WARNING, logger="gateway.store.blocked"):
        with pytest.raises(StoreUnavailable):
            await blocked.poll()
        reset = blocked.status().last_reset
        assert reset is not None and (reset.restored, reset.done) == (RESTORE_CHUNK, False)
        await blocked.poll()
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING", "WARNING"]
    assert "retrying" in caplog.records[1].getMessage()
    status = blocked.status()
    assert (status.resets, status.restored, status.count) == (1, len(ids), len(ids))
    assert status.last_reset is not None and status.last_reset.done
    assert len(await raw.zrange(store.keys.device("b0").blocked, 0, -1)) >= 1


async def test_a_suspected_reset_is_looked_for_at_once(shared: tuple[Store, Any]) -> None:
    store, raw = shared
    await store.block("b1")
    blocked = BlockedSet(
        store._admin,
        store.keys,
        restore=store._block_again,
        poll_interval=30.0,
        clock=FakeClock().millis,
    )
    blocked.start()
    try:
        await asyncio.wait_for(blocked.synced.wait(), WAIT)
        await raw.flushall()
        blocked.suspect_reset()  # the data plane saw a new record for "b1"
        await until(lambda: blocked.status().resets == 1, "the reset found", timeout=WAIT)
        await until(lambda: blocked.status().restored == 1, "the block restored", timeout=WAIT)
    finally:
        await blocked.close()


@pytest.mark.timing
async def test_every_process_learns_of_a_block_within_10_ms_on_each_engine(
    redis_engine: RedisEngine,
) -> None:
    """Four following processes (stores of their own, the poll out of the way): each learns
    of a block and of an unblock within 10 ms of the admin's call, on one server, a
    cluster (the script's PUBLISH crosses the cluster bus) and Sentinel."""
    settings = RedisSettings(url=redis_engine.url, timeout=1.0, write_replicas=0)
    followers = [Store.from_settings(settings) for _ in range(4)]
    admin = Store.from_settings(settings)
    try:
        for follower in followers:
            follower.blocked._poll_interval = 30.0  # only the first poll: the rest is pub/sub
            await follower.start(follow_blocked=True)
            await asyncio.wait_for(follower.blocked.synced.wait(), WAIT)
        await until(
            lambda: fewest_subscribers(redis_engine, admin.keys) >= len(followers),
            "the subscriptions",
        )
        ids = ("fast-1", "fast-2", "fast-3")
        for device_id in ids:  # the admin client's first calls on a node connect and load
            await admin.block(device_id)  # the scripts there: not what is measured
            await admin.unblock(device_id)
        await until(
            lambda: all(not f.blocked.known or "fast-3" not in f.blocked for f in followers),
            "quiet",
        )
        took: list[float] = []
        for device_id in ids:
            for change, seen in ((admin.block, True), (admin.unblock, False)):
                started = time.monotonic()
                await change(device_id)
                while any((device_id in f.blocked) is not seen for f in followers):
                    assert time.monotonic() - started < WAIT, "never learnt"
                    await asyncio.sleep(0.0005)
                took.append(time.monotonic() - started)
        ms = sorted(round(t * 1000, 2) for t in took)
        print(f"figure ms from the admin call to the last follower: {ms}")
        # 10 ms as a rule; one slow scheduling of a loaded 2-vCPU machine is let go.
        assert statistics.median(took) < 0.010 and sorted(took)[-2] < 0.010, took
        assert max(took) < 0.050, took
    finally:
        for store in (*followers, admin):
            await store.close()
