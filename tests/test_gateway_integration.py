"""The gateway end to end: real sockets, a real redis-server and a real upstream app.

Every gateway here is the data plane (or `serve`) on a loopback port in front of the rig's
`CountingUpstream`, which records each request it saw, so a test can say "the upstream never
saw it". Stores get the fake clock: the token bucket is driven by `clock.advance`, never sleep.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpServer
from yarl import URL

from gateway.admin import create_admin_app
from gateway.app import YOUNG_THRESHOLD, Running, serve
from gateway.config import Settings, parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.logs import ACCESS_LOGGER, JsonFormatter
from gateway.model import Device, HistoryEntry
from gateway.store import Store
from gateway.store.keys import KeySchema
from tests.rig.client import Answer as RawAnswer
from tests.rig.client import RawClient, answers_in
from tests.rig.clock import FakeClock
from tests.rig.engine_fixtures import RedisEngine, primary_ports
from tests.rig.redis_server import RedisServer
from tests.rig.system import free_port
from tests.rig.upstream import CountingUpstream, MakeUpstream, Reply, Seen
from tests.rig.waits import until_async

pytestmark = pytest.mark.integration

TOKEN = "integration-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# 2026-11-03T23:24:19.787Z, conftest's EPOCH_US, as the admin API writes it.
EPOCH_ISO = "2026-11-03T23:24:19.787Z"
PHONE = {
    "X-Device-Id": "phone-1",
    "X-App-Name": "FieldApp",
    "X-App-Version": "2.4.1",
    "X-OS-Name": "Android",
    "X-OS-Version": "15",
    "X-Device-Manufacturer": "Samsung",
    "X-Device-Model": "Galaxy S24",
}
BLOCKED = {"status": False, "result": "Access denied: device is blocked"}
LIMITED = {"status": False, "result": "Too many requests"}
RATE_LIMIT_HEADERS = (
    "RateLimit",
    "RateLimit-Policy",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)
WAIT = 10.0  # seconds: the bound on every wait for a server, a process or a response


# ---------------------------------------------------------------- the upstream


def path_report(seen: Seen) -> bytes:
    """What these tests' upstream answers: that it was reached, and the raw path."""
    return orjson.dumps({"upstream": True, "path": seen.raw_path})


@pytest.fixture
async def upstream(make_upstream: MakeUpstream) -> CountingUpstream:
    """The rig's upstream, answering `{"upstream": true, "path": <raw path>}`."""
    json = {"Content-Type": "application/json"}
    return await make_upstream(Reply(body=path_report, headers=json))


# ---------------------------------------------------------------- gateways


def make_settings(upstream: CountingUpstream, redis_url: str, yaml_text: str = "") -> Settings:
    """Settings from YAML, pointed at the upstream and the store through env overrides."""
    env = {
        "GATEWAY_UPSTREAM_URL": upstream.url,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_ADMIN_TOKEN": TOKEN,
    }
    return parse_config(yaml_text, "test.yaml", env)


@dataclass(frozen=True)
class Gateway:
    """A data-plane app and its admin app on their own loopback ports, over one Store."""

    url: URL
    admin: URL
    store: Store


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(
    aiohttp_server: AiohttpServer, clock: FakeClock
) -> AsyncIterator[StartGateway]:
    """Factory: the data plane + create_admin_app for settings (a new Store unless given)."""
    own: list[Store] = []
    planes: list[tuple[DataPlane, asyncio.Server]] = []

    async def start(settings: Settings, store: Store | None = None) -> Gateway:
        if store is None:
            store = Store.from_settings(
                settings.redis, history_size=settings.devices.history_size, clock=clock
            )
            own.append(store)
            # As every data-plane process does: follow the blocked ids, and know them
            # before serving (else a Redis outage is answered 503 whatever on_error says).
            await store.start(follow_blocked=True)
            await asyncio.wait_for(store.blocked.synced.wait(), WAIT)
        plane = DataPlane(settings, store)
        server = await start_public(plane, "127.0.0.1", 0)
        planes.append((plane, server))
        admin = await aiohttp_server(create_admin_app(store, TOKEN))
        port = server.sockets[0].getsockname()[1]
        return Gateway(URL(f"http://127.0.0.1:{port}"), admin.make_url(""), store)

    yield start
    for plane, server in planes:
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
    for store in own:
        await store.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session, closed after the test; every call is bounded."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


