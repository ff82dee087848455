"""Awkward device ids end to end: the data plane accepts them, and both the page's paths
(paths.js, resolved by node's WHATWG URL parser as fetch() resolves them) and the CLI's
AdminClient reach the right device through a real admin app; "." ".." and commas are refused
for new state while records kept before the rule stay manageable by the API and the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pytest_aiohttp.plugin import AiohttpServer
from yarl import URL

from gateway.admin import create_admin_app
from gateway.admin_client import AdminClient
from gateway.config import DeviceSettings
from gateway.errors import AdminClientError, IdentityError
from gateway.identity import IdentityReader, device_id_problem
from gateway.model import Bucket, DeviceIdentity
from gateway.store import Store
from tests.rig.node_js import run_modules

if TYPE_CHECKING:
    from tests.rig.clock import FakeClock

TOKEN = "admin-ids-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUCKET = Bucket(rate=100.0, burst=100)
WAIT = 10.0
READER = IdentityReader(DeviceSettings())
SUFFIXES = ("", "/history", "/block", "/unblock")

# Ids that a URL, a path router or a shell treats specially; each is a valid device id.
AWKWARD = {
    "percent": "%",
    "slash": "/",
    "question-mark": "?",
    "hash": "#",
    "braces": "{}",
    "route-placeholder": "{d001}",
    "inner-dot": "a.b",
    "three-dots": "...",
    "leading-dot": ".a",
    "trailing-dots": "a..",
    "dot-dot-then-text": "..a",
    "percent-2e-2e-text": "%2e%2e",
    "percent-2E-text": "%2E",
    "dot-percent-2e-text": ".%2e",
    "star": "*",
    "colon": ":",
    "backslash": "\\",
    "double-quote": '"',
    "single-quote": "'",
    "angle-brackets": "<>",
    "ampersand": "&",
    "plus": "+",
    "equals": "=",
    "semicolon": ";",
    "at": "@",
    "square-brackets": "[]",
    "pipe-caret-backtick": "|^`",
    "tilde": "~",
    "traversal-inside": "a/../b",
    "ends-with-block": "x/block",
    "escaped-slash-text": "%2F",
    "query-and-fragment": "?a=1#b",
    "128-characters": "." * 127 + "x",
}
REFUSED = {
    "dot": (".", 'must not be "." or ".."'),
    "dot-dot": ("..", 'must not be "." or ".."'),
    "comma": ("a,b", "must not contain commas"),
}

PAGE_PATHS = """
import { devicePath } from "./paths.js";
const base = `http://127.0.0.1:${input.port}/`;  // the page is served at /
print(input.suffixes.map((suffix) => {
  try {
    const url = new URL(devicePath(input.id, suffix), base);
    return { href: url.href, pathname: url.pathname };
  } catch (err) {
    return { error: err.message };
  }
}));
"""


@pytest.fixture
async def mem_store(clock: FakeClock) -> AsyncIterator[Store]:
    """A Store on fakeredis with the fake clock."""
    store = Store.memory(clock=clock)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def base_url(aiohttp_server: AiohttpServer, mem_store: Store) -> str:
    """The URL (ending in "/") of a real admin app on a loopback port."""
    server = await aiohttp_server(create_admin_app(mem_store, TOKEN))
    return str(server.make_url("/"))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that sends the admin token, every call bounded."""
    async with aiohttp.ClientSession(
        headers=AUTH, timeout=aiohttp.ClientTimeout(total=WAIT)
    ) as session:
        yield session


async def page_paths(
    tmp_path: Path, http: aiohttp.ClientSession, base_url: str, device_id: str
) -> list[dict[str, str]]:
    """What the page's devicePath gives for each suffix, resolved against the page's URL."""
    async with http.get(base_url + "static/paths.js") as resp:  # the module as served
        assert resp.status == 200 and resp.content_type == "text/javascript"
        source = await resp.read()
    data = {"port": URL(base_url).port, "id": device_id, "suffixes": SUFFIXES}
    result: list[dict[str, str]] = run_modules(tmp_path, {"paths.js": source}, PAGE_PATHS, data)
    return result


async def call(
    http: aiohttp.ClientSession, method: str, href: str, body: Any = None
) -> tuple[int, Any]:
    """(status, result) of an admin call to `href` sent exactly as resolved (no requoting)."""
    data = None if body is None else orjson.dumps(body)
    async with http.request(method, URL(href, encoded=True), data=data) as resp:
        payload = orjson.loads(await resp.read())
    return resp.status, payload["result"]


def headers(device_id: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict([("X-Device-Id", device_id)]))


async def register(store: Store, device_id: str) -> None:
    """The device as the data plane registers it: its header read by the identity rule."""
    identity = READER.read(headers(device_id))
    assert identity == DeviceIdentity(device_id)
    await store.enforce(identity, "127.0.0.1", BUCKET, upload=False)


