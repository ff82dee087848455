"""How the store connects, per topology (gateway.redis_topology): redis-py clients for the
admin side and the pipelined script caller for the data plane.

    single     a connection pool to one server; one pipelined connection to it
    sentinel   redis-py's Sentinel (the pool asks the sentinels for the primary again after
               a failure); the pipelined connection asks them each time it opens, and drops
               itself on a READONLY reply
    cluster    redis-py's RedisCluster (slot-aware, follows MOVED/ASK); one pipelined
               connection per primary (gateway.store.cluster_scripts)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from gateway.errors import StoreUnavailable
from gateway.redis_topology import NodeAddress, RedisTopology
from gateway.store.cluster_scripts import ClusterScripts
from gateway.store.enforce_script import ScriptCaller
from gateway.store.node_query import ask
from gateway.store.pipeline import Batching, ConnectTo, Resolve, ScriptPipeline

POOL_SIZE: Final = 64


def redis_client(topology: RedisTopology, timeout: float, *, decode: bool) -> aioredis.Redis:
    """A redis-py client for the topology, every call bounded by `timeout`."""
    bounds: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": decode,
    }
    t = topology
    if t.kind == "cluster":
        return cast(
            aioredis.Redis,
            RedisCluster(
                startup_nodes=[ClusterNode(a.host, a.port) for a in t.seeds],
                username=t.username,
                password=t.password,
                ssl=t.tls,
                max_connections=POOL_SIZE,
                **bounds,
            ),
        )
    if t.kind == "sentinel":
        sentinel = Sentinel(
            [(a.host, a.port) for a in t.seeds],
            sentinel_kwargs={
                "password": t.sentinel_password,
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
            },
        )
        primary = sentinel.master_for(
            t.service,
            username=t.username,
            password=t.password,
            db=t.db,
            ssl=t.tls,
            max_connections=POOL_SIZE,
            retry=Retry(NoBackoff(), 1),
            **bounds,
        )
        return cast(aioredis.Redis, primary)
    pool = aioredis.BlockingConnectionPool.from_url(
        t.url,
        max_connections=POOL_SIZE,
        timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        **bounds,
    )
    return aioredis.Redis(connection_pool=pool)


# (script, keys, args, ("WAIT", replicas, milliseconds)) -> (reply, replicas reached)
AckedEval = Callable[
    [str, Sequence[str], Sequence[str | int], tuple[str, int, int]], Awaitable[tuple[Any, int]]
]


def cluster_acked_eval(
    client: aioredis.Redis, topology: RedisTopology, timeout: float
) -> AckedEval:
    """An admin script and its WAIT on one connection to the primary of the keys' slot (a
    cluster client's pool may hand WAIT another connection, which has no writes to wait
    for). Returns the script's reply, decoded, and the replicas reached. A MOVED answer
    (the slot moved since the map was learnt) relearns the map and tries once more."""
    cluster = cast(RedisCluster, client)
    t = topology

    async def run(
        script: str, keys: Sequence[str], args: Sequence[str | int], wait: tuple[str, int, int]
    ) -> tuple[Any, int]:
        await cluster.initialize()
        for attempt in (1, 2):
            node = cluster.get_node_from_key(keys[0])
            if node is None:
                raise StoreUnavailable("no Redis Cluster node serves the device's slot")
            try:
                reply, reached = await ask(
                    NodeAddress(node.host, int(node.port)),
                    [("EVAL", script, len(keys), *keys, *args), wait],
                    timeout=timeout,
                    tls=t.tls,
                    username=t.username,
                    password=t.password,
                )
            except StoreUnavailable as exc:
                if attempt == 2 or "MOVED" not in str(exc):
                    raise
                await cluster.nodes_manager.initialize()
                continue
            return _decoded(reply), int(reached)
        raise AssertionError("unreachable")

    return run


def _decoded(reply: Any) -> Any:
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, list):
        return [_decoded(item) for item in reply]
    return reply


def script_caller(
    topology: RedisTopology, script: str, *, timeout: float, batch: str | None = None
) -> ScriptCaller:
    """The data plane's pipelined caller of `script` for the topology; `batch`, the text of
    its batch variant (gateway.store.pipeline.Batching), sends each tick's calls as one."""
    if topology.kind == "cluster":
        return ClusterScripts(topology, script, timeout=timeout, batch=batch)
    batching = None if batch is None else Batching(batch)
    if topology.kind == "sentinel":
        resolve = sentinel_primary(topology, timeout)
        return ScriptPipeline(resolve, script, timeout=timeout, batch=batching)
    return ScriptPipeline.for_url(topology.url, script, timeout=timeout, batch=batching)


def sentinel_primary(topology: RedisTopology, timeout: float) -> Resolve:
    """Asks the sentinels, in turn, for the primary they watch under the service name; the
    one that answered is asked first next time."""
    sentinels = list(topology.seeds)
    t = topology

    async def resolve() -> ConnectTo:
        last: StoreUnavailable | None = None
        for i, sentinel in enumerate(sentinels):
            try:
                (reply,) = await ask(
                    sentinel,
                    [("SENTINEL", "get-master-addr-by-name", t.service)],
                    timeout=timeout,
                    password=t.sentinel_password,
                )
            except StoreUnavailable as exc:
                last = exc
                continue
            if not reply:
                last = StoreUnavailable(f"sentinel {sentinel} does not know {t.service!r}")
                continue
            if i:
                sentinels.insert(0, sentinels.pop(i))
            host, port = (p.decode() if isinstance(p, bytes) else str(p) for p in reply)
            return ConnectTo(
                host, int(port), tls=t.tls, username=t.username, password=t.password, db=t.db
            )
        raise last or StoreUnavailable("no sentinel answered")

    return resolve


async def close_client(client: aioredis.Redis) -> None:
    """Close a client made by `redis_client` and its connections."""
    made: object = client  # typed as Redis by redis_client; a RedisCluster closes alone
    if isinstance(made, RedisCluster):
        await made.aclose()
        return
    await client.aclose(close_connection_pool=True)
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    if isinstance(manager, Sentinel):
        for sentinel in manager.sentinels:  # the clients it asks the sentinels with
            await sentinel.aclose(close_connection_pool=True)