@dataclass(frozen=True)
class Answer:
    """A response, read whole."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: URL | str,
    headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
    **kwargs: Any,
) -> Answer:
    """One request; the response is read and released before returning."""
    async with http.request(method, url, headers=headers, **kwargs) as resp:
        return Answer(resp.status, resp.headers, await resp.read())


async def block(http: aiohttp.ClientSession, gw: Gateway, device_id: str) -> Answer:
    """Block a device through the gateway's admin API."""
    return await call(http, "POST", gw.admin / "devices" / device_id / "block", AUTH)


def rate_headers(answer: Answer) -> dict[str, str]:
    """The rate-limit header fields of an answer (absent ones left out)."""
    return {name: answer.headers[name] for name in RATE_LIMIT_HEADERS if name in answer.headers}


async def redis_keys(engine: RedisEngine) -> list[bytes]:
    """Every key on the engine's primaries but the epoch marker (set by the processes that
    follow the blocked ids, never by a request)."""
    found: list[bytes] = []
    for port in primary_ports(engine):
        client = aioredis.Redis(port=port, socket_timeout=2)
        try:
            found += [k if isinstance(k, bytes) else k.encode() for k in await client.keys("*")]
        finally:
            await client.aclose()
    return sorted(k for k in found if k != KeySchema("dg").epoch.encode())


async def raw_request(url: URL, data: bytes) -> RawAnswer:
    """Send raw bytes to the server at `url`, read until it closes the socket: the one
    answer that came."""
    assert url.host is not None and url.port is not None
    client = await RawClient.connect(url.port, url.host, timeout=WAIT)
    try:
        await client.send(data)
        [answer] = await answers_in(await client.read_to_eof())
    finally:
        await client.close()
    return answer


# ---------------------------------------------------------------- forwarding and registration


