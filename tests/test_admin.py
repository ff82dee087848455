"""The admin API (gateway.admin) against a Store on fakeredis, driven with aiohttp_client."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpClient

from gateway.admin import create_admin_app
from gateway.errors import StoreUnavailable
from gateway.model import Bucket, DeviceIdentity, ReplyCode
from gateway.store import Store
from gateway.store.blocked import BlockedSeed

if TYPE_CHECKING:
    from tests.rig.clock import FakeClock

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUCKET = Bucket(rate=100.0, burst=100)
AdminTestClient = TestClient[web.Request, web.Application]


@pytest.fixture
async def mem_store(clock: FakeClock) -> AsyncIterator[Store]:
    """A Store on fakeredis with the fake clock."""
    store = Store.memory(clock=clock)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def api(aiohttp_client: AiohttpClient, mem_store: Store) -> AdminTestClient:
    """A client that sends the admin token on every request."""
    client: AdminTestClient = await aiohttp_client(create_admin_app(mem_store, TOKEN), headers=AUTH)
    return client


@pytest.fixture
async def anon(aiohttp_client: AiohttpClient, mem_store: Store) -> AdminTestClient:
    """A client that sends no token."""
    client: AdminTestClient = await aiohttp_client(create_admin_app(mem_store, TOKEN))
    return client


async def seen(store: Store, device_id: str, *, upload: bool = False, **fields: str) -> None:
    """Register a device the way the data plane does."""
    await store.enforce(DeviceIdentity(id=device_id, **fields), "127.0.0.1", BUCKET, upload=upload)


async def body(resp: ClientResponse) -> Any:
    """The decoded JSON body; fails the test on anything but the envelope."""
    data = orjson.loads(await resp.read())
    assert set(data) == {"status", "result"}
    assert resp.content_type == "application/json"
    return data


async def expect(resp: ClientResponse, status: int, result: Any = None) -> Any:
    """Assert the status and the envelope; returns the result."""
    data = await body(resp)
    assert resp.status == status, data
    assert data["status"] is (status < 400)
    if result is not None:
        assert data["result"] == result
    return data["result"]


class StubStore:
    """Stands in for a Store: every method fails the way `failure` says."""

    def __init__(self, failure: BaseException | None) -> None:
        self.failure = failure
        self.calls: list[str] = []

    async def ping(self) -> bool:
        self.calls.append("ping")
        return False

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def method(*args: object, **kwargs: object) -> Any:
            self.calls.append(name)
            assert self.failure is not None
            raise self.failure

        return method


def stub_app(failure: BaseException | None) -> tuple[web.Application, StubStore]:
    stub = StubStore(failure)
    return create_admin_app(cast(Store, stub), TOKEN), stub


# Every route that needs the token, with a body that would be valid.
PROTECTED = [
    ("GET", "/readyz", None),
    ("GET", "/devices", None),
    ("GET", "/devices/d1", None),
    ("GET", "/devices/d1/history", None),
    ("PUT", "/devices/d1", {"name": "x"}),
    ("POST", "/devices/d1/block", None),
    ("POST", "/devices/d1/unblock", None),
    ("PUT", "/devices/d1/rate_limit", {"rate": 1, "burst": 1}),
    ("DELETE", "/devices/d1/rate_limit", None),
    ("DELETE", "/devices/d1", None),
]
STORE_ROUTES = PROTECTED[1:]


# ---- authentication ----------------------------------------------------------------------


async def test_healthz_needs_no_token_and_never_touches_the_store(
    aiohttp_client: AiohttpClient,
) -> None:
    app, stub = stub_app(RuntimeError("the store must not be asked"))
    client = await aiohttp_client(app)
    await expect(await client.get("/healthz"), 200, "ok")
    assert stub.calls == []


@pytest.mark.parametrize(("method", "path", "payload"), PROTECTED)
async def test_every_route_but_healthz_needs_the_token(
    anon: AdminTestClient, method: str, path: str, payload: Any
) -> None:
    resp = await anon.request(method, path, json=payload)
    await expect(resp, 401, "Missing admin token")
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="devicegate"'


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        pytest.param(f"Basic {TOKEN}", "Missing admin token", id="other-scheme"),
        pytest.param("Bearer", "Missing admin token", id="no-token"),
        pytest.param("Bearer ", "Missing admin token", id="empty-token"),
        pytest.param(TOKEN, "Missing admin token", id="no-scheme"),
        pytest.param("Bearer wrong", "Invalid admin token", id="wrong"),
        pytest.param(f"Bearer {TOKEN}x", "Invalid admin token", id="longer"),
        pytest.param(f"Bearer {TOKEN[:-1]}", "Invalid admin token", id="prefix"),
        pytest.param(f"Bearer {TOKEN.upper()}", "Invalid admin token", id="case"),
    ],
)
async def test_a_wrong_token_is_refused(anon: AdminTestClient, header: str, reason: str) -> None:
    resp = await anon.post("/devices/d1/block", headers={"Authorization": header})
    await expect(resp, 401, reason)
    assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="devicegate"')
    assert (await anon.get("/devices/d1", headers=AUTH)).status == 404  # nothing was blocked


async def test_the_wrong_token_challenge_says_invalid_token(anon: AdminTestClient) -> None:
    resp = await anon.get("/devices", headers={"Authorization": "Bearer nope"})
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="devicegate", error="invalid_token"'


async def test_two_authorization_headers_are_refused(anon: AdminTestClient) -> None:
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")]
    await expect(await anon.get("/devices", headers=headers), 401, "Missing admin token")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_right_token_passes_with_any_scheme_case(
    anon: AdminTestClient, scheme: str
) -> None:
    resp = await anon.get("/devices", headers={"Authorization": f"{scheme} {TOKEN}"})
    await expect(resp, 200, [])


def test_an_empty_token_is_refused_at_build_time(mem_store: Store) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        create_admin_app(mem_store, "")


# ---- routing and errors ------------------------------------------------------------------


async def test_unknown_routes_need_the_token_then_get_404(
    anon: AdminTestClient, api: AdminTestClient
) -> None:
    await expect(await anon.get("/nope"), 401)
    await expect(await api.get("/nope"), 404, "Not found")
    await expect(await api.get("/devices/d1/nope"), 404, "Not found")
    await expect(await api.get("/devices/"), 404, "Not found")


async def test_a_wrong_method_gets_405_with_allow(api: AdminTestClient) -> None:
    resp = await api.post("/devices")
    await expect(resp, 405, "Method not allowed")
    assert "GET" in resp.headers["Allow"]


@pytest.mark.parametrize(("method", "path", "payload"), STORE_ROUTES)
async def test_store_unavailable_gives_503_with_retry_after(
    aiohttp_client: AiohttpClient, method: str, path: str, payload: Any
) -> None:
    app, stub = stub_app(StoreUnavailable("Redis did not answer within 0.1 s"))
    client = await aiohttp_client(app, headers=AUTH)
    resp = await client.request(method, path, json=payload)
    await expect(resp, 503, "Store unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert stub.calls


async def test_readyz_follows_the_store(
    aiohttp_client: AiohttpClient, api: AdminTestClient
) -> None:
    await expect(await api.get("/readyz"), 200, "ready")
    app, stub = stub_app(None)
    client = await aiohttp_client(app, headers=AUTH)
    resp = await client.get("/readyz")
    await expect(resp, 503, "Store unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert stub.calls == ["ping"]


async def test_readyz_verbose_shows_the_checks(api: AdminTestClient, mem_store: Store) -> None:
    result = await expect(await api.get("/readyz?verbose=1"), 200)
    assert result["store"] == {"reachable": True}
    # This store does not follow the blocked ids: nothing told it them.
    assert result["blocked_ids"]["known"] is False
    assert (result["snapshot"], result["resets"], result["last_reset"]) == (None, 0, None)
    mem_store.blocked.seed(BlockedSeed(frozenset({"a"}), "e1", "snapshot", 0))
    result = await expect(await api.get("/readyz?verbose=true"), 200)
    assert result["blocked_ids"]["source"] == "snapshot" and result["blocked_ids"]["count"] == 1
    await expect(await api.get("/readyz?verbose=0"), 200, "ready")


READYZ_REFUSED = {
    "an unknown parameter": ("/readyz?full=1", "Unknown query parameter: full"),
    "a bad flag": ("/readyz?verbose=yes", "verbose: must be 0 or 1"),
    "a repeated flag": ("/readyz?verbose=1&verbose=1", "Repeated query parameter: verbose"),
}


@pytest.mark.parametrize(("path", "reason"), READYZ_REFUSED.values(), ids=READYZ_REFUSED)
async def test_readyz_refuses_unknown_query_parameters(
    api: AdminTestClient, path: str, reason: str
) -> None:
    await expect(await api.get(path), 400, reason)


async def test_readyz_verbose_while_the_store_is_down_is_503_with_the_checks(
    aiohttp_client: AiohttpClient,
) -> None:
    down = Store.memory()
    down.ping = _never  # type: ignore[method-assign]
    client = await aiohttp_client(create_admin_app(down, TOKEN), headers=AUTH)
    resp = await client.get("/readyz?verbose=1")
    data = await body(resp)
    assert (resp.status, data["status"], resp.headers["Retry-After"]) == (503, False, "1")
    assert data["result"]["store"] == {"reachable": False}
    await down.close()


async def _never() -> bool:
    return False


async def test_an_unexpected_error_is_a_logged_500_without_details(
    aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = stub_app(RuntimeError("secret detail"))
    client = await aiohttp_client(app, headers=AUTH)
    with caplog.at_level(logging.ERROR, logger="gateway.admin"):
        resp = await client.get("/devices/d1")
        raw = await resp.read()
    await expect(resp, 500, "Internal error")
    assert b"secret" not in raw and b"Traceback" not in raw
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


# ---- the web page ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type", "marker"),
    [
        ("/", "text/html", b"API Devices"),
        ("/static/app.js", "text/javascript", b"sessionStorage"),
        ("/static/paths.js", "text/javascript", b"export function devicePath("),
        ("/static/text.js", "text/javascript", b"export function displayParts("),
        ("/static/style.css", "text/css", b"@media (max-width: 720px) {\n  .hw { display: none; }"),
    ],
)
async def test_the_page_and_its_assets_are_served_without_a_token(
    anon: AdminTestClient, path: str, content_type: str, marker: bytes
) -> None:
    resp = await anon.get(path)
    assert resp.status == 200
    assert resp.content_type == content_type
    assert resp.charset == "utf-8"
    assert marker in await resp.read()
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_the_page_loads_only_its_own_assets(anon: AdminTestClient) -> None:
    html = (await (await anon.get("/")).read()).decode()
    assert '<script type="module" src="static/app.js">' in html
    assert 'href="static/style.css"' in html
    assert "http://" not in html and "https://" not in html  # offline: no CDN


async def test_every_module_the_page_imports_is_served(anon: AdminTestClient) -> None:
    script = (await (await anon.get("/static/app.js")).read()).decode()
    imported = re.findall(r'^import .* from "\./([a-z]+\.js)";$', script, re.M)
    assert imported == ["paths.js", "text.js"]
    for name in imported:
        resp = await anon.get(f"/static/{name}")
        assert resp.status == 200 and resp.content_type == "text/javascript", name
        module = (await resp.read()).decode()
        assert "innerHTML" not in module and "import " not in module  # no deeper imports


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/index.html", "/static/..%2Fauth.py"])
async def test_unknown_assets_are_404(anon: AdminTestClient, path: str) -> None:
    await expect(await anon.get(path), 404, "Not found")


async def test_the_page_never_puts_data_in_innerhtml(anon: AdminTestClient) -> None:
    script = (await (await anon.get("/static/app.js")).read()).decode()
    assert "innerHTML" not in script.replace("never innerHTML", "")
    assert "textContent" in script


# ---- listing -----------------------------------------------------------------------------


async def test_list_is_most_recent_activity_first_with_total(
    api: AdminTestClient, mem_store: Store, clock: FakeClock
) -> None:
    for device_id in ("old", "mid", "new"):
        await seen(mem_store, device_id, application="shop")
        clock.advance(1000)
    await api.post("/devices/pre-blocked/block")  # activity = when it was blocked: newest
    resp = await api.get("/devices")
    result = await expect(resp, 200)
    assert [d["id"] for d in result] == ["pre-blocked", "new", "mid", "old"]
    assert resp.headers["X-Total-Count"] == "4"
    assert result[1]["application"] == "shop"
    assert result[0]["last_activity"] == result[0]["blocked_at"]


async def test_list_pages(api: AdminTestClient, mem_store: Store, clock: FakeClock) -> None:
    for i in range(5):
        await seen(mem_store, f"d{i}")
        clock.advance(10)
    resp = await api.get("/devices", params={"page": "2", "amount": "2"})
    assert [d["id"] for d in await expect(resp, 200)] == ["d2", "d1"]
    assert resp.headers["X-Total-Count"] == "5"
    resp = await api.get("/devices", params={"page": "9", "amount": "2"})
    await expect(resp, 200, [])
    assert resp.headers["X-Total-Count"] == "5"


async def test_list_amount_defaults_to_20(
    api: AdminTestClient, mem_store: Store, clock: FakeClock
) -> None:
    for i in range(25):
        await seen(mem_store, f"d{i:02}")
        clock.advance(1)
    resp = await api.get("/devices")
    assert len(await expect(resp, 200)) == 20
    assert resp.headers["X-Total-Count"] == "25"


async def test_list_filters_by_name_or_id_and_by_blocked(
    api: AdminTestClient, mem_store: Store
) -> None:
    for device_id in ("phone-A", "phone-b", "tablet"):
        await seen(mem_store, device_id)
    await api.put("/devices/tablet", json={"name": "Kitchen PHONE"})
    await api.post("/devices/phone-b/block")

    async def ids(**params: str) -> set[str]:
        resp = await api.get("/devices", params=params)
        result = await expect(resp, 200)
        assert resp.headers["X-Total-Count"] == str(len(result))
        return {d["id"] for d in result}

    assert await ids(name="PHONE") == {"phone-A", "phone-b", "tablet"}
    assert await ids(name="kitchen") == {"tablet"}
    assert await ids(name="a") == {"phone-A", "tablet"}
    assert await ids(blocked="only") == {"phone-b"}
    assert await ids(blocked="hide") == {"phone-A", "tablet"}
    assert await ids(blocked="all") == {"phone-A", "phone-b", "tablet"}
    assert await ids(name="phone-", blocked="hide") == {"phone-A"}
    assert await ids(name="") == {"phone-A", "phone-b", "tablet"}


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        pytest.param("page=0", "page: must be an integer from 1 to 1000000000", id="page-zero"),
        pytest.param("page=-1", "page: must be an integer from 1 to 1000000000", id="page-neg"),
        pytest.param("page=abc", "page: must be an integer from 1 to 1000000000", id="page-text"),
        pytest.param("page=1.5", "page: must be an integer from 1 to 1000000000", id="page-float"),
        pytest.param("page=", "page: must be an integer from 1 to 1000000000", id="page-empty"),
        pytest.param("page=+1", "page: must be an integer from 1 to 1000000000", id="page-plus"),
        pytest.param(
            "page=99999999999", "page: must be an integer from 1 to 1000000000", id="page-huge"
        ),
        pytest.param("amount=0", "amount: must be an integer from 1 to 1000", id="amount-zero"),
        pytest.param("amount=1001", "amount: must be an integer from 1 to 1000", id="amount-big"),
        pytest.param("amount=x", "amount: must be an integer from 1 to 1000", id="amount-text"),
        pytest.param("blocked=yes", "blocked: must be one of all, hide, only", id="blocked"),
        pytest.param("blocked=", "blocked: must be one of all, hide, only", id="blocked-empty"),
        pytest.param("name=" + "n" * 257, "name: must be at most 256 characters", id="name-long"),
        pytest.param("name=a%01b", "name: must not contain control characters", id="name-ctrl"),
        pytest.param("limit=5", "Unknown query parameter: limit", id="unknown"),
        pytest.param("page=1&page=2", "Repeated query parameter: page", id="repeated"),
    ],
)
async def test_list_validation(api: AdminTestClient, query: str, reason: str) -> None:
    await expect(await api.get(f"/devices?{query}"), 400, reason)


@pytest.mark.parametrize(
    "query", ["page=1000000000", "amount=1000", "amount=1", "name=" + "n" * 256]
)
async def test_list_accepts_the_bounds(api: AdminTestClient, query: str) -> None:
    await expect(await api.get(f"/devices?{query}"), 200, [])


# ---- one device --------------------------------------------------------------------------


async def test_get_device_returns_the_record(
    api: AdminTestClient, mem_store: Store, clock: FakeClock
) -> None:
    await seen(mem_store, "d1", upload=True, application="shop", os="iOS", model="iPhone 14")
    result = await expect(await api.get("/devices/d1"), 200)
    assert result["id"] == "d1"
    assert result["display_name"] == "d1"
    assert result["application"] == "shop"
    assert result["model"] == "iPhone 14"
    assert result["last_active"] == "2026-11-03T23:24:19.787Z"
    assert result["last_data_upload"] == "2026-11-03T23:24:19.787Z"
    assert result["blocked"] is False
    assert result["request_count"] == 1


@pytest.mark.parametrize(
    "path", ["/devices/ghost", "/devices/ghost/history", "/devices/ghost/unblock"]
)
async def test_unknown_device_is_404(api: AdminTestClient, path: str) -> None:
    method = "POST" if path.endswith("unblock") else "GET"
    await expect(await api.request(method, path), 404, "Device not found")


async def test_rename_and_delete_of_unknown_device_are_404(api: AdminTestClient) -> None:
    await expect(await api.put("/devices/ghost", json={"name": "x"}), 404, "Device not found")
    await expect(await api.delete("/devices/ghost"), 404, "Device not found")
    await expect(await api.get("/devices/ghost"), 404)  # none of them created a record


@pytest.mark.parametrize(
    ("device_id", "encoded"),
    [
        ("a:b", "a:b"),
        ("{x}", "%7Bx%7D"),
        ("a/b", "a%2Fb"),
        ("*", "*"),
        ("100%", "100%25"),
        ("?#", "%3F%23"),
        ("a/block", "a%2Fblock"),
        ("~!$&'()+;=@", "~!$&'()+;=@"),
    ],
)
async def test_ids_with_special_characters(
    api: AdminTestClient, mem_store: Store, device_id: str, encoded: str
) -> None:
    await seen(mem_store, device_id)
    path = f"/devices/{encoded}"
    assert (await expect(await api.get(path), 200))["id"] == device_id
    assert (await expect(await api.post(f"{path}/block"), 200))["id"] == device_id
    await expect(await api.get(f"{path}/history"), 200, [])
    device = await mem_store.get_device(device_id)
    assert device is not None and device.blocked
    await expect(await api.delete(path), 200, "Successfully Removed")


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param("x" * 129, id="too-long"),
        pytest.param("a%20b", id="space"),
        pytest.param("%C3%A9", id="non-ascii"),
        pytest.param("a%7Fb", id="del"),
        pytest.param("a%09b", id="tab"),
    ],
)
async def test_invalid_ids_are_400(api: AdminTestClient, encoded: str) -> None:
    reason = "Invalid device id: must be 1 to 128 visible ASCII characters"
    await expect(await api.get(f"/devices/{encoded}"), 400, reason)
    await expect(await api.post(f"/devices/{encoded}/block"), 400, reason)


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        # "." and ".." need a client that keeps dot segments: test_admin_ids sends them.
        pytest.param("a,b", "must not contain commas", id="comma"),
        pytest.param("%2C", "must not contain commas", id="encoded-comma"),
        pytest.param(",x,", "must not contain commas", id="commas-around"),
    ],
)
async def test_routes_that_create_state_apply_the_data_planes_rule(
    api: AdminTestClient, mem_store: Store, encoded: str, reason: str
) -> None:
    path = f"/devices/{encoded}"
    await expect(await api.post(f"{path}/block"), 400, f"Invalid device id: {reason}")
    resp = await api.put(f"{path}/rate_limit", json={"rate": 1, "burst": 1})
    await expect(resp, 400, f"Invalid device id: {reason}")
    # Routes that address a record accept the id: there is none, so 404, not 400.
    await expect(await api.get(path), 404, "Device not found")
    await expect(await api.delete(f"{path}/rate_limit"), 404)


async def test_an_id_of_128_characters_is_valid(api: AdminTestClient) -> None:
    await expect(await api.post(f"/devices/{'x' * 128}/block"), 200)


async def test_history_lists_changes(
    api: AdminTestClient, mem_store: Store, clock: FakeClock
) -> None:
    await seen(mem_store, "d1", application="shop", os="iOS")
    clock.advance(1000)
    await seen(mem_store, "d1", application="shop", os="Android")
    result = await expect(await api.get("/devices/d1/history"), 200)
    assert result == [
        {"at": "2026-11-03T23:24:20.787Z", "field": "os", "old": "iOS", "new": "Android"}
    ]


# ---- rename ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("Kitchen tablet", "Kitchen tablet"),
        ("  padded  ", "padded"),
        ("Ünïcødé 東京 📱", "Ünïcødé 東京 📱"),
        ("n" * 256, "n" * 256),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
async def test_rename(
    api: AdminTestClient, mem_store: Store, sent: str | None, stored: str | None
) -> None:
    await seen(mem_store, "d1")
    await api.put("/devices/d1", json={"name": "before"})
    result = await expect(await api.put("/devices/d1", json={"name": sent}), 200)
    assert result["name"] == stored
    assert result["display_name"] == (stored or "d1")
    device = await mem_store.get_device("d1")
    assert device is not None and device.name == stored


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b"", "Invalid JSON body", id="empty"),
        pytest.param(b"{name: 1}", "Invalid JSON body", id="not-json"),
        pytest.param(b'{"name": "x"', "Invalid JSON body", id="truncated"),
        pytest.param(b"[]", "Body must be a JSON object", id="array"),
        pytest.param(b'"x"', "Body must be a JSON object", id="string"),
        pytest.param(b"{}", "Missing field: name", id="missing"),
        pytest.param(b'{"name": "x", "id": "y"}', "Unknown field: id", id="unknown"),
        pytest.param(b'{"name": 5}', "name: must be a string or null", id="number"),
        pytest.param(b'{"name": ["x"]}', "name: must be a string or null", id="list"),
        pytest.param(b'{"name": false}', "name: must be a string or null", id="bool"),
        pytest.param(
            b'{"name": "' + b"n" * 257 + b'"}', "name: must be at most 256 characters", id="long"
        ),
        pytest.param(
            b'{"name": "a\\u0007b"}', "name: must not contain control characters", id="bell"
        ),
        pytest.param(
            b'{"name": "a\\nb"}', "name: must not contain control characters", id="newline"
        ),
        pytest.param(
            b'{"name": "a\\u0085b"}', "name: must not contain control characters", id="c1"
        ),
    ],
)
async def test_rename_validation(
    api: AdminTestClient, mem_store: Store, raw: bytes, reason: str
) -> None:
    await seen(mem_store, "d1")
    await expect(await api.put("/devices/d1", data=raw), 400, reason)
    device = await mem_store.get_device("d1")
    assert device is not None and device.name is None


async def test_an_invalid_body_is_400_even_for_an_unknown_id(api: AdminTestClient) -> None:
    await expect(await api.put("/devices/ghost", data=b"[]"), 400, "Body must be a JSON object")


async def test_a_body_over_64_kib_is_413(api: AdminTestClient, mem_store: Store) -> None:
    await seen(mem_store, "d1")
    big = b'{"name": "' + b"n" * (64 * 1024) + b'"}'
    reason = "Request body too large: at most 65536 bytes"
    await expect(await api.put("/devices/d1", data=big), 413, reason)

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 4096

    await expect(await api.put("/devices/d1", data=chunked()), 413, reason)


# ---- block and unblock -------------------------------------------------------------------


async def test_block_and_unblock_are_idempotent(
    api: AdminTestClient, mem_store: Store, clock: FakeClock
) -> None:
    await seen(mem_store, "d1")
    clock.advance(5000)
    first = await expect(await api.post("/devices/d1/block"), 200)
    assert first["blocked"] is True
    assert first["blocked_at"] == "2026-11-03T23:24:24.787Z"
    clock.advance(5000)
    again = await expect(await api.post("/devices/d1/block"), 200)
    assert again["blocked"] is True
    assert again["blocked_at"] == first["blocked_at"]
    decision = await mem_store.enforce(DeviceIdentity(id="d1"), "127.0.0.1", BUCKET, upload=False)
    assert decision.outcome is ReplyCode.BLOCKED

    for _ in range(2):
        result = await expect(await api.post("/devices/d1/unblock"), 200)
        assert result["blocked"] is False
        assert result["blocked_at"] is None
    decision = await mem_store.enforce(DeviceIdentity(id="d1"), "127.0.0.1", BUCKET, upload=False)
    assert decision.outcome is ReplyCode.ALLOW


async def test_block_creates_the_record_of_an_unseen_id(
    api: AdminTestClient, mem_store: Store
) -> None:
    result = await expect(await api.post("/devices/never-seen/block"), 200)
    assert result["id"] == "never-seen"
    assert result["blocked"] is True
    assert result["blocked_at"] == "2026-11-03T23:24:19.787Z"
    assert result["last_active"] is None
    assert result["request_count"] == 0
    decision = await mem_store.enforce(
        DeviceIdentity(id="never-seen"), "127.0.0.1", BUCKET, upload=False
    )
    assert decision.outcome is ReplyCode.BLOCKED


# ---- rate-limit overrides ----------------------------------------------------------------


async def test_rate_limit_override_for_an_unseen_id(api: AdminTestClient, mem_store: Store) -> None:
    resp = await api.put("/devices/fresh/rate_limit", json={"rate": 2.5, "burst": 3})
    await expect(resp, 200, {"rate": 2.5, "burst": 3})
    decision = await mem_store.enforce(DeviceIdentity(id="fresh"), "1.2.3.4", BUCKET, upload=False)
    assert decision.bucket == Bucket(rate=2.5, burst=3)
    device = await expect(await api.get("/devices/fresh"), 200)
    assert device["rate_limit"] == {"rate": 2.5, "burst": 3}

    await expect(await api.delete("/devices/fresh/rate_limit"), 200, "Successfully Removed")
    reason = "Rate limit override not found"
    await expect(await api.delete("/devices/fresh/rate_limit"), 404, reason)
    assert (await expect(await api.get("/devices/fresh"), 200))["rate_limit"] is None


@pytest.mark.parametrize(
    "payload",
    [
        {"rate": 0.001, "burst": 1},
        {"rate": 1_000_000, "burst": 1_000_000},
        {"rate": 7, "burst": 20},
    ],
)
async def test_rate_limit_accepts_the_bounds(api: AdminTestClient, payload: Any) -> None:
    result = await expect(await api.put("/devices/d1/rate_limit", json=payload), 200)
    assert result == {"rate": float(payload["rate"]), "burst": payload["burst"]}


RATE = "rate: must be from 0.001 to 1e+06 tokens per second"
BURST = "burst: must be an integer from 1 to 1000000"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b"nope", "Invalid JSON body", id="not-json"),
        pytest.param(b"[1, 2]", "Body must be a JSON object", id="array"),
        pytest.param(b'{"rate": 1}', "Missing field: burst", id="no-burst"),
        pytest.param(b'{"burst": 1}', "Missing field: rate", id="no-rate"),
        pytest.param(b'{"rate": 1, "burst": 1, "x": 1}', "Unknown field: x", id="unknown"),
        pytest.param(b'{"rate": "5", "burst": 1}', "rate: must be a number", id="rate-string"),
        pytest.param(b'{"rate": true, "burst": 1}', "rate: must be a number", id="rate-bool"),
        pytest.param(b'{"rate": null, "burst": 1}', "rate: must be a number", id="rate-null"),
        pytest.param(b'{"rate": 0, "burst": 1}', RATE, id="rate-zero"),
        pytest.param(b'{"rate": -1, "burst": 1}', RATE, id="rate-negative"),
        pytest.param(b'{"rate": 0.0009, "burst": 1}', RATE, id="rate-tiny"),
        pytest.param(b'{"rate": 1000000.5, "burst": 1}', RATE, id="rate-huge"),
        pytest.param(b'{"rate": 1e300, "burst": 1}', RATE, id="rate-1e300"),
        pytest.param(b'{"rate": 1, "burst": 0}', BURST, id="burst-zero"),
        pytest.param(b'{"rate": 1, "burst": 1.5}', BURST, id="burst-float"),
        pytest.param(b'{"rate": 1, "burst": 2.0}', BURST, id="burst-float-whole"),
        pytest.param(b'{"rate": 1, "burst": 1000001}', BURST, id="burst-huge"),
        pytest.param(b'{"rate": 1, "burst": true}', BURST, id="burst-bool"),
        pytest.param(b'{"rate": 1, "burst": "3"}', BURST, id="burst-string"),
    ],
)
async def test_rate_limit_validation(
    api: AdminTestClient, mem_store: Store, raw: bytes, reason: str
) -> None:
    await expect(await api.put("/devices/d1/rate_limit", data=raw), 400, reason)
    assert not await mem_store.delete_rate_limit("d1")  # nothing was stored


# ---- delete ------------------------------------------------------------------------------


async def test_delete_removes_the_device(api: AdminTestClient, mem_store: Store) -> None:
    await seen(mem_store, "d1")
    await expect(await api.delete("/devices/d1"), 200, "Successfully Removed")
    await expect(await api.get("/devices/d1"), 404, "Device not found")
    await expect(await api.delete("/devices/d1"), 404, "Device not found")
    resp = await api.get("/devices")
    await expect(resp, 200, [])
    assert resp.headers["X-Total-Count"] == "0"


async def test_list_pages_by_cursor_and_searches_by_prefix(
    api: AdminTestClient, mem_store: Store, clock: FakeClock
) -> None:
    for i in range(5):
        await seen(mem_store, f"cam-{i}")
        clock.advance(1)
    await api.put("/devices/cam-0", json={"name": "Dock north"})
    resp = await api.get("/devices", params={"amount": "2"})
    assert [d["id"] for d in await expect(resp, 200)] == ["cam-4", "cam-3"]
    cursor = resp.headers["X-Next-Cursor"]
    resp = await api.get("/devices", params={"amount": "2", "after": cursor})
    assert [d["id"] for d in await expect(resp, 200)] == ["cam-2", "cam-1"]
    assert resp.headers["X-Total-Count"] == "5"
    resp = await api.get("/devices", params={"name": "NORTH", "match": "prefix"})
    assert [d["id"] for d in await expect(resp, 200)] == ["cam-0"]
    resp = await api.get("/devices", params={"name": "orth", "match": "prefix"})
    assert await expect(resp, 200) == []
    resp = await api.get("/devices", params={"name": "orth"})  # contains, as ever
    assert [d["id"] for d in await expect(resp, 200)] == ["cam-0"]
    assert "X-Next-Cursor" not in resp.headers


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"after": "not-a-cursor"}, "after: not a cursor this API gave"),
        ({"after": "bDE6eA", "page": "2"}, "after: give either page or after, not both"),
        ({"match": "prefix"}, "match: needs a name to look for"),
        ({"name": "x", "match": "regex"}, "match: must be one of prefix, contains"),
        ({"name": "x", "after": "bDE6eA"}, "after: not a cursor this API gave"),
    ],
)
async def test_list_refuses_bad_cursors_and_matches(
    api: AdminTestClient, params: dict[str, str], message: str
) -> None:
    resp = await api.get("/devices", params=params)
    assert await resp.json() == {"status": False, "result": message}
    assert resp.status == 400
