"""The device list at scale: keyset cursors, the indexed search, the bounded substring scan,
one script call a node a page, and the indexes kept in step with the records."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway import cli
from gateway.config import RedisSettings
from gateway.errors import BadRequest
from gateway.model import Bucket, DeviceIdentity
from gateway.store import Store
from gateway.store import listing as L
from gateway.store.cursor import ListCursor, ScanCursor, read_list_cursor, read_scan_cursor
from gateway.store.keys import SHARDS, shard_of
from gateway.store.keywise import ascii_lower
from gateway.store.listing import ListPage, scan_cut
from tests.rig.clock import FakeClock
from tests.rig.engine_fixtures import primary_ports
from tests.rig.redis_cluster import RedisCluster
from tests.rig.redis_server import RedisServer

BUCKET = Bucket(rate=1000, burst=1000)


@pytest.fixture
async def mem_store(clock: FakeClock) -> AsyncIterator[Store]:
    s = Store.memory(clock=clock)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def real_redis_store(real_redis: RedisServer, clock: FakeClock) -> AsyncIterator[Store]:
    s = Store.from_settings(RedisSettings(url=real_redis.url, timeout=2.0), clock=clock)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def real_redis_client(real_redis: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis(port=real_redis.port, decode_responses=True, socket_timeout=5) as c:
        yield c


async def seen(store: Store, device_id: str) -> None:
    await store.enforce(DeviceIdentity(device_id, application="App"), "203.0.113.9", BUCKET,
                        upload=False)  # fmt: skip


async def register(store: Store, clock: FakeClock, ids: Iterable[str]) -> list[str]:
    """Registers `ids` one second apart; returns them most recent first (the list's order)."""
    done = []
    for device_id in ids:
        await seen(store, device_id)
        clock.advance(1)
        done.append(device_id)
    return done[::-1]


async def walk(store: Store, after: str | None = None, **query: Any) -> list[str]:
    """Every id of the list from `after` on, page after page through the cursors."""
    page: ListPage = await store.list_page(amount=7, after=after, **query)
    ids = [d.id for d in page.devices]
    while page.next_cursor is not None:
        page = await store.list_page(amount=7, after=page.next_cursor, **query)
        ids += [d.id for d in page.devices]
    return ids


# ---- cursors (pure) ------------------------------------------------------------------------


def test_cursors_round_trip_and_refuse_anything_else() -> None:
    cursor = ListCursor(1_790_000_000_123, "a:b{c}*")
    assert read_list_cursor(cursor.encode()) == cursor
    scan = ScanCursor(17, b"iabc\0ABC")
    assert read_scan_cursor(scan.encode(), SHARDS) == scan
    for bad in ("", "!!!", "x" * 401, ScanCursor(1, b"").encode(), "bDE6"):
        with pytest.raises(BadRequest):
            read_list_cursor(bad)
    for bad in (cursor.encode(), ScanCursor(SHARDS, b"").encode()):
        with pytest.raises(BadRequest):
            read_scan_cursor(bad, SHARDS)


def test_a_scan_is_cut_where_it_can_be_resumed() -> None:
    # (score, id, shard, state after): a name match (state "") can only be followed by the
    # shard's end, so the shard's other name matches come along.
    found = [(1, "a", 0, "ia"), (2, "b", 0, ""), (3, "c", 0, ""), (4, "d", 1, "id")]
    assert scan_cut(found, 1) == 1
    assert scan_cut(found, 2) == 3
    assert scan_cut(found, 3) == 3
    assert scan_cut(found, 10) == 4


# ---- the list ------------------------------------------------------------------------------


async def test_cursor_walk_gives_every_device_once_in_order(store: Store, clock: FakeClock) -> None:
    order = await register(store, clock, (f"dev-{i:03d}" for i in range(40)))
    await store.block("dev-005")
    await store.block("dev-017")
    assert await walk(store) == order
    assert await walk(store, blocked="hide") == [
        i for i in order if i not in {"dev-005", "dev-017"}
    ]
    assert await walk(store, blocked="only") == ["dev-017", "dev-005"]
    first = await store.list_page(amount=40)
    assert first.next_cursor is None and first.total == 40


async def test_the_list_moves_a_device_when_its_last_active_enters_another_second(
    store: Store, clock: FakeClock
) -> None:
    """The order is by last activity to the second: a device moves when its last_active
    enters another second, however often it calls (the index is not written in between)."""
    clock.now_us = (clock.now_us // 1_000_000 + 1) * 1_000_000 + 500_000  # at x.500 s

    async def order() -> list[str]:
        return [d.id for d in (await store.list_page()).devices]

    await seen(store, "a")
    clock.advance(1)
    await seen(store, "b")
    assert await order() == ["b", "a"]
    clock.advance(498)  # x.999: the same second as both
    await seen(store, "a")
    assert await order() == ["b", "a"]
    clock.advance(1)  # (x+1).000: another second
    await seen(store, "a")
    assert await order() == ["a", "b"]
    for _ in range(10):  # b calls every 300 ms, never a second apart: it still moves
        clock.advance(300)
        await seen(store, "b")
    assert await order() == ["b", "a"]


async def test_cursor_neither_repeats_nor_skips_a_device_that_did_not_move(
    store: Store, clock: FakeClock
) -> None:
    order = await register(store, clock, (f"dev-{i:03d}" for i in range(30)))
    page = await store.list_page(amount=10)
    assert [d.id for d in page.devices] == order[:10]
    # Activity in between: one device of the first page and one further down move to the top.
    clock.advance(5000)
    await seen(store, order[3])
    await seen(store, order[20])
    rest = await walk(store, after=page.next_cursor)
    assert rest == [i for i in order[10:] if i != order[20]]


async def test_equal_scores_page_by_id(store: Store, clock: FakeClock) -> None:
    for i in range(12):  # the same millisecond
        await seen(store, f"tie-{i:02d}")
    ids = await walk(store)
    assert ids == sorted(ids, reverse=True) and len(ids) == 12


async def test_page_numbers_still_page_and_deep_ones_point_to_the_cursor(
    store: Store, clock: FakeClock
) -> None:
    order = await register(store, clock, (f"dev-{i:03d}" for i in range(25)))
    devices, total = await store.list_devices(page=2, amount=10)
    assert [d.id for d in devices] == order[10:20] and total == 25
    past = await store.list_page(page=L.MAX_OFFSET // 10 + 5, amount=10)
    assert (past.devices, past.total) == ([], 25)


async def test_a_deep_page_number_is_refused(
    mem_store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(L, "MAX_OFFSET", 10)
    await register(mem_store, clock, (f"dev-{i:03d}" for i in range(25)))
    with pytest.raises(BadRequest, match="after=<cursor>"):
        await mem_store.list_page(page=3, amount=10)


# ---- the search by prefix ------------------------------------------------------------------


async def test_prefix_search_matches_the_start_of_an_id_or_of_a_name_word(
    store: Store, clock: FakeClock
) -> None:
    await register(store, clock, ["SN-77AB", "sn-78cd", "x-SN-1", "tablet", "phone"])
    await store.rename("tablet", "Kitchen scanner NORTH")
    await store.rename("phone", "Übergabe Süd")
    await store.block("sn-78cd")

    async def ids(name: str, blocked: L.BlockedFilter = "all") -> list[str]:
        page = await store.list_page(name=name, match="prefix", blocked=blocked)
        assert page.total == len(page.devices) and not page.truncated
        return [d.id for d in page.devices]

    assert await ids("sn-") == ["sn-78cd", "SN-77AB"]  # case-insensitive, most recent first
    assert await ids("SN-77") == ["SN-77AB"]
    assert await ids("north") == ["tablet"]
    assert await ids("scan") == ["tablet"]
    assert await ids("canner") == []  # the middle of a word: that is match=contains
    assert await ids("-sn") == []
    assert await ids("Süd") == ["phone"]  # a word of another script, as written
    assert await ids("sn-", blocked="only") == ["sn-78cd"]
    assert await ids("sn-", blocked="hide") == ["SN-77AB"]
    await store.rename("tablet", "Hall")
    assert await ids("north") == []
    assert await ids("hall") == ["tablet"]
    await store.delete("SN-77AB")
    assert await ids("sn") == ["sn-78cd"]


async def test_prefix_search_pages_by_cursor(store: Store, clock: FakeClock) -> None:
    order = await register(store, clock, (f"cam-{i:02d}" for i in range(20)))
    await register(store, clock, ["other"])
    assert await walk(store, name="CAM", match="prefix") == order


async def test_prefix_search_is_bounded_and_says_so(
    mem_store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"cam-{i:03d}" for i in range(300)]
    await register(mem_store, clock, ids)
    monkeypatch.setattr(L, "SEARCH_CAP", 1)
    page = await mem_store.list_page(name="cam", match="prefix", amount=500)
    assert page.truncated
    assert page.total is not None and page.total < 300
    assert len({shard_of(d.id) for d in page.devices}) == len(page.devices)  # 1 a shard


# ---- the substring scan --------------------------------------------------------------------


async def test_contains_scan_in_one_answer_counts_and_pages(store: Store, clock: FakeClock) -> None:
    order = await register(store, clock, [f"a{i}-mid-z" for i in range(15)] + ["plain"])
    await store.rename("plain", "has MID inside")
    page = await store.list_page(name="MID", amount=10)
    assert page.total == 16 and page.next_cursor is None
    assert [d.id for d in page.devices] == order[:10]
    devices, total = await store.list_devices(name="mid", page=2, amount=10)
    assert [d.id for d in devices] == order[10:] and total == 16


async def test_contains_scan_in_bounded_steps_finds_each_match_once(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"box-{i:03d}" for i in range(60)]
    await register(store, clock, [*ids, "other"])
    named = ["other", "box-007"]
    await store.rename("other", "the box room")
    await store.rename("box-007", "box too")
    monkeypatch.setattr(L, "SCAN_BUDGET", 0.0)  # one step an answer
    monkeypatch.setattr(L, "SCAN_STEP", 5)
    found: list[str] = []
    page = await store.list_page(name="box", amount=4)
    answers = 1
    found += [d.id for d in page.devices]
    while page.next_cursor is not None:
        assert page.total is None
        page = await store.list_page(name="box", amount=4, after=page.next_cursor)
        found += [d.id for d in page.devices]
        answers += 1
    assert sorted(found) == sorted(ids + named[:1])
    assert answers > 60 // 5


# ---- the indexes stay in step with the records ---------------------------------------------


def index_problems(client: Any, store: Store) -> list[str]:
    """Every way the shard indexes disagree with the records (empty: consistent)."""
    problems: list[str] = []
    prefix = store.keys.prefix
    records = {
        k.split(":dev:", 1)[1]: client.hgetall(k)
        for k in client.scan_iter(match=f"{prefix}:*:dev:*", count=1000)
    }
    for i in range(SHARDS):
        s = store.keys.shard(i)
        mine = {d: r for d, r in records.items() if shard_of(d) == i and "rc" in r}
        active = dict(client.zrange(s.active, 0, -1, withscores=True))
        blocked = dict(client.zrange(s.blocked, 0, -1, withscores=True))
        if set(active) != set(mine):
            problems.append(f"shard {i}: active {sorted(active)} != records {sorted(mine)}")
        want_blocked = {d for d, r in mine.items() if "b" in r}
        if set(blocked) != want_blocked:
            problems.append(f"shard {i}: blocked {sorted(blocked)} != {sorted(want_blocked)}")
        problems += [f"{d}: blocked score" for d in blocked if blocked[d] != active.get(d)]
        names = client.hgetall(s.names)
        if names != {d: r["n"] for d, r in mine.items() if "n" in r}:
            problems.append(f"shard {i}: names {names}")
        words = set(client.zrange(f"{s.active[:-6]}nw", 0, -1))
        want_words = {
            f"{w}\0{d}" for d, n in names.items() for w in ascii_lower(n).replace(",", " ").split()
        }
        if words != want_words:
            problems.append(f"shard {i}: words {sorted(words)} != {sorted(want_words)}")
        heads = sorted(client.zrange(f"{s.active[:-6]}ix", 0, -1))
        entries: list[str] = []
        for j, head in enumerate(heads):
            chunk = client.zrange(f"{s.active[:-6]}ix:{head}", 0, -1)
            if not chunk or len(chunk) > 120:
                problems.append(f"shard {i}: chunk {head!r} holds {len(chunk)}")
            nxt = heads[j + 1] if j + 1 < len(heads) else None
            if any(e < head or (nxt is not None and e >= nxt) for e in chunk):
                problems.append(f"shard {i}: chunk {head!r} out of its range")
            entries += chunk
        want_entries = sorted(d.lower() if d == d.lower() else f"{d.lower()}\0{d}" for d in mine)
        if entries != want_entries:
            problems.append(f"shard {i}: id index {entries} != {want_entries}")
    return problems


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_interleaved_scripts_keep_every_index_consistent(
    real_redis_store: Store, clock: FakeClock, real_redis_client: redis.Redis, seed: int
) -> None:
    """Registration, block, unblock, rename and delete, interleaved at random over a few
    ids (so chunks split and empty): after every step, every index agrees with the
    records. Each step is one script, atomic in Redis: a crash can only fall between two
    of them, where the invariants are checked."""
    store, rnd = real_redis_store, random.Random(seed)
    pool = [f"id-{i:03d}" for i in range(150)] + [f"ID-{i:02d}" for i in range(30)]
    names = ["Hall A", "north,dock", "", "Kitchen scanner", "Ünïcode wörd"]
    for step in range(700):
        device_id, op = rnd.choice(pool), rnd.random()
        if op < 0.45:
            await seen(store, device_id)
        elif op < 0.6:
            await store.block(device_id)
        elif op < 0.7:
            await store.unblock(device_id)
        elif op < 0.85:
            await store.rename(device_id, rnd.choice(names) or None)
        else:
            await store.delete(device_id)
        clock.advance(rnd.choice([0, 1, 1500]))
        if step % 50 == 0 or step == 699:
            assert index_problems(real_redis_client, store) == []
    alive = [d for d in pool if await store.get_device(d) is not None]
    assert sorted(await walk(store)) == sorted(alive)


# ---- a cluster: one call a node, and slots that move ----------------------------------------


def evalsha_calls(cluster: RedisCluster) -> int:
    total = 0
    for port in primary_ports(cluster):
        with redis.Redis(port=port, socket_timeout=5) as node:
            total += int(node.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    return total


async def test_a_page_is_one_script_call_a_primary_on_a_cluster(
    real_cluster: RedisCluster, clock: FakeClock
) -> None:
    store = cluster_store(real_cluster, clock)
    await store.start()
    try:
        order = await register(store, clock, (f"dev-{i:03d}" for i in range(40)))
        await store.list_page(amount=10)  # loads the script on every primary
        for port in primary_ports(real_cluster):
            with redis.Redis(port=port, socket_timeout=5) as node:
                node.config_resetstat()
        page = await store.list_page(amount=10)
        assert [d.id for d in page.devices] == order[:10]
        assert evalsha_calls(real_cluster) == len(primary_ports(real_cluster))
        search = await store.list_page(name="dev-01", match="prefix")
        assert [d.id for d in search.devices] == [f"dev-{i:03d}" for i in range(19, 9, -1)]
    finally:
        await store.close()


async def test_listing_stays_whole_while_a_slot_migrates(
    real_cluster: RedisCluster, clock: FakeClock
) -> None:
    store = cluster_store(real_cluster, clock)
    await store.start()
    try:
        order = await register(store, clock, (f"dev-{i:03d}" for i in range(60)))
        key = store.keys.enforce(order[0])[0]
        slot = real_cluster.slot_for_key(key)
        owner = real_cluster.primary_for_slot(slot)
        target = next(p for p in primary_ports(real_cluster) if p != owner)
        source = real_cluster.begin_migration(slot, target)
        real_cluster.migrate_keys(slot, source, target, [key])  # half moved: ASK
        try:
            assert await walk(store) == order
            assert await walk(store, blocked="hide") == order
            contains = await store.list_page(name="ev-0", amount=100)
            assert contains.total == 60 and [d.id for d in contains.devices] == order
        finally:
            real_cluster.migrate_keys(slot, source, target)
            real_cluster.finish_migration(slot, source, target)
        assert await walk(store) == order
    finally:
        await store.close()


def cluster_store(cluster: RedisCluster, clock: FakeClock) -> Store:
    return Store.from_settings(RedisSettings(url=cluster.url, timeout=2.0), clock=clock)


async def test_reindex_puts_records_written_before_the_indexes_in_them(
    real_redis: RedisServer,
    real_redis_store: Store,
    real_redis_client: redis.Redis,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    store = real_redis_store
    await register(store, clock, [f"Old-{i:03d}" for i in range(300)])
    await store.rename("Old-007", "Loading dock")
    index_keys = [
        k
        for k in real_redis_client.scan_iter(match="dg:*", count=1000)
        if k.endswith((":nw", ":ix")) or ":ix:" in k
    ]
    real_redis_client.delete(*index_keys)  # as a release without the indexes left them
    assert (await store.list_page(name="old-", match="prefix")).total == 0
    config = tmp_path / "config.yaml"
    config.write_text(f"redis:\n  url: {real_redis.url}\n")
    out = io.StringIO()
    reindex = ["reindex", "--config", str(config)]
    assert await asyncio.to_thread(cli.main, reindex, env={}, out=out) == 0
    assert out.getvalue() == "reindexed 300 devices\n"
    assert (await store.list_page(name="old-", match="prefix")).total == 300
    assert [d.id for d in (await store.list_page(name="dock", match="prefix")).devices] == [
        "Old-007"
    ]
    assert index_problems(real_redis_client, store) == []
    assert await asyncio.to_thread(cli.main, reindex, env={}, out=io.StringIO()) == 0
    assert index_problems(real_redis_client, store) == []


async def test_every_page_by_number_matches_the_order(store: Store, clock: FakeClock) -> None:
    """Pages by number up to 130 rows deep: a page's first rows are selected by a bounded
    insertion, and by a sort past 64 rows (lua/list_order.lua): both give the order."""
    order = await register(store, clock, (f"dev-{i:03d}" for i in range(130)))
    for page in range(1, 15):
        devices, total = await store.list_devices(page=page, amount=10)
        assert [d.id for d in devices] == order[(page - 1) * 10 : page * 10], page
        assert total == 130
    matched = await store.list_page(name="dev-1", match="prefix", page=3, amount=10)
    assert [d.id for d in matched.devices] == [i for i in order if i.startswith("dev-1")][20:30]
