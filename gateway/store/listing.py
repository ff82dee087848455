"""The admin list of devices: pages by last activity, keyset cursors, and the two searches.

Devices are spread over `keys.SHARDS` shards, each with its own indexes (gateway.store.keys).
A page is one read-only script call per Redis node, over the shards that node holds
(`lua/list.lua`, and `lua/search.lua` for a search by prefix): the node merges its shards
lazily and answers its first rows with their records; the nodes' answers are merged here.
One server is one call over all 256 shards; a cluster node runs the script flagged
allow-cross-slot-keys, over a connection of its own. While a node's slots move (its call
refused: ASK, TRYAGAIN), the list and the substring scan read its shards key by key
(gateway.store.keywise); the search by prefix answers StoreUnavailable until they settle.

- `after=<cursor>` (keyset paging): the page after a row the previous answer named. Its
  cost does not grow with the depth: each shard is read from the cursor's score down.
- `page=N`: the rows from (N - 1) x amount on. The node reads and the merge keeps that
  many rows before the page, and the records come in a second round trip: O(offset).
- A search by prefix (`match=prefix`): ids, and words of custom names, that
  start with the text (ASCII letters case-insensitive), from the id index and the name
  words. It looks at most SEARCH_CAP ids a shard; beyond that the answer says it is cut.
- A search by substring (`match=contains`, the default, as the name filter always was):
  bounded steps through the id index and the
  names (`lua/scan.lua`), at most SCAN_BUDGET seconds an answer, continued by its cursor.

Every round trip is bounded in time by the `AdminCall` the Store gives, which turns Redis
failures into StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection

from gateway.errors import BadRequest, StoreUnavailable
from gateway.model import Device
from gateway.redis_topology import NodeAddress
from gateway.store import keys as K
from gateway.store.cursor import ListCursor, ScanCursor, read_list_cursor, read_scan_cursor
from gateway.store.keys import SHARDS, KeySchema
from gateway.store.keywise import KeywiseReader, ascii_lower
from gateway.store.listing_types import AdminCall, BlockedFilter
from gateway.store.node_query import ask
from gateway.store.records import device_from_hash
from gateway.store.scripts import load_script

__all__ = [
    "MAX_OFFSET",
    "SCAN_BUDGET",
    "SCAN_STEP",
    "SEARCH_CAP",
    "BlockedFilter",
    "DeviceListing",
    "ListPage",
    "Match",
    "ascii_lower",
    "scan_cut",
]

Match = Literal["prefix", "contains"]

# Ids a shard a search by prefix looks at: 4,096 in all. A prefix of millions of ids costs
# about 50-100 ms of Redis at that (measured at 2,000,000 devices on a loaded machine: 92 ms
# at 32 a shard); at 2,000 a shard such a search held Redis 10 s at 10,000,000 devices.
SEARCH_CAP: Final = 16
SCAN_STEP: Final = 10_000  # ids one scan.lua step looks at (a few ms of Redis)
SCAN_BUDGET: Final = 0.12  # seconds of substring scanning in one answer (+ one step, records)
_PER_NODE: Final = ("list.lua", "search.lua", "scan.lua")
# `page=N` reads every row before the page: deeper than this many rows (and not past the
# end), a caller pages with the cursor, whose cost does not grow with the depth.
MAX_OFFSET: Final = 10_000
KEYWISE_PARALLEL: Final = 16  # a node's shards read at once, key by key, while slots move


@dataclass(frozen=True, slots=True)
class ListPage:
    """One answer of the device list."""

    devices: list[Device]
    total: int | None  # devices that match; None for a substring scan (not counted)
    next_cursor: str | None  # `after=` for the next page; None when this one is the last
    truncated: bool = False  # a search by prefix looked at SEARCH_CAP ids of some shard


@dataclass(frozen=True, slots=True)
class _Row:
    score: int
    id: str
    record: dict[str, str] | None


def scan_cut(found: Sequence[tuple[int, str, int, str]], amount: int) -> int:
    """How many of a scan's matches (in scan order: score, id, shard, state after) one
    answer takes: `amount`, or more where a cut could not be resumed: after a name match
    (state "") only the shard's end can be, so its other name matches come along."""
    cut = min(amount, len(found))
    while cut < len(found) and found[cut - 1][3] == "" and found[cut][2] == found[cut - 1][2]:
        cut += 1
    return cut


