"""Blocked stays blocked when Redis cannot answer; the breaker spares the timeout in an outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import aiohttp
import pytest
import redis
from aiohttp import web

from gateway.config import RedisSettings, parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.store import Store
from tests.conftest import RedisServer, until

pytestmark = pytest.mark.integration

WAIT = 10.0


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


async def test_blocks_reach_other_processes_at_once_through_pubsub(
    own_redis: RedisServer,
) -> None:
    follower = Store.from_settings(RedisSettings(url=own_redis.url, timeout=1.0))
    follower.blocked._poll_interval = 30.0  # only the first poll: the rest is pub/sub
    admin = Store.from_settings(RedisSettings(url=own_redis.url, timeout=1.0))
    await follower.start(follow_blocked=True)
    await asyncio.wait_for(follower.blocked.synced.wait(), WAIT)
    await asyncio.sleep(0.2)  # the subscription is in place
    await admin.block("phone-1")
    assert await until(lambda: "phone-1" in follower.blocked, "the block") < 0.5
    await admin.unblock("phone-1")
    assert await until(lambda: "phone-1" not in follower.blocked, "the unblock") < 0.5
    await admin.block("phone-2")
    await until(lambda: "phone-2" in follower.blocked, "the second block")
    await admin.delete("phone-2")
    assert await until(lambda: "phone-2" not in follower.blocked, "the delete") < 0.5
    await follower.close()
    await admin.close()


async def test_a_missed_message_is_caught_up_by_the_poll(own_redis: RedisServer) -> None:
    admin = Store.from_settings(RedisSettings(url=own_redis.url, timeout=1.0))
    await admin.block("early")  # blocked before the follower starts: the first poll reads it
    follower = Store.from_settings(RedisSettings(url=own_redis.url, timeout=1.0))
    await follower.start(follow_blocked=True)
    await asyncio.wait_for(follower.blocked.synced.wait(), WAIT)
    assert "early" in follower.blocked
    # A block whose message never arrived: the index and the shard version, no publish.
    keys = admin.keys.device("quiet")
    with redis.Redis(port=own_redis.port) as raw:
        raw.hset(keys.record, mapping={"rc": 0, "dc": 0, "b": 1})
        raw.zadd(keys.blocked, {"quiet": 1})
        raw.incr(keys.blocked_version)
    took = await until(lambda: "quiet" in follower.blocked, "the poll")
    assert took < 1.5
    assert len(follower.blocked) == 2
    await follower.close()
    await admin.close()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[str]]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Device-Id", "-"))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    await runner.cleanup()


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_a_blocked_device_stays_blocked_while_redis_is_down(
    own_redis: RedisServer,
    upstream: tuple[str, list[str]],
    on_error: Literal["open", "closed"],
) -> None:
    origin, seen = upstream
    settings = parse_config(
        f"upstream: {{url: '{origin}'}}\nredis: {{url: '{own_redis.url}', timeout: 0.1, "
        f"on_error: {on_error}}}",
        "test",
    )
    store = Store.from_settings(settings.redis)
    await store.start(follow_blocked=True)
    plane = DataPlane(settings, store)
    server = await start_public(plane, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
    try:
        await store.block("stolen")
        await until(lambda: "stolen" in store.blocked, "the local copy")
        await asyncio.to_thread(own_redis.kill)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
            statuses = []
            for _ in range(20):
                async with http.get(url, headers={"X-Device-Id": "stolen"}) as r:
                    statuses.append(r.status)
            async with http.get(url, headers={"X-Device-Id": "honest"}) as r:
                honest = r.status
        assert statuses == [403] * 20
        assert "stolen" not in seen  # none of them reached the upstream
        assert honest == (200 if on_error == "open" else 503)
    finally:
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
        await store.close()


async def test_the_breaker_spares_requests_the_timeout_and_recovers_within_a_second(
    own_redis: RedisServer, upstream: tuple[str, list[str]]
) -> None:
    origin, _ = upstream
    settings = parse_config(
        f"upstream: {{url: '{origin}'}}\nredis: {{url: '{own_redis.url}', timeout: 0.2}}",
        "test",
    )
    store = Store.from_settings(settings.redis)
    await store.start()
    plane = DataPlane(settings, store)
    server = await start_public(plane, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
    headers = {"X-Device-Id": "d1"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
            async with http.get(url, headers=headers) as r:
                assert "RateLimit" in r.headers
            own_redis.freeze()
            try:
                took = []
                for _ in range(10):
                    started = time.monotonic()
                    async with http.get(url, headers=headers) as r:
                        assert r.status == 200  # on_error: open
                    took.append(time.monotonic() - started)
            finally:
                own_redis.thaw()
            assert all(t < 0.2 + 0.15 for t in took)  # never more than the timeout
            assert sum(t > 0.15 for t in took) <= 4  # after 3 failures: the breaker skips
            assert max(took[4:]) < 0.1
            # Redis is back: within a second a probe goes through and enforcement resumes.
            started = time.monotonic()
            while True:
                async with http.get(url, headers=headers) as r:
                    if "RateLimit" in r.headers:
                        break
                assert time.monotonic() - started < 1.5, "enforcement did not resume"
                await asyncio.sleep(0.05)
    finally:
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
        await store.close()
