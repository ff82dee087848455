"""Counters: what the public listener counts and how the admin listener shows it."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.accesslog import access_log_middleware
from gateway.admin import create_admin_app
from gateway.config import parse_config
from gateway.enforce import Enforcer, enforce_middleware
from gateway.errors import StoreUnavailable
from gateway.metrics import Metrics
from gateway.store import Store

TOKEN = "metrics-test-token-0123456789"


class DownStore:
    async def enforce(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("Redis failed: connection refused")


def test_render_is_prometheus_text() -> None:
    metrics = Metrics()
    metrics.observe("allow", 200)
    metrics.observe("allow", 200)
    metrics.observe("blocked", 403)
    metrics.store_failures = 3
    text = metrics.render()
    assert 'devicegate_requests_total{decision="allow"} 2\n' in text
    assert 'devicegate_requests_total{decision="blocked"} 1\n' in text
    assert 'devicegate_responses_total{status="403"} 1\n' in text
    assert "devicegate_store_failures_total 3\n" in text
    assert "# TYPE devicegate_requests_total counter\n" in text


async def test_open_mode_counts_store_failures_and_admin_shows_them(aiohttp_client: Any) -> None:
    settings = parse_config("redis: {on_error: open}", "test")
    metrics = Metrics()

    async def upstream(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    public = web.Application(
        middlewares=[
            access_log_middleware(enabled=False, metrics=metrics),
            enforce_middleware(enforcer=Enforcer(settings, DownStore(), metrics)),  # type: ignore[arg-type]
        ]
    )
    public.router.add_route("*", "/{tail:.*}", upstream)
    client = await aiohttp_client(public)
    for _ in range(2):
        assert (await client.get("/", headers={"X-Device-Id": "d1"})).status == 200
    assert metrics.store_failures == 2
    assert metrics.decisions["store_down_open"] == 2

    store = Store.memory()
    admin = await aiohttp_client(create_admin_app(store, TOKEN, metrics))
    assert (await admin.get("/metrics")).status == 401
    resp = await admin.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    text = await resp.text()
    assert "devicegate_store_failures_total 2\n" in text
    assert 'devicegate_responses_total{status="200"} 2\n' in text
    await store.close()
