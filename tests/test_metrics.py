"""Counters: what the public listener counts and how the admin listener shows it."""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.admin import create_admin_app
from gateway.config import RedisSettings, parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.metrics import Metrics, render
from gateway.store import Store
from gateway.store.blocked import BlockedSeed
from tests.rig.system import free_port
from tests.rig.upstream import MakeUpstream, Reply

TOKEN = "metrics-test-token-0123456789"


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


def test_each_process_shows_its_hold_on_the_blocked_ids() -> None:
    worker, unknowing, supervisor = Metrics(), Metrics(), Metrics()
    worker.show_blocked("supervisor", 3, 0, 0)
    supervisor.show_blocked("redis", 3, 1, 3)
    supervisor.show_snapshot(1_000, 2)
    text = render(
        [worker, unknowing, supervisor], ["worker-0", "worker-1", "supervisor"], now_ms=3_500
    )
    for line in (
        "# TYPE devicegate_blocked_ids_known gauge",
        'devicegate_blocked_ids_known{process="worker-0",source="supervisor"} 1',
        'devicegate_blocked_ids_known{process="worker-1",source="none"} 0',  # it shows
        'devicegate_blocked_ids_known{process="supervisor",source="redis"} 1',
        'devicegate_blocked_ids{process="worker-0"} 3',
        'devicegate_blocked_ids{process="worker-1"} 0',
        "# TYPE devicegate_store_resets_total counter",
        'devicegate_store_resets_total{process="supervisor"} 1',
        'devicegate_blocks_restored_total{process="supervisor"} 3',
        'devicegate_blocked_snapshot_age_seconds{process="supervisor"} 2.500',
        'devicegate_blocked_snapshot_write_failures_total{process="supervisor"} 2',
    ):
        assert f"{line}\n" in text, line
    # Only the process that writes the snapshot reports it.
    assert 'snapshot_age_seconds{process="worker-0"}' not in text
    # One process: named "main".
    assert 'devicegate_blocked_ids_known{process="main",source="none"} 0\n' in Metrics().render()


async def test_open_mode_counts_store_failures_and_admin_shows_them(
    aiohttp_client: Any, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream(Reply(body=b"ok"))
    settings = parse_config(
        f"redis: {{on_error: open}}\nupstream: {{url: '{upstream.url}'}}", "test"
    )
    metrics = Metrics()
    store = Store.memory()
    # The data plane's store is a Redis that refuses connections: nothing listens there.
    down = Store.from_settings(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.5))
    plane = DataPlane(settings, down, metrics)
    server = await start_public(plane, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as http:
            # Nothing tells this process the blocked ids: 503, whatever on_error says.
            async with http.get(f"http://127.0.0.1:{port}/", headers={"X-Device-Id": "d1"}) as r:
                assert r.status == 503
            down.blocked.seed(BlockedSeed(frozenset(), "e1", "snapshot", 0))
            for _ in range(2):
                async with http.get(
                    f"http://127.0.0.1:{port}/", headers={"X-Device-Id": "d1"}
                ) as r:
                    assert r.status == 200
    finally:
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
        await down.close()
    assert metrics.store_failures == 3
    assert metrics.decisions["store_down_unknown"] == 1
    assert metrics.decisions["store_down_open"] == 2

    admin = await aiohttp_client(create_admin_app(store, TOKEN, metrics))
    assert (await admin.get("/metrics")).status == 401
    resp = await admin.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    text = await resp.text()
    assert "devicegate_store_failures_total 3\n" in text
    assert 'devicegate_responses_total{status="200"} 2\n' in text
    assert 'devicegate_requests_total{decision="store_down_unknown"} 1\n' in text
    await store.close()
