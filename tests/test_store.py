"""The store on fakeredis and on a real redis-server: registration, blocking, lists, limits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from gateway.config import RedisSettings
from gateway.errors import StoreUnavailable
from gateway.model import Bucket, DeviceIdentity, ReplyCode, iso_ms
from gateway.store import Store
from gateway.store.keys import shard_of
from tests.rig.clock import EPOCH_US, FakeClock
from tests.rig.raw_upstream import MakeRawUpstream
from tests.rig.redis_server import RedisServer, command_stats, reset_stats
from tests.rig.system import free_port

BUCKET = Bucket(rate=1.0, burst=3)
PHONE = DeviceIdentity(
    "phone-1",
    application="FieldApp",
    application_version="2.4.1",
    os="Android",
    os_version="15",
    manufacturer="Samsung",
    model="Galaxy S24",
)


async def call(store: Store, identity: DeviceIdentity | None = PHONE, *, upload: bool = False):
    return await store.enforce(identity, "203.0.113.9", BUCKET, upload=upload)


def test_iso_ms_formats_like_the_seed() -> None:
    assert iso_ms(1_793_748_259_787) == "2026-11-03T23:24:19.787Z"
    assert iso_ms(1_793_748_259_007) == "2026-11-03T23:24:19.007Z"
    assert iso_ms(None) is None


async def test_first_request_registers_the_device(store: Store, clock: FakeClock) -> None:
    decision = await call(store, upload=True)
    assert decision.outcome is ReplyCode.ALLOW
    assert decision.new_device
    device = await store.get_device("phone-1")
    assert device is not None
    assert device.to_json() == {
        "id": "phone-1",
        "name": None,
        "display_name": "phone-1",
        "application": "FieldApp",
        "application_version": "2.4.1",
        "os": "Android",
        "os_version": "15",
        "manufacturer": "Samsung",
        "model": "Galaxy S24",
        "first_seen": "2026-11-03T23:24:19.787Z",
        "last_active": "2026-11-03T23:24:19.787Z",
        "last_data_upload": "2026-11-03T23:24:19.787Z",
        "last_activity": "2026-11-03T23:24:19.787Z",
        "blocked": False,
        "blocked_at": None,
        "request_count": 1,
        "denied_count": 0,
        "rate_limit": None,
    }
    assert not (await call(store)).new_device


async def test_last_active_moves_and_upload_only_for_uploads(
    store: Store, clock: FakeClock
) -> None:
    await call(store, upload=True)
    uploaded = clock.now_ms
    clock.advance(5_000)
    await call(store, upload=False)
    device = await store.get_device("phone-1")
    assert device is not None
    assert device.last_active == clock.now_ms
    assert device.last_data_upload == uploaded
    assert device.first_seen == uploaded
    assert device.request_count == 2


async def test_timestamps_never_move_backwards(store: Store, clock: FakeClock) -> None:
    await call(store)
    first = clock.now_ms
    clock.advance(-30_000)
    await call(store)
    device = await store.get_device("phone-1")
    assert device is not None
    assert device.last_active == first


async def test_undeclared_fields_keep_their_stored_values(store: Store) -> None:
    await call(store)
    await call(store, DeviceIdentity("phone-1"))
    device = await store.get_device("phone-1")
    assert device is not None
    assert (device.application, device.model) == ("FieldApp", "Galaxy S24")
    assert await store.history("phone-1") == []


async def test_a_device_s_keys_and_declared_fields_are_kept_per_identity(
    store: Store, clock: FakeClock
) -> None:
    """The data plane reuses one identity object while a device sends the same headers
    (gateway.identity): its KEYS and ARGV are built once. Another object, with other values,
    is read afresh: the change reaches the record and its history."""
    script = store._enforce_script
    first = DeviceIdentity("kept-1", "FieldApp", "2.4.1")
    for _ in range(3):
        await store.enforce(first, "198.51.100.7", BUCKET, upload=False)
        clock.advance(10)
    kept = script._devices["kept-1"]
    assert kept[0] is first and kept[2] == "FieldApp\x1f2.4.1\x1f\x1f\x1f\x1f"
    newer = DeviceIdentity("kept-1", "FieldApp", "2.5.0")
    await store.enforce(newer, "198.51.100.7", BUCKET, upload=False)
    assert script._devices["kept-1"][0] is newer
    assert script._devices["kept-1"][1] == kept[1]  # the keys: the id's, kept
    device = await store.get_device("kept-1")
    assert device is not None and device.application_version == "2.5.0"
    assert device.request_count == 4
    [change] = await store.history("kept-1") or []
    assert (change.field, change.old, change.new) == ("application_version", "2.4.1", "2.5.0")


async def test_the_kept_devices_are_bounded(clock: FakeClock) -> None:
    store = Store.memory(clock=clock)
    store._enforce_script._device_cache = 5
    for i in range(12):
        reply = await store.enforce(DeviceIdentity(f"b-{i}"), "198.51.100.7", BUCKET, upload=False)
        assert reply.new_device
        assert len(store._enforce_script._devices) <= 5
    await store.close()


async def test_changes_are_recorded_newest_first(store: Store, clock: FakeClock) -> None:
    await call(store)
    clock.advance(1_000)
    await call(store, DeviceIdentity("phone-1", application_version="2.5.0", os_version="16"))
    history = await store.history("phone-1")
    assert history is not None
    assert [e.to_json() for e in history] == [
        {"at": iso_ms(clock.now_ms), "field": "os_version", "old": "15", "new": "16"},
        {
            "at": iso_ms(clock.now_ms),
            "field": "application_version",
            "old": "2.4.1",
            "new": "2.5.0",
        },
    ]


async def test_history_is_capped(clock: FakeClock) -> None:
    store = Store.memory(clock=clock, history_size=3)
    for version in range(6):
        await call(store, DeviceIdentity("phone-1", application_version=str(version)))
    history = await store.history("phone-1")
    assert history is not None
    assert [e.new for e in history] == ["5", "4", "3"]
    assert await store.history("nobody") is None
    await store.close()


async def test_bucket_allows_burst_then_limits_then_refills(store: Store, clock: FakeClock) -> None:
    outcomes = [(await call(store)).outcome for _ in range(4)]
    assert outcomes == [ReplyCode.ALLOW] * 3 + [ReplyCode.LIMITED]
    limited = await call(store)
    assert limited.retry_after_us == 1_000_000
    clock.advance(999)
    assert (await call(store)).outcome is ReplyCode.LIMITED
    clock.advance(1)
    assert (await call(store)).outcome is ReplyCode.ALLOW
    device = await store.get_device("phone-1")
    assert device is not None
    assert (device.request_count, device.denied_count) == (7, 3)


async def test_blocked_device_is_denied_without_taking_tokens(
    store: Store, clock: FakeClock
) -> None:
    await call(store)
    await store.block("phone-1")
    clock.advance(2_000)
    for _ in range(5):
        assert (await call(store)).outcome is ReplyCode.BLOCKED
    device = await store.get_device("phone-1")
    assert device is not None
    assert device.blocked
    assert device.denied_count == 5
    assert device.last_active == clock.now_ms  # ops see a blocked device that keeps trying
    await store.unblock("phone-1")
    # The bucket was full before the block and no token was taken while blocked.
    remaining = [(await call(store)).remaining for _ in range(3)]
    assert remaining == [2, 1, 0]


async def test_block_is_idempotent_and_keeps_the_first_time(store: Store, clock: FakeClock) -> None:
    await call(store)
    first = await store.block("phone-1")
    clock.advance(10_000)
    again = await store.block("phone-1")
    assert first.blocked_at == again.blocked_at == clock.now_ms - 10_000
    unblocked = await store.unblock("phone-1")
    assert unblocked is not None
    assert not unblocked.blocked
    assert unblocked.blocked_at is None
    assert (await store.unblock("phone-1")) is not None


async def test_pre_block_creates_a_record_and_denies_the_first_request(
    store: Store, clock: FakeClock
) -> None:
    device = await store.block("lost-phone")
    assert device.blocked
    assert device.first_seen is None
    assert device.last_activity == clock.now_ms
    assert (await call(store, DeviceIdentity("lost-phone"))).outcome is ReplyCode.BLOCKED


async def test_unknown_devices(store: Store) -> None:
    assert await store.get_device("ghost") is None
    assert await store.unblock("ghost") is None
    assert await store.rename("ghost", "x") is None
    assert await store.delete("ghost") is False
    assert await store.delete_rate_limit("ghost") is False


async def test_rename_and_clear(store: Store) -> None:
    await call(store)
    renamed = await store.rename("phone-1", "Warehouse scanner")
    assert renamed is not None
    assert (renamed.name, renamed.display_name) == ("Warehouse scanner", "Warehouse scanner")
    cleared = await store.rename("phone-1", None)
    assert cleared is not None
    assert (cleared.name, cleared.display_name) == (None, "phone-1")
    devices, total = await store.list_devices(name="warehouse")
    assert (devices, total) == ([], 0)


async def test_delete_removes_every_key(store: Store) -> None:
    await call(store)
    await call(store, DeviceIdentity("phone-1", application="Other"))
    await store.rename("phone-1", "n")
    await store.block("phone-1")
    await store.set_rate_limit("phone-1", Bucket(rate=2, burst=2))
    assert await store.delete("phone-1") is True
    assert await store.get_device("phone-1") is None
    prefix = store.keys.prefix
    left = [k async for k in store._admin.scan_iter(match=f"{prefix}:*")]
    # Empty index keys vanish by themselves in Redis; only the shard's blocked-index
    # version counter stays (shard metadata, not the device's).
    assert left == [store.keys.shard(shard_of("phone-1")).blocked_version]
    assert await store.list_devices() == ([], 0)


async def test_rate_limit_override_takes_precedence(store: Store) -> None:
    await store.set_rate_limit("phone-1", Bucket(rate=0.5, burst=1))
    first = await call(store)
    assert first.bucket == Bucket(rate=0.5, burst=1)
    assert first.retry_after_us == 2_000_000
    assert (await call(store)).outcome is ReplyCode.LIMITED
    device = await store.get_device("phone-1")
    assert device is not None
    assert device.rate_limit == Bucket(rate=0.5, burst=1)
    assert await store.delete_rate_limit("phone-1") is True
    assert (await call(store)).bucket is BUCKET


async def test_anonymous_buckets_are_per_address(store: Store) -> None:
    for _ in range(3):
        assert (await store.enforce(None, "198.51.100.1", BUCKET, upload=False)).policy == (
            "anonymous"
        )
    assert (await store.enforce(None, "198.51.100.1", BUCKET, upload=False)).outcome is (
        ReplyCode.LIMITED
    )
    assert (await store.enforce(None, "198.51.100.2", BUCKET, upload=False)).outcome is (
        ReplyCode.ALLOW
    )
    assert await store.list_devices() == ([], 0)


# The six declared values' own hash fields, as an older devicegate wrote them beside `df`.
OWN_FIELDS = ("a", "av", "o", "ov", "mf", "md")
JOINED = "FieldApp\x1f2.4.1\x1fAndroid\x1f15\x1fSamsung\x1fGalaxy S24"


async def test_the_declared_values_live_in_df_only(store: Store, clock: FakeClock) -> None:
    record = store.keys.device("phone-1").record
    await call(store)
    assert await store._admin.hget(record, "df") == JOINED
    assert set(OWN_FIELDS).isdisjoint(await store._admin.hkeys(record))
    # A changed declaration is compared part by part with `df`, with history.
    clock.advance(1.0)
    await call(store, dataclasses.replace(PHONE, os_version="16"))
    device = await store.get_device("phone-1")
    assert device is not None
    assert (device.os, device.os_version) == ("Android", "16")
    changed = JOINED.replace("\x1f15\x1f", "\x1f16\x1f")
    assert await store._admin.hget(record, "df") == changed
    assert set(OWN_FIELDS).isdisjoint(await store._admin.hkeys(record))
    history = await store.history("phone-1")
    assert history is not None
    assert [(e.field, e.old, e.new) for e in history] == [("os_version", "15", "16")]
    # A partial declaration keeps what is stored for the rest: `df` holds the merged values.
    await call(store, DeviceIdentity("phone-1", model="Galaxy S25"))
    device = await store.get_device("phone-1")
    assert device is not None
    assert (device.application, device.os_version, device.model) == (
        "FieldApp",
        "16",
        "Galaxy S25",
    )
    assert await store._admin.hget(record, "df") == changed.replace("S24", "S25")
    assert set(OWN_FIELDS).isdisjoint(await store._admin.hkeys(record))
    history = await store.history("phone-1")
    assert history is not None
    assert [(e.field, e.old, e.new) for e in history] == [
        ("model", "Galaxy S24", "Galaxy S25"),
        ("os_version", "15", "16"),
    ]


async def test_an_empty_declared_value_keeps_the_stored_one(store: Store) -> None:
    record = store.keys.device("phone-1").record
    await call(store)
    await call(store, DeviceIdentity("phone-1", os="Android", model="Galaxy S24"))
    await call(store, DeviceIdentity("phone-1"))
    assert await store._admin.hget(record, "df") == JOINED
    # A device never declaring a field leaves its part empty.
    await call(store, DeviceIdentity("tablet", os="Android"))
    assert await store._admin.hget(store.keys.device("tablet").record, "df") == (
        "\x1f\x1fAndroid\x1f\x1f\x1f"
    )
    tablet = await store.get_device("tablet")
    assert tablet is not None
    assert (tablet.application, tablet.os, tablet.model) == (None, "Android", None)
    assert await store.history("phone-1") == await store.history("tablet") == []


async def old_record(store: Store, clock: FakeClock, **fields: str) -> str:
    """A record as an older devicegate wrote it: the six values in fields of their own."""
    record = store.keys.device("phone-1").record
    stamp = str(clock.now_ms)
    values = {"rc": "4", "dc": "0", "fs": stamp, "la": stamp}
    values |= zip(OWN_FIELDS, JOINED.split("\x1f"), strict=True)
    values |= fields
    await store._admin.hset(record, items=[x for item in values.items() for x in item])
    return record


async def test_a_record_with_no_df_still_reads_and_changes(store: Store, clock: FakeClock) -> None:
    record = await old_record(store, clock)
    device = await store.get_device("phone-1")
    assert device is not None
    assert (device.application, device.os_version, device.model) == ("FieldApp", "15", "Galaxy S24")
    clock.advance(1_000)
    # It declares a new os version and leaves its model out: the model stays the stored one.
    await call(store, dataclasses.replace(PHONE, os_version="16", model=None))
    history = await store.history("phone-1")
    assert history is not None
    assert [(e.field, e.old, e.new) for e in history] == [("os_version", "15", "16")]
    assert await store._admin.hget(record, "df") == JOINED.replace("\x1f15\x1f", "\x1f16\x1f")
    device = await store.get_device("phone-1")
    assert device is not None
    assert (device.os_version, device.model, device.request_count) == ("16", "Galaxy S24", 5)


async def test_a_record_whose_df_left_values_out_still_reads_and_changes(
    store: Store, clock: FakeClock
) -> None:
    # An older devicegate kept in `df` the declaration as sent: a device that declared only
    # its application last left the rest in their own fields.
    record = await old_record(store, clock, df="FieldApp\x1f\x1f\x1f\x1f\x1f")
    device = await store.get_device("phone-1")
    assert device is not None
    assert (device.application, device.os, device.model) == ("FieldApp", "Android", "Galaxy S24")
    clock.advance(1_000)
    await call(store, DeviceIdentity("phone-1", application="FieldApp", model="Galaxy S25"))
    history = await store.history("phone-1")
    assert history is not None
    assert [(e.field, e.old, e.new) for e in history] == [("model", "Galaxy S24", "Galaxy S25")]
    assert await store._admin.hget(record, "df") == JOINED.replace("S24", "S25")
    # The old fields stay behind, unread: `df` has a value for each.
    assert await store._admin.hget(record, "md") == "Galaxy S24"
    await store._admin.hset(record, "o", "edited")
    await call(store, dataclasses.replace(PHONE, model="Galaxy S25"))
    device = await store.get_device("phone-1")
    assert device is not None
    assert (device.os, device.model) == ("Android", "Galaxy S25")
    assert len(await store.history("phone-1") or []) == 1


async def test_a_known_device_declaring_the_same_reads_its_record_once(
    real_redis: RedisServer, clock: FakeClock
) -> None:
    store = Store.from_settings(
        RedisSettings(url=real_redis.url, timeout=2.0, key_prefix="tdf"), clock=clock
    )
    await store.start()
    try:
        await call(store)
        reset_stats(real_redis)
        for _ in range(3):
            await call(store)
        stats = command_stats(real_redis)
        assert stats["hmget"]["calls"] == 3  # one per call: the six fields are not read
        assert "lpush" not in stats
        reset_stats(real_redis)
        await call(store, dataclasses.replace(PHONE, model="Galaxy S25"))
        assert command_stats(real_redis)["hmget"]["calls"] == 1  # `df` came with the state
    finally:
        await store.close()


@contextlib.contextmanager
def script_writes(server: RedisServer) -> Iterator[list[list[str]]]:
    """The HSETs the scripts make inside the block, each as [key, field, value, ...] (MONITOR;
    values with no double quote in them)."""
    writes: list[list[str]] = []
    with redis.Redis(port=server.port, socket_timeout=2) as monitoring, monitoring.monitor() as m:
        yield writes
        with redis.Redis(port=server.port, socket_timeout=2) as other:
            other.echo("script-writes-end")
        while True:
            line = m.connection.read_response()
            text = line.decode() if isinstance(line, bytes) else str(line)
            args = re.findall(r'"(.*?)(?<!\\)"', text.split("] ", 1)[1])
            if args == ["ECHO", "script-writes-end"]:
                break
            if "[0 lua]" in text and args[0].upper() == "HSET":
                writes.append(args[1:])


async def test_a_declaration_that_matches_df_does_not_rewrite_it(
    real_redis: RedisServer, clock: FakeClock
) -> None:
    store = Store.from_settings(
        RedisSettings(url=real_redis.url, timeout=2.0, key_prefix="tdf"), clock=clock
    )
    await store.start()
    try:
        await call(store)
        reset_stats(real_redis)
        with script_writes(real_redis) as writes:
            await call(store)  # the same six: one string compare
            await call(store, DeviceIdentity("phone-1", model="Galaxy S24"))  # part of them
            await call(store, DeviceIdentity("phone-1"))  # none
            await call(store, dataclasses.replace(PHONE, model="Galaxy S25"))  # a change
            await call(store, dataclasses.replace(PHONE, model="Galaxy S25"))  # the same again
        assert ["df" in hset[1::2] for hset in writes] == [False, False, False, True, False]
        assert command_stats(real_redis)["hmget"]["calls"] == 5  # the state only, each time
    finally:
        await store.close()


async def test_a_device_bucket_lives_in_its_record_with_no_key_of_its_own(store: Store) -> None:
    await call(store)
    record = store.keys.device("phone-1").record
    # Two of three tokens left at the fake clock's time, in the record's `tb` field.
    assert await store._admin.hget(record, "tb") == f"2000:{EPOCH_US}"
    assert await store._admin.pttl(record) == -1  # the record never expires
    # No bucket key beside it. Searched past the prefix: the real store's random prefix
    # ("t" and six hex digits) starts with "tb" one time in sixteen.
    assert await store._admin.keys(f"{store.keys.prefix}:*tb*") == []


async def test_an_address_bucket_key_expires_when_it_would_be_full(store: Store) -> None:
    await call(store, None)
    ttl = await store._admin.pttl(store.keys.anonymous_bucket("203.0.113.9"))
    assert 0 < ttl <= 1_001


async def seed_devices(store: Store, clock: FakeClock, count: int) -> list[str]:
    ids = []
    for i in range(count):
        ids.append(f"dev-{i:03d}")
        await store.enforce(DeviceIdentity(ids[-1]), "", BUCKET, upload=False)
        clock.advance(10)
    return ids


async def test_list_is_most_recent_first_with_paging(store: Store, clock: FakeClock) -> None:
    ids = await seed_devices(store, clock, 45)
    newest_first = ids[::-1]
    page1, total = await store.list_devices(page=1, amount=20)
    page3, _ = await store.list_devices(page=3, amount=20)
    beyond, _ = await store.list_devices(page=4, amount=20)
    assert total == 45
    assert [d.id for d in page1] == newest_first[:20]
    assert [d.id for d in page3] == newest_first[40:]
    assert beyond == []
    everything, _ = await store.list_devices(page=1, amount=1000)
    assert [d.id for d in everything] == newest_first


async def test_list_blocked_filters(store: Store, clock: FakeClock) -> None:
    ids = await seed_devices(store, clock, 30)
    for device_id in ids[::3]:
        await store.block(device_id)
    blocked = [i for i in ids[::-1] if int(i[-3:]) % 3 == 0]
    unblocked = [i for i in ids[::-1] if int(i[-3:]) % 3]
    only, only_total = await store.list_devices(blocked="only", amount=100)
    hide, hide_total = await store.list_devices(blocked="hide", amount=100)
    hide_page2, _ = await store.list_devices(blocked="hide", page=2, amount=7)
    assert ([d.id for d in only], only_total) == (blocked, 10)
    assert ([d.id for d in hide], hide_total) == (unblocked, 20)
    assert [d.id for d in hide_page2] == unblocked[7:14]


async def test_list_orders_never_seen_blocked_devices_by_block_time(
    store: Store, clock: FakeClock
) -> None:
    await call(store)
    clock.advance(1_000)
    await store.block("lost-phone")
    clock.advance(1_000)
    await call(store, DeviceIdentity("tablet"))
    devices, _ = await store.list_devices()
    assert [d.id for d in devices] == ["tablet", "lost-phone", "phone-1"]


async def test_name_search_matches_id_or_custom_name(store: Store, clock: FakeClock) -> None:
    await seed_devices(store, clock, 12)
    await store.rename("dev-003", "Front DESK tablet")
    await store.block("dev-010")
    by_name, total = await store.list_devices(name="desk")
    assert ([d.id for d in by_name], total) == (["dev-003"], 1)
    by_id, total = await store.list_devices(name="DEV-01")
    assert ([d.id for d in by_id], total) == (["dev-011", "dev-010"], 2)
    only, _ = await store.list_devices(name="dev-01", blocked="only")
    hide, _ = await store.list_devices(name="dev-01", blocked="hide")
    assert [d.id for d in only] == ["dev-010"]
    assert [d.id for d in hide] == ["dev-011"]
    paged, total = await store.list_devices(name="dev", page=2, amount=5)
    assert total == 12
    assert [d.id for d in paged] == ["dev-006", "dev-005", "dev-004", "dev-003", "dev-002"]


async def test_two_stores_share_one_server(clock: FakeClock) -> None:
    import fakeredis

    server = fakeredis.FakeServer()
    a = Store.memory(clock=clock, server=server)
    b = Store.memory(clock=clock, server=server)
    await a.enforce(PHONE, "", BUCKET, upload=False)
    await b.block("phone-1")
    assert (await a.enforce(PHONE, "", BUCKET, upload=False)).outcome is ReplyCode.BLOCKED
    await a.close()
    await b.close()


@pytest.mark.timing
async def test_unreachable_redis_raises_store_unavailable_in_time() -> None:
    store = Store.from_settings(
        RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.1)
    )
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await call(store)
    assert await store.ping() is False
    await store.start()  # tolerated: the scripts load on first use
    assert time.monotonic() - started < 2
    await store.close()


@pytest.mark.timing
async def test_black_holed_redis_is_bounded_by_the_timeout(
    make_raw_upstream: MakeRawUpstream,
) -> None:
    # A listener (the rig's raw server) that accepts and never answers: the call must end
    # at the timeout.
    async def swallow(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads everything, answers nothing, until the client goes

    hole = await make_raw_upstream(serve=swallow)
    store = Store.from_settings(RedisSettings(url=f"redis://127.0.0.1:{hole.port}/0", timeout=0.1))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"did not answer|failed"):
        await call(store)
    assert time.monotonic() - started < 1.0
    await store.close()


async def test_list_merges_correctly_when_one_shard_holds_many(
    store: Store, clock: FakeClock
) -> None:
    # Ids chosen to share one shard force the lazy per-shard refills of the merge.
    crowded = [i for i in (f"c-{n}" for n in range(20_000)) if shard_of(i) == 7][:70]
    others = [f"o-{n}" for n in range(30)]
    order = []
    for device_id in crowded[:35] + others + crowded[35:]:
        await store.enforce(DeviceIdentity(device_id), "", BUCKET, upload=False)
        order.append(device_id)
        clock.advance(1)
    for device_id in crowded[::5]:
        await store.block(device_id)
    newest_first = order[::-1]
    pages = [(await store.list_devices(page=p, amount=9))[0] for p in range(1, 13)]
    assert [d.id for page in pages for d in page] == newest_first
    hidden = [i for i in newest_first if i not in crowded[::5]]
    hide_pages = [
        (await store.list_devices(blocked="hide", page=p, amount=11))[0] for p in range(1, 10)
    ]
    assert [d.id for page in hide_pages for d in page] == hidden


REGISTRATION = Bucket(rate=1.0, burst=2)


async def register(store: Store, device_id: str, ip: str = "198.51.100.9"):
    return await store.enforce(
        DeviceIdentity(device_id), ip, BUCKET, upload=False, registration=REGISTRATION
    )


async def test_new_devices_are_charged_to_their_address_budget(
    store: Store, clock: FakeClock
) -> None:
    assert (await register(store, "n1")).outcome is ReplyCode.ALLOW
    assert (await register(store, "n2")).outcome is ReplyCode.ALLOW
    refused = await register(store, "n3")
    assert (refused.outcome, refused.policy) == (ReplyCode.LIMITED, "registration")
    assert refused.retry_after_us == 1_000_000
    assert await store.get_device("n3") is None  # a refused device leaves no record
    # Known devices are never charged; another address has its own budget.
    assert (await register(store, "n1")).outcome is ReplyCode.ALLOW
    assert (await register(store, "m1", ip="198.51.100.10")).outcome is ReplyCode.ALLOW
    clock.advance(1000)
    assert (await register(store, "n3")).outcome is ReplyCode.ALLOW
    _, total = await store.list_devices()
    assert total == 4


async def test_a_device_new_or_known_costs_one_call(clock: FakeClock) -> None:
    store = Store.memory(clock=clock)
    await store.start()  # the script is loaded: no NOSCRIPT retry in the count
    calls: list[int] = []  # the number of keys of each enforce.lua call
    hot = store._hot
    original = hot.evalsha

    async def counting(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        calls.append(numkeys)
        return await original(sha, numkeys, *keys_and_args)

    hot.evalsha = counting  # type: ignore[method-assign]
    try:
        await register(store, "fresh")
        assert calls == [5]  # the device's keys and its address's budget, in one call
        calls.clear()
        await register(store, "fresh")
        assert calls == [5]  # the budget's key travels along, untouched for a known device
    finally:
        await store.close()


async def test_a_device_new_or_known_costs_one_round_trip_on_real_redis(
    real_redis: RedisServer, clock: FakeClock
) -> None:
    settings = RedisSettings(url=real_redis.url, timeout=2.0)
    store = Store.from_settings(settings, clock=clock)
    await store.start()
    try:
        reset_stats(real_redis)
        await register(store, "fresh")
        assert command_stats(real_redis)["evalsha"]["calls"] == 1
        reset_stats(real_redis)
        await register(store, "fresh")
        assert command_stats(real_redis)["evalsha"]["calls"] == 1
    finally:
        await store.close()
