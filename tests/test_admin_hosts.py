"""gateway.admin.hosts: which Host headers the admin listener answers (DNS rebinding)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from multidict import CIMultiDict
from pytest_aiohttp.plugin import AiohttpServer

from gateway.admin import create_admin_app
from gateway.admin.hosts import host_allowed, host_middleware, is_loopback
from gateway.store import Store
from tests.rig.client import RawClient, answers_in

TOKEN = "admin-hosts-test-token-0123456789"
WAIT = 10.0


class Case(NamedTuple):
    listen: str
    allowed_hosts: tuple[str, ...]
    host: str | None  # the Host header; None: none sent
    allowed: bool


NONE: tuple[str, ...] = ()
LISTED = ("admin.internal", "10.0.0.5", "[fd00::5]")

CASES: dict[str, Case] = {
    # Bound to loopback: its own names, loopback literals and the list.
    "loopback-localhost": Case("127.0.0.1", NONE, "localhost", True),
    "loopback-localhost-port": Case("127.0.0.1", NONE, "localhost:8081", True),
    "loopback-localhost-any-case": Case("127.0.0.1", NONE, "LocalHost:8081", True),
    "loopback-127-0-0-1": Case("127.0.0.1", NONE, "127.0.0.1:8081", True),
    "loopback-other-127": Case("127.0.0.1", NONE, "127.8.9.10", True),
    "loopback-ipv6-literal": Case("127.0.0.1", NONE, "[::1]:8081", True),
    "loopback-ipv6-literal-no-port": Case("127.0.0.1", NONE, "[::1]", True),
    "ipv6-loopback-bind": Case("::1", NONE, "[::1]:8081", True),
    "localhost-bind": Case("localhost", NONE, "localhost", True),
    "loopback-block-bind": Case("127.0.0.2", NONE, "127.0.0.1", True),
    "loopback-listed-name": Case("127.0.0.1", LISTED, "admin.internal:8081", True),
    "loopback-listed-name-any-case": Case("127.0.0.1", LISTED, "ADMIN.Internal", True),
    "loopback-listed-ipv6": Case("127.0.0.1", LISTED, "[FD00::5]:443", True),
    "loopback-no-host-header": Case("127.0.0.1", NONE, None, True),
    "loopback-rebound-name": Case("127.0.0.1", NONE, "evil.example", False),
    "loopback-rebound-name-port": Case("127.0.0.1", NONE, "evil.example:8081", False),
    "loopback-name-ending-localhost": Case("127.0.0.1", NONE, "evil.localhost.example", False),
    "loopback-localhost-subdomain": Case("127.0.0.1", NONE, "a.localhost", False),
    "loopback-localhost-trailing-dot": Case("127.0.0.1", NONE, "localhost.", False),
    "loopback-other-address": Case("127.0.0.1", NONE, "192.168.1.10", False),
    "loopback-unlisted-name": Case("127.0.0.1", LISTED, "admin.internal.evil", False),
    "loopback-ipv6-without-brackets": Case("127.0.0.1", NONE, "::1", False),
    "loopback-ipv4-in-brackets": Case("127.0.0.1", NONE, "[127.0.0.1]", False),
    "loopback-ipv4-mapped": Case("127.0.0.1", NONE, "[::ffff:127.0.0.1]", False),
    "loopback-empty-host": Case("127.0.0.1", NONE, "", False),
    "loopback-bad-port": Case("127.0.0.1", NONE, "localhost:http", False),
    "loopback-empty-port": Case("127.0.0.1", NONE, "localhost:", False),
    "loopback-userinfo": Case("127.0.0.1", NONE, "evil@localhost", False),
    "loopback-two-ports": Case("127.0.0.1", NONE, "localhost:1:2", False),
    "loopback-unclosed-bracket": Case("127.0.0.1", NONE, "[::1:8081", False),
    # Bound elsewhere: the list when there is one, else anything.
    "wildcard-empty-list-any-host": Case("0.0.0.0", NONE, "evil.example", True),
    "address-empty-list-any-host": Case("10.0.0.5", NONE, "whatever:1", True),
    "ipv6-wildcard-empty-list": Case("::", NONE, "x", True),
    "name-bind-empty-list": Case("admin.internal", NONE, "x", True),
    "wildcard-listed": Case("0.0.0.0", LISTED, "admin.internal:8081", True),
    "wildcard-listed-address": Case("0.0.0.0", LISTED, "10.0.0.5", True),
    "wildcard-unlisted": Case("0.0.0.0", LISTED, "evil.example", False),
    "wildcard-list-without-localhost": Case("0.0.0.0", LISTED, "localhost", False),
    "wildcard-list-no-host-header": Case("0.0.0.0", LISTED, None, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_host_allowed(case: Case) -> None:
    got = host_allowed(case.host, listen_host=case.listen, allowed_hosts=case.allowed_hosts)
    assert got is case.allowed


LOOPBACK = {
    "localhost": ("localhost", True),
    "localhost-upper": ("LOCALHOST", True),
    "ipv4": ("127.0.0.1", True),
    "ipv4-block": ("127.255.0.1", True),
    "ipv6": ("::1", True),
    "ipv6-bracketed": ("[::1]", True),
    "ipv4-wildcard": ("0.0.0.0", False),
    "ipv6-wildcard": ("::", False),
    "private": ("10.1.2.3", False),
    "name": ("admin.internal", False),
    "localhost-suffix": ("localhost.example", False),
}


@pytest.mark.parametrize(("host", "expected"), LOOPBACK.values(), ids=LOOPBACK.keys())
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


# ---- through a real admin app ------------------------------------------------------------


@pytest.fixture
async def server(aiohttp_server: AiohttpServer) -> AsyncIterator[TestServer]:
    """A real admin app on loopback, bound (as far as it knows) to 127.0.0.1."""
    store = Store.memory()
    await store.start()
    app = create_admin_app(store, TOKEN, listen_host="127.0.0.1", allowed_hosts=("admin.lan",))
    yield await aiohttp_server(app)
    await store.close()


async def raw_get(server: TestServer, head: bytes) -> tuple[int, bytes]:
    """(status, body) of one request written byte for byte (Host as the test sets it)."""
    assert server.port is not None
    client = await RawClient.connect(server.port, timeout=WAIT)
    try:
        await client.send(head)
        data = await client.read_to_eof()  # the server closes: HTTP/1.0
    finally:
        await client.close()
    [answer] = await answers_in(data)
    return answer.status, answer.body


ROUTES = ["/healthz", "/", "/static/app.js", "/devices", "/devices/d1", "/nope"]


@pytest.mark.parametrize("path", ROUTES)
async def test_a_foreign_host_is_refused_on_every_route(server: TestServer, path: str) -> None:
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    head = f"GET {path} HTTP/1.1\r\nHost: evil.example:{server.port}\r\n".encode()
    status, body = await raw_get(server, head + auth + b"Connection: close\r\n\r\n")
    assert (status, body) == (403, b'{"status":false,"result":"Host not allowed"}')


@pytest.mark.parametrize(
    "host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "ADMIN.LAN", "localhost"]
)
async def test_its_own_names_are_answered(server: TestServer, host: str) -> None:
    head = f"GET /healthz HTTP/1.1\r\nHost: {host.format(port=server.port)}\r\n".encode()
    status, body = await raw_get(server, head + b"Connection: close\r\n\r\n")
    assert (status, body) == (200, b'{"status":true,"result":"ok"}')


async def test_http_1_0_without_a_host_is_answered(server: TestServer) -> None:
    assert await raw_get(server, b"GET /healthz HTTP/1.0\r\n\r\n") == (
        200,
        b'{"status":true,"result":"ok"}',
    )


async def test_two_host_headers_are_refused(server: TestServer) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n"
    status, _ = await raw_get(server, head + b"Connection: close\r\n\r\n")
    assert status == 400  # aiohttp's parser refuses it before any middleware


async def test_the_middleware_refuses_two_host_headers_too() -> None:
    # Should a parser ever let two through: neither is believed.
    middleware = host_middleware(listen_host="127.0.0.1", allowed_hosts=())

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="reached")

    two = CIMultiDict([("Host", "localhost"), ("Host", "evil.example")])
    resp = await middleware(make_mocked_request("GET", "/healthz", headers=two), handler)
    assert resp.status == 403
    one = CIMultiDict([("Host", "localhost")])
    resp = await middleware(make_mocked_request("GET", "/healthz", headers=one), handler)
    assert resp.status == 200


async def test_the_test_client_default_host_passes(aiohttp_client: Any) -> None:
    # aiohttp's test client sends Host 127.0.0.1:<port>, as every other admin test does.
    store = Store.memory()
    client = await aiohttp_client(create_admin_app(store, TOKEN))
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/healthz", headers={"Host": "rebound.example"})
    assert resp.status == 403
    assert await resp.json() == {"status": False, "result": "Host not allowed"}
    await store.close()
