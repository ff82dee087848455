"""The suite's fixtures and hooks, one plugin (tests/conftest.py registers it with
`pytest_plugins`): test modules take fixtures by name and never import them.

- the state home of every gateway a test starts (never $HOME);
- `redis_server` (one real redis-server per session), `real_redis` (emptied), `clock`,
  `store` (on fakeredis and on the real server);
- `upstream` (a CountingUpstream), `make_upstream` and `make_raw_upstream` (factories of
  the rig's upstreams), `raw_client` (RawClient factory), `http` (an aiohttp client),
  `proxies` (FaultProxy factory), `start_gateway` (the in-process data plane),
  `gateway_log`;
- `unaccepting_listener` (connects that time out);
- the loop every async test runs on (DEVICEGATE_LOOP).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from tests.rig.client import OpenRawClient, RawClient
from tests.rig.clock import FakeClock
from tests.rig.faults import FaultProxy
from tests.rig.gateway import Gateway, StartGateway
from tests.rig.raw_upstream import MakeRawUpstream, RawUpstream, Script, Serve
from tests.rig.redis_server import RedisServer
from tests.rig.upstream import REPORT, Behaviour, CountingUpstream, MakeUpstream
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


@pytest.fixture(params=["fake", "single", "cluster", "sentinel"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    """A Store with the fake clock on each engine: fakeredis, a real redis-server, a real
    Redis Cluster and a real Sentinel-watched primary (tests/rig/engine_fixtures.py)."""
    if request.param == "fake":
        s = Store.memory(clock=clock)
    else:
        engine = request.getfixturevalue(
            f"real_{'redis' if request.param == 'single' else request.param}"
        )
        s = Store.from_settings(
            RedisSettings(url=engine.url, timeout=2.0, key_prefix=f"t{uuid.uuid4().hex[:6]}"),
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
async def make_upstream() -> AsyncIterator[MakeUpstream]:
    """Factory: a started CountingUpstream; every one closed (bounded) after the test."""
    made: list[CountingUpstream] = []

    async def make(
        default: Behaviour = REPORT,
        *,
        keepalive_timeout: float = 75.0,
        listener: socket.socket | None = None,
    ) -> CountingUpstream:
        up = CountingUpstream(default, keepalive_timeout=keepalive_timeout)
        made.append(up)
        await up.start(listener)
        return up

    yield make
    for up in made:
        await bounded(up.close(), "closing an upstream")


@pytest.fixture
async def upstream(make_upstream: MakeUpstream) -> CountingUpstream:
    """A started CountingUpstream answering every path with a JSON report of the request."""
    return await make_upstream()


@pytest.fixture
async def make_raw_upstream() -> AsyncIterator[MakeRawUpstream]:
    """Factory: a started RawUpstream; every one closed (bounded) after the test."""
    made: list[RawUpstream] = []

    async def make(
        answer: bytes | None = None,
        *,
        close: bool = True,
        script: Script | None = None,
        serve: Serve | None = None,
    ) -> RawUpstream:
        if answer is None:
            raw = RawUpstream(close=close, script=script, serve=serve)
        else:
            raw = RawUpstream(answer, close=close, script=script, serve=serve)
        made.append(raw)
        await raw.start()
        return raw

    yield make
    for raw in made:
        await bounded(raw.close(), "closing a raw upstream")


@pytest.fixture
async def raw_client() -> AsyncIterator[OpenRawClient]:
    """Factory: a RawClient connected to a loopback port; every one aborted after the test
    (not closed: a close would wait to flush what a refused upload left unsent)."""
    made: list[RawClient] = []

    async def open_(port: int, *, timeout: float = WAIT, framed: bool = False) -> RawClient:
        client = await RawClient.connect(port, timeout=timeout, framed=framed)
        made.append(client)
        return client

    yield open_
    for client in made:
        client.abort()
        with contextlib.suppress(ConnectionError):
            await bounded(client.writer.wait_closed(), "closing a raw client")


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
