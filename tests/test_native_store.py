"""The embedded store (gateway.store.native and its modules): each behaviour on its own, the
Store's behaviour tests again with `store` a NativeStore, and its parts against models.

tests/test_native_differential.py runs it beside a Store on a real redis-server.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import RedisSettings
from gateway.errors import BadRequest
from gateway.model import Bucket, DeviceIdentity, EnforceReply, ReplyCode
from gateway.store import NativeStore, Store, native_listing, open_store
from gateway.store import listing as L
from gateway.store.blocked import BlockedSeed
from gateway.store.cursor import ListCursor, ScanCursor
from gateway.store.keys import shard_of
from gateway.store.native_bucket import NO_BUCKET, OUTCOME_ALLOWED, AddressBuckets, take
from gateway.store.native_listing import index_entry, name_words
from gateway.store.native_order import CHUNK, SHED_AT, ActivityOrder
from gateway.store.native_record import DeviceRecord
from tests import test_listing, test_store
from tests.rig.bucket_model import BucketModel
from tests.rig.clock import FakeClock

T = TypeVar("T")
BUCKET = Bucket(rate=1.0, burst=3)
REGISTRATION = Bucket(rate=1.0, burst=2)
PHONE = DeviceIdentity("phone-1", application="FieldApp", os="Android", model="Galaxy S24")
IP = "203.0.113.9"


def done(call: Coroutine[Any, Any, T]) -> T:
    """The result of a store call run to its end at once: the embedded store never waits
    on anything (a call that suspended would fail here)."""
    try:
        call.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    call.close()
    raise AssertionError("the call suspended")


def request(
    store: NativeStore,
    identity: DeviceIdentity | None = PHONE,
    *,
    upload: bool = False,
    ip: str = IP,
    bucket: Bucket = BUCKET,
    registration: Bucket | None = None,
) -> EnforceReply:
    return done(store.enforce(identity, ip, bucket, upload=upload, registration=registration))


class Expiry:
    """A monotonic clock for the address buckets' expiry, moved by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def native(clock: FakeClock) -> NativeStore:
    """A NativeStore on the fake clock."""
    return NativeStore(clock=clock)


@pytest.fixture
async def store(clock: FakeClock) -> NativeStore:
    """The Store's behaviour tests below run with `store` a NativeStore (this module's
    fixture takes the place of the rig's, which gives the Redis engines)."""
    return NativeStore(clock=clock)


# ---- the Store's behaviour tests, on the embedded store ----------------------------------
# Those that ask only what the contract offers (no Redis keys, no script counts).

test_first_request_registers_the_device = test_store.test_first_request_registers_the_device
test_last_active_moves_and_upload_only_for_uploads = (
    test_store.test_last_active_moves_and_upload_only_for_uploads
)
test_timestamps_never_move_backwards = test_store.test_timestamps_never_move_backwards
test_undeclared_fields_keep_their_stored_values = (
    test_store.test_undeclared_fields_keep_their_stored_values
)
test_changes_are_recorded_newest_first = test_store.test_changes_are_recorded_newest_first
test_bucket_allows_burst_then_limits_then_refills = (
    test_store.test_bucket_allows_burst_then_limits_then_refills
)
test_blocked_device_is_denied_without_taking_tokens = (
    test_store.test_blocked_device_is_denied_without_taking_tokens
)
test_block_is_idempotent_and_keeps_the_first_time = (
    test_store.test_block_is_idempotent_and_keeps_the_first_time
)
test_pre_block_creates_a_record_and_denies_the_first_request = (
    test_store.test_pre_block_creates_a_record_and_denies_the_first_request
)
test_unknown_devices = test_store.test_unknown_devices
test_rename_and_clear = test_store.test_rename_and_clear
test_rate_limit_override_takes_precedence = test_store.test_rate_limit_override_takes_precedence
test_anonymous_buckets_are_per_address = test_store.test_anonymous_buckets_are_per_address
test_list_is_most_recent_first_with_paging = test_store.test_list_is_most_recent_first_with_paging
test_the_list_moves_a_device_when_its_last_active_enters_another_second = (
    test_listing.test_the_list_moves_a_device_when_its_last_active_enters_another_second
)
test_list_blocked_filters = test_store.test_list_blocked_filters
test_list_orders_never_seen_blocked_devices_by_block_time = (
    test_store.test_list_orders_never_seen_blocked_devices_by_block_time
)
test_name_search_matches_id_or_custom_name = test_store.test_name_search_matches_id_or_custom_name
test_list_merges_correctly_when_one_shard_holds_many = (
    test_store.test_list_merges_correctly_when_one_shard_holds_many
)
test_new_devices_are_charged_to_their_address_budget = (
    test_store.test_new_devices_are_charged_to_their_address_budget
)
test_cursor_walk_gives_every_device_once_in_order = (
    test_listing.test_cursor_walk_gives_every_device_once_in_order
)
test_cursor_neither_repeats_nor_skips_a_device_that_did_not_move = (
    test_listing.test_cursor_neither_repeats_nor_skips_a_device_that_did_not_move
)
test_equal_scores_page_by_id = test_listing.test_equal_scores_page_by_id
test_page_numbers_still_page_and_deep_ones_point_to_the_cursor = (
    test_listing.test_page_numbers_still_page_and_deep_ones_point_to_the_cursor
)
test_prefix_search_matches_the_start_of_an_id_or_of_a_name_word = (
    test_listing.test_prefix_search_matches_the_start_of_an_id_or_of_a_name_word
)
test_prefix_search_pages_by_cursor = test_listing.test_prefix_search_pages_by_cursor
test_contains_scan_in_one_answer_counts_and_pages = (
    test_listing.test_contains_scan_in_one_answer_counts_and_pages
)
test_every_page_by_number_matches_the_order = (
    test_listing.test_every_page_by_number_matches_the_order
)


