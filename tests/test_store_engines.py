"""The store on real distributed engines: a 3+3 Redis Cluster and a Sentinel-watched primary.

What one server gives must hold on both: enforce.lua in one call per request, the admin's
calls, listing merged across nodes, the blocked ids followed. And what only they can do:
the cluster's redirects (MOVED, ASK) followed once, a failed-over primary found again
without a restart, on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from pytest_aiohttp.plugin import AiohttpClient

from gateway.admin import create_admin_app
from gateway.admin.routes import REPLICATED_HEADER, replicated
from gateway.config import RedisSettings
from gateway.errors import StoreUnavailable
from gateway.model import Bucket, DeviceIdentity, Replication, ReplyCode
from gateway.store import Store
from gateway.store.cluster_scripts import ClusterScripts
from gateway.store.keys import KeySchema
from gateway.store.slots import key_slot
from tests.rig.redis_cluster import RedisCluster
from tests.rig.redis_sentinel import RedisSentinel
from tests.rig.redis_server import RedisServer
from tests.rig.waits import WAIT, until, until_async

pytestmark = pytest.mark.integration

BUCKET = Bucket(rate=1000, burst=1000)
REGISTRATION = Bucket(rate=1.0, burst=2)
KEYS = KeySchema("dg")
TOKEN = "engines-admin-token-0123456789abcdef"


def ident(device_id: str) -> DeviceIdentity:
    return DeviceIdentity(device_id, "app", "1.0", None, None, None, None)


async def enforce(store: Store, device_id: str) -> ReplyCode:
    """One request of the device, as the data plane asks for it: what Redis decided."""
    reply = await store.enforce(ident(device_id), "198.51.100.7", BUCKET, upload=False)
    return reply.outcome


def open_store(url: str) -> Store:
    return Store.from_settings(RedisSettings(url=url, timeout=1.0))


@pytest.fixture
async def cluster_store(real_cluster: RedisCluster) -> AsyncIterator[Store]:
    store = open_store(real_cluster.url)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def sentinel_store(real_sentinel: RedisSentinel) -> AsyncIterator[Store]:
    store = open_store(real_sentinel.url)
    await store.start()
    yield store
    await store.close()


def router(store: Store) -> ClusterScripts:
    caller = store._pipeline
    assert isinstance(caller, ClusterScripts)
    return caller


def ids_on_every_primary(cluster: RedisCluster, per_primary: int = 3) -> list[str]:
    """Device ids whose records live on each primary, `per_primary` of each."""
    found: dict[int, list[str]] = {}
    n = 0
    primaries = {node.port for node in cluster.nodes if node.role == "primary"}
    while any(len(found.get(p, [])) < per_primary for p in primaries):
        device_id = f"dev-{n}"
        n += 1
        port = cluster.primary_for_key(KEYS.device(device_id).record)
        if len(found.setdefault(port, [])) < per_primary:
            found[port].append(device_id)
    return [device_id for ids in found.values() for device_id in ids]


def evalsha_calls(port: int) -> int:
    with redis.Redis(port=port, socket_timeout=WAIT) as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


# ---------------------------------------------------------------- cluster


async def test_cluster_devices_on_every_primary_one_call_each(
    real_cluster: RedisCluster, cluster_store: Store
) -> None:
    ids = ids_on_every_primary(real_cluster)
    for device_id in ids:
        assert await enforce(cluster_store, device_id) is ReplyCode.ALLOW
    before = {
        p: evalsha_calls(p)
        for p in {real_cluster.primary_for_key(KEYS.device(i).record) for i in ids}
    }
    for device_id in ids:
        assert await enforce(cluster_store, device_id) is ReplyCode.ALLOW
    after = {p: evalsha_calls(p) for p in before}
    assert sum(after.values()) - sum(before.values()) == len(ids)  # one call per request
    assert all(after[p] > before[p] for p in before)  # each went to its own primary
    for device_id in ids:
        device = await cluster_store.get_device(device_id)
        assert device is not None and device.request_count == 2


async def test_cluster_admin_calls_and_listing_across_nodes(
    real_cluster: RedisCluster, cluster_store: Store
) -> None:
    ids = ids_on_every_primary(real_cluster, per_primary=4)
    for device_id in ids:
        await enforce(cluster_store, device_id)
    devices, total = await cluster_store.list_devices(amount=100)
    assert total == len(ids) and {d.id for d in devices} == set(ids)
    blocked = ids[::3]
    for device_id in blocked:
        assert (await cluster_store.block(device_id)).blocked
    assert await enforce(cluster_store, blocked[0]) is ReplyCode.BLOCKED
    only, count = await cluster_store.list_devices(blocked="only", amount=100)
    assert count == len(blocked) and {d.id for d in only} == set(blocked)
    renamed = await cluster_store.rename(ids[1], "Kitchen Tablet")
    assert renamed is not None and renamed.name == "Kitchen Tablet"
    found, _ = await cluster_store.list_devices(name="kitchen", amount=10)
    assert [d.id for d in found] == [ids[1]]
    assert await cluster_store.unblock(blocked[0]) is not None
    assert await enforce(cluster_store, blocked[0]) is ReplyCode.ALLOW
    assert await cluster_store.delete(ids[2])
    assert await cluster_store.get_device(ids[2]) is None


async def test_cluster_registration_budget_spans_two_slots(cluster_store: Store) -> None:
    for device_id in ("n1", "n2"):
        reply = await cluster_store.enforce(
            ident(device_id), "198.51.100.9", BUCKET, upload=False, registration=REGISTRATION
        )
        assert reply.outcome is ReplyCode.ALLOW
    refused = await cluster_store.enforce(
        ident("n3"), "198.51.100.9", BUCKET, upload=False, registration=REGISTRATION
    )
    assert (refused.outcome, refused.policy) == (ReplyCode.LIMITED, "registration")
    assert await cluster_store.get_device("n3") is None


async def test_cluster_moved_is_followed_once_and_corrects_the_map(
    real_cluster: RedisCluster, cluster_store: Store
) -> None:
    await enforce(cluster_store, "moved-1")
    scripts = router(cluster_store)
    slot = key_slot(KEYS.device("moved-1").record)
    right = scripts._slots[slot]
    wrong = next(a for a in set(scripts._slots) if a is not None and a != right)
    scripts._slots[slot] = wrong  # as if the slot had moved since the map was learnt
    assert await enforce(cluster_store, "moved-1") is ReplyCode.ALLOW
    assert scripts._slots[slot] == right


async def test_cluster_batch_entry_of_a_moved_slot_goes_alone_and_follows_moved(
    real_cluster: RedisCluster, cluster_store: Store
) -> None:
    """A node's batch carries the keys of its slots in ARGV, where Redis cannot redirect:
    the entry of a slot the node does not serve fails alone, is sent again alone with its
    keys declared, meets MOVED and is followed; the batch's other calls are answered."""
    ids = ids_on_every_primary(real_cluster)
    for device_id in ids:
        assert await enforce(cluster_store, device_id) is ReplyCode.ALLOW
    scripts = router(cluster_store)
    moved = ids[0]
    slot = key_slot(KEYS.device(moved).record)
    right = scripts._slots[slot]
    wrong = next(a for a in set(scripts._slots) if a is not None and a != right)
    scripts._slots[slot] = wrong  # as if the slot had moved since the map was learnt
    beside = [d for d in ids if scripts._slots[key_slot(KEYS.device(d).record)] == wrong]
    assert len(beside) >= 3  # the batch that goes to the wrong node: the moved id among them
    outcomes = await asyncio.gather(*(enforce(cluster_store, d) for d in beside))
    assert set(outcomes) == {ReplyCode.ALLOW}
    assert scripts._slots[slot] == right
    for device_id in beside:
        device = await cluster_store.get_device(device_id)
        assert device is not None and device.request_count == 2  # each counted once


