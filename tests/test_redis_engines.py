"""The rig's real Redis engines (tests/rig/redis_cluster.py, redis_sentinel.py), checked
with redis-py before the gateway's tests run over them: a Cluster that routes keys, fails
over, migrates slots; a Sentinel deployment that names, replaces and takes back a primary.

A test that kills a node restarts it before it ends: the next one gets the session's
engine whole (and `real_*` restarts whatever a failed test left down)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode as Seed
from redis.cluster import RedisCluster as ClusterClient
from redis.exceptions import AskError, MovedError, TryAgainError
from redis.sentinel import Sentinel

from tests.rig.redis_cluster import SLOTS, RedisCluster
from tests.rig.redis_nodes import wait_until
from tests.rig.redis_sentinel import FAILOVER_WAIT, RedisSentinel

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster_client(real_cluster: RedisCluster) -> Iterator[ClusterClient]:
    """redis-py's cluster client, started from the rig's seeds."""
    client = ClusterClient(
        startup_nodes=[Seed(host, port) for host, port in real_cluster.seeds],
        socket_timeout=1,
        socket_connect_timeout=1,
        decode_responses=True,
    )
    yield client
    client.close()


def direct(port: int) -> redis.Redis:
    """A plain client of one node (no redirections followed)."""
    return redis.Redis(port=port, socket_timeout=1, decode_responses=True)


def writes_again(write: redis.Redis | ClusterClient, key: str, value: str) -> float:
    """Retry a SET until one is accepted (a refused or timed-out one counts as not yet);
    returns the seconds it took."""

    def check() -> str | None:
        write.set(key, value)
        return None

    return wait_until(check, f"a write of {key} to be accepted", FAILOVER_WAIT)


# --- cluster -------------------------------------------------------------------------------


def test_cluster_is_three_primaries_with_a_replica_each(real_cluster: RedisCluster) -> None:
    ports = ",".join(f"127.0.0.1:{port}" for port in real_cluster.ports[:3])
    assert real_cluster.url == f"redis+cluster://{ports}"
    assert all(port <= 55535 for port in real_cluster.ports)  # the bus is port + 10000
    nodes = real_cluster.nodes
    primaries = [n for n in nodes if n.role == "primary"]
    replicas = [n for n in nodes if n.role == "replica"]
    assert len(primaries) == 3 and len(replicas) == 3
    assert sorted(str(r.primary_id) for r in replicas) == sorted(p.node_id for p in primaries)
    served = [slot for p in primaries for slot in p.slots]
    assert sorted(served) == list(range(SLOTS))  # every slot, each once


def test_cluster_routes_keys_to_the_primary_of_their_slot(
    real_cluster: RedisCluster, cluster_client: ClusterClient
) -> None:
    keys = [f"device:{i}" for i in range(60)]
    for key in keys:
        cluster_client.set(key, key.upper())
    assert [cluster_client.get(key) for key in keys] == [key.upper() for key in keys]
    owners = {key: real_cluster.primary_for_key(key) for key in keys}
    assert len(set(owners.values())) == 3  # the keys spread over every primary
    primaries = [n.port for n in real_cluster.nodes if n.role == "primary"]
    for key in keys[:10]:
        with direct(owners[key]) as owner:
            assert owner.get(key) == key.upper()
        other = next(port for port in primaries if port != owners[key])
        with direct(other) as stranger, pytest.raises(MovedError) as moved:
            stranger.get(key)
        assert moved.value.node_addr == ("127.0.0.1", owners[key])


def test_cluster_promotes_a_replica_when_a_primary_is_killed(
    real_cluster: RedisCluster, cluster_client: ClusterClient
) -> None:
    key = "device:failover"
    cluster_client.set(key, "before")
    old = real_cluster.primary_for_key(key)
    (heir,) = real_cluster.replicas_of(old)
    real_cluster.kill_primary(old)
    try:
        accepted = writes_again(cluster_client, key, "after")
        settled = real_cluster.wait_failover(old)
        print(
            f"cluster failover: writes accepted {accepted:.2f} s after the SIGKILL, "
            f"every node agreed {settled:.2f} s after it"
        )
        assert real_cluster.primary_for_key(key) == heir.port
        assert cluster_client.get(key) == "after"
    finally:
        rejoined = real_cluster.restart(old)
        print(f"cluster: the old primary rejoined in {rejoined:.2f} s")
    assert real_cluster.node(old).role == "replica"
    assert real_cluster.node(old).primary_id == heir.node_id
    real_cluster.wait_healthy()


def test_cluster_moves_a_keys_slot_and_the_key_stays_readable(
    real_cluster: RedisCluster, cluster_client: ClusterClient
) -> None:
    key = "device:{migrating}"
    cluster_client.set(key, "kept")
    slot = real_cluster.slot_for_key(key)
    source = real_cluster.primary_for_key(key)
    target = next(n.port for n in real_cluster.nodes if n.role == "primary" and n.port != source)
    real_cluster.move_slots([slot], target)
    try:
        assert real_cluster.primary_for_key(key) == target
        assert cluster_client.get(key) == "kept"  # a MOVED, followed
        with direct(target) as owner:
            assert owner.get(key) == "kept"
        with direct(source) as former, pytest.raises(MovedError) as moved:
            former.get(key)
        assert moved.value.node_addr == ("127.0.0.1", target)
    finally:
        real_cluster.move_slots([slot], source)


def test_cluster_reshard_by_redis_cli_moves_slots_with_their_keys(
    real_cluster: RedisCluster, cluster_client: ClusterClient
) -> None:
    source, target = (n.port for n in real_cluster.nodes[:2])
    lowest = min(real_cluster.node(source).slots)
    key = next(f"k{i}" for i in range(100_000) if real_cluster.slot_for_key(f"k{i}") == lowest)
    cluster_client.set(key, "resharded")
    moved = real_cluster.reshard(5, source, target)
    try:
        assert lowest in moved  # redis-cli takes the source's lowest slots
        assert all(real_cluster.primary_for_slot(slot) == target for slot in moved)
        assert cluster_client.get(key) == "resharded"
    finally:
        real_cluster.move_slots(moved, source)


def test_cluster_half_migrated_slot_answers_ask(real_cluster: RedisCluster) -> None:
    moved_key, staying_key = "{tag}moved", "{tag}staying"
    source = real_cluster.primary_for_key(moved_key)
    with direct(source) as owner:
        owner.set(moved_key, "there")
        owner.set(staying_key, "here")
    target = next(n.port for n in real_cluster.nodes if n.role == "primary" and n.port != source)
    slot = real_cluster.slot_for_key(moved_key)
    assert real_cluster.begin_migration(slot, target) == source
    try:
        assert real_cluster.migrate_keys(slot, source, target, [moved_key]) == 1
        with direct(source) as owner:
            assert owner.get(staying_key) == "here"
            with pytest.raises(AskError) as ask:
                owner.get(moved_key)
            assert ask.type is AskError  # not its subclass MovedError
            assert (ask.value.slot_id, ask.value.node_addr) == (slot, ("127.0.0.1", target))
            # Keys of one slot split between two nodes: a multi-key call cannot run (the
            # gateway's one-hash-tag scripts meet this while a slot migrates).
            with pytest.raises(TryAgainError):
                owner.mget(moved_key, staying_key)
    finally:
        real_cluster.migrate_keys(slot, source, target)
        real_cluster.finish_migration(slot, source, target)
        real_cluster.move_slots([slot], source)
    assert real_cluster.primary_for_key(moved_key) == source


# --- sentinel ------------------------------------------------------------------------------


@pytest.fixture
def sentinel_client(real_sentinel: RedisSentinel) -> Sentinel:
    """redis-py's Sentinel, given the rig's sentinels."""
    return Sentinel(
        real_sentinel.sentinel_addresses,
        socket_timeout=1,
        socket_connect_timeout=1,
        decode_responses=True,
    )


def test_sentinel_url_names_the_service_and_resolves_its_primary(
    real_sentinel: RedisSentinel, sentinel_client: Sentinel
) -> None:
    hosts = ",".join(f"127.0.0.1:{port}" for port in real_sentinel.sentinel_ports)
    assert real_sentinel.url == f"redis+sentinel://{hosts}/{real_sentinel.service}"
    assert len(real_sentinel.sentinel_ports) == 3
    primary = real_sentinel.primary_port()
    assert sentinel_client.discover_master(real_sentinel.service) == ("127.0.0.1", primary)
    (replica,) = (port for port in real_sentinel.data_ports if port != primary)
    assert sentinel_client.discover_slaves(real_sentinel.service) == [("127.0.0.1", replica)]
    client = sentinel_client.master_for(real_sentinel.service)
    client.set("device:1", "one")
    assert client.get("device:1") == "one"
    with direct(primary) as node:
        assert node.execute_command("ROLE")[0] == "master"
        assert node.get("device:1") == "one"


def test_sentinel_replaces_a_killed_primary_and_takes_it_back_as_replica(
    real_sentinel: RedisSentinel, sentinel_client: Sentinel
) -> None:
    client = sentinel_client.master_for(real_sentinel.service)
    client.set("device:1", "before")
    old = real_sentinel.kill_primary()
    try:
        accepted = writes_again(client, "device:1", "after")
        settled = real_sentinel.wait_failover()
        print(
            f"sentinel failover: writes accepted {accepted:.2f} s after the SIGKILL, "
            f"every sentinel agreed {settled:.2f} s after it"
        )
        new = real_sentinel.primary_port()
        assert new != old
        assert sentinel_client.discover_master(real_sentinel.service) == ("127.0.0.1", new)
        assert client.get("device:1") == "after"
    finally:
        rejoined = real_sentinel.restart_old_primary()
        print(f"sentinel: the old primary was a replica again {rejoined:.2f} s after its restart")
    with direct(old) as former:
        role = former.execute_command("ROLE")
    assert role[:4] == ["slave", "127.0.0.1", new, "connected"]


def test_sentinel_stop_leaves_no_process_and_no_file() -> None:
    deployment = RedisSentinel(service="short-lived")
    processes = deployment.data + deployment.sentinels
    directory = deployment.dir
    assert re.fullmatch(
        r"redis\+sentinel://(127\.0\.0\.1:\d+,){2}127\.0\.0\.1:\d+/short-lived", deployment.url
    )
    deployment.stop()
    assert not any(node.alive for node in processes)
    assert not Path(directory).exists()