# ---- which store the gateway opens ---------------------------------------------------------


async def test_memory_urls_open_the_native_store_and_redis_urls_the_store() -> None:
    embedded = open_store(RedisSettings(url="memory://", key_prefix="p"), history_size=7)
    assert isinstance(embedded, NativeStore)
    assert embedded.keys.prefix == "p"
    on_redis = open_store(RedisSettings(url="redis://127.0.0.1:1/0"))
    assert isinstance(on_redis, Store)
    await on_redis.close()
    # The Store's own constructor still embeds fakeredis for memory://: tests compare the
    # Lua scripts with the embedded store through it.
    lua = Store.from_settings(RedisSettings(url="memory://"))
    assert isinstance(lua, Store)
    await lua.close()


async def test_the_embedded_store_is_always_up() -> None:
    store = NativeStore()
    await store.start(follow_blocked=True)
    assert await store.ping()
    assert await store.reindex() == 0
    await store.close()


def test_without_a_clock_it_stamps_wall_time() -> None:
    store = NativeStore()
    import time

    before = time.time_ns() // 1_000_000
    request(store)
    after = time.time_ns() // 1_000_000
    device = done(store.get_device("phone-1"))
    assert device is not None and device.first_seen is not None
    assert before <= device.first_seen <= after


# ---- the token bucket ----------------------------------------------------------------------

steps = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=3_000_000),
        st.integers(min_value=-50_000, max_value=0),  # a clock going backwards
        st.just(0),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=500, deadline=None)
@given(
    rate_milli=st.integers(min_value=1, max_value=50_000),
    burst=st.integers(min_value=1, max_value=20),
    elapsed=steps,
)
def test_buckets_match_the_model(rate_milli: int, burst: int, elapsed: list[int]) -> None:
    """A device's bucket (in its record) and an address's (held until full) against the
    model tests/test_bucket_model.py holds enforce.lua to."""
    clock = FakeClock()
    store = NativeStore(clock=clock, expiry_clock=lambda: 0.0)  # nothing expires
    bucket = Bucket(rate=rate_milli / 1000, burst=burst)
    device, address = BucketModel(rate_milli, burst), BucketModel(rate_milli, burst)
    for step in elapsed:
        clock.now_us += step
        for model, identity in ((device, PHONE), (address, None)):
            want = model.take(clock.now_us)
            got = request(store, identity, bucket=bucket)
            assert (
                got.outcome is ReplyCode.ALLOW,
                got.remaining,
                got.retry_after_us,
                got.full_after_us,
            ) == (want.allowed, want.remaining, want.retry_after_us, want.full_after_us)