async def test_cluster_calls_ride_through_a_slot_migration(
    real_cluster: RedisCluster, cluster_store: Store
) -> None:
    """While the slot moves, the source answers ASK or TRYAGAIN and the target TRYAGAIN
    (some of the keys are elsewhere or missing): the call waits out the migration within its
    budget, then meets MOVED and follows it."""
    device_id = "migrating-1"
    await enforce(cluster_store, device_id)
    record = KEYS.device(device_id).record
    slot = key_slot(record)
    source = real_cluster.primary_for_slot(slot)
    target = next(n.port for n in real_cluster.nodes if n.role == "primary" and n.port != source)
    real_cluster.begin_migration(slot, target)
    real_cluster.migrate_keys(slot, source, target)
    call = asyncio.ensure_future(enforce(cluster_store, device_id))
    await asyncio.sleep(0.1)  # the scenario: the call is in flight during the migration
    assert not call.done()
    await asyncio.to_thread(real_cluster.finish_migration, slot, source, target)
    assert await asyncio.wait_for(call, WAIT) is ReplyCode.ALLOW
    assert await enforce(cluster_store, device_id) is ReplyCode.ALLOW
    assert router(cluster_store)._slots[slot].port == target  # type: ignore[union-attr]
    device = await cluster_store.get_device(device_id)
    assert device is not None and device.request_count == 3  # nothing lost on the way


