"""The suite's fixtures and hooks, one plugin (tests/conftest.py registers it with
`pytest_plugins`): test modules take fixtures by name and never import them.

- the state home of every gateway a test starts (never $HOME);
- `redis_server` (one real redis-server per session), `real_redis` (emptied), `clock`,
  `store` (on fakeredis and on the real server);
- `upstream` (a CountingUpstream), `http` (an aiohttp client), `proxies` (FaultProxy
  factory), `start_gateway` (the in-process data plane), `gateway_log`;
- `unaccepting_listener` (connects that time out);
- the loop every async test runs on (DEVICEGATE_LOOP).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway import loops
from gateway.config import RedisSettings, Settings
from gateway.dataplane import DataPlane, start_public
from gateway.store import Store
from tests.rig.clock import FakeClock
from tests.rig.faults import FaultProxy
from tests.rig.gateway import Gateway, StartGateway
from tests.rig.redis_server import RedisServer
from tests.rig.upstream import CountingUpstream
from tests.rig.waits import WAIT, bounded


def pytest_configure(config: pytest.Config) -> None:
    """State files (blocked-ids snapshots, generated admin tokens) of every gateway the
    tests start, in-process or not, go to a directory of this session's, never to $HOME."""
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="devicegate-state-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get("XDG_STATE_HOME", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def state_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test's gateways (in-process, or children that inherit the environment) keep
    their state files in a directory of the test's own: a blocked-ids snapshot left by an
    earlier test on the same redis-server would seed the next one's gateway."""
    path = Path(tempfile.mkdtemp(prefix="devicegate-state-"))
    monkeypatch.setenv("XDG_STATE_HOME", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole session."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def real_redis(redis_server: RedisServer) -> RedisServer:
    """The real redis-server, emptied for this test."""
    redis_server.flush()
    return redis_server


@pytest.fixture(params=["fake", "real"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    """A Store on fakeredis and on a real redis-server, with the fake clock."""
    if request.param == "fake":
        s = Store.memory(clock=clock)
    else:
        server: RedisServer = request.getfixturevalue("real_redis")
        s = Store.from_settings(
            RedisSettings(url=server.url, timeout=2.0, key_prefix=f"t{uuid.uuid4().hex[:6]}"),
            clock=clock,
        )
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def clock() -> FakeClock:
    """A fresh fake clock."""
    return FakeClock()


@pytest.fixture
async def upstream() -> AsyncIterator[CountingUpstream]:
    """A started CountingUpstream, closed (bounded) after the test."""
    up = CountingUpstream()
    await up.start()
    yield up
    await bounded(up.close(), "closing the upstream")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client with room for 200 connections, every request bounded by WAIT."""
    connector = aiohttp.TCPConnector(limit=200)
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[[int], Awaitable[FaultProxy]]]:
    """Factory: a started FaultProxy in front of a loopback port."""
    made: list[FaultProxy] = []

    async def start(port: int) -> FaultProxy:
        proxy = FaultProxy("127.0.0.1", port)
        await proxy.start()
        made.append(proxy)
        return proxy

    yield start
    for proxy in made:
        await bounded(proxy.close(), "closing a fault proxy")


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    """Factory: the data plane on a loopback port over a Store of its own (following the
    blocked ids); every one started is shut down, bounded, after the test."""
    running: list[tuple[Gateway, asyncio.Server]] = []

    async def start(settings: Settings) -> Gateway:
        store = Store.from_settings(settings.redis, history_size=settings.devices.history_size)
        await store.start(follow_blocked=True)
        # Known before serving, as a process that read its snapshot (or its supervisor) at
        # start would: a fault injected right away then meets on_error, not the 503 of a
        # process that does not know the blocked ids yet.
        await asyncio.wait_for(store.blocked.synced.wait(), WAIT)
        plane = DataPlane(settings, store)
        server = await start_public(plane, "127.0.0.1", 0)
        gw = Gateway(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", store, plane)
        running.append((gw, server))
        return gw

    yield start
    for gw, server in running:
        server.close()
        await bounded(gw.plane.shutdown(1.0), "the data plane's shutdown")
        await bounded(server.wait_closed(), "closing the public listener")
        await bounded(gw.store.close(), "closing the store")


@pytest.fixture
def gateway_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record at INFO and up (the gateway's own from DEBUG), for `assert_no_traceback`."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="gateway")
    return caplog


@pytest.fixture
def unaccepting_listener() -> Iterator[str]:
    """A loopback listener whose accept queue is full, so new SYNs are dropped (Linux).

    Skips when the kernel completes connects anyway: then there is no way to provoke a
    connect timeout on loopback, and a refused connect is covered by its own test.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(address)
    except TimeoutError:
        pass
    else:
        pytest.skip("the kernel accepted a connect beyond the listen backlog")
    finally:
        probe.close()
    try:
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the loop the gateway itself would pick (DEVICEGATE_LOOP:
    auto, uvloop or asyncio), so CI can run the suite on both loops."""
    factory = loops.loop_factory()
    return {loops.loop_name(factory): factory}
