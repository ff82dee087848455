"""Which store the gateway opens for its `redis.url`: the embedded NativeStore for
`memory://`, else the Store on Redis (one server, Sentinel or Cluster).

This is the gateway's one way to a store (`gateway run`, its `--workers` supervisor, the
CLI). `Store.from_settings` stays the Redis Store's own constructor: given `memory://` it
still embeds fakeredis, which runs the very Lua scripts, for tests that compare the two.
"""

from __future__ import annotations

from gateway.config import RedisSettings
from gateway.redis_topology import parse_redis_url
from gateway.store.contract import DeviceStore
from gateway.typedefs import Clock


def open_store(
    settings: RedisSettings, *, history_size: int = 50, clock: Clock | None = None
) -> DeviceStore:
    """The store `settings` name, not started yet (its `start` connects)."""
    if parse_redis_url(settings.url).kind == "memory":
        from gateway.store.native import NativeStore

        return NativeStore(key_prefix=settings.key_prefix, history_size=history_size, clock=clock)
    from gateway.store.store import Store  # redis-py and the scripts, only for Redis

    return Store.from_settings(settings, history_size=history_size, clock=clock)
