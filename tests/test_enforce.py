"""The enforce middleware on fakeredis, with a stub handler in place of the proxy."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.accesslog import access_log_middleware
from gateway.config import Settings, parse_config
from gateway.enforce import Enforcer, enforce_middleware, extra_headers
from gateway.errors import StoreUnavailable
from gateway.store import Store
from tests.conftest import FakeClock

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

CONFIG = """
rate_limits:
  device: {rate: 1, burst: 2}
  anonymous: {rate: 1, burst: 1}
limits:
  max_body_bytes: 100
"""


class Reached:
    """The stub handler: counts what got through and echoes the rate-limit headers."""

    def __init__(self) -> None:
        self.count = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.count += 1
        return web.Response(text="upstream", headers=extra_headers(request))


async def make_app(settings: Settings, store: Any, reached: Reached) -> web.Application:
    app = web.Application(
        middlewares=[
            access_log_middleware(enabled=False),
            enforce_middleware(enforcer=Enforcer(settings, store)),
        ]
    )
    app.router.add_route("*", "/{tail:.*}", reached.handle)
    return app


@pytest.fixture
def settings() -> Settings:
    return parse_config(CONFIG, "test")


@pytest.fixture
async def store(clock: FakeClock):
    s = Store.memory(clock=clock)
    yield s
    await s.close()


@pytest.fixture
async def gateway(aiohttp_client: MakeClient, settings: Settings, store: Store):
    reached = Reached()
    client = await aiohttp_client(await make_app(settings, store, reached))
    return client, reached


async def envelope(response: Any) -> Any:
    return orjson.loads(await response.read())


async def test_allowed_request_passes_with_rate_limit_headers(gateway: Any) -> None:
    client, reached = gateway
    resp = await client.get("/x", headers={"X-Device-Id": "d1"})
    assert resp.status == 200
    assert reached.count == 1
    assert resp.headers["RateLimit"] == '"device";r=1;t=1'
    assert resp.headers["RateLimit-Policy"] == '"device";q=2;w=2'


async def test_invalid_identity_is_400_naming_the_header_and_writes_nothing(
    gateway: Any, store: Store
) -> None:
    client, reached = gateway
    resp = await client.get("/x", headers={"X-Device-Id": "x" * 129})
    assert resp.status == 400
    body = await envelope(resp)
    assert body["status"] is False
    assert "X-Device-Id" in body["result"]
    assert reached.count == 0
    assert await store.list_devices() == ([], 0)


async def test_validation_comes_before_the_body_size(gateway: Any) -> None:
    client, _ = gateway
    resp = await client.post("/x", headers={"X-Device-Id": ""}, data=b"y" * 500)
    assert resp.status == 400


async def test_declared_body_over_limit_is_413_before_the_store(gateway: Any, store: Store) -> None:
    client, reached = gateway
    resp = await client.post("/x", headers={"X-Device-Id": "d1"}, data=b"y" * 101)
    assert resp.status == 413
    assert await envelope(resp) == {"status": False, "result": "Request body too large"}
    assert reached.count == 0
    assert await store.get_device("d1") is None


async def test_blocked_is_403_before_the_bucket(gateway: Any, store: Store) -> None:
    client, reached = gateway
    await store.block("d1")
    for _ in range(4):
        resp = await client.get("/x", headers={"X-Device-Id": "d1"})
        assert resp.status == 403
        assert await envelope(resp) == {
            "status": False,
            "result": "Access denied: device is blocked",
        }
        assert "RateLimit" not in resp.headers
    assert reached.count == 0
    await store.unblock("d1")
    statuses = [(await client.get("/x", headers={"X-Device-Id": "d1"})).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_limited_is_429_with_retry_after_and_headers(gateway: Any, clock: FakeClock) -> None:
    client, reached = gateway
    for _ in range(2):
        await client.get("/x", headers={"X-Device-Id": "d1"})
    resp = await client.get("/x", headers={"X-Device-Id": "d1"})
    assert resp.status == 429
    assert await envelope(resp) == {"status": False, "result": "Too many requests"}
    assert resp.headers["Retry-After"] == "1"
    assert resp.headers["RateLimit"] == '"device";r=0;t=1'
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert reached.count == 2
    clock.advance(1000)
    assert (await client.get("/x", headers={"X-Device-Id": "d1"})).status == 200


async def test_anonymous_requests_use_the_anonymous_bucket(gateway: Any) -> None:
    client, _ = gateway
    first = await client.get("/x")
    assert first.headers["RateLimit-Policy"] == '"anonymous";q=1;w=1'
    # An untrusted client cannot pick its own key with X-Forwarded-For.
    second = await client.get("/x", headers={"X-Forwarded-For": "192.0.2.77"})
    assert second.status == 429


async def test_require_id_answers_401_to_anonymous(
    aiohttp_client: MakeClient, settings: Settings, store: Store
) -> None:
    strict = dataclasses.replace(
        settings, devices=dataclasses.replace(settings.devices, require_id=True)
    )
    reached = Reached()
    client = await aiohttp_client(await make_app(strict, store, reached))
    resp = await client.get("/x")
    assert resp.status == 401
    assert await envelope(resp) == {"status": False, "result": "A device id is required"}
    assert (await client.get("/x", headers={"X-Device-Id": "d"})).status == 200


async def test_connect_is_405(gateway: Any) -> None:
    client, reached = gateway
    resp = await client.request("CONNECT", "/x", headers={"X-Device-Id": "d1"})
    assert resp.status == 405
    assert (await envelope(resp))["status"] is False
    assert reached.count == 0


class DownStore:
    """A store whose Redis is gone."""

    async def enforce(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("Redis failed: connection refused")


@pytest.mark.parametrize(
    ("on_error", "status", "reached_count"), [("open", 200, 1), ("closed", 503, 0)]
)
async def test_store_down(
    aiohttp_client: MakeClient,
    settings: Settings,
    on_error: Literal["open", "closed"],
    status: int,
    reached_count: int,
) -> None:
    mode = dataclasses.replace(
        settings, redis=dataclasses.replace(settings.redis, on_error=on_error)
    )
    reached = Reached()
    client = await aiohttp_client(await make_app(mode, DownStore(), reached))
    resp = await client.get("/x", headers={"X-Device-Id": "d1"})
    assert resp.status == status
    assert reached.count == reached_count
    # Headers are left out rather than invented when Redis could not be asked.
    assert "RateLimit" not in resp.headers
    assert "X-RateLimit-Remaining" not in resp.headers
    if status == 503:
        assert resp.headers["Retry-After"] == "1"
        assert (await envelope(resp))["status"] is False


async def test_unexpected_error_is_a_500_envelope(
    aiohttp_client: MakeClient, settings: Settings, store: Store
) -> None:
    async def broken(_request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    app = web.Application(
        middlewares=[
            access_log_middleware(enabled=False),
            enforce_middleware(enforcer=Enforcer(settings, store)),
        ]
    )
    app.router.add_route("*", "/{tail:.*}", broken)
    client = await aiohttp_client(app)
    resp = await client.get("/x", headers={"X-Device-Id": "d1"})
    assert resp.status == 500
    assert await envelope(resp) == {"status": False, "result": "Internal error"}