async def test_device_request_is_forwarded_and_registers_the_device(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    gw = await start_gateway(make_settings(upstream, redis_engine.url))
    t0 = clock.now_ms
    payload = os.urandom(64 * 1024)

    first = await call(http, "POST", f"{gw.url}/api/data?batch=7", PHONE, data=payload)

    assert first.status == 200
    assert first.json() == {"upstream": True, "path": "/api/data?batch=7"}
    [seen] = upstream.seen
    assert (seen.method, seen.raw_path) == ("POST", "/api/data?batch=7")
    assert seen.body_sha256 == hashlib.sha256(payload).hexdigest()
    assert seen.body_size == len(payload)
    for name, value in PHONE.items():  # identification headers travel on unchanged
        assert seen.headers.getall(name) == [value]
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    # Defaults: device rate 10/s, burst 20.
    assert rate_headers(first) == {
        "RateLimit-Policy": '"device";q=20;w=2',
        "RateLimit": '"device";r=19;t=1',
        "X-RateLimit-Limit": "20",
        "X-RateLimit-Remaining": "19",
        "X-RateLimit-Reset": "1",
    }
    assert await gw.store.get_device("phone-1") == Device(
        id="phone-1",
        name=None,
        application="FieldApp",
        application_version="2.4.1",
        os="Android",
        os_version="15",
        manufacturer="Samsung",
        model="Galaxy S24",
        first_seen=t0,
        last_active=t0,
        last_data_upload=t0,
        blocked=False,
        blocked_at=None,
        request_count=1,
        denied_count=0,
        rate_limit=None,
    )

    # A minute later a GET from an updated app: activity moves, the upload time does not,
    # and the version change lands in the history.
    clock.advance(60_000)
    t1 = clock.now_ms
    second = await call(http, "GET", f"{gw.url}/api/config", {**PHONE, "X-App-Version": "2.5.0"})
    assert second.status == 200
    device = await gw.store.get_device("phone-1")
    assert device is not None
    assert (device.first_seen, device.last_active, device.last_data_upload) == (t0, t1, t0)
    assert (device.application_version, device.request_count) == ("2.5.0", 2)
    assert await gw.store.history("phone-1") == [
        HistoryEntry(at=t1, field="application_version", old="2.4.1", new="2.5.0")
    ]
    history = await call(http, "GET", gw.admin / "devices" / "phone-1" / "history", AUTH)
    assert history.json() == {
        "status": True,
        "result": [
            {
                "at": "2026-11-03T23:25:19.787Z",
                "field": "application_version",
                "old": "2.4.1",
                "new": "2.5.0",
            }
        ],
    }
    shown = await call(http, "GET", gw.admin / "devices" / "phone-1", AUTH)
    assert shown.json()["result"]["first_seen"] == EPOCH_ISO

    # Same identity again: counted, no new history entry.
    third = await call(http, "GET", f"{gw.url}/api/config", {**PHONE, "X-App-Version": "2.5.0"})
    assert third.status == 200
    device = await gw.store.get_device("phone-1")
    assert device is not None and device.request_count == 3
    assert len(await gw.store.history("phone-1") or []) == 1

    # A device that only ever sent GET has no upload time.
    assert (await call(http, "GET", f"{gw.url}/x", {"X-Device-Id": "reader-1"})).status == 200
    reader = await gw.store.get_device("reader-1")
    assert reader is not None
    assert (reader.last_active, reader.last_data_upload, reader.application) == (t1, None, None)
    assert upstream.paths() == ["/api/data?batch=7", "/api/config", "/api/config", "/x"]


# ---------------------------------------------------------------- blocking


async def test_block_and_unblock_take_effect_across_two_gateways_sharing_redis(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    # A slow bucket (one token per 100 s) so refills cannot hide a token taken while blocked.
    settings = make_settings(
        upstream, redis_engine.url, "rate_limits: {device: {rate: 0.01, burst: 5}}"
    )
    a = await start_gateway(settings)
    b = await start_gateway(settings)  # its own Store and connections, the same Redis
    url_b = f"{b.url}/api/data"

    assert (await call(http, "GET", url_b, PHONE)).status == 200
    clock.advance(1000)

    blocked = await call(http, "POST", a.admin / "devices" / "phone-1" / "block", AUTH)
    assert blocked.status == 200
    assert blocked.json()["result"]["blocked"] is True
    assert blocked.json()["result"]["blocked_at"] == "2026-11-03T23:24:20.787Z"

    clock.advance(1000)
    denied = await call(http, "GET", url_b, PHONE)
    assert (denied.status, denied.json()) == (403, BLOCKED)
    assert rate_headers(denied) == {}  # no token was asked for
    denied_a = await call(http, "POST", f"{a.url}/api/data", PHONE, data=b"x")
    assert (denied_a.status, denied_a.json()) == (403, BLOCKED)
    assert upstream.paths() == ["/api/data"]  # only the first request got through

    device = await b.store.get_device("phone-1")
    assert device is not None
    assert device.blocked and device.denied_count == 2 and device.request_count == 3
    assert device.last_active == clock.now_ms  # a blocked device that keeps trying is visible

    unblocked = await call(http, "POST", a.admin / "devices" / "phone-1" / "unblock", AUTH)
    assert (unblocked.status, unblocked.json()["result"]["blocked"]) == (200, False)
    passed = await call(http, "GET", url_b, PHONE)
    assert passed.status == 200
    assert upstream.paths() == ["/api/data", "/api/data"]
    # 5 - 2 tokens: the blocked requests took none.
    assert passed.headers["X-RateLimit-Remaining"] == "3"


async def test_an_id_blocked_in_advance_is_denied_on_its_first_request(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    gw = await start_gateway(make_settings(upstream, redis_engine.url))

    pre = await call(http, "POST", gw.admin / "devices" / "stolen-7" / "block", AUTH)
    assert pre.status == 200
    record = pre.json()["result"]
    assert (record["blocked"], record["blocked_at"]) == (True, EPOCH_ISO)
    assert (record["first_seen"], record["last_active"], record["request_count"]) == (None, None, 0)

    clock.advance(5000)
    first = await call(http, "GET", f"{gw.url}/api/data", {"X-Device-Id": "stolen-7"})
    assert (first.status, first.json()) == (403, BLOCKED)
    assert upstream.seen == []
    device = await gw.store.get_device("stolen-7")
    assert device is not None
    assert (device.request_count, device.denied_count) == (1, 1)
    assert (device.blocked_at, device.last_active) == (clock.now_ms - 5000, clock.now_ms)


# ---------------------------------------------------------------- rate limits

BUCKET_CONFIG = """
rate_limits:
  device: {rate: 0.5, burst: 3}
  anonymous: {rate: 2, burst: 4}
"""


async def test_token_bucket_end_to_end_with_an_injected_clock(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:
    gw = await start_gateway(make_settings(upstream, redis_engine.url, BUCKET_CONFIG))
    url = f"{gw.url}/api/data"
    dev = {"X-Device-Id": "busy-1"}
    # burst 3 at 0.5 token/s: a token every 2 s, 6 s from empty to full.
    policy = '"device";q=3;w=6'

    for remaining, reset in ((2, 2), (1, 4), (0, 6)):
        ok = await call(http, "GET", url, dev)
        assert ok.status == 200
        assert rate_headers(ok) == {
            "RateLimit-Policy": policy,
            "RateLimit": f'"device";r={remaining};t=2',
            "X-RateLimit-Limit": "3",
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset),
        }

    limited = await call(http, "GET", url, dev)
    assert (limited.status, limited.json()) == (429, LIMITED)
    assert limited.headers["Retry-After"] == "2"
    assert rate_headers(limited) == {
        "RateLimit-Policy": policy,
        "RateLimit": '"device";r=0;t=2',
        "X-RateLimit-Limit": "3",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "6",
    }
    assert len(upstream.seen) == 3

    clock.advance(1999)  # one millisecond short of a whole token
    early = await call(http, "GET", url, dev)
    assert early.status == 429
    assert (early.headers["Retry-After"], early.headers["RateLimit"]) == ("1", '"device";r=0;t=1')

    clock.advance(1)
    again = await call(http, "GET", url, dev)
    assert again.status == 200
    assert (again.headers["RateLimit"], again.headers["X-RateLimit-Reset"]) == (
        '"device";r=0;t=2',
        "6",
    )
    assert (await call(http, "GET", url, dev)).status == 429
    assert len(upstream.seen) == 4
    device = await gw.store.get_device("busy-1")
    assert device is not None and (device.request_count, device.denied_count) == (7, 3)

    # A per-device override set through the admin API beats the default bucket.
    override = await call(
        http,
        "PUT",
        gw.admin / "devices" / "vip-1" / "rate_limit",
        AUTH,
        data=orjson.dumps({"rate": 1, "burst": 5}),
    )
    assert override.status == 200
    vip = {"X-Device-Id": "vip-1"}
    for remaining in (4, 3, 2, 1, 0):
        ok = await call(http, "GET", url, vip)
        assert ok.status == 200
        assert ok.headers["RateLimit-Policy"] == '"device";q=5;w=5'
        assert (ok.headers["X-RateLimit-Limit"], ok.headers["X-RateLimit-Remaining"]) == (
            "5",
            str(remaining),
        )
    vip_limited = await call(http, "GET", url, vip)
    assert (vip_limited.status, vip_limited.headers["Retry-After"]) == (429, "1")
    assert vip_limited.headers["RateLimit-Policy"] == '"device";q=5;w=5'

    removed = await call(http, "DELETE", gw.admin / "devices" / "vip-1" / "rate_limit", AUTH)
    assert removed.status == 200
    back = await call(http, "GET", url, vip)
    assert (back.status, back.headers["RateLimit-Policy"]) == (429, policy)


async def test_anonymous_requests_are_limited_by_client_ip(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    plain = await start_gateway(make_settings(upstream, redis_engine.url, BUCKET_CONFIG))
    behind_proxy = await start_gateway(
        make_settings(
            upstream,
            redis_engine.url,
            BUCKET_CONFIG + "server: {trusted_proxies: [127.0.0.1/32]}",
        ),
        store=plain.store,
    )
    url = f"{plain.url}/public"

    # burst 4 at 2 tokens/s: 2 s from empty to full.
    for remaining, reset in ((3, 1), (2, 1), (1, 2), (0, 2)):
        ok = await call(http, "GET", url)
        assert ok.status == 200
        assert rate_headers(ok) == {
            "RateLimit-Policy": '"anonymous";q=4;w=2',
            "RateLimit": f'"anonymous";r={remaining};t=1',
            "X-RateLimit-Limit": "4",
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset),
        }
    limited = await call(http, "GET", url)
    assert (limited.status, limited.json()) == (429, LIMITED)
    assert limited.headers["Retry-After"] == "1"
    assert limited.headers["RateLimit"] == '"anonymous";r=0;t=1'

    # The peer is not a trusted proxy: its X-Forwarded-For cannot pick a fresh bucket.
    spoofed = await call(http, "GET", url, {"X-Forwarded-For": "203.0.113.7"})
    assert spoofed.status == 429
    assert len(upstream.seen) == 4

    # Through a gateway that trusts 127.0.0.1, the forwarded client is the key.
    proxied = await call(
        http, "GET", f"{behind_proxy.url}/public", {"X-Forwarded-For": "203.0.113.7"}
    )
    assert proxied.status == 200
    assert proxied.headers["RateLimit"] == '"anonymous";r=3;t=1'
    # ...and the proxy's own address is still the exhausted bucket.
    assert (await call(http, "GET", f"{behind_proxy.url}/public")).status == 429

    keys = plain.store.keys
    assert await redis_keys(redis_engine) == sorted(
        [
            keys.anonymous_bucket("127.0.0.1").encode(),
            keys.anonymous_bucket("203.0.113.7").encode(),
        ]
    )  # two buckets, no device records


# ---------------------------------------------------------------- Redis down


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to be stopped and restarted."""
    server = RedisServer()
    yield server
    server.stop()


async def timed(coro: Awaitable[Answer]) -> tuple[Answer, float]:
    """The answer and the seconds it took."""
    started = time.monotonic()
    answer = await coro
    return answer, time.monotonic() - started


@pytest.mark.timing
@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_redis_down_follows_on_error_and_recovers_without_a_restart(
    on_error: str,
    own_redis: RedisServer,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(
        make_settings(upstream, own_redis.url, f"redis: {{timeout: 0.1, on_error: {on_error}}}")
    )
    url = f"{gw.url}/api/data"
    healthy = await call(http, "GET", url, PHONE)
    assert healthy.status == 200 and "RateLimit" in healthy.headers

    await asyncio.to_thread(own_redis.kill)
    before = len(upstream.seen)
    for headers in (PHONE, None):  # a device and an anonymous request
        answer, took = await timed(call(http, "GET", url, headers))
        assert took < 1.0, f"{took:.3f} s with redis.timeout 0.1"
        if on_error == "open":
            assert answer.status == 200
            assert answer.json() == {"upstream": True, "path": "/api/data"}
            assert rate_headers(answer) == {}  # never invented
        else:
            assert answer.status == 503
            assert answer.json() == {"status": False, "result": "Service temporarily unavailable"}
            assert int(answer.headers["Retry-After"]) >= 1
    assert len(upstream.seen) == before + (2 if on_error == "open" else 0)

    await asyncio.to_thread(own_redis.restart)
    resumed = await call(http, "GET", url, PHONE)
    assert resumed.status == 200
    assert resumed.headers["X-RateLimit-Remaining"] == "19"  # a fresh Redis, a fresh bucket
    device = await gw.store.get_device("phone-1")
    assert device is not None and device.request_count == 1
    # Enforcement, not just headers: a block is honoured again.
    assert (await block(http, gw, "phone-1")).status == 200
    assert (await call(http, "GET", url, PHONE)).status == 403


@pytest.mark.timing
async def test_a_hung_redis_costs_at_most_the_timeout(
    own_redis: RedisServer,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    # SIGSTOP: the socket accepts but nothing answers, the case a refused connection hides.
    gw = await start_gateway(make_settings(upstream, own_redis.url, "redis: {timeout: 0.1}"))
    url = f"{gw.url}/api/data"
    assert (await call(http, "GET", url, PHONE)).status == 200

    own_redis.freeze()
    try:
        for _ in range(3):
            answer, took = await timed(call(http, "GET", url, PHONE))
            assert took < 1.0, f"{took:.3f} s with redis.timeout 0.1"
            assert answer.status == 200 and rate_headers(answer) == {}
    finally:
        own_redis.thaw()

    # Enforcement resumes on its own, once the circuit breaker's probe goes through (within
    # a second); replies to the abandoned calls are not taken for answers to new ones. (An
    # abandoned call that had reached Redis's socket may still be applied once Redis
    # resumes, so counts are bounds, not exact.)
    async def enforced() -> bool:
        return bool(rate_headers(await call(http, "GET", url, PHONE)))

    await until_async(enforced, "enforcement to resume within 1.5 s", timeout=1.5, every=0.05)
    remaining = []
    for _ in range(2):
        answer = await call(http, "GET", url, PHONE)
        assert answer.status == 200 and rate_headers(answer).keys() == set(RATE_LIMIT_HEADERS)
        remaining.append(int(answer.headers["X-RateLimit-Remaining"]))
    assert 19 > remaining[0] > remaining[1]
    device = await gw.store.get_device("phone-1")
    assert device is not None and device.request_count >= 4
    assert (await block(http, gw, "phone-1")).status == 200
    assert (await call(http, "GET", url, PHONE)).status == 403


# ---------------------------------------------------------------- requests the gateway refuses


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param(
            [("X-Device-Id", "d" * 129)],
            "Invalid X-Device-Id header: must be at most 128 characters",
            id="id-129-chars",
        ),
        pytest.param(
            [("X-Device-Id", "phone-1"), ("X-Device-Id", "phone-2")],
            "Invalid X-Device-Id header: sent more than once",
            id="duplicate-id",
        ),
        pytest.param(
            [("X-Device-Id", "phone-1"), ("X-App-Name", "a" * 257)],
            "Invalid X-App-Name header: must be at most 256 characters",
            id="field-257-chars",
        ),
    ],
)
async def test_invalid_identity_is_400_and_writes_nothing(
    headers: list[tuple[str, str]],
    reason: str,
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(make_settings(upstream, redis_engine.url))
    answer = await call(http, "POST", f"{gw.url}/api/data", headers, data=b"{}")
    assert (answer.status, answer.json()) == (400, {"status": False, "result": reason})
    assert upstream.seen == []
    for _, value in headers:
        assert await gw.store.get_device(value) is None
    assert await redis_keys(redis_engine) == []


async def test_require_id_answers_401_to_anonymous_requests(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(
        make_settings(upstream, redis_engine.url, "devices: {require_id: true}")
    )
    anonymous = await call(http, "GET", f"{gw.url}/api/data")
    assert (anonymous.status, anonymous.json()) == (
        401,
        {"status": False, "result": "A device id is required"},
    )
    assert upstream.seen == []
    assert (await call(http, "GET", f"{gw.url}/api/data", PHONE)).status == 200
    assert upstream.paths() == ["/api/data"]


async def test_declared_body_over_the_limit_is_413_before_anything_else(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    settings = make_settings(upstream, redis_engine.url, "limits: {max_body_bytes: 1024}")
    gw = await start_gateway(settings)
    url = f"{gw.url}/upload"
    too_big = await call(http, "POST", url, PHONE, data=b"x" * 1025)
    assert (too_big.status, too_big.json()) == (
        413,
        {"status": False, "result": "Request body too large"},
    )
    assert upstream.seen == []
    assert await redis_keys(redis_engine) == []  # 413 comes before the store is asked

    # Order of checks: size before blocked.
    assert (await block(http, gw, "phone-1")).status == 200
    assert (await call(http, "POST", url, PHONE, data=b"x" * 1025)).status == 413
    assert (await call(http, "POST", url, PHONE, data=b"x")).status == 403

    exact = b"y" * 1024
    fits = await call(http, "POST", url, {"X-Device-Id": "other"}, data=exact)
    assert fits.status == 200
    [seen] = upstream.seen
    assert (seen.body_size, seen.body_sha256) == (1024, hashlib.sha256(exact).hexdigest())


async def test_connect_is_405_and_never_forwarded(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(make_settings(upstream, redis_engine.url))
    raw = await raw_request(
        gw.url,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
        b"X-Device-Id: phone-1\r\nConnection: close\r\n\r\n",
    )
    status, headers, body = raw.status, raw.fields, raw.body
    assert status == 405
    assert orjson.loads(body) == {"status": False, "result": "Method not allowed"}
    assert "CONNECT" not in headers["Allow"] and "GET" in headers["Allow"]
    assert upstream.seen == []
    assert await redis_keys(redis_engine) == []


async def test_the_admin_api_is_not_reachable_through_the_public_port(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(make_settings(upstream, redis_engine.url))
    await call(http, "GET", f"{gw.url}/x", PHONE)

    listed = await call(http, "GET", f"{gw.url}/devices", AUTH)
    assert listed.json() == {"upstream": True, "path": "/devices"}
    block = await call(http, "POST", f"{gw.url}/devices/phone-1/block", AUTH)
    assert block.json() == {"upstream": True, "path": "/devices/phone-1/block"}
    health = await call(http, "GET", f"{gw.url}/healthz")
    assert health.json() == {"upstream": True, "path": "/healthz"}
    assert upstream.paths() == ["/x", "/devices", "/devices/phone-1/block", "/healthz"]
    device = await gw.store.get_device("phone-1")
    assert device is not None and not device.blocked

    # The admin port does answer them.
    admin = await call(http, "GET", gw.admin / "devices", AUTH)
    assert admin.json()["status"] is True
    assert [d["id"] for d in admin.json()["result"]] == ["phone-1"]


# ---------------------------------------------------------------- access log


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access-log records, rendered by JsonFormatter; each must be one JSON line."""
    formatter = JsonFormatter()
    out = []
    for record in caplog.records:
        if record.name != ACCESS_LOGGER:
            continue
        line = formatter.format(record)
        assert "\n" not in line and len(line.splitlines()) == 1, line
        out.append(orjson.loads(line))
    return out


async def test_every_request_gets_one_json_access_log_line(
    redis_engine: RedisEngine,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    gw = await start_gateway(make_settings(upstream, redis_engine.url))
    assert (await call(http, "POST", f"{gw.url}/api/log?q=1", PHONE, data=b"1")).status == 200
    await block(http, gw, "phone-2")
    assert (await call(http, "GET", f"{gw.url}/api/log", {"X-Device-Id": "phone-2"})).status == 403
    # U+2028 (a line separator) reaches the gateway and is refused by identity validation.
    odd = await raw_request(
        gw.url,
        "GET /api/odd HTTP/1.1\r\nHost: gw\r\nX-Device-Id: phone-3\r\n"
        "X-App-Name: evil\u2028app\r\nConnection: close\r\n\r\n".encode(),
    )
    assert odd.status == 400
    # An ANSI escape is refused by aiohttp's own parser before any handler: a plain 400.
    ansi = await raw_request(
        gw.url,
        b"GET /api/ansi HTTP/1.1\r\nHost: gw\r\nX-Device-Id: phone-4\r\n"
        b"X-App-Name: \x1b[31mred\r\nConnection: close\r\n\r\n",
    )
    assert ansi.status == 400
    assert upstream.paths() == ["/api/log?q=1"]

    lines = access_lines(caplog)
    assert [
        (e["device_id"], e["method"], e["path"], e["status"], e["decision"]) for e in lines
    ] == [
        ("phone-1", "POST", "/api/log?q=1", 200, "allow"),
        ("phone-2", "GET", "/api/log", 403, "blocked"),
        (None, "GET", "/api/odd", 400, "invalid"),
    ]
    allowed, blocked, invalid = lines
    assert isinstance(allowed["upstream_ms"], float) and allowed["upstream_ms"] >= 0
    assert allowed["total_ms"] >= allowed["upstream_ms"]
    assert blocked["upstream_ms"] is None and invalid["upstream_ms"] is None
    assert all(isinstance(e["total_ms"], float) for e in lines)
    assert all(e["logger"] == ACCESS_LOGGER and e["message"] == "request" for e in lines)


def test_json_formatter_escapes_line_separators_in_fields() -> None:
    record = logging.makeLogRecord(
        {
            "name": ACCESS_LOGGER,
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "request",
            "fields": {"path": "/a\u2028b\u2029c", "device_id": "\x1b[31mred\r\nx"},
        }
    )
    line = JsonFormatter().format(record)
    assert orjson.loads(line)["path"] == "/a\u2028b\u2029c"
    assert len(line.splitlines()) == 1, line


# ---------------------------------------------------------------- serve()


async def test_serve_runs_both_listeners_until_stop_is_set(
    upstream: CountingUpstream, http: aiohttp.ClientSession
) -> None:
    public_port, admin_port = free_port(), free_port()
    settings = parse_config(
        f"""
        server: {{listen: "127.0.0.1:{public_port}"}}
        admin: {{listen: "127.0.0.1:{admin_port}", token: "{TOKEN}"}}
        upstream: {{url: "{upstream.url}"}}
        redis: {{url: "memory://"}}
        """.replace("\n        ", "\n"),
        "serve.yaml",
    )
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    frozen: list[int] = []
    young: list[int] = []
    thresholds = gc.get_threshold()

    async def on_ready(running: Running) -> None:
        frozen.append(gc.get_freeze_count())
        young.append(gc.get_threshold()[0])
        ready.set_result(running)

    gc.unfreeze()  # earlier tests' serve() froze their own start-up
    task = asyncio.create_task(serve(settings, on_ready=on_ready, stop=stop))
    try:
        waiters: set[asyncio.Future[Any]] = {task, ready}
        await asyncio.wait(waiters, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what stopped it
        assert ready.done(), "serve() did not call on_ready"
        running = ready.result()
        # What start-up built is out of the collector's sight before the first request.
        assert frozen and frozen[0] > 1000, frozen
        # The young collections run every YOUNG_THRESHOLD net allocations, not every 700.
        assert young == [YOUNG_THRESHOLD] and thresholds[0] < YOUNG_THRESHOLD
        assert running == Running(
            public_url=f"http://127.0.0.1:{public_port}",
            admin_url=f"http://127.0.0.1:{admin_port}",
            admin_token=TOKEN,
        )
        answer = await call(http, "POST", f"{running.public_url}/api/data", PHONE, data=b"hi")
        assert answer.status == 200 and "RateLimit" in answer.headers
        assert upstream.paths() == ["/api/data"]
        shown = await call(http, "GET", f"{running.admin_url}/devices/phone-1", AUTH)
        assert shown.json()["result"]["request_count"] == 1
        await http.close()  # no idle keep-alive connection left behind

        stop.set()
        await asyncio.wait_for(task, WAIT)  # returns cleanly: no exception, no hang
        assert gc.get_threshold() == thresholds  # given back on the way out
    finally:
        if not task.done():
            stop.set()
            await asyncio.wait_for(task, WAIT)
        gc.unfreeze()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as fresh:
        with pytest.raises(aiohttp.ClientConnectionError):
            await call(fresh, "GET", f"http://127.0.0.1:{public_port}/")
