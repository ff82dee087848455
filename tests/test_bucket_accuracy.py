"""The token bucket as clients see it: across gateways, against Retry-After, under clock skew.

Every gateway here is a DataPlane with a Store of its own (its own connections and script
pipeline, as a separate `gateway run` process would have) on each real engine in turn (one
redis-server, a Redis Cluster, a Sentinel-watched primary), in
front of a loopback upstream that answers 200. The first test runs on real time (Redis
`TIME`); the others drive an injected fake clock.

About injected clocks: `Store(clock=...)` is a test hook. Production passes no clock, and
enforce.lua then reads Redis `TIME`, the one clock every gateway process shares; a gateway
host's own clock is never consulted for a decision or a timestamp.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.config import parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.metrics import Metrics
from gateway.model import Bucket
from gateway.store import Store
from gateway.typedefs import Clock
from tests.rig.clock import FakeClock
from tests.rig.engine_fixtures import RedisEngine, primary_port_for, primary_ports
from tests.rig.upstream import CountingUpstream

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds: the bound on every single request and wait


@dataclass(frozen=True)
class Plane:
    """One gateway: its URL, its own Store and its counters."""

    url: str
    store: Store
    metrics: Metrics


StartPlane = Callable[..., Awaitable[Plane]]


@pytest.fixture
async def start_plane(
    redis_engine: RedisEngine, upstream: CountingUpstream
) -> AsyncIterator[StartPlane]:
    """Factory: a DataPlane with a Store of its own on the shared real Redis."""
    prefix = f"acc{uuid.uuid4().hex[:6]}"
    started: list[tuple[asyncio.Server, DataPlane, Store]] = []

    async def start(*, clock: Clock | None = None, device: tuple[float, int] = (10, 20)) -> Plane:
        rate, burst = device
        config = {
            "upstream": {"url": upstream.url},
            # Generous: a slow call must not become an unenforced (on_error: open) answer.
            "redis": {"url": redis_engine.url, "timeout": 2.0, "key_prefix": prefix},
            "rate_limits": {"device": {"rate": rate, "burst": burst}},
        }
        settings = parse_config(orjson.dumps(config).decode(), "test.yaml")  # JSON is YAML
        store = Store.from_settings(settings.redis, clock=clock)
        await store.start()
        metrics = Metrics()
        plane = DataPlane(settings, store, metrics)
        server = await start_public(plane, "127.0.0.1", 0)
        started.append((server, plane, store))
        return Plane(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", store, metrics)

    yield start
    for server, plane, store in started:
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
        await store.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


@dataclass(frozen=True)
class Answer:
    status: int
    remaining: int | None
    retry_after: int | None


async def get(
    http: aiohttp.ClientSession, plane: Plane, device_id: str, method: str = "GET"
) -> Answer:
    async with http.request(
        method, f"{plane.url}/api", headers={"X-Device-Id": device_id}, data=b"x"
    ) as resp:
        await resp.read()
        remaining = resp.headers.get("X-RateLimit-Remaining")
        retry_after = resp.headers.get("Retry-After")
    return Answer(
        resp.status,
        None if remaining is None else int(remaining),
        None if retry_after is None else int(retry_after),
    )


# ---------------------------------------------------------------- accuracy under load


async def test_two_gateways_hammering_one_device_allow_burst_plus_rate_times_elapsed(
    start_plane: StartPlane, http: aiohttp.ClientSession
) -> None:
    a = await start_plane()
    b = await start_plane()
    rate, burst = 20, 10
    await a.store.set_rate_limit("hammer", Bucket(rate=rate, burst=burst))
    statuses: dict[str, list[int]] = {a.url: [], b.url: []}
    unenforced = 0
    stop_at = time.monotonic() + 2.0

    async def worker(plane: Plane) -> None:
        nonlocal unenforced
        while time.monotonic() < stop_at:
            answer = await get(http, plane, "hammer")
            statuses[plane.url].append(answer.status)
            unenforced += answer.remaining is None

    await asyncio.wait_for(
        asyncio.gather(*(worker(plane) for plane in (a, b) for _ in range(4))), WAIT
    )

    every = statuses[a.url] + statuses[b.url]
    assert set(every) <= {200, 429}
    assert unenforced == 0  # every answer was decided by Redis (none let through on error)
    assert a.metrics.store_failures == b.metrics.store_failures == 0
    allowed = every.count(200)
    for plane in (a, b):  # both gateways took part, and both were refused at times
        assert statuses[plane.url].count(200) >= 1 and statuses[plane.url].count(429) >= 1

    device = await a.store.get_device("hammer")
    assert device is not None and device.first_seen is not None and device.last_active is not None
    assert device.request_count == len(every)
    assert device.request_count - device.denied_count == allowed
    # Elapsed from the first to the last request as the bucket saw them: first_seen and
    # last_active are the Redis TIME of the first and the last script call (in ms,
    # truncated), so they carry no client or network latency, only +-1 ms of truncation.
    elapsed = (device.last_active - device.first_seen) / 1000
    expected = burst + rate * elapsed
    # Bounds. The bucket starts full (burst tokens) at the first call and gains `rate` a
    # second; whatever it holds after the last call was never handed out. Upper: nothing
    # can be allowed beyond burst + rate * elapsed (+0.02: 1 ms of truncation at 20/s).
    # Lower: eight clients keep asking every few ms, far more often than a token comes
    # back (50 ms), so the bucket never fills up and overflows after the start, and every
    # whole token is taken by the next call: after the last call less than one token is
    # left. Hence expected - 1 < allowed <= expected, +-0.02 for the millisecond stamps.
    assert expected - 1.02 < allowed <= expected + 0.02, (allowed, expected, elapsed)


# ---------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0.3, 2), (0.7, 4), (0.2, 1), (1.5, 9)],
    ids=["0.3/s-burst-2", "0.7/s-burst-4", "0.2/s-burst-1", "1.5/s-burst-9"],
)
async def test_a_request_sent_retry_after_seconds_later_is_allowed(
    start_plane: StartPlane, http: aiohttp.ClientSession, clock: FakeClock, rate: float, burst: int
) -> None:
    # Buckets that take seconds to refill: the key's expiry (Redis's real clock, set from
    # the fake time) cannot run out while the test runs.
    plane = await start_plane(clock=clock)
    await plane.store.set_rate_limit("patient", Bucket(rate=rate, burst=burst))
    for _ in range(burst):
        assert (await get(http, plane, "patient")).status == 200
    # Odd offsets leave the bucket between whole tokens, where rounding could lie.
    for offset_ms in (0, 1, 333, 1234, 2999, 10, 0):
        clock.advance(offset_ms)
        limited = await get(http, plane, "patient")
        if limited.status == 200:
            continue  # the offset alone brought a token back: take it and go on
        assert limited.status == 429
        assert limited.retry_after is not None and limited.retry_after >= 1
        if limited.retry_after > 1:
            # The smallest honest whole number: one second less is still too early.
            clock.advance((limited.retry_after - 1) * 1000)
            assert (await get(http, plane, "patient")).status == 429
            clock.advance(1000)
        else:
            clock.advance(limited.retry_after * 1000)
        assert (await get(http, plane, "patient")).status == 200


# ---------------------------------------------------------------- clock skew


async def redis_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_host_clock_skew_changes_no_decision_and_no_timestamp(
    start_plane: StartPlane,
    http: aiohttp.ClientSession,
    redis_engine: RedisEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Production stores: no injected clock, so enforce.lua reads Redis TIME. Three gateways
    # whose hosts disagree: while one of them handles a request, this process's wall clock
    # reads 30 s ahead (or behind). A token every 10 s: a store that used the host clock
    # would see 60 s pass between the -30 s and the +30 s host and refill the bucket.
    bucket = (0.1, 3)
    ahead, behind, exact = [await start_plane(device=bucket) for _ in range(3)]
    real_time, real_time_ns = time.time, time.time_ns

    def skewed(seconds: int) -> None:
        monkeypatch.setattr(time, "time", lambda: real_time() + seconds)
        monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + seconds * 10**9)

    redis_client = aioredis.Redis(port=primary_ports(redis_engine)[0], socket_timeout=WAIT)
    try:
        sequence = [(behind, -30), (ahead, 30), (exact, 0)] * 2
        skewed_answers = []
        for plane, skew in sequence:
            before = await redis_ms(redis_client)
            skewed(skew)
            try:
                skewed_answers.append(await get(http, plane, "skewed"))
            finally:
                monkeypatch.undo()
            after = await redis_ms(redis_client)
            device = await exact.store.get_device("skewed")
            assert device is not None and device.last_active is not None
            assert before <= device.last_active <= after, (skew, before, device, after)
        reference = [await get(http, exact, "steady") for _ in sequence]
    finally:
        await redis_client.aclose()

    assert skewed_answers == reference
    assert [a.status for a in reference] == [200, 200, 200, 429, 429, 429]
    assert [a.remaining for a in reference] == [2, 1, 0, 0, 0, 0]


async def test_timestamps_never_move_backwards_when_a_request_carries_an_older_time(
    start_plane: StartPlane,
    http: aiohttp.ClientSession,
    clock: FakeClock,
    redis_engine: RedisEngine,
) -> None:
    # The injected clock is the test hook that can carry an old time into enforce.lua (a
    # call delayed in flight would do the same with a client clock): stores 30 s ahead and
    # 30 s behind a third, on the same device. A token every 10 s, burst 2.
    bucket = (0.1, 2)
    exact = await start_plane(clock=clock, device=bucket)
    ahead = await start_plane(clock=lambda: clock() + 30_000_000, device=bucket)
    behind = await start_plane(clock=lambda: clock() - 30_000_000, device=bucket)
    t = clock.now_ms
    record_key = exact.store.keys.device("drift").record
    redis_client = aioredis.Redis(
        port=primary_port_for(redis_engine, record_key), socket_timeout=WAIT
    )
    stamps: list[int] = []

    async def step(plane: Plane, method: str = "GET") -> tuple[int, int | None, int, int | None]:
        answer = await get(http, plane, "drift", method)
        device = await exact.store.get_device("drift")
        assert device is not None and device.last_active is not None
        state = await redis_client.hget(record_key, "tb")
        assert isinstance(state, bytes)  # the record's bucket: "<milli-tokens>:<timestamp us>"
        stamps.append(int(state.split(b":")[1]))
        return answer.status, answer.remaining, device.last_active, device.last_data_upload

    try:
        assert await step(exact) == (200, 1, t, None)
        # 30 s ahead: the bucket refills to full, then gives one.
        assert await step(ahead) == (200, 1, t + 30_000, None)
        # Back at t: no refill for a negative interval, and last_active stays ahead.
        assert await step(exact) == (200, 0, t + 30_000, None)
        assert await step(behind) == (429, 0, t + 30_000, None)
        # An upload stamped from the past is recorded at the latest time seen, not earlier.
        assert await step(behind, "POST") == (429, 0, t + 30_000, t + 30_000)
        clock.advance(10_000)  # 10 s past the latest time seen: exactly one token back
        assert await step(ahead) == (200, 0, t + 40_000, t + 30_000)
        assert await step(behind, "POST") == (429, 0, t + 40_000, t + 40_000)
    finally:
        await redis_client.aclose()
    assert stamps == sorted(stamps), stamps  # the bucket's own timestamp never went back
    device = await exact.store.get_device("drift")
    assert device is not None and device.first_seen == t