def test_take_of_a_missing_bucket_is_a_full_one() -> None:
    assert take(0, NO_BUCKET, 5_000_000, 1000, 3) == (OUTCOME_ALLOWED, 2000, 5_000_000, 2,
                                                       1_000_000, 1_000_000)  # fmt: skip
    # A bucket above a smaller burst (an override lowered it) is clipped to it.
    assert take(9000, 5_000_000, 5_000_000, 1000, 2)[1:4] == (1000, 5_000_000, 1)


def test_an_address_bucket_is_forgotten_once_it_would_be_full() -> None:
    expiry = Expiry()
    buckets = AddressBuckets(expiry)
    now = 10_000_000
    assert buckets.take("a", now, 1000, 3)[3] == 2
    assert buckets.take("a", now, 1000, 3)[3] == 1  # kept while not full
    expiry.now += 2.001  # its time to full (2 s) plus the millisecond the Lua adds
    taken = buckets.take("a", now, 1000, 3)  # the script's clock did not move: only expiry
    assert taken[3] == 2  # forgotten: a full bucket again, as an expired key is
    refused = AddressBuckets(expiry)
    assert refused.take("b", now, 1000, 0)[0] != OUTCOME_ALLOWED  # nothing taken...
    assert len(refused) == 0  # ...nothing written


def test_address_buckets_do_not_grow_without_bound() -> None:
    expiry = Expiry()
    buckets = AddressBuckets(expiry)
    now = 10_000_000
    for second in range(50):
        for i in range(200):
            buckets.take(f"10.{second}.0.{i}", now, 1000, 1)  # full again after 1 s
        expiry.now += 1.0
        now += 1_000_000
        # Those written in the last second or two stay; the older ones are swept as new
        # ones are written.
        assert len(buckets) <= 2 * 200 + 2


# ---- records -------------------------------------------------------------------------------


def test_an_empty_declared_value_is_not_a_declaration(native: NativeStore) -> None:
    request(native)
    request(native, DeviceIdentity("phone-1", application="", os="", model="Galaxy S25"))
    device = done(native.get_device("phone-1"))
    assert device is not None
    assert (device.application, device.os, device.model) == ("FieldApp", "Android", "Galaxy S25")
    assert [(e.field, e.old, e.new) for e in done(native.history("phone-1")) or []] == [
        ("model", "Galaxy S24", "Galaxy S25")
    ]


@pytest.mark.parametrize(("size", "kept"), [(0, []), (3, ["5", "4", "3"])])
def test_history_keeps_the_newest_changes(clock: FakeClock, size: int, kept: list[str]) -> None:
    store = NativeStore(clock=clock, history_size=size)
    for version in range(6):
        request(store, DeviceIdentity("phone-1", application_version=str(version)))
    assert [e.new for e in done(store.history("phone-1")) or []] == kept
    assert done(store.history("nobody")) is None


def test_an_override_set_before_the_first_request_waits_for_it(native: NativeStore) -> None:
    own = Bucket(rate=0.5, burst=1)
    done(native.set_rate_limit("early", own))
    # No record yet: the override alone is none (as a Redis hash of `rr`/`rb` only).
    assert done(native.get_device("early")) is None
    assert done(native.unblock("early")) is None
    assert done(native.rename("early", "x")) is None
    assert done(native.delete("early")) is False
    first = request(native, DeviceIdentity("early"))
    assert (first.bucket, first.new_device) == (own, True)
    assert request(native, DeviceIdentity("early")).outcome is ReplyCode.LIMITED
    device = done(native.get_device("early"))
    assert device is not None and device.rate_limit == own
    assert done(native.delete_rate_limit("early")) is True
    assert done(native.delete_rate_limit("early")) is False
    # One set on an unseen id and removed before it came: gone.
    done(native.set_rate_limit("later", own))
    assert done(native.delete_rate_limit("later")) is True
    assert request(native, DeviceIdentity("later")).bucket is BUCKET


def test_a_block_of_an_unseen_id_keeps_its_override(native: NativeStore) -> None:
    own = Bucket(rate=2.0, burst=5)
    done(native.set_rate_limit("lost", own))
    device = done(native.block("lost"))
    assert (device.blocked, device.rate_limit, device.request_count) == (True, own, 0)


def test_the_reply_names_the_default_bucket_when_an_override_equals_it(
    native: NativeStore,
) -> None:
    done(native.set_rate_limit("phone-1", Bucket(rate=1.0, burst=3)))
    assert request(native).bucket is BUCKET
    done(native.set_rate_limit("phone-1", Bucket(rate=0.0015, burst=3)))
    # The override's rate as stored, in milli-tokens a second (2), read back.
    assert request(native).bucket == Bucket(rate=0.002, burst=3)


