"""The in-process gateway the fault tests share: its settings, what `start_gateway` gives,
and the answers read through it.

The data plane runs on a loopback port over a Store of its own (following the blocked ids),
in front of a `CountingUpstream`, with `FaultProxy`s to put between them; the fixtures that
start them are in tests/rig/fixtures.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import Settings, parse_config
from gateway.dataplane import DataPlane
from gateway.logs import JsonFormatter
from gateway.store import Store
from tests.rig.upstream import MARK, CountingUpstream
from tests.rig.waits import WAIT

OnError = Literal["open", "closed"]

TIMEOUT = 0.1  # redis.timeout under test
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


# ---------------------------------------------------------------- the running gateway


@dataclass(frozen=True)
class Gateway:
    """The data plane on a loopback port over its own Store (following the blocked ids)."""

    url: str
    store: Store
    plane: DataPlane


StartGateway = Callable[[Settings], Awaitable[Gateway]]


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


class Load:
    """`clients` concurrent clients, each sending a request every `pace` seconds (after the
    previous answer) round the devices, until stopped."""

    def __init__(
        self, http: aiohttp.ClientSession, base: str, devices: Sequence[str], *, clients: int
    ) -> None:
        self.http = http
        self.base = base
        self.devices = devices
        self.clients = clients
        self.answers: list[Answer] = []
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, pace: float) -> None:
        self._tasks = [asyncio.create_task(self._client(i, pace)) for i in range(self.clients)]

    async def stop(self) -> list[Answer]:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), WAIT)
        assert not self.errors, self.errors
        return self.answers

    async def _client(self, i: int, pace: float) -> None:
        for k in itertools.count(i):
            if self._stop.is_set():
                return
            try:
                self.answers.append(
                    await send(self.http, self.base, self.devices[k % len(self.devices)])
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors.append(exc)
                return
            await asyncio.sleep(pace)  # the load's pace is the scenario
