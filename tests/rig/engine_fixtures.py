"""The real multi-process Redis engines as fixtures, a second plugin (tests/conftest.py
registers it beside fixtures.py): `redis_cluster` and `redis_sentinel` start once per
session, when a test first asks, and stop at its end; `real_cluster` and `real_sentinel`
hand a test the engine whole (any node an earlier test left down restarted) and empty;
`redis_engine` gives each of the three real engines in turn."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.rig.redis_cluster import RedisCluster
from tests.rig.redis_sentinel import RedisSentinel
from tests.rig.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One real 3-primary / 3-replica Redis Cluster for the whole session."""
    cluster = RedisCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """One real primary + replica + 3 sentinels for the whole session."""
    sentinel = RedisSentinel()
    try:
        yield sentinel
    finally:
        sentinel.stop()


@pytest.fixture
def real_cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The session's cluster, whole again and emptied for this test."""
    redis_cluster.ensure_healthy()
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture
def real_sentinel(redis_sentinel: RedisSentinel) -> RedisSentinel:
    """The session's sentinel deployment, whole again and emptied for this test."""
    redis_sentinel.ensure_healthy()
    redis_sentinel.flush()
    return redis_sentinel


RedisEngine = RedisServer | RedisCluster | RedisSentinel


@pytest.fixture(params=["single", "cluster", "sentinel"])
def redis_engine(request: pytest.FixtureRequest) -> RedisEngine:
    """Each real engine in turn (a redis-server, the cluster, the Sentinel deployment),
    emptied: for the integration tests that must hold on all three."""
    name = "redis" if request.param == "single" else request.param
    engine: RedisEngine = request.getfixturevalue(f"real_{name}")
    return engine


def primary_ports(engine: RedisEngine) -> list[int]:
    """The ports of the engine's primaries (where its keys live)."""
    if isinstance(engine, RedisCluster):
        return [node.port for node in engine.nodes if node.role == "primary"]
    if isinstance(engine, RedisSentinel):
        return [engine.primary_port()]
    return [engine.port]


def primary_port_for(engine: RedisEngine, key: str) -> int:
    """The port of the primary that holds `key` on the engine."""
    if isinstance(engine, RedisCluster):
        return engine.primary_for_key(key)
    return primary_ports(engine)[0]


def all_ports(engine: RedisEngine) -> list[int]:
    """The ports of every data node of the engine (a pub/sub subscriber may be on any)."""
    if isinstance(engine, RedisCluster):
        return [node.port for node in engine.nodes]
    if isinstance(engine, RedisSentinel):
        return engine.data_ports
    return [engine.port]