def _rows(flat: Sequence[Any], start: int) -> list[_Row]:
    """The (id, score, record) triples a list/search script answered, from `start` on."""
    rows: list[_Row] = []
    for j in range(start, len(flat), 3):
        record = flat[j + 2]
        pairs = dict(zip(record[::2], record[1::2], strict=True)) if record else None
        rows.append(_Row(int(flat[j + 1]), flat[j], pairs))
    return rows


class DeviceListing:
    """Lists the devices of one key schema, through the admin client."""

    def __init__(
        self,
        admin: aioredis.Redis | RedisCluster,
        keys: KeySchema,
        call: AdminCall,
        *,
        node_timeout: float = 5.0,
    ) -> None:
        self._admin = admin
        self._node_timeout = node_timeout  # a cluster node's own connection, per call
        self._keywise = KeywiseReader(admin, keys, call)
        self._keys = keys
        self._call = call
        self._scripts = {
            name: admin.register_script(load_script(name))
            for name in ("list.lua", "search.lua", "scan.lua")
        }
        self._cluster = admin if isinstance(admin, RedisCluster) else None
        # The per-node variants: on a cluster node, one call reads the keys of many slots.
        self._cross = {name: load_script(name, cross_slot=True) for name in _PER_NODE}
        self._cross_sha = {
            name: hashlib.sha1(text.encode()).hexdigest() for name, text in self._cross.items()
        }

    async def page(
        self,
        *,
        name: str | None,
        blocked: BlockedFilter,
        page: int,
        amount: int,
        after: str | None = None,
        match: Match = "contains",
    ) -> ListPage:
        """One page of devices, most recent activity first."""
        if name and match == "contains":
            return await self._contains(ascii_lower(name), blocked, page, amount, after)
        cursor = read_list_cursor(after) if after else None
        offset = 0 if cursor else (page - 1) * amount
        if offset > MAX_OFFSET:
            total = (
                await self.page(name=name, blocked=blocked, page=1, amount=1, match=match)
            ).total
            if total is not None and offset >= total:
                return ListPage([], total, None)  # past the end: empty, as ever
            raise BadRequest(
                f"page: pages more than {MAX_OFFSET} rows deep are read with after=<cursor> "
                "(the X-Next-Cursor header of the page before)"
            )
        at = (str(cursor.score), cursor.id) if cursor else ("", "")
        want = offset + amount + 1  # one more: tells whether a next page exists
        records = "1" if offset == 0 else "0"
        truncated = False
        if name:
            replies = await self._per_node(
                "search.lua",
                lambda s: (s.active, s.blocked, s.names),
                (blocked, ascii_lower(name), SEARCH_CAP, want, *at, records),
            )
            total = sum(int(r[0]) for r in replies)
            truncated = any(int(r[1]) for r in replies)
            rows = [row for r in replies for row in _rows(r, 2)]
        else:
            replies = await self._per_node(
                "list.lua",
                lambda s: (s.active, s.blocked),
                (blocked, want, *at, records, "1"),
            )
            total = sum(int(r[0]) for r in replies)
            rows = [row for r in replies for row in _rows(r, 1)]
        rows.sort(key=lambda r: (r.score, r.id), reverse=True)
        more = len(rows) > offset + amount
        rows = rows[offset : offset + amount]
        if all(r.record is not None for r in rows):
            devices = [device_from_hash(r.id, r.record) for r in rows if r.record]
        else:  # a page by number, or shards read key by key: the page's records now
            devices = await self._records([r.id for r in rows])
        next_cursor = ListCursor(rows[-1].score, rows[-1].id).encode() if more else None
        return ListPage(devices, total, next_cursor, truncated)

    async def _per_node(
        self,
        name: str,
        shard_keys: Callable[[K.ShardKeys], tuple[str, ...]],
        args: tuple[str | int, ...],
    ) -> list[list[Any]]:
        """Run the script `name` once a node over the shards it holds; its replies."""
        cluster = self._cluster
        if cluster is None:
            keys = [k for i in range(SHARDS) for k in shard_keys(self._keys.shard(i))]
            return [await self._call(self._scripts[name](keys=keys, args=args))]
        groups = await self._node_groups(cluster, 0)

        async def on_node(node: ClusterNode, shards: list[int]) -> list[list[Any]]:
            keys = [k for i in shards for k in shard_keys(self._keys.shard(i))]
            try:
                return [await self._call(self._eval_on(cluster, node, name, keys, args))]
            except StoreUnavailable:
                if name != "list.lua":
                    raise StoreUnavailable(
                        "a Redis node's slots are moving (or it failed): search again soon"
                    ) from None
                # Slots moving, or the node gone: no script can read a shard whose keys a
                # migration left on two nodes (TRYAGAIN); single keys can, each where it
                # is (the cluster client follows ASK).
                return list(await asyncio.gather(*(one_shard(i) for i in shards)))

        gate = asyncio.Semaphore(KEYWISE_PARALLEL)

        async def one_shard(i: int) -> list[Any]:
            async with gate:
                return await self._keywise.list_shard(i, args)

        per_node = await asyncio.gather(*(on_node(n, s) for n, s in groups.values()))
        return [reply for replies in per_node for reply in replies]

    async def _node_groups(
        self, cluster: RedisCluster, first: int
    ) -> dict[str, tuple[ClusterNode, list[int]]]:
        """The shards from `first` on, grouped by the primary that holds them, in order."""
        await self._call(cluster.initialize())
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i in range(first, SHARDS):
            node = cluster.get_node_from_key(self._keys.shard(i).active)
            if node is None:
                raise StoreUnavailable(f"no Redis node serves shard {i}")
            groups.setdefault(node.name, (node, []))[1].append(i)
        return groups

    async def _eval_on(
        self,
        cluster: RedisCluster,
        node: ClusterNode,
        name: str,
        keys: list[str],
        args: tuple[str | int, ...],
    ) -> list[Any]:
        """EVALSHA of the cross-slot variant on `node`, loading it there when missing. The
        keys go in ARGV (Redis checks declared keys for one slot even with the flag). Sent
        over a connection of its own: a refusal (ASK, TRYAGAIN while a slot moves) is the
        caller's to handle, and must not leave the cluster client's routing in doubt."""
        options = cluster.connection_kwargs
        command = ("EVALSHA", self._cross_sha[name], 0, len(keys), *keys, *args)

        async def send(*commands: tuple[str | int, ...]) -> list[Any]:
            return await ask(
                NodeAddress(node.host, int(node.port)),
                commands,
                timeout=self._node_timeout,
                tls=issubclass(options.get("connection_class", Connection), SSLConnection),
                username=options.get("username"),
                password=options.get("password"),
                decode=True,
            )

        try:
            reply: list[Any] = (await send(command))[0]
        except StoreUnavailable as exc:
            if "NOSCRIPT" not in str(exc):
                raise
            reply = (await send(("SCRIPT", "LOAD", self._cross[name]), command))[1]
        return reply

    async def _contains(
        self, needle: str, blocked: BlockedFilter, page: int, amount: int, after: str | None
    ) -> ListPage:
        """Devices whose id or custom name contains `needle`: the shards in bounded steps
        from the cursor on, for at most SCAN_BUDGET seconds an answer.

        A scan that went through every shard in one answer is complete: its matches are
        ordered by last activity, counted, and paged by `page` like the list. Otherwise the
        answer holds the first `amount` matches in the scan's order and a cursor for the
        rest (no total)."""
        start = read_scan_cursor(after, SHARDS) if after else ScanCursor(0, b"")
        shard, state = start.shard, start.state.decode("ascii", "replace")
        clock = asyncio.get_running_loop().time
        deadline = clock() + SCAN_BUDGET
        found: list[tuple[int, str, int, str]] = []  # score, id, shard, state after it
        while shard < SHARDS:
            calls, end = await self._scan_round(shard, state, blocked, needle)
            # Every call went through its shards in order: what lies before the first shard
            # any call left unfinished is done; what came after it is asked again next time.
            unfinished = [
                (shards[done], reply[1])
                for shards, reply in calls
                if (done := int(reply[0])) < len(shards)
            ]
            shard, state = min(unfinished, default=(end, ""))
            for shards, reply in calls:
                for j in range(2, len(reply), 4):
                    at = shards[int(reply[j + 2])]
                    if at <= shard:
                        found.append((int(reply[j + 1]), reply[j], at, reply[j + 3]))
            if clock() >= deadline:
                break
        if after is None and shard >= SHARDS:
            found.sort(reverse=True)
            offset = (page - 1) * amount
            rows = found[offset : offset + amount]
            devices = await self._records([row[1] for row in rows])
            return ListPage(devices, len(found), None)
        # Back into the scan's order (the nodes answered side by side): by shard, then by
        # place in the shard: its id index in order, then its names (state "").
        found.sort(key=lambda f: (f[2], f[3] == "", f[3]))
        cut = scan_cut(found, amount)
        if cut < len(found):
            _, _, at_shard, at_state = found[cut - 1]
            resume = ScanCursor(at_shard if at_state else at_shard + 1, at_state.encode())
        else:
            resume = ScanCursor(shard, state.encode())
        rows = sorted(found[:cut], reverse=True)
        devices = await self._records([row[1] for row in rows])
        more = resume.shard < SHARDS
        return ListPage(devices, None, resume.encode() if more else None)

    async def _scan_round(
        self, shard: int, state: str, blocked: BlockedFilter, needle: str
    ) -> tuple[list[tuple[list[int], list[Any]]], int]:
        """One round of scan.lua from `shard` (at `state`) on: one call over every shard
        left on one server; on a cluster one call a node over its shards (the cross-slot
        variant), or, while a node's slots move, its shards read key by key.
        Each call's shards, in order, with its reply; and the shard the round went up to
        (not included) when every call finished."""
        args = (blocked, needle, state, SCAN_STEP)
        keys = [(s.active, s.blocked, s.names) for s in map(self._keys.shard, range(SHARDS))]
        cluster = self._cluster
        if cluster is None:
            shards = list(range(shard, SHARDS))
            flat = [k for i in shards for k in keys[i]]
            reply = await self._call(self._scripts["scan.lua"](keys=flat, args=args))
            return [(shards, reply)], SHARDS
        groups = await self._node_groups(cluster, shard)

        async def on_node(node: ClusterNode, shards: list[int]) -> tuple[list[int], list[Any]]:
            at = state if shards[0] == shard else ""
            flat = [k for i in shards for k in keys[i]]
            command = self._eval_on(cluster, node, "scan.lua", flat, (*args[:2], at, SCAN_STEP))
            return shards, await self._call(command)

        gate = asyncio.Semaphore(KEYWISE_PARALLEL)

        async def one_shard(i: int) -> tuple[list[int], list[Any]]:
            async with gate:
                at = state if i == shard else ""
                return [i], await self._keywise.scan_shard(i, at, blocked, needle)

        async def node_or_shards(
            node: ClusterNode, shards: list[int]
        ) -> list[tuple[list[int], list[Any]]]:
            try:
                return [await on_node(node, shards)]
            except StoreUnavailable:
                # Slots moving: no script can read a shard whose keys a migration left on
                # two nodes (TRYAGAIN); this node's shards key by key, each where it is
                # (the cluster client follows ASK), in smaller steps.
                return list(await asyncio.gather(*(one_shard(i) for i in shards)))

        rounds = await asyncio.gather(*(node_or_shards(n, s) for n, s in groups.values()))
        return [call for calls in rounds for call in calls], SHARDS

    async def _records(self, ids: list[str]) -> list[Device]:
        """The records of `ids`, in one pipeline (one round trip a node)."""
        if not ids:
            return []
        async with self._admin.pipeline(transaction=False) as pipe:
            for device_id in ids:
                pipe.hgetall(self._keys.device(device_id).record)
            records = await self._call(pipe.execute())
        return [
            device_from_hash(device_id, record)
            for device_id, record in zip(ids, records, strict=True)
            if K.FIELD_REQUESTS in record  # deleted between the index read and now
        ]