@pytest.mark.parametrize("device_id", AWKWARD.values(), ids=AWKWARD.keys())
async def test_an_awkward_id_is_valid_and_manageable_from_the_page_and_the_cli(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    base_url: str,
    mem_store: Store,
    device_id: str,
) -> None:
    # (c) the data plane's rule accepts it.
    assert device_id_problem(device_id) is None
    await register(mem_store, device_id)

    # (a) the page: each path stays one segment under /devices/ and reaches this device.
    resolved = await page_paths(tmp_path, http, base_url, device_id)
    for suffix, url in zip(SUFFIXES, resolved, strict=True):
        assert "error" not in url, url
        segment = url["pathname"].removeprefix("/devices/").removesuffix(suffix)
        assert url["pathname"] == f"/devices/{segment}{suffix}" and "/" not in segment, url
    view, history, block, unblock = (url["href"] for url in resolved)
    assert await call(http, "GET", view) == (200, await device_json(mem_store, device_id))
    assert await call(http, "GET", history) == (200, [])
    status, renamed = await call(http, "PUT", view, {"name": "renamed on the page"})
    assert (status, renamed["id"], renamed["name"]) == (200, device_id, "renamed on the page")
    status, blocked = await call(http, "POST", block)
    assert (status, blocked["id"], blocked["blocked"]) == (200, device_id, True)
    status, unblocked = await call(http, "POST", unblock)
    assert (status, unblocked["id"], unblocked["blocked"]) == (200, device_id, False)
    assert await call(http, "DELETE", view) == (200, "Successfully Removed")
    assert await mem_store.get_device(device_id) is None

    # (b) the CLI's client, on the device registered again.
    await register(mem_store, device_id)
    async with AdminClient(base_url, TOKEN, timeout=WAIT) as client:
        assert (await client.get_device(device_id))["id"] == device_id
        assert await client.history(device_id) == []
        assert (await client.rename(device_id, "renamed by the CLI"))["name"] == (
            "renamed by the CLI"
        )
        assert (await client.block(device_id))["blocked"] is True
        device = await mem_store.get_device(device_id)
        assert device is not None and device.blocked
        assert (await client.unblock(device_id))["blocked"] is False
        assert await client.set_rate_limit(device_id, 2, 3) == {"rate": 2.0, "burst": 3}
        await client.delete_rate_limit(device_id)
        await client.delete(device_id)
    assert await mem_store.get_device(device_id) is None


async def device_json(store: Store, device_id: str) -> Any:
    device = await store.get_device(device_id)
    assert device is not None
    return orjson.loads(orjson.dumps(device.to_json()))


@pytest.mark.parametrize(("device_id", "reason"), REFUSED.values(), ids=REFUSED.keys())
async def test_dots_and_commas_are_refused_for_new_state(
    http: aiohttp.ClientSession, base_url: str, mem_store: Store, device_id: str, reason: str
) -> None:
    with pytest.raises(IdentityError) as caught:
        READER.read(headers(device_id))
    assert str(caught.value) == f"Invalid X-Device-Id header: {reason}"

    path = base_url + "devices/" + device_id.replace(",", "%2C")
    expected = (400, f"Invalid device id: {reason}")
    assert await call(http, "POST", path + "/block") == expected
    assert await call(http, "PUT", path + "/rate_limit", {"rate": 1, "burst": 1}) == expected
    async with AdminClient(base_url, TOKEN, timeout=WAIT) as client:
        with pytest.raises(AdminClientError, match=f"Invalid device id: {reason} \\(HTTP 400"):
            await client.block(device_id)
        with pytest.raises(AdminClientError, match=f"Invalid device id: {reason} \\(HTTP 400"):
            await client.set_rate_limit(device_id, 1, 1)
    assert await mem_store.get_device(device_id) is None  # nothing was created


@pytest.mark.parametrize("device_id", [".", "..", "a,b"])
async def test_a_record_kept_before_the_rule_stays_manageable_by_the_api_and_the_cli(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    base_url: str,
    mem_store: Store,
    device_id: str,
) -> None:
    # Written straight into the store, as the data plane did before it refused such ids.
    await mem_store.enforce(DeviceIdentity(device_id), "127.0.0.1", BUCKET, upload=False)
    path = base_url + "devices/" + device_id.replace(",", "%2C")
    assert await call(http, "GET", path) == (200, await device_json(mem_store, device_id))
    assert await call(http, "GET", path + "/history") == (200, [])
    async with AdminClient(base_url, TOKEN, timeout=WAIT) as client:
        assert (await client.get_device(device_id))["id"] == device_id
        assert (await client.rename(device_id, "legacy"))["name"] == "legacy"
        await client.delete(device_id)
    assert await mem_store.get_device(device_id) is None
    await mem_store.enforce(DeviceIdentity(device_id), "127.0.0.1", BUCKET, upload=False)
    assert await call(http, "DELETE", path) == (200, "Successfully Removed")
    assert await mem_store.get_device(device_id) is None


@pytest.mark.parametrize("device_id", [".", ".."])
async def test_the_page_refuses_to_build_a_path_for_a_dot_segment_id(
    tmp_path: Path, http: aiohttp.ClientSession, base_url: str, device_id: str
) -> None:
    # No URL names such a device (the parser removes dot segments), so the page says so
    # instead of sending `devices/../block`, which would be `/block`.
    for url in await page_paths(tmp_path, http, base_url, device_id):
        assert url == {
            "error": f'Device "{device_id}" cannot be managed from this page: '
            "use `gateway devices` or the API"
        }