async def test_cluster_ask_is_followed_for_keys_that_moved(
    real_cluster: RedisCluster, cluster_store: Store
) -> None:
    """Every key of the call on the importing node: ASK, then ASKING + the call there."""
    device_id = "asked-1"
    await enforce(cluster_store, device_id)
    newer = DeviceIdentity(device_id, "app", "2.0", None, None, None, None)
    await cluster_store.enforce(newer, "198.51.100.7", BUCKET, upload=False)  # history
    await cluster_store.block(device_id)  # the shard's blocked index
    keys = KEYS.enforce(device_id)
    slot = key_slot(keys[0])
    source = real_cluster.primary_for_slot(slot)
    target = next(n.port for n in real_cluster.nodes if n.role == "primary" and n.port != source)
    real_cluster.begin_migration(slot, target)
    try:
        real_cluster.migrate_keys(slot, source, target)
        with redis.Redis(port=target, socket_timeout=WAIT) as client:
            client.execute_command("ASKING")
            assert client.exists(*keys) == len(keys)  # the whole call can run there
        assert await enforce(cluster_store, device_id) is ReplyCode.BLOCKED
    finally:
        await asyncio.to_thread(real_cluster.finish_migration, slot, source, target)
    assert router(cluster_store)._slots[slot].port == source  # type: ignore[union-attr]
    assert await enforce(cluster_store, device_id) is ReplyCode.BLOCKED  # MOVED now
    device = await cluster_store.get_device(device_id)
    assert device is not None and device.request_count == 4 and device.denied_count == 2


async def test_cluster_primary_killed_enforcement_resumes_after_failover(
    real_cluster: RedisCluster, cluster_store: Store
) -> None:
    device_id = "failover-1"
    await enforce(cluster_store, device_id)
    record = KEYS.device(device_id).record
    port = real_cluster.primary_for_key(record)
    with redis.Redis(port=port, socket_timeout=WAIT) as client:
        client.execute_command("WAIT", 1, 2000)  # the record has reached the replica
    real_cluster.kill_primary(port)
    with pytest.raises(StoreUnavailable):
        await enforce(cluster_store, device_id)
    real_cluster.wait_failover(port)
    outcomes: list[ReplyCode] = []

    async def resumed() -> bool:
        try:
            outcomes.append(await enforce(cluster_store, device_id))
        except StoreUnavailable:
            return False
        return True

    started = asyncio.get_running_loop().time()
    while not await resumed():
        assert asyncio.get_running_loop().time() - started < 2.0, "not resumed in 2 s"
        await asyncio.sleep(0.05)
    assert outcomes[-1] is ReplyCode.ALLOW
    device = await cluster_store.get_device(device_id)
    assert device is not None and device.request_count >= 2  # the record survived


async def test_cluster_block_is_followed_by_another_process(
    real_cluster: RedisCluster, cluster_store: Store
) -> None:
    follower = open_store(real_cluster.url)
    await follower.start(follow_blocked=True)
    try:
        await asyncio.wait_for(follower.blocked.synced.wait(), WAIT)
        ids = ids_on_every_primary(real_cluster, per_primary=1)
        for device_id in ids:
            await cluster_store.block(device_id)
        await until(lambda: all(i in follower.blocked for i in ids), "the blocks to be followed")
        await cluster_store.unblock(ids[0])
        await until(lambda: ids[0] not in follower.blocked, "the unblock to be followed")
    finally:
        await follower.close()


# ---------------------------------------------------------------- sentinel


