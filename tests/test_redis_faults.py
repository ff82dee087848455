"""Redis faults injected for real (issue 5, section 2): kill, black hole, latency, an empty
script cache, out of memory, a gateway started before Redis, clients that hang up.

Each test runs the real data plane (or `serve`) on loopback in front of a `CountingUpstream`,
over a real redis-server of its own, reached directly or through a `FaultProxy`. Timing
bounds come from the configuration under test: `redis.timeout` 0.1 s, the breaker's 3
failures and 0.5 s cool-down (`gateway/store/breaker.py`). Every test also checks that the
gateway logged no traceback and that every answer it made itself is the JSON envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson
import pytest
import redis
from multidict import CIMultiDict

from gateway.app import Running, serve
from gateway.config import RedisSettings, Settings
from gateway.logs import ACCESS_LOGGER
from gateway.model import Bucket
from gateway.store import Store
from gateway.store.breaker import COOLDOWN, THRESHOLD
from gateway.store.keys import FIELD_REQUESTS, KeySchema
from gateway.store.snapshot import snapshot_name
from tests.rig.client import RawClient, answers_in
from tests.rig.faults import FaultProxy
from tests.rig.gateway import (
    TIMEOUT,
    TOKEN,
    Answer,
    Load,
    OnError,
    StartGateway,
    assert_envelope,
    assert_no_traceback,
    figure,
    make_settings,
    send,
)
from tests.rig.redis_server import RedisServer, calls, command_stats, reset_stats
from tests.rig.system import free_port
from tests.rig.upstream import MARK, CountingUpstream
from tests.rig.waits import WAIT, bounded, until

pytestmark = pytest.mark.integration

MODES: tuple[OnError, ...] = ("open", "closed")

# The promise: a request pays at most redis.timeout + 50 ms for a Redis that cannot answer.
# The 50 ms is the whole allowance for scheduling on a busy 2-core CI machine (a timed-out
# call measures 100-105 ms of added latency on an idle one).
MARGIN = 0.05
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BLOCKED = {"status": False, "result": "Access denied: device is blocked"}
LIMITED = {"status": False, "result": "Too many requests"}
UNAVAILABLE = {"status": False, "result": "Service temporarily unavailable"}


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def redis_servers() -> Iterator[Callable[..., RedisServer]]:
    """Factory: a redis-server of the test's own (extra args after conftest's defaults)."""
    made: list[RedisServer] = []

    def start(*extra_args: str) -> RedisServer:
        server = RedisServer(extra_args=extra_args)
        made.append(server)
        return server

    yield start
    for server in made:
        server.stop()


# ---------------------------------------------------------------- load


async def first_enforced(
    http: aiohttp.ClientSession, base: str, device: str, since: float, limit: float
) -> float:
    """Seconds from `since` until an answer for `device` carries the rate-limit headers."""
    while True:
        answer = await send(http, base, device)
        assert_envelope(answer)
        if answer.enforced:
            return answer.done - since
        assert time.monotonic() - since < limit + 1.0, "enforcement did not resume"
        await asyncio.sleep(0.02)  # between two probes of a bounded poll


async def upstream_alone(http: aiohttp.ClientSession, upstream: CountingUpstream) -> float:
    """The median latency of the upstream asked directly (the baseline of added latency)."""
    took = []
    for _ in range(20):
        started = time.monotonic()
        async with http.get(f"{upstream.url}/baseline") as r:
            await r.read()
        took.append(time.monotonic() - started)
    return statistics.median(took)


# ---------------------------------------------------------------- Redis helpers

# Every write reaches the append-only file (the OS's cache) before Redis replies, so a
# SIGKILL loses nothing and "no record lost" is about the gateway, not Redis. Not
# `appendfsync always`: an fsync on a busy CI disk can outlast the 100 ms budget of a call.
AOF = ("--appendonly", "yes", "--appendfsync", "no")


def crash(server: RedisServer) -> None:
    """SIGKILL: no shutdown, no final save (what a crash or an OOM kill does)."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(timeout=WAIT)


# ---------------------------------------------------------------- killed under load


