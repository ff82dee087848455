"""The embedded NativeStore against the Store on a real redis-server: one state machine drives
both with the same steps and fails on the first answer that differs.

Steps: requests of known and new devices (declared fields present, empty or absent,
uploads, a registration budget or none), anonymous requests, blocks, unblocks, renames,
deletes, rate-limit overrides set and removed (on ids with and without a record), and the
shared fake clock moved forwards and backwards. After every step: the whole list (every
record, in order) and the blocked ids; after a step on a device, its record and its history
(no other one's can have changed); a step of its own asks one list page (a filter, a search
by prefix or by substring, a page by number or after a cursor) of both.

The address buckets (anonymous and registration) refill slowly: their keys expire on
Redis's real clock, not the fake one (tests/test_bucket_model.py), and at these rates a key
outlives the run, as the native store's buckets (on the real monotonic clock too) do.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, ClassVar, TypeVar

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from gateway.config import RedisSettings
from gateway.errors import BadRequest
from gateway.model import Bucket, DeviceIdentity, EnforceReply
from gateway.store import NativeStore, Store
from gateway.store.listing import ListPage
from tests.rig.clock import FakeClock
from tests.rig.redis_server import RedisServer

pytestmark = pytest.mark.integration

T = TypeVar("T")
HISTORY = 3
IDS = ("d1", "D1", "dev-2", "Dev-3", "phone-1", "x")
ADDRESSES = ("198.51.100.1", "198.51.100.2")
NAMES = (None, "", "Front Desk", "front-desk 2", "Übergabe Süd", "DESK", "box room")
NEEDLES = ("d", "de", "desk", "DEV", "1", "süd", "x", "room", "-")
RATES = (1, 500, 1000, 2500)  # milli-tokens a second, of device buckets
BURSTS = (1, 2, 3)
SLOW = Bucket(rate=0.002, burst=2)  # an address's bucket: full again after 1,000 s at most


def identities() -> st.SearchStrategy[DeviceIdentity]:
    """A device's identity: a known or new id, each field declared, empty or absent."""
    return st.builds(
        DeviceIdentity,
        st.sampled_from(IDS),
        st.sampled_from([None, "", "FieldApp", "FieldApp2"]),
        st.sampled_from([None, "1", "2"]),
        st.sampled_from([None, "Android"]),
        st.sampled_from([None, "14", "15"]),
        st.sampled_from([None, "Samsung"]),
        st.sampled_from([None, "S24", "S25"]),
    )


def buckets() -> st.SearchStrategy[Bucket]:
    return st.builds(
        Bucket, st.sampled_from(RATES).map(lambda r: r / 1000), st.sampled_from(BURSTS)
    )


def fields(reply: EnforceReply) -> tuple[Any, ...]:
    """Every field of a verdict."""
    return (
        reply.outcome,
        reply.remaining,
        reply.retry_after_us,
        reply.full_after_us,
        reply.bucket,
        reply.policy,
        reply.new_device,
    )


class Engines:
    """What every example shares: the event loop and the redis-server."""

    def __init__(self, loop: asyncio.Runner, server: RedisServer) -> None:
        self.loop = loop
        self.server = server

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(call)


