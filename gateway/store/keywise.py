"""The admin list's reads of one shard key by key, for a cluster node whose slots move.

While a slot migrates, the keys of its shard may sit on two nodes: no script can read them
together (TRYAGAIN), but each key can be read where it is (the cluster client follows ASK).
Slower than the one script call a node of gateway.store.listing, and only used meanwhile:
each method answers what its script would (`lua/list.lua`, `lua/scan.lua`) for one shard.
"""

from __future__ import annotations

from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.store.keys import KeySchema
from gateway.store.listing_types import AdminCall, BlockedFilter

SCAN_KEYWISE_STEP: Final = 1000  # ids a scan step looks at, reading a shard key by key
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lower-cases ASCII letters only, as the indexes and the Lua scripts do."""
    return text.translate(_ASCII_LOWER)


class KeywiseReader:
    """Reads a shard of one key schema key by key, through the admin client."""

    def __init__(
        self, admin: aioredis.Redis | RedisCluster, keys: KeySchema, call: AdminCall
    ) -> None:
        self._admin = admin
        self._keys = keys
        self._call = call

    async def list_shard(self, i: int, args: tuple[str | int, ...]) -> list[Any]:
        """list.lua's answer for one shard, from single-key reads (each key where it is:
        the cluster client follows ASK)."""
        blocked, want, score, after_id = str(args[0]), int(args[1]), str(args[2]), str(args[3])
        s = self._keys.shard(i)
        source = s.blocked if blocked == "only" else s.active
        admin = self._admin
        top = score if score != "" else "+inf"
        ties = await self._call(admin.zcount(source, score, score)) if score != "" else 0
        got = cast(
            list[tuple[str, float]],
            await self._call(
                admin.zrevrangebyscore(
                    source, top, "-inf", start=0, num=want + ties, withscores=True
                )
            ),
        )
        rows = [(m, int(sc)) for m, sc in got if score == "" or sc < int(score) or m < after_id]
        if blocked == "hide" and rows:
            flags = await self._call(admin.zmscore(s.blocked, [m for m, _ in rows]))
            rows = [row for row, flag in zip(rows, flags, strict=True) if flag is None]
        if blocked == "only":
            total = await self._call(admin.zcard(s.blocked))
        else:
            total = await self._call(admin.zcard(s.active))
            if blocked == "hide":
                total -= await self._call(admin.zcard(s.blocked))
        reply: list[Any] = [total]
        for device_id, sc in rows[:want]:
            reply += [device_id, sc, None]  # records: the page reads the ones it shows
        return reply

    async def scan_shard(
        self, i: int, state: str, blocked: BlockedFilter, needle: str
    ) -> list[Any]:
        """scan.lua's step over one shard, from single-key reads (the cluster client follows
        ASK for each key): for a shard whose slot is half migrated."""
        admin, s = self._admin, self._keys.shard(i)
        index = f"{s.active[: -len('active')]}ix"
        reply: list[Any] = [0, ""]

        async def keep(device_id: str, after: str) -> None:
            score = await self._call(admin.zscore(s.active, device_id))
            if score is None:
                return
            if blocked != "all":
                is_blocked = await self._call(admin.zscore(s.blocked, device_id)) is not None
                if is_blocked != (blocked == "only"):
                    return
            reply.extend((device_id, int(score), 0, after))

        after = state[1:] if state else None

        async def lex(
            key: str, low: str, high: str, *, rev: bool = False, one: bool = True
        ) -> list[str]:
            limit = (0, 1) if one else (None, None)
            call = (
                admin.zrevrangebylex(key, low, high, *limit)
                if rev
                else admin.zrangebylex(key, low, high, *limit)
            )
            return cast(list[str], await self._call(call))

        heads: list[str] = []
        if after is not None:
            heads = await lex(index, f"[{after}", "-", rev=True)
        if not heads:
            heads = await lex(index, "-", "+")
        looked = 0
        while heads:
            head = heads[0]
            start = f"({after}" if after is not None else "-"
            for entry in await lex(f"{index}:{head}", start, "+", one=False):
                low, _, original = entry.partition("\0")
                if needle in low:
                    await keep(original or low, f"i{entry}")
                looked += 1
                if looked >= SCAN_KEYWISE_STEP:
                    reply[1] = f"i{entry}"
                    return reply
            after = None
            heads = await lex(index, f"({head}", "+")
        names = cast(dict[str, str], await self._call(admin.hgetall(s.names)))
        for device_id, name in names.items():
            if needle in ascii_lower(name) and needle not in ascii_lower(device_id):
                await keep(device_id, "")
        reply[0] = 1
        return reply