async def test_sentinel_store_enforces_and_serves_the_admin(sentinel_store: Store) -> None:
    for device_id in ("s1", "s2", "s3"):
        assert await enforce(sentinel_store, device_id) is ReplyCode.ALLOW
    await sentinel_store.block("s2")
    assert await enforce(sentinel_store, "s2") is ReplyCode.BLOCKED
    _, total = await sentinel_store.list_devices()
    assert total == 3
    reply = await sentinel_store.enforce(
        ident("s4"), "198.51.100.9", BUCKET, upload=False, registration=REGISTRATION
    )
    assert reply.outcome is ReplyCode.ALLOW and reply.new_device


async def test_sentinel_failover_is_followed_without_a_restart(
    real_sentinel: RedisSentinel, sentinel_store: Store
) -> None:
    await enforce(sentinel_store, "f1")
    await sentinel_store.block("f2")
    with redis.Redis(port=real_sentinel.primary_port(), socket_timeout=WAIT) as client:
        client.execute_command("WAIT", 1, 2000)
    real_sentinel.kill_primary()
    with pytest.raises(StoreUnavailable):
        await enforce(sentinel_store, "f1")
    real_sentinel.wait_failover()

    async def data_plane_back() -> bool:
        try:
            return await enforce(sentinel_store, "f1") is ReplyCode.ALLOW
        except StoreUnavailable:
            return False

    started = asyncio.get_running_loop().time()
    while not await data_plane_back():
        assert asyncio.get_running_loop().time() - started < 2.0, "not resumed in 2 s"
        await asyncio.sleep(0.05)
    assert await enforce(sentinel_store, "f2") is ReplyCode.BLOCKED  # the block survived
    device = await sentinel_store.get_device("f1")  # the admin side follows too
    assert device is not None and device.request_count >= 2
    real_sentinel.restart_old_primary()


# ---------------------------------------------------------------- acknowledged writes


def acked_store(url: str, replicas: int | None = None) -> Store:
    settings = RedisSettings(url=url, timeout=1.0, write_replicas=replicas, write_timeout=0.5)
    return Store.from_settings(settings)


@pytest.mark.parametrize("engine", ["cluster", "sentinel"])
async def test_block_unblock_delete_wait_for_a_replica_by_default(
    engine: str, request: pytest.FixtureRequest
) -> None:
    deployment: RedisCluster | RedisSentinel = request.getfixturevalue(f"real_{engine}")
    store = acked_store(deployment.url)  # auto: one replica on a cluster or Sentinel
    await store.start()
    try:
        device, replication = await store.block_acked("acked-1")
        assert device.blocked and (replication.wanted, replication.in_time) == (1, True)
        assert device == await store.get_device("acked-1")  # the reply decoded as usual
        device_after, replication = await store.unblock_acked("acked-1")
        assert device_after is not None and not device_after.blocked
        assert replication.in_time
        removed, replication = await store.delete_acked("acked-1")
        assert removed and replication.in_time
    finally:
        await store.close()


