"""A cluster's block events on the shards' own channels: one connection per primary,
SSUBSCRIBEd to the channels of the slots it owns (gateway.store.blocked follows them).

block.lua, unblock.lua and delete.lua SPUBLISH on `<p>:{dNNN}:bev` on a cluster: the message
stays within the shard's primary and replicas, never on the cluster bus, whose links held a
second message back by about 40 ms. Here each primary's channels are read over a connection
of its own (one SSUBSCRIBE per channel: several in one command would be CROSSSLOT), with no
read timeout (a subscription is quiet until a block). Any failure, or the slots moving
(looked at every `interval`), subscribes again from the cluster's current map; the version
poll covers what a gap misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway.errors import StoreError

log = logging.getLogger("gateway.store.blocked")  # the follower's lines, under its name

RETRY_GAP: Final = 0.05  # seconds before subscribing again after a failure
# What a primary's own subscription connection takes from the cluster client's settings.
NODE_CONNECTION_KEYS: Final = (
    "host", "port", "username", "password", "socket_connect_timeout",
    "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_check_hostname",
)  # fmt: skip


async def follow_shard_channels(
    cluster: RedisCluster,
    channels: Sequence[str],
    apply: Callable[[str], None],
    *,
    closing: Callable[[], bool],
    interval: float,
    call_timeout: float,
) -> None:
    """Hand every message of `channels` to `apply` until `closing()`; every call to the
    cluster is bounded by `call_timeout`."""
    while not closing():
        listeners: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(call_timeout):
                await cluster.initialize()
            owners: dict[str, list[str]] = {}
            nodes: dict[str, Any] = {}
            for channel in channels:
                node = cluster.get_node_from_key(channel)
                if node is None:
                    raise StoreError(f"no Redis Cluster node serves {channel}")
                owners.setdefault(node.name, []).append(channel)
                nodes[node.name] = node
            listeners = [
                asyncio.create_task(_listen_node(nodes[name], mine, apply, closing, interval))
                for name, mine in owners.items()
            ]
            while not closing():
                done, _ = await asyncio.wait(
                    listeners, timeout=interval, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    task.result()  # a listener ends only by failing (or closing)
                owned = {n.name for c in channels if (n := cluster.get_node_from_key(c))}
                if done or owned != set(owners):
                    break
        except (RedisError, OSError, TimeoutError, StoreError) as exc:
            log.debug("blocked-set sharded subscription lost: %r", exc)
        except Exception:
            # Not Redis's doing: say so loudly, and subscribe again rather than stop.
            log.exception("blocked-set sharded subscription failed")
        finally:
            for task in listeners:
                task.cancel()
            if listeners:
                await asyncio.wait(listeners, timeout=call_timeout)
        if not closing():
            await asyncio.sleep(RETRY_GAP)
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(call_timeout):
                    await cluster.nodes_manager.initialize()


async def _listen_node(
    node: Any,
    channels: list[str],
    apply: Callable[[str], None],
    closing: Callable[[], bool],
    interval: float,
) -> None:
    """Read one primary's shard channels until the connection fails or `closing()`."""
    given = node.connection_kwargs
    kwargs = {k: given[k] for k in NODE_CONNECTION_KEYS if given.get(k) is not None}
    if "SSL" in getattr(given.get("connection_class"), "__name__", ""):
        kwargs["ssl"] = True
    client = aioredis.Redis(**kwargs, socket_timeout=None)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        for channel in channels:
            await pubsub.ssubscribe(channel)
        while not closing():
            message = await pubsub.get_message(timeout=interval)
            if message is not None and message.get("type") == "smessage":
                data = message["data"]
                apply(data if isinstance(data, str) else data.decode())
    finally:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await client.aclose()
