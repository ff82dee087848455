"""`gateway run` on `memory://` runs on the embedded NativeStore: the whole gateway in one
process (gateway.app.serve), real sockets, a real upstream, and no fakeredis in the way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from gateway import app
from gateway.app import Running, serve
from gateway.config import parse_config
from gateway.store import NativeStore, Store, open_store
from tests.rig.system import free_port
from tests.rig.upstream import CountingUpstream
from tests.rig.waits import WAIT

pytestmark = pytest.mark.integration

TOKEN = "native-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PHONE = {"X-Device-Id": "phone-1", "X-App-Name": "FieldApp", "X-OS-Name": "Android"}


@pytest.fixture
async def running(
    upstream: CountingUpstream, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Running]:
    """`serve` on memory://, with the Redis Store's constructors out of reach: had the
    gateway embedded fakeredis, its start would fail."""
    opened: list[Any] = []

    def no_redis_store(*args: object, **kwargs: object) -> Store:
        raise AssertionError("memory:// opened a Store (fakeredis), not the NativeStore")

    monkeypatch.setattr(Store, "memory", no_redis_store)
    monkeypatch.setattr(Store, "from_settings", no_redis_store)

    def opening(*args: Any, **kwargs: Any) -> Any:
        opened.append(open_store(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(app, "open_store", opening)
    settings = parse_config(
        f"""
        server: {{listen: "127.0.0.1:{free_port()}"}}
        admin: {{listen: "127.0.0.1:{free_port()}", token: "{TOKEN}"}}
        upstream: {{url: "{upstream.url}"}}
        redis: {{url: "memory://"}}
        rate_limits: {{device: {{rate: 0.01, burst: 2}}}}
        log: {{access: false}}
        """.replace("\n        ", "\n"),
        "native.yaml",
    )
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, on_ready=ready.set_result, stop=stop))
    try:
        waiters: set[asyncio.Future[Any]] = {task, ready}
        await asyncio.wait(waiters, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what stopped it
        assert [type(store) for store in opened] == [NativeStore]
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


async def test_the_data_plane_allows_limits_and_blocks_on_the_native_store(
    running: Running, upstream: CountingUpstream, http: aiohttp.ClientSession
) -> None:
    api = f"{running.public_url}/api/data"
    async with http.get(api, headers=PHONE) as first:
        assert first.status == 200
        assert first.headers["RateLimit"] == '"device";r=1;t=100'
    async with http.post(api, headers=PHONE, data=b"reading") as second:
        assert second.status == 200  # the second token of a burst of 2
    async with http.get(api, headers=PHONE) as third:
        assert third.status == 429
        assert third.headers["Retry-After"] == "100"
        assert orjson.loads(await third.read())["status"] is False
    assert upstream.paths() == ["/api/data", "/api/data"]

    device = f"{running.admin_url}/devices/phone-1"
    async with http.get(device, headers=AUTH) as shown:
        record = orjson.loads(await shown.read())["result"]
    assert (record["request_count"], record["denied_count"]) == (3, 1)
    assert (record["application"], record["os"]) == ("FieldApp", "Android")
    assert record["last_data_upload"] is not None

    async with http.post(f"{device}/block", headers=AUTH) as blocked:
        assert blocked.status == 200
    async with http.get(api, headers=PHONE) as refused:
        assert refused.status == 403
        assert orjson.loads(await refused.read()) == {
            "status": False,
            "result": "Access denied: device is blocked",
        }
    async with http.get(f"{running.admin_url}/readyz?verbose=1", headers=AUTH) as ready:
        checks = orjson.loads(await ready.read())["result"]
    assert checks["store"] == {"reachable": True}
    assert (checks["blocked_ids"]["known"], checks["blocked_ids"]["count"]) == (True, 1)

    async with http.post(f"{device}/unblock", headers=AUTH) as unblocked:
        assert unblocked.status == 200
    async with http.delete(f"{device}/rate_limit", headers=AUTH) as none:
        assert none.status == 404
    async with http.put(f"{device}/rate_limit", headers=AUTH, json={"rate": 5, "burst": 5}):
        pass
    async with http.get(api, headers=PHONE) as again:
        # Its own bucket from now on, refilling from what the old one held (nothing).
        assert (again.status, again.headers["Retry-After"]) == (429, "1")
        assert again.headers["RateLimit-Policy"] == '"device";q=5;w=1'
    async with http.get(f"{running.admin_url}/devices?name=phone", headers=AUTH) as listed:
        assert [d["id"] for d in orjson.loads(await listed.read())["result"]] == ["phone-1"]
        assert listed.headers["X-Total-Count"] == "1"