async def test_a_write_that_reaches_no_replica_in_time_says_so(
    real_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One server has no replica: asked for one, WAIT gives up after write_timeout and the
    write is answered as not replicated (and logged), never as an error."""
    store = acked_store(real_redis.url, replicas=1)
    await store.start()
    try:
        device, replication = await store.block_acked("lonely")
        assert device.blocked and (replication.wanted, replication.reached) == (1, 0)
        assert not replication.in_time
        assert "reached 0 of 1 replicas" in caplog.text
    finally:
        await store.close()
    plain = acked_store(real_redis.url)  # auto on one server: no wait
    await plain.start()
    try:
        _, replication = await plain.unblock_acked("lonely")
        assert (replication.wanted, replication.in_time) == (0, True)
    finally:
        await plain.close()


async def test_the_admin_api_says_whether_a_block_was_replicated(
    real_sentinel: RedisSentinel, aiohttp_client: AiohttpClient
) -> None:
    store = acked_store(real_sentinel.url)
    await store.start()
    try:
        client = await aiohttp_client(create_admin_app(store, TOKEN))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answer = await client.post("/devices/acked-2/block", headers=auth)
        assert answer.status == 200 and answer.headers[REPLICATED_HEADER] == "yes"
        answer = await client.delete("/devices/acked-2", headers=auth)
        assert answer.status == 200 and answer.headers[REPLICATED_HEADER] == "yes"
    finally:
        await store.close()


def test_no_header_when_no_wait_was_asked() -> None:
    assert replicated(Replication(0, 0)) == {}
    assert replicated(Replication(1, 0)) == {REPLICATED_HEADER: "no"}
    assert replicated(Replication(2, 3)) == {REPLICATED_HEADER: "yes"}


# ---------------------------------------------------------------- faults on both engines


@pytest.fixture(params=["cluster", "sentinel"])
async def engine_store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Store, list[int]]]:
    """A store on the cluster or on Sentinel, and the ports of the engine's primaries."""
    engine: RedisCluster | RedisSentinel = request.getfixturevalue(f"real_{request.param}")
    if isinstance(engine, RedisCluster):
        ports = [node.port for node in engine.nodes if node.role == "primary"]
    else:
        ports = [engine.primary_port()]
    store = open_store(engine.url)
    await store.start()
    yield store, ports
    await store.close()


def on_primaries(ports: list[int], *command: str | int) -> None:
    for port in ports:
        with redis.Redis(port=port, socket_timeout=WAIT) as client:
            client.execute_command(*command)


def script_stats(ports: list[int]) -> tuple[int, int, int]:
    """EVALSHA calls, EVALSHA failed calls, SCRIPT LOADs, summed over the primaries."""
    calls = failed = loads = 0
    for port in ports:
        with redis.Redis(port=port, socket_timeout=WAIT) as client:
            stats = client.info("commandstats")
        calls += int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
        failed += int(stats.get("cmdstat_evalsha", {}).get("failed_calls", 0))
        loads += int(stats.get("cmdstat_script|load", {}).get("calls", 0))
    return calls, failed, loads


async def test_an_emptied_script_cache_on_every_primary_is_reloaded_once_a_node(
    engine_store: tuple[Store, list[int]],
) -> None:
    store, ports = engine_store
    devices = [f"script-{i}" for i in range(12)]
    for device_id in devices:
        assert await enforce(store, device_id) is ReplyCode.ALLOW
    on_primaries(ports, "SCRIPT", "FLUSH")
    on_primaries(ports, "CONFIG", "RESETSTAT")
    outcomes = await asyncio.gather(*(enforce(store, d) for d in devices * 3))
    assert set(outcomes) == {ReplyCode.ALLOW}  # no request saw the miss
    calls, failed, loads = script_stats(ports)
    # The tick's calls are one batch a node (enforce_batch.lua); each batch met NOSCRIPT and
    # was sent again, once.
    assert 1 <= failed <= len(ports)
    assert calls == 2 * failed
    # enforce.lua and its batch variant, once a node, whatever the number of calls that missed.
    assert loads <= 2 * len(ports)
    on_primaries(ports, "CONFIG", "RESETSTAT")
    for device_id in devices:
        assert await enforce(store, device_id) is ReplyCode.ALLOW
    assert script_stats(ports) == (len(devices), 0, 0)  # one EVALSHA a request again


async def test_a_primary_out_of_memory_fails_the_call_then_decides_again(
    engine_store: tuple[Store, list[int]],
) -> None:
    store, ports = engine_store
    assert await enforce(store, "known") is ReplyCode.ALLOW
    await store.block("stolen")
    try:
        on_primaries(ports, "CONFIG", "SET", "maxmemory", "1")  # every write refused (OOM)
        with pytest.raises(StoreUnavailable, match="OOM"):
            await enforce(store, "fresh")
        with pytest.raises(StoreUnavailable):
            await store.block("another")
    finally:
        on_primaries(ports, "CONFIG", "SET", "maxmemory", "0")
    assert await until_decided(store, "known") is ReplyCode.ALLOW
    assert await enforce(store, "stolen") is ReplyCode.BLOCKED
    assert await store.get_device("fresh") is None  # the refused call wrote nothing


async def until_decided(store: Store, device_id: str) -> ReplyCode:
    """The device's outcome once the store answers again (its breaker may be open a while)."""
    outcome: ReplyCode | None = None

    async def decided() -> bool:
        nonlocal outcome
        try:
            outcome = await enforce(store, device_id)
        except StoreUnavailable:
            return False
        return True

    await until_async(decided, "the store to decide again", WAIT, every=0.05)
    assert outcome is not None
    return outcome