def test_a_refused_registration_leaves_no_trace_but_the_budget(native: NativeStore) -> None:
    for device_id in ("n1", "n2"):
        assert request(native, DeviceIdentity(device_id), registration=REGISTRATION).new_device
    refused = request(native, DeviceIdentity("n3"), registration=REGISTRATION)
    assert (refused.outcome, refused.policy, refused.bucket, refused.new_device) == (
        ReplyCode.LIMITED,
        "registration",
        REGISTRATION,
        False,
    )
    assert done(native.get_device("n3")) is None
    assert done(native.list_page()).total == 2


def test_a_deleted_device_comes_back_new(native: NativeStore, clock: FakeClock) -> None:
    request(native)
    done(native.rename("phone-1", "Desk"))
    done(native.block("phone-1"))
    assert done(native.delete("phone-1")) is True
    assert "phone-1" not in native.blocked
    assert done(native.list_page()).total == 0
    clock.advance(5)
    again = request(native)
    assert (again.outcome, again.new_device) == (ReplyCode.ALLOW, True)
    device = done(native.get_device("phone-1"))
    assert device is not None
    assert (device.name, device.blocked, device.request_count) == (None, False, 1)
    assert done(native.history("phone-1")) == []
    assert [d.id for d in done(native.list_page()).devices] == ["phone-1"]


# ---- the list's order ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_order_files_records_as_a_sort_would(seed: int) -> None:
    """Records made, moved and deleted at random (splitting chunks, and some rounds so
    busy that the order is sorted again from scratch), read whole and from any key."""
    rng = random.Random(seed)
    order = ActivityOrder()
    live: dict[str, DeviceRecord] = {}
    for round_ in range(12):
        for _ in range(rng.choice([5, 50, 3 * CHUNK])):
            device_id = f"d{rng.randrange(4 * CHUNK)}"
            record = live.get(device_id)
            if record is not None and rng.random() < 0.2:
                order.drop(record)
                del live[device_id]
                continue
            if record is None:
                record = live[device_id] = DeviceRecord(device_id, 1, 0)
            record.score = rng.randrange(1000)  # ties too: then by id
            order.touch(record)
        order.sync(live.values(), len(live))
        want = sorted(((r.score, r.id) for r in live.values()), reverse=True)
        assert list(order.below(None)) == want, round_
        assert len(order) == len(want)
        for key in [*rng.sample(want, min(5, len(want))), (-1, ""), (10**9, "")]:
            assert list(order.below(key)) == [k for k in want if k < key]


def test_deleted_records_do_not_pile_up_in_the_queue() -> None:
    order = ActivityOrder()
    kept = [DeviceRecord(f"k{i}", 1, 0) for i in range(100)]
    for record in kept:
        order.touch(record)
    for i in range(50 * SHED_AT):  # made and deleted again and again, never listed
        record = DeviceRecord(f"gone-{i}", 1, 0)
        order.touch(record)
        order.drop(record)
    assert len(order._queue) <= 2 * SHED_AT + 2 * len(kept)
    order.sync(kept, len(kept))
    assert [key[1] for key in order.below(None)] == sorted((r.id for r in kept), reverse=True)


# ---- the searches --------------------------------------------------------------------------


def test_index_entries_and_name_words_as_the_scripts_write_them() -> None:
    assert index_entry("sn-77ab") == "sn-77ab"
    assert index_entry("SN-77AB") == "sn-77ab\0SN-77AB"
    assert name_words("Front DESK, north-east\tÜber_gabe") == {
        b"front",
        b"desk",
        b"north",
        b"east",
        "Über".encode(),
        b"gabe",
    }