class SameAnswers(RuleBasedStateMachine):
    """The NativeStore and the Store on Redis, asked the same."""

    engines: ClassVar[Engines]

    def __init__(self) -> None:
        super().__init__()
        engines = self.engines
        with redis.Redis(port=engines.server.port, socket_timeout=5) as client:
            client.flushall()
        self.clock = FakeClock()
        self.bucket = Bucket(rate=1.0, burst=2)
        self.lua = Store.from_settings(
            RedisSettings(url=engines.server.url, timeout=5.0, key_prefix=uuid.uuid4().hex[:6]),
            history_size=HISTORY,
            clock=self.clock,
        )
        self.native = NativeStore(history_size=HISTORY, clock=self.clock)
        engines.run(self.lua.start())

    def teardown(self) -> None:
        self.engines.run(self.lua.close())

    def both(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """The same call of both stores: their answers, or the BadRequest each raised."""

        async def one(store: Any) -> Any:
            try:
                return await getattr(store, method)(*args, **kwargs)
            except BadRequest as exc:
                return ("BadRequest", str(exc))

        return self.engines.run(one(self.lua)), self.engines.run(one(self.native))

    def same(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The same call of both stores, which must answer the same; the answer."""
        lua, native = self.both(method, *args, **kwargs)
        assert native == lua, (method, args, kwargs)
        return lua

    # -- the data plane ---------------------------------------------------------------

    @rule(
        burst=st.lists(identities(), min_size=1, max_size=4),
        ip=st.sampled_from(ADDRESSES),
        upload=st.booleans(),
        registration=st.sampled_from([None, SLOW]),
    )
    def requests(
        self, burst: list[DeviceIdentity], ip: str, upload: bool, registration: Bucket | None
    ) -> None:
        """A few requests at one instant, each verdict compared."""
        for identity in burst:
            lua, native = self.both(
                "enforce", identity, ip, self.bucket, upload=upload, registration=registration
            )
            assert fields(native) == fields(lua)
            self.same_device(identity.id)

    @rule(ip=st.sampled_from(ADDRESSES))
    def anonymous(self, ip: str) -> None:
        lua, native = self.both("enforce", None, ip, SLOW, upload=False)
        assert fields(native) == fields(lua)

    @rule(bucket=buckets())
    def change_default_bucket(self, bucket: Bucket) -> None:
        self.bucket = bucket  # as a restart with another config would

    @rule(
        us=st.one_of(
            # the edges: a second (the list's order), a milli-token's worth of time
            st.sampled_from([-1_000_000, -1, 1, 999_999, 1_000_000, 1_000_001, 2_000_000]),
            st.integers(0, 5_000_000),
            st.integers(-5_000_000, 0),  # backwards: last_active must not follow
            st.integers(0, 2_000_000_000),  # long enough for the slow buckets to refill
        )
    )
    def clock_moves(self, us: int) -> None:
        self.clock.now_us += us

    # -- the admin ------------------------------------------------------------------------

    @rule(device_id=st.sampled_from(IDS))
    def block(self, device_id: str) -> None:
        self.same("block", device_id)
        self.same_device(device_id)

    @rule(device_id=st.sampled_from(IDS))
    def unblock(self, device_id: str) -> None:
        self.same("unblock", device_id)
        self.same_device(device_id)

    @rule(device_id=st.sampled_from(IDS))
    def delete(self, device_id: str) -> None:
        self.same("delete", device_id)
        self.same_device(device_id)

    @rule(device_id=st.sampled_from(IDS), name=st.sampled_from(NAMES))
    def rename(self, device_id: str, name: str | None) -> None:
        self.same("rename", device_id, name)
        self.same_device(device_id)

    @rule(device_id=st.sampled_from(IDS), bucket=buckets())
    def set_rate_limit(self, device_id: str, bucket: Bucket) -> None:
        self.same("set_rate_limit", device_id, bucket)
        self.same_device(device_id)

    @rule(device_id=st.sampled_from(IDS))
    def delete_rate_limit(self, device_id: str) -> None:
        self.same("delete_rate_limit", device_id)
        self.same_device(device_id)

    @rule(
        blocked=st.sampled_from(["all", "hide", "only"]),
        name=st.sampled_from([None, *NEEDLES]),
        match=st.sampled_from(["prefix", "contains"]),
        amount=st.integers(1, 4),
        page=st.integers(1, 4),
        by_cursor=st.booleans(),
    )
    def list_page(
        self, blocked: Any, name: str | None, match: Any, amount: int, page: int, by_cursor: bool
    ) -> None:
        """One page, by number, or every page through the cursors."""
        query = {"name": name, "blocked": blocked, "amount": amount}
        if name is not None:
            query["match"] = match
        if not by_cursor:
            self.same("list_page", page=page, **query)
            return
        answer: ListPage = self.same("list_page", **query)
        while answer.next_cursor is not None:
            after = answer.next_cursor
            answer = self.same("list_page", after=after, **query)

    # -- after every step -----------------------------------------------------------------

    def same_device(self, device_id: str) -> None:
        """The device's record and history, as each store reads them for the admin."""
        self.same("get_device", device_id)
        self.same("history", device_id)

    @invariant()
    def same_list(self) -> None:
        listed: ListPage = self.same("list_page", amount=len(IDS) + 1)
        assert self.native.blocked.ids() == {d.id for d in listed.devices if d.blocked}


@pytest.fixture(scope="module")
def engines(redis_server: RedisServer) -> Iterator[Engines]:
    """One event loop across the examples (a Store's connections belong to theirs)."""
    with asyncio.Runner() as loop:
        yield Engines(loop, redis_server)


def test_the_native_store_answers_as_the_store_on_redis(engines: Engines) -> None:
    SameAnswers.engines = engines
    run_state_machine_as_test(
        SameAnswers,
        settings=settings(
            max_examples=60,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
