"""The in-process gateway rig the fault tests share: settings, fixtures, answers.

The data plane runs on a loopback port over a Store of its own (following the blocked ids),
in front of a `CountingUpstream`, with `FaultProxy`s to put between them. Test modules take
the fixtures by importing them (`from tests.gateway_rig import http as http`): pytest finds
a fixture in the module that uses it, and the alias tells ruff the name is a re-export.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import Settings, parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.logs import JsonFormatter
from gateway.store import Store
from tests.counting_upstream import MARK, CountingUpstream
from tests.faults import FaultProxy

OnError = Literal["open", "closed"]

TIMEOUT = 0.1  # redis.timeout under test
WAIT = 10.0  # bounds every wait for a server, a process or a response
TOKEN = "gateway-rig-admin-token-0123456789"


# ---------------------------------------------------------------- configuration


def make_settings(
    upstream: CountingUpstream,
    redis_url: str,
    on_error: OnError = "open",
    *,
    extra: str = "",
) -> Settings:
    """Settings for these tests: buckets so large that no request meets its limit unless a
    test gives a device its own, and a registration budget that never refuses."""
    text = (
        f"redis: {{timeout: {TIMEOUT}, on_error: {on_error}}}\n"
        "rate_limits: {device: {rate: 1000, burst: 1000}}\n"
        "devices: {registration_limit: {rate: 1000, burst: 10000}}\n"
        f"{extra}"
    )
    env = {
        "GATEWAY_UPSTREAM_URL": upstream.url,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_ADMIN_TOKEN": TOKEN,
    }
    return parse_config(text, "faults.yaml", env)


# ---------------------------------------------------------------- fixtures


async def bounded(step: Awaitable[None], what: str) -> None:
    """A teardown step bounded by WAIT; past it, the tasks still running are printed and the
    step fails by name (rather than a silent wait until pytest-timeout)."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=WAIT)
    if not done:
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                other.print_stack()
        task.cancel()
        pytest.fail(f"{what} did not finish within {WAIT} s")
    task.result()


@pytest.fixture
async def upstream() -> AsyncIterator[CountingUpstream]:
    up = CountingUpstream()
    await up.start()
    yield up
    await bounded(up.close(), "closing the upstream")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
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


@dataclass(frozen=True)
class Gateway:
    """The data plane on a loopback port over its own Store (following the blocked ids)."""

    url: str
    store: Store
    plane: DataPlane


StartGateway = Callable[[Settings], Awaitable[Gateway]]


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
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


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """No record carries an exception, and none renders (as the gateway's JSON line) a
    traceback."""
    formatter = JsonFormatter()
    for record in caplog.records:
        line = formatter.format(record)
        assert record.exc_info is None and "Traceback" not in line, line


# ---------------------------------------------------------------- requests and answers


@dataclass(frozen=True)
class Answer:
    """One answer, read whole, with when its request was sent and how long it took."""

    status: int
    headers: CIMultiDictProxy[str] | CIMultiDict[str]
    body: bytes
    tag: str
    device: str
    sent: float  # time.monotonic() at the send
    took: float

    @property
    def done(self) -> float:
        return self.sent + self.took

    @property
    def from_upstream(self) -> bool:
        return MARK in self.headers

    @property
    def enforced(self) -> bool:
        """Redis decided: the rate-limit headers are there (never invented without it)."""
        return "RateLimit" in self.headers and "X-RateLimit-Remaining" in self.headers

    def json(self) -> Any:
        return orjson.loads(self.body)


def assert_envelope(answer: Answer) -> None:
    """An answer the gateway made itself is `{"status": false, "result": "<reason>"}`."""
    if answer.from_upstream:
        return
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer
    document = answer.json()
    assert set(document) == {"status", "result"}, document
    assert document["status"] is (answer.status < 400)
    assert isinstance(document["result"], str)


_tags = itertools.count()


async def send(http: aiohttp.ClientSession, base: str, device: str) -> Answer:
    """GET /r/<device>?n=<unique tag> with the device's id; the answer is read whole."""
    tag = str(next(_tags))
    started = time.monotonic()
    async with http.get(f"{base}/r/{device}?n={tag}", headers={"X-Device-Id": device}) as r:
        body = await r.read()
    return Answer(r.status, r.headers, body, tag, device, started, time.monotonic() - started)


def figure(name: str, value: float) -> None:
    """Print a measured figure (shown with `pytest -rP`; the closing notes quote them)."""
    print(f"figure {name}: {value:.4g}")