def test_a_prefix_search_past_its_bound_says_so(
    native: NativeStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(10):
        request(native, DeviceIdentity(f"cam-{i}"))
        clock.advance(1)
    monkeypatch.setattr(native_listing, "SEARCH_LOOKS", 4)
    page = done(native.list_page(name="CAM", match="prefix"))
    # The first four ids in the id index's order were looked at, shown by activity.
    assert (page.truncated, page.total) == (True, 4)
    assert [d.id for d in page.devices] == ["cam-3", "cam-2", "cam-1", "cam-0"]
    assert not done(native.list_page(name="cam-9", match="prefix")).truncated


async def test_a_deep_page_number_is_refused_as_the_store_refuses_it(
    native: NativeStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    lua = Store.memory(clock=clock)
    monkeypatch.setattr(L, "MAX_OFFSET", 10)
    monkeypatch.setattr(native_listing, "MAX_OFFSET", 10)
    messages = []
    for store in (native, lua):
        for i in range(25):
            await store.enforce(DeviceIdentity(f"dev-{i}"), IP, BUCKET, upload=False)
        with pytest.raises(BadRequest) as refused:
            await store.list_page(page=3, amount=10)
        messages.append(str(refused.value))
        assert (await store.list_page(page=4, amount=10)).devices == []  # past the end
        with pytest.raises(BadRequest, match="not a cursor"):
            await store.list_page(after=ScanCursor(0, b"").encode())
        with pytest.raises(BadRequest, match="not a cursor"):
            await store.list_page(name="dev", after=ListCursor(1, "x").encode())
    assert messages[0] == messages[1]
    await lua.close()


async def test_a_scan_cursor_of_the_store_is_followed_as_the_store_follows_it(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cursors of a substring scan a Redis store answered in steps, each given to the
    embedded store, give what the Redis store answers when its scan from there finishes in
    one answer: the next matches in the scan's order, and a cursor after them."""
    lua = Store.memory(clock=clock)
    native = NativeStore(clock=clock)
    ids = [f"box-{i:03d}" for i in range(40)] + ["BOX-Up", "other", "spare"]
    for store in (lua, native):
        for device_id in ids:
            await store.enforce(DeviceIdentity(device_id), IP, BUCKET, upload=False)
        await store.rename("other", "the box room")
        await store.rename("spare", "no match")
        await store.block("box-007")
    filters: tuple[L.BlockedFilter, ...] = ("all", "hide", "only")
    cursors: list[tuple[L.BlockedFilter, str]] = []
    monkeypatch.setattr(L, "SCAN_BUDGET", 0.0)  # one step an answer
    monkeypatch.setattr(L, "SCAN_STEP", 3)
    for blocked in filters:
        page = await lua.list_page(name="box", amount=4, blocked=blocked)
        while page.next_cursor is not None:
            cursors.append((blocked, page.next_cursor))
            page = await lua.list_page(name="box", amount=4, blocked=blocked, after=cursors[-1][1])
    assert len(cursors) > 3 * 3
    # A cursor past its shard's last index entry goes on with the next shard.
    last = max(index_entry(i) for i in ids)
    cursors.append(("all", ScanCursor(shard_of(_id_of(last)), b"i" + last.encode()).encode()))
    monkeypatch.setattr(L, "SCAN_BUDGET", 60.0)
    monkeypatch.setattr(L, "SCAN_STEP", 10_000)
    for blocked, after in cursors:
        want = await lua.list_page(name="box", amount=4, blocked=blocked, after=after)
        assert want.total is None
        assert await native.list_page(name="box", amount=4, blocked=blocked, after=after) == want
    await lua.close()


def _id_of(entry: str) -> str:
    return entry.partition("\0")[2] or entry


# ---- the blocked ids -----------------------------------------------------------------------


def test_the_blocked_ids_are_the_records_own_and_always_known(
    native: NativeStore, clock: FakeClock
) -> None:
    blocked = native.blocked
    changes: list[int] = []
    blocked.watch(lambda: changes.append(blocked.status().count))
    assert blocked.known and blocked.synced.is_set() and blocked.epoch is None
    assert blocked.status().source == "redis"  # the store's own data, as /metrics names it
    done(native.block("a"))
    done(native.block("a"))  # idempotent: no change
    done(native.block("b"))
    assert "a" in blocked and "c" not in blocked and len(blocked) == 2
    done(native.unblock("a"))
    done(native.delete("b"))
    assert changes == [1, 2, 1, 0]
    done(native.block("c"))
    handed = blocked.handover()
    assert handed is not None and (handed.ids, handed.source) == (frozenset({"c"}), "supervisor")
    blocked.seed(BlockedSeed(frozenset({"x"}), "e", "snapshot", 0))  # the store knows better
    blocked.suspect_reset()
    assert blocked.ids() == frozenset({"c"})
    assert request(native, DeviceIdentity("c")).outcome is ReplyCode.BLOCKED
