"""The store: the only package that talks to Redis. This module only re-exports, lazily.

    store.py           Store: the two redis-py clients, the scripts, the admin's calls on
                       one device, and `Store.enforce` (the data plane's call)
    enforce_script.py  EnforceScript: the data plane's client of enforce.lua (keys and
                       arguments, circuit breaker, the reply typed as an EnforceReply)
    pipeline.py        ScriptPipeline: enforce.lua over one pipelined hiredis connection
    clients.py         how the store connects per topology: one server, Sentinel, Cluster
    cluster_scripts.py ClusterScripts: enforce.lua on a Redis Cluster, one pipeline per
                       primary (slot map, MOVED / ASK / TRYAGAIN, a breaker per primary)
    node_query.py      one-off questions to one node (CLUSTER SLOTS, a sentinel's primary,
                       the list's one script call a cluster node)
    slots.py           the cluster's key -> slot function (pure)
    breaker.py         CircuitBreaker (pure)
    keys.py            the Redis key schema and record field names (pure)
    records.py         a Redis hash or flat script reply read back into a Device (pure)
    listing.py         DeviceListing: a page is one script call a node (list.lua), keyset
                       cursors, the search by prefix (search.lua) and by substring (scan.lua)
    keywise.py         KeywiseReader: a shard read key by key while a cluster's slots move
    listing_types.py   what the list's modules share: the filter, the admin call (pure)
    cursor.py          the list's continuation cursors (pure)
    blocked.py         BlockedSet: each process's copy of the blocked ids, following Redis
    shard_events.py    a cluster's block events on the shards' own channels (SSUBSCRIBE)
    reset.py           ResetRecovery: Redis lost the gateway's data: block the known ids again
    epoch.py           the epoch marker that tells such a loss (pure)
    snapshot.py        the blocked ids kept on disk for a start while Redis is down
    lua/*.lua          the scripts
    contract.py        DeviceStore and BlockedIds: what callers ask of either store
    opening.py         open_store: the NativeStore for memory://, else the Store
    native.py          NativeStore: the embedded store, the same contract in plain Python
    native_record.py   a device's record, a slotted object
    native_bucket.py   the token bucket's arithmetic, and the client addresses' buckets
    native_order.py    the list's order by activity, filed when a list is asked for
    native_listing.py  the list and the searches over the records in memory
    native_blocked.py  the BlockedIds surface over the embedded store's own blocked ids

Names are imported on first use (PEP 562), so that a pure module (`gateway.store.keys`)
imports without redis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.store.contract import BlockedIds, DeviceStore
    from gateway.store.listing import BlockedFilter
    from gateway.store.native import NativeStore
    from gateway.store.opening import open_store
    from gateway.store.store import Store

__all__ = ["BlockedFilter", "BlockedIds", "DeviceStore", "NativeStore", "Store", "open_store"]

# Each name and the module it lives in.
_HOMES = {
    "BlockedFilter": "gateway.store.listing",
    "BlockedIds": "gateway.store.contract",
    "DeviceStore": "gateway.store.contract",
    "NativeStore": "gateway.store.native",
    "Store": "gateway.store.store",
    "open_store": "gateway.store.opening",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