@pytest.mark.timing
@pytest.mark.parametrize("on_error", MODES)
async def test_redis_killed_under_load_then_restarted_loses_nothing_and_enforces_again(
    on_error: OnError,
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    server = redis_servers(*AOF)
    gw = await start_gateway(make_settings(upstream, server.url, on_error))
    devices = [f"fleet-{i}" for i in range(20)]
    for device in devices:
        assert (await send(http, gw.url, device)).enforced
    before = {d: await gw.store.get_device(d) for d in devices}

    load = Load(http, gw.url, devices, clients=8)
    load.start(pace=0.03)  # ~250 requests a second
    await asyncio.sleep(0.5)  # the scenario: half a second of enforced traffic, then the kill
    await asyncio.to_thread(crash, server)
    down = time.monotonic()
    await asyncio.sleep(1.0)  # the scenario: a second of outage under load
    restarting = time.monotonic()
    await asyncio.to_thread(server.start)  # same port, same directory: the AOF is read back
    up = time.monotonic()
    await until(lambda: any(a.sent >= up and a.enforced for a in load.answers), "enforcement", 3.0)
    await asyncio.sleep(0.5)  # the scenario: a tail of enforced traffic
    answers = await load.stop()
    recovered_at = min(a.done for a in answers if a.sent >= up and a.enforced)
    resumed = recovered_at - up

    for answer in answers:
        assert_envelope(answer)
    outage = [a for a in answers if a.sent >= down and a.done <= restarting]
    assert len(answers) >= 300 and len(outage) >= 100, (len(answers), len(outage))
    assert not any(a.enforced for a in outage)
    if on_error == "open":
        assert [a for a in answers if a.status >= 500] == []
        assert all(a.status == 200 and a.from_upstream for a in outage)
    else:
        assert all(a.status == 503 and a.json() == UNAVAILABLE for a in outage)
        assert all(a.headers.get("Retry-After") == "1" for a in outage)
        refused = {a.tag for a in answers if a.status == 503}
        reached = {s.raw_path.rsplit("=", 1)[1] for s in upstream.seen if "?n=" in s.raw_path}
        assert refused and refused.isdisjoint(reached)  # none of them reached the upstream
        assert {a.status for a in answers} == {200, 503}
    figure("requests", len(answers))
    figure("requests during the outage", len(outage))
    figure("5xx", sum(a.status >= 500 for a in answers))
    figure("seconds from restart to enforcement", resumed)
    # Enforcement is back within 2 s of the restart, and stays: no gateway restart needed.
    assert resumed < 2.0, resumed
    late = [a for a in answers if a.sent > recovered_at and not a.enforced]
    assert late == [], [(a.status, a.body, a.took, a.sent - recovered_at) for a in late]
    # Every record registered before the kill is still there, first_seen untouched.
    for device, old in before.items():
        new = await gw.store.get_device(device)
        assert old is not None and new is not None, device
        assert new.first_seen == old.first_seen and new.request_count >= old.request_count
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- black hole


@pytest.mark.timing
@pytest.mark.parametrize("on_error", MODES)
async def test_black_holed_redis_costs_each_request_at_most_the_timeout_and_the_breaker_skips_it(
    on_error: OnError,
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    proxies: Callable[[int], Awaitable[FaultProxy]],
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    server = redis_servers()
    proxy = await proxies(server.port)
    gw = await start_gateway(make_settings(upstream, f"redis://127.0.0.1:{proxy.port}/0", on_error))
    baseline = await upstream_alone(http, upstream)
    devices = [f"hole-{i}" for i in range(8)]
    for device in devices:
        assert (await send(http, gw.url, device)).enforced

    seen_before = upstream.count()
    proxy.black_hole()  # accepted, never answered: only the deadline ends a call
    load = Load(http, gw.url, devices, clients=4)
    started = time.monotonic()
    load.start(pace=0.01)
    await asyncio.sleep(1.5)  # the scenario: load against the black hole for 1.5 s
    answers = await load.stop()
    duration = time.monotonic() - started

    for answer in answers:
        assert_envelope(answer)
        assert not answer.enforced
        if on_error == "open":
            assert (answer.status, answer.from_upstream) == (200, True)
        else:
            assert (answer.status, answer.json()) == (503, UNAVAILABLE)
    added = [a.took - baseline for a in answers]
    figure("requests", len(answers))
    figure("max added latency", max(added))
    figure("upstream alone", baseline)
    # The promise: a request pays at most the timeout. Checked on the 95th percentile; the
    # maximum only has to stay under two deadlines, because on a 2-core CI machine one
    # request can lose a scheduling slice to another process (seen once: 0.215 s while a
    # package install ran beside the suite). No code path waits for two deadlines.
    assert statistics.quantiles(added, n=20)[-1] <= TIMEOUT + MARGIN, sorted(added)[-5:]
    # Never a hang: full-suite CI runs have shown one outlier of 0.2-0.3 s among ~430
    # requests (not seen in ~60 runs of this file alone; suspected: a pause of the one test
    # process that runs gateway, proxy, upstream and clients together). Left open in the notes.
    assert max(added) <= 1.0, max(added)
    # Only the first failures and one probe per cool-down pay the timeout; the rest skip.
    # A request that paid the timeout waited all of it; one a busy 2-core machine merely
    # delayed (seen: 10 over TIMEOUT / 2 where 8 paid) did not reach Redis's deadline.
    slow = [a for a in answers if a.took >= TIMEOUT * 0.95]
    figure("requests that paid the timeout", len(slow))
    probes = int(duration / COOLDOWN) + 1
    assert len(slow) <= max(THRESHOLD, load.clients) + probes, (
        len(answers),
        [(round(a.sent - started, 3), round(a.took, 3), a.status) for a in slow],
    )
    assert len(answers) >= 10 * len(slow)
    later = [a.took for a in answers if a.sent > started + 2 * TIMEOUT]
    figure("median latency once the breaker is open", statistics.median(later))
    assert statistics.median(later) < 0.02, statistics.median(later)
    if on_error == "closed":
        assert upstream.count() == seen_before  # none of them reached the upstream
    assert proxy.accepted >= 2  # the dropped connection was opened again, into the hole

    # Redis is back: the breaker lets a probe through within its cool-down; within 1 s
    # requests are enforced again.
    proxy.pass_through()
    back = time.monotonic()
    recovery = await first_enforced(http, gw.url, devices[0], back, 1.0)
    figure("seconds from pass-through to enforcement", recovery)
    assert recovery < 1.0
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- slow Redis


@pytest.mark.timing
@pytest.mark.parametrize("on_error", MODES)
async def test_slow_redis_is_waited_for_below_the_timeout_and_fails_per_on_error_above(
    on_error: OnError,
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    proxies: Callable[[int], Awaitable[FaultProxy]],
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    server = redis_servers()
    proxy = await proxies(server.port)
    gw = await start_gateway(make_settings(upstream, f"redis://127.0.0.1:{proxy.port}/0", on_error))
    baseline = await upstream_alone(http, upstream)
    assert (await send(http, gw.url, "slowpoke")).enforced

    proxy.latency(0.3 * TIMEOUT)  # below the timeout: waited for, enforced
    below = [await send(http, gw.url, "slowpoke") for _ in range(10)]
    for answer in below:
        assert answer.status == 200 and answer.enforced
        # Waited for, and answered before the deadline (an enforced answer cannot be later).
        assert 0.3 * TIMEOUT <= answer.took <= baseline + TIMEOUT + MARGIN, answer.took

    seen_before = upstream.count()
    proxy.latency(2 * TIMEOUT)  # above: every call fails at the deadline, or is skipped
    above = [await send(http, gw.url, "slowpoke") for _ in range(10)]
    for answer in above:
        assert_envelope(answer)
        assert not answer.enforced
        # At most the deadline; two deadlines of slack for a CI scheduling hiccup (see the
        # black-hole test), the median holding the promise.
        assert answer.took - baseline <= 1.0, answer.took  # never a hang; median holds below
        if on_error == "open":
            assert (answer.status, answer.from_upstream) == (200, True)
        else:
            assert (answer.status, answer.json()) == (503, UNAVAILABLE)
            assert answer.headers["Retry-After"] == "1"
    assert statistics.median(a.took - baseline for a in above) <= TIMEOUT + MARGIN
    assert sum(a.took > TIMEOUT / 2 for a in above) >= THRESHOLD  # the deadline did cut them
    if on_error == "closed":
        assert upstream.count() == seen_before

    figure("max latency below the timeout", max(a.took for a in below))
    figure("max added latency above the timeout", max(a.took for a in above) - baseline)
    proxy.pass_through()
    back = time.monotonic()
    recovery = await first_enforced(http, gw.url, "slowpoke", back, 1.0)
    figure("seconds from pass-through to enforcement", recovery)
    assert recovery < 1.0
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- empty script cache


async def test_an_emptied_script_cache_is_reloaded_once_then_one_evalsha_per_request(
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    server = redis_servers(*AOF)
    gw = await start_gateway(make_settings(upstream, server.url))
    devices = [f"script-{i}" for i in range(10)]
    for device in devices:  # registered: from now on a request costs exactly one call
        assert (await send(http, gw.url, device)).enforced

    async def burst(n: int, clients: int = 4) -> list[Answer]:
        async def client(i: int) -> list[Answer]:
            return [await send(http, gw.url, devices[(i + k) % len(devices)]) for k in range(n)]

        groups = await asyncio.gather(*(client(i) for i in range(clients)))
        return [a for group in groups for a in group]

    # 1. A restart empties the cache (scripts are never persisted): the new connection loads
    #    the scripts (enforce.lua and its batch variant) ahead of its first call, so no call
    #    meets NOSCRIPT at all. A call carries one request, or a tick's batch of them.
    await asyncio.to_thread(crash, server)
    await asyncio.to_thread(server.start)
    before = request_counts(server, devices)
    answers = await burst(20)
    assert all(a.status == 200 and a.enforced for a in answers)
    stats = command_stats(server)
    assert 1 <= calls(stats, "evalsha") <= len(answers) == 80
    assert calls(stats, "evalsha", "failed_calls") == 0
    assert calls(stats, "script|load") == 2
    assert counted_since(server, devices, before) == len(answers)  # each exactly once

    # 2. The cache emptied under a live connection (SCRIPT FLUSH; a failover behind a proxy
    #    does the same): the calls that meet NOSCRIPT load the script and are sent again.
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        client.script_flush()
        client.config_resetstat()
    before = request_counts(server, devices)
    answers = await burst(20)
    assert all(a.status == 200 and a.enforced for a in answers)  # no request saw the miss
    stats = command_stats(server)
    missed = calls(stats, "evalsha", "failed_calls")
    figure("calls that met NOSCRIPT", missed)
    figure("SCRIPT LOADs after the flush", calls(stats, "script|load"))
    assert 1 <= missed <= 4  # at most the calls of the first tick (one request per client)
    assert calls(stats, "evalsha") <= len(answers) + missed
    assert calls(stats, "script|load") == 2  # both scripts once, whatever the calls that missed
    assert counted_since(server, devices, before) == len(answers)  # sent again, counted once

    # 3. Recovered: at most one EVALSHA per request again, nothing failing, nothing loaded.
    reset_stats(server)
    before = request_counts(server, devices)
    answers = await burst(20)
    assert all(a.status == 200 and a.enforced for a in answers)
    stats = command_stats(server)
    assert 1 <= calls(stats, "evalsha") <= len(answers)
    assert calls(stats, "evalsha", "failed_calls") == 0
    assert calls(stats, "script|load") == 0
    assert counted_since(server, devices, before) == len(answers)
    assert_no_traceback(gateway_log)


def request_counts(server: RedisServer, devices: list[str]) -> dict[str, int]:
    """Each device's request count, as its record in Redis holds it."""
    keys = KeySchema("dg")
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        return {d: int(client.hget(keys.device(d).record, FIELD_REQUESTS) or 0) for d in devices}


def counted_since(server: RedisServer, devices: list[str], before: dict[str, int]) -> int:
    """Requests Redis counted for the devices since `before` (request_counts)."""
    after = request_counts(server, devices)
    return sum(after[d] - before[d] for d in devices)


# ---------------------------------------------------------------- out of memory


MAXMEMORY = 2 * 1024 * 1024


def fill(server: RedisServer) -> int:
    """Write filler keys until Redis refuses writes (maxmemory, noeviction); returns bytes.

    Then the limit is pinned 256 KiB under what is used: a client's buffers freed later (the
    filler's own, on its close) cannot bring Redis back under it and make the test flaky.
    """
    written = 0
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        for size in (64 * 1024, 1024):
            for i in range(10_000):
                try:
                    client.set(f"filler:{size}:{i}", b"f" * size)
                except redis.exceptions.OutOfMemoryError:
                    break
                written += size
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used - 256 * 1024)
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("probe", b"1")
    return written


def unfill(server: RedisServer) -> None:
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        client.delete(*client.scan_iter("filler:*", count=1000))
        client.config_set("maxmemory", MAXMEMORY)


@pytest.mark.timing
@pytest.mark.parametrize("on_error", MODES)
async def test_redis_out_of_memory_follows_on_error_and_a_blocked_device_stays_blocked(
    on_error: OnError,
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    server = redis_servers("--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction")
    gw = await start_gateway(make_settings(upstream, server.url, on_error))
    assert (await send(http, gw.url, "known")).enforced
    await gw.store.block("stolen")
    await until(lambda: "stolen" in gw.store.blocked, "the local copy of the blocked ids")
    assert await asyncio.to_thread(fill, server) > 0

    seen_before = upstream.count()
    answers = []
    for device in ("known", "fresh", "stolen") * 10:
        answers.append(await send(http, gw.url, device))
    for answer in answers:
        assert_envelope(answer)
        assert answer.status != 500 and not answer.enforced
        if answer.device == "stolen":
            assert (answer.status, answer.json()) == (403, BLOCKED)
        elif on_error == "open":
            assert (answer.status, answer.from_upstream) == (200, True)
        else:
            assert (answer.status, answer.json()) == (503, UNAVAILABLE)
            assert answer.headers["Retry-After"] == "1"
    reached = upstream.seen[seen_before:]
    assert upstream.count(device_id="stolen") == 0
    assert len(reached) == (20 if on_error == "open" else 0)
    assert any("OOM" in r.getMessage() for r in gateway_log.records)  # the cause, as logged

    # Memory freed: Redis decides again within a second (the breaker's next probe).
    await asyncio.to_thread(unfill, server)
    recovery = await first_enforced(http, gw.url, "known", time.monotonic(), 1.0)
    figure("seconds from memory freed to enforcement", recovery)
    assert recovery < 1.0
    stolen = await send(http, gw.url, "stolen")
    assert (stolen.status, stolen.json()) == (403, BLOCKED)
    record = await gw.store.get_device("stolen")
    assert record is not None and record.denied_count >= 1  # counted by Redis again
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- started before Redis


SNAPSHOTS_AT_START = {"no snapshot": None, "a corrupt snapshot": b'{"format": 1, "ids": ["'}


@pytest.mark.timing
@pytest.mark.parametrize("left", SNAPSHOTS_AT_START.values(), ids=SNAPSHOTS_AT_START.keys())
async def test_a_gateway_started_while_redis_is_down_listens_and_becomes_ready_when_it_is_up(
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
    state_home: Path,
    left: bytes | None,
) -> None:
    server = redis_servers()
    server.kill()  # its port now refuses; start() brings it back on the same one
    if left is not None:
        snapshot_file(state_home, server).parent.mkdir(parents=True)
        snapshot_file(state_home, server).write_bytes(left)
    public_port, admin_port = free_port(), free_port()
    settings = make_settings(
        upstream,
        server.url,
        extra=f"server: {{listen: '127.0.0.1:{public_port}'}}\n"
        f"admin: {{listen: '127.0.0.1:{admin_port}'}}\n",
    )
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    task = asyncio.create_task(serve(settings, stop=stop, on_ready=ready.set_result))
    health: list[tuple[int, Any]] = []
    checking = True

    async def check_health() -> None:
        while checking:
            async with http.get(f"http://127.0.0.1:{admin_port}/healthz") as r:
                health.append((r.status, orjson.loads(await r.read())))
            await asyncio.sleep(0.02)  # the sampling interval of a measurement, not a wait

    async def readyz(headers: dict[str, str] | None = AUTH) -> tuple[int, Any]:
        async with http.get(f"http://127.0.0.1:{admin_port}/readyz", headers=headers) as r:
            return r.status, orjson.loads(await r.read())

    health_task: asyncio.Task[None] | None = None
    try:
        waiters: set[asyncio.Future[Any]] = {task, ready}
        await asyncio.wait(waiters, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what stopped it
        assert ready.done(), "the listeners were not up within 2 s"
        listening = time.monotonic() - started
        running = ready.result()
        health_task = asyncio.create_task(check_health())

        # Down: not ready, every time. No snapshot and no supervisor told this process the
        # blocked ids: any device could be a blocked one, so each gets 503 (on_error: open
        # notwithstanding); a request without a device id is no device's and is forwarded.
        for _ in range(5):
            assert await readyz() == (503, {"status": False, "result": "Store unavailable"})
            down = await send(http, running.public_url, "early")
            assert_envelope(down)
            assert (down.status, down.json(), down.headers["Retry-After"]) == (
                503,
                UNAVAILABLE,
                "1",
            )
            assert upstream.count(device_id="early") == 0
            async with http.get(f"{running.public_url}/anonymous") as r:
                assert (r.status, MARK in r.headers) == (200, True)
            await asyncio.sleep(0.05)  # the scenario: the same answers, asked over time
        assert (await readyz(None))[0] == 401  # readiness needs the admin token

        await asyncio.to_thread(server.start)
        up = time.monotonic()
        while (answer := await readyz())[0] != 200:
            assert answer == (503, {"status": False, "result": "Store unavailable"})
            assert time.monotonic() - up < 2.0 + 1.0, "/readyz did not turn 200"
            await asyncio.sleep(0.02)  # between two probes of a bounded poll
        became_ready = time.monotonic() - up
        assert answer == (200, {"status": True, "result": "ready"})
        enforced_after = await first_enforced(http, running.public_url, "early", up, 2.0)
    finally:
        checking = False
        if health_task is not None:
            await asyncio.wait_for(health_task, WAIT)
        stop.set()
        await bounded(task, "serve() to return")
    figure("seconds to listen", listening)
    figure("seconds from Redis up to /readyz 200", became_ready)
    figure("seconds from Redis up to enforcement", enforced_after)
    figure("/healthz checks", len(health))
    assert listening < 2.0, listening
    assert became_ready < 2.0, became_ready
    assert enforced_after < 2.0, enforced_after
    assert len(health) >= 10
    assert all(check == (200, {"status": True, "result": "ok"}) for check in health), health
    ignored = [r.getMessage() for r in gateway_log.records if "ignoring the blocked-ids" in r.msg]
    if left is None:
        assert ignored == []
    else:  # a warning naming the file and why, never a traceback, never a crash
        assert ignored == [
            f"ignoring the blocked-ids snapshot {snapshot_file(state_home, server)}: not JSON "
            "(unexpected end of data: line 1 column 24 (char 23))"
        ]
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- knowing the blocked ids


def snapshot_file(state_home: Path, server: RedisServer) -> Path:
    """Where `gateway run` keeps the blocked-ids snapshot for this server (prefix dg)."""
    return state_home / "devicegate" / snapshot_name("dg", server.url)


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Running]:
    """`serve(settings)` in this process (what `gateway run` runs), until the block ends."""
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop=stop, on_ready=ready.set_result))
    try:
        waiters: set[asyncio.Future[Any]] = {task, ready}
        await asyncio.wait(waiters, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what stopped it
        assert ready.done(), f"the listeners were not up within {WAIT} s"
        yield ready.result()
    finally:
        stop.set()
        await bounded(task, "serve() to return")


async def admin(
    http: aiohttp.ClientSession, running: Running, method: str, path: str
) -> tuple[int, Any]:
    """One admin API call: (status, the decoded envelope)."""
    async with http.request(method, f"{running.admin_url}{path}", headers=AUTH) as r:
        return r.status, orjson.loads(await r.read())


async def admin_until(
    http: aiohttp.ClientSession,
    running: Running,
    path: str,
    done: Callable[[Any], bool],
    what: str,
) -> tuple[int, Any]:
    """GET an admin path until `done(envelope)` (a bounded poll); returns the last answer."""
    started = time.monotonic()
    while True:
        status, body = await admin(http, running, "GET", path)
        if done(body):
            return status, body
        assert time.monotonic() - started < WAIT, f"timed out waiting for {what}: {body}"
        await asyncio.sleep(0.02)  # between two probes of a bounded poll


async def metrics_text(http: aiohttp.ClientSession, running: Running) -> str:
    async with http.get(f"{running.admin_url}/metrics", headers=AUTH) as r:
        return await r.text()


ADMIN_ANY_PORT = "server: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"


async def test_a_gateway_started_while_redis_is_down_refuses_the_blocked_ids_of_its_snapshot(
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
    state_home: Path,
) -> None:
    server = redis_servers()
    settings = make_settings(upstream, server.url, "open", extra=ADMIN_ANY_PORT)
    snapshot = snapshot_file(state_home, server)
    async with serving(settings) as running:
        assert (await admin(http, running, "POST", "/devices/stolen/block"))[0] == 200
        await until(
            lambda: snapshot.is_file() and b'"stolen"' in snapshot.read_bytes(), "the snapshot"
        )
    await asyncio.to_thread(server.kill)

    # Restarted while Redis is down: the snapshot says who is blocked.
    async with serving(settings) as running:
        stolen = [await send(http, running.public_url, "stolen") for _ in range(10)]
        honest = await send(http, running.public_url, "honest")
        _, checks = await admin(http, running, "GET", "/readyz?verbose=1")
        metrics = await metrics_text(http, running)
    assert [(a.status, a.json()) for a in stolen] == [(403, BLOCKED)] * 10
    assert upstream.count(device_id="stolen") == 0  # none of them reached the upstream
    assert (honest.status, honest.from_upstream, honest.enforced) == (200, True, False)
    assert checks["status"] is False
    assert checks["result"]["store"] == {"reachable": False}
    blocked = checks["result"]["blocked_ids"]
    assert (blocked["known"], blocked["source"], blocked["count"]) == (True, "snapshot", 1)
    assert checks["result"]["snapshot"]["path"] == str(snapshot)
    assert 'devicegate_blocked_ids_known{process="main",source="snapshot"} 1\n' in metrics
    assert 'devicegate_blocked_ids{process="main"} 1\n' in metrics
    loaded = [r.getMessage() for r in gateway_log.records if "from the snapshot" in r.msg]
    assert len(loaded) == 1 and loaded[0].startswith("blocked ids from the snapshot: 1 ids")
    assert_no_traceback(gateway_log)


EMPTIED = ("flushall", "restart")


@pytest.mark.parametrize("how", EMPTIED)
async def test_redis_back_empty_is_reported_and_the_blocks_restored(
    how: str,
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    server = redis_servers()
    settings = make_settings(upstream, server.url, "open", extra=ADMIN_ANY_PORT)
    lost = ("stolen", "lost-2")
    async with serving(settings) as running:
        assert (await send(http, running.public_url, "honest")).enforced
        for device_id in lost:
            assert (await admin(http, running, "POST", f"/devices/{device_id}/block"))[0] == 200

        await admin_until(
            http,
            running,
            "/readyz?verbose=1",
            lambda body: body["result"]["blocked_ids"]["count"] == len(lost),
            "the local copy",
        )
        ready = await admin(http, running, "GET", "/readyz")
        assert ready == (200, {"status": True, "result": "ready"})
        _, before = await admin(http, running, "GET", "/devices/stolen")

        await asyncio.to_thread(server.flush if how == "flushall" else server.restart)
        status, ready = await admin_until(
            http,
            running,
            "/readyz",
            lambda body: body["result"] != "ready" and not body["result"].endswith("so far"),
            "the loss noticed and the blocks restored",
        )
        assert status == 200 and ready["status"] is True
        assert re.fullmatch(
            r"ready; Redis lost its data at \S+Z: 2 blocked ids restored", ready["result"]
        ), ready
        for device_id in lost:
            status, device = await admin(http, running, "GET", f"/devices/{device_id}")
            assert status == 200 and device["result"]["blocked"] is True
        _, after = await admin(http, running, "GET", "/devices/stolen")
        assert after["result"]["blocked_at"] >= before["result"]["blocked_at"]  # a new one
        answer = await send(http, running.public_url, "stolen")
        metrics = await metrics_text(http, running)
        _, checks = await admin(http, running, "GET", "/readyz?verbose=1")
    assert (answer.status, answer.json()) == (403, BLOCKED)
    assert upstream.count(device_id="stolen") == 0
    assert 'devicegate_store_resets_total{process="main"} 1\n' in metrics
    assert 'devicegate_blocks_restored_total{process="main"} 2\n' in metrics
    reset = checks["result"]["last_reset"]
    assert (reset["blocked_ids_known"], reset["restored"], reset["done"]) == (2, 2, True)
    errors = [r for r in gateway_log.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "Redis lost the gateway's data (restarted without persistence, or flushed): "
        "2 blocked ids known here, blocking them again"
    ]
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- clients that hang up


State = Literal["blocked", "limited", "normal"]
HangUp = Literal["mid_head", "at_once", "after_head", "mid_answer"]


@dataclass(frozen=True)
class Outcome:
    device: str
    state: State
    hang_up: HangUp | None
    status: int | None  # None: the client left before reading an answer
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Start:
    """Clients that connect first, then send at once: `go` once `connected` says all are."""

    go: asyncio.Event = field(default_factory=asyncio.Event)
    connected: int = 0


async def one_client(
    port: int,
    device: str,
    state: State,
    hang_up: HangUp | None,
    start: Start,
    rng: random.Random,
) -> Outcome:
    """A raw client: connect, wait for the start, send; leave early when told to."""
    client = await RawClient.connect(port, timeout=WAIT)
    start.connected += 1
    request = (
        f"GET /c/{device} HTTP/1.1\r\nHost: gw\r\nX-Device-Id: {device}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    status: int | None = None
    headers: CIMultiDict[str] = CIMultiDict()
    body = b""
    try:
        await asyncio.wait_for(start.go.wait(), WAIT)
        if hang_up == "mid_head":
            client.write(request[: rng.randrange(1, len(request) - 1)])
            await asyncio.sleep(rng.uniform(0, 0.02))  # the scenario: a random moment to leave
        elif hang_up == "at_once":  # while the store call is in flight
            client.write(request)
        elif hang_up == "after_head":
            client.write(request)
            await asyncio.sleep(rng.uniform(0, 0.03))  # the scenario: a random moment to leave
        elif hang_up == "mid_answer":
            client.write(request)
            await client.read_some(rng.randrange(1, 64))
        else:
            client.write(request)
            [answer] = await answers_in(await client.read_to_eof())
            status, headers, body = answer.status, answer.fields, answer.body
    finally:
        if hang_up == "at_once" or (hang_up is not None and rng.random() < 0.5):
            client.reset()  # an abrupt end
        await client.close()
    return Outcome(device, state, hang_up, status, headers, body)


def redis_clients(server: RedisServer) -> int:
    """Connections Redis holds now (the asking connection excluded)."""
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        return len(client.client_list()) - 1


async def test_clients_hanging_up_at_random_points_get_their_own_decisions_and_leak_nothing(
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    server = redis_servers()
    gw = await start_gateway(make_settings(upstream, server.url, "closed"))
    states: dict[str, State] = {}
    for i in range(1000):
        state: State = ("blocked", "limited", "normal")[i % 3]
        states[f"{state}-{i}"] = state
    gate = asyncio.Semaphore(50)

    async def prepare(device: str, state: State) -> None:
        async with gate:
            if state == "blocked":
                await gw.store.block(device)
                return
            if state == "limited":  # its own bucket: 1 token, refilled once in 1000 s
                await gw.store.set_rate_limit(device, Bucket(rate=0.001, burst=1))
            answer = await send(http, gw.url, device)  # registers it; takes the one token
            assert answer.status == 200 and answer.enforced

    await asyncio.gather(*(prepare(d, s) for d, s in states.items()))
    await http.close()  # no idle keep-alive connection of the warm-up left
    seen_before = upstream.count()
    connections_before = await asyncio.to_thread(redis_clients, server)

    start = Start()
    kinds: tuple[HangUp, ...] = ("mid_head", "at_once", "after_head", "mid_answer")
    plan = [(d, s, rng.choice(kinds) if rng.random() < 1 / 3 else None) for d, s in states.items()]
    port = int(gw.url.rsplit(":", 1)[1])
    tasks = [asyncio.create_task(one_client(port, d, s, h, start, rng)) for d, s, h in plan]
    # The connections made first: then all requests go at once.
    await until(lambda: start.connected == len(tasks), "every client to connect")
    start.go.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)

    completed = [o for o in outcomes if o.status is not None]
    hung_up = [o for o in outcomes if o.hang_up is not None]
    assert 250 <= len(hung_up) <= 420 and len(completed) == 1000 - len(hung_up), seed
    # Exchanges the gateway had started and then lost its client for (access log: 499).
    cut = sum(
        getattr(r, "fields", {}).get("status") == 499
        for r in gateway_log.records
        if r.name == ACCESS_LOGGER
    )
    figure("clients that hung up", len(hung_up))
    figure("exchanges cut by their client (499)", cut)
    assert cut >= 20, (seed, cut)
    expected = {"blocked": 403, "limited": 429, "normal": 200}
    for o in completed:
        assert o.status == expected[o.state], (seed, o)
        answer = Answer(o.status, o.headers, o.body, "", o.device, 0.0, 0.0)
        assert_envelope(answer)
        if o.state == "normal":
            report = orjson.loads(o.body)
            assert (report["device"], report["path"]) == (o.device, f"/c/{o.device}"), seed
            assert o.headers["X-RateLimit-Limit"] == "1000"
        elif o.state == "limited":
            assert orjson.loads(o.body) == LIMITED
            assert o.headers["X-RateLimit-Limit"] == "1"  # its own bucket, not another's
        else:
            assert orjson.loads(o.body) == BLOCKED
    # Only normal devices ever reached the upstream, each with its own path.
    for s in upstream.seen[seen_before:]:
        assert s.device_id is not None and states[s.device_id] == "normal", s
        assert s.raw_path == f"/c/{s.device_id}"

    # A wave of clients that all leave while their store calls are in flight, and at once
    # (within the breaker's cool-down) one request per state: the cancelled calls counted as
    # no failure of Redis, and the next calls still get their own decisions.
    start = Start()
    wave = [
        asyncio.create_task(one_client(port, f"normal-{i}", "normal", "at_once", start, rng))
        for i in range(5, 305, 3)
    ]
    await until(lambda: start.connected == len(wave), "every client of the wave to connect")
    start.go.set()
    await asyncio.wait_for(asyncio.gather(*wave), WAIT)
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout) as after:
        for device in ("blocked-0", "limited-1", "normal-2"):
            answer = await send(after, gw.url, device)
            assert_envelope(answer)
            assert answer.status == expected[states[device]], (seed, answer)

    # No Redis connection leaked: the same fixed set (pipeline, pub/sub, pooled admin ones);
    # and no request left open at the upstream by a client that went away.
    await until(lambda: not gw.plane.connections, "the client connections to be gone", 5.0)
    await until(lambda: upstream.in_progress == 0, "the upstream's requests to end", 2.0)
    connections_after = await asyncio.to_thread(redis_clients, server)
    figure("Redis connections before", connections_before)
    figure("Redis connections after", connections_after)
    assert connections_after == connections_before, (connections_before, connections_after)
    assert connections_after <= 1 + 1 + 64 + 64  # pipeline, pub/sub, the two pools' caps
    assert_no_traceback(gateway_log)


async def test_calls_meeting_noscript_together_reload_the_script_once(
    upstream: CountingUpstream,
    redis_servers: Callable[..., RedisServer],
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    server = redis_servers()
    gw = await start_gateway(make_settings(upstream, server.url))
    devices = [f"together-{i}" for i in range(20)]
    for device in devices:
        assert (await send(http, gw.url, device)).enforced
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        client.script_flush()
        client.config_resetstat()
    # Connected first, then sent at once: the calls share the first batch after the flush.
    start = Start()
    port = int(gw.url.rsplit(":", 1)[1])
    rng = random.Random(0)
    tasks = [asyncio.create_task(one_client(port, d, "normal", None, start, rng)) for d in devices]
    await until(lambda: start.connected == len(tasks), "every client to connect")
    start.go.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert all(o.status == 200 and "RateLimit" in o.headers for o in outcomes)
    assert_no_traceback(gateway_log)
    stats = command_stats(server)
    figure("calls that met NOSCRIPT together", calls(stats, "evalsha", "failed_calls"))
    assert calls(stats, "evalsha", "failed_calls") >= 1  # the premise: a batch met it
    assert calls(stats, "script|load") == 2  # enforce.lua and its batch variant, once each


async def test_a_store_closes_while_its_blocked_set_is_polling(
    redis_servers: Callable[..., RedisServer], gateway_log: pytest.LogCaptureFixture
) -> None:
    # Closed while the first poll (256 shard versions) is being written: on Python 3.11 the
    # cancel can be swallowed there (asyncio.wait_for inside redis-py, gh-86296), and a close
    # that cancelled once and waited without a bound hung in 9 attempts out of 10, and with it
    # serve()'s shutdown on SIGTERM. Ten attempts: the hang cannot hide.
    server = redis_servers()
    for attempt in range(10):
        store = Store.from_settings(RedisSettings(url=server.url, timeout=TIMEOUT))
        await store.start(follow_blocked=True)
        for _ in range(5):
            await asyncio.sleep(0)
        closing = asyncio.ensure_future(store.close())
        done, _ = await asyncio.wait({closing}, timeout=2.0)
        if not done:  # end the test cleanly: cancel the followers that lost their cancel
            for task in asyncio.all_tasks():
                if task.get_name() in ("blocked-poll", "blocked-pubsub") and task.cancelling():
                    task.cancel()
        await bounded(closing, "closing the store")
        assert done, f"Store.close() still waiting after 2 s (attempt {attempt + 1})"
    assert_no_traceback(gateway_log)
