"""Connection management of the data plane: keep-alive idle close, graceful shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from gateway.config import parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.store import Store
from tests.rig.client import OpenRawClient
from tests.rig.upstream import CountingUpstream, Handle, MakeUpstream, Reply
from tests.rig.waits import until

pytestmark = pytest.mark.integration

WAIT = 10.0
REQUEST = b"GET /x HTTP/1.1\r\nHost: gw\r\nX-Device-Id: d1\r\n\r\n"


@dataclass
class Running:
    plane: DataPlane
    server: asyncio.Server
    port: int
    release: asyncio.Event
    upstream: CountingUpstream

    async def slow_at_upstream(self, count: int = 1) -> None:
        """Wait until `count` /slow requests are held at the upstream."""
        await until(lambda: self.upstream.started.count("/slow") >= count, "/slow upstream")


@pytest.fixture
def server_yaml() -> str:
    """The `server:` section of the test gateway's config (tests may override it)."""
    return "{}"


@pytest.fixture
async def running(server_yaml: str, make_upstream: MakeUpstream) -> AsyncIterator[Running]:
    """The data plane in front of the rig's upstream, whose /slow answers wait for
    `release`."""
    release = asyncio.Event()

    async def held(request: web.BaseRequest) -> web.Response:
        await release.wait()
        await request.read()  # an upload endpoint reads the whole body before answering
        return web.Response(text="ok")

    upstream = await make_upstream(Reply(body=b"ok"))
    upstream.behave(Handle(held), path="/slow")
    origin = upstream.url
    store = Store.memory()
    settings = parse_config(f"upstream: {{url: '{origin}'}}\nserver: {server_yaml}", "test")
    plane = DataPlane(settings, store)
    server = await start_public(plane, "127.0.0.1", 0)
    yield Running(plane, server, server.sockets[0].getsockname()[1], release, upstream)
    release.set()
    server.close()
    await plane.shutdown(1.0)
    await server.wait_closed()
    await store.close()


@pytest.mark.timing
@pytest.mark.parametrize("server_yaml", ["{keepalive_timeout: 0.3}"])
async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(
    running: Running, raw_client: OpenRawClient
) -> None:
    client = await raw_client(running.port, framed=True)
    client.write(REQUEST)
    answer = await client.read_answer()
    assert answer.head.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert await client.read_to_eof() == b""  # closed by the gateway
    assert 0.3 <= time.monotonic() - started < 2.5  # the sweep runs once a second


@pytest.mark.parametrize("server_yaml", ["{keepalive_timeout: 0.3}"])
async def test_a_busy_connection_is_not_closed_as_idle(
    running: Running, raw_client: OpenRawClient
) -> None:
    client = await raw_client(running.port, framed=True)
    client.write(REQUEST.replace(b"/x", b"/slow"))
    # The scenario: real time past the idle timeout (0.3 s) and a sweep (once a second),
    # while the answer is pending.
    await asyncio.sleep(1.5)
    running.release.set()
    answer = await client.read_answer()
    assert answer.head.startswith(b"HTTP/1.1 200")


async def test_graceful_shutdown_finishes_answers_in_flight_and_closes_idle_ones(
    running: Running, raw_client: OpenRawClient
) -> None:
    busy = await raw_client(running.port, framed=True)
    idle = await raw_client(running.port, framed=True)
    idle.write(REQUEST)
    await idle.read_answer()
    busy.write(REQUEST.replace(b"/x", b"/slow"))
    await running.slow_at_upstream()
    running.server.close()
    shutdown = asyncio.ensure_future(running.plane.shutdown(WAIT))
    assert await idle.read_to_eof() == b""  # idle: closed at once
    await asyncio.sleep(0.2)  # a quiet period, not a wait for a state: nothing may end it
    assert not shutdown.done()  # waits for the answer in flight
    running.release.set()
    answer = await busy.read_answer()
    assert answer.head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in answer.head.lower()
    await asyncio.wait_for(shutdown, WAIT)


async def test_a_connection_accepted_once_shutdown_began_is_closed_not_served(
    running: Running, raw_client: OpenRawClient
) -> None:
    # The listener closes just before shutdown() begins, but a connection already in the
    # accept queue can still reach connection_made: it must not hold the stop.
    busy = await raw_client(running.port, framed=True)
    busy.write(REQUEST.replace(b"/x", b"/slow"))
    await running.slow_at_upstream()
    shutdown = asyncio.ensure_future(running.plane.shutdown(WAIT))
    await asyncio.sleep(0)
    late = await raw_client(running.port, framed=True)
    late.write(REQUEST)
    assert await late.read_to_eof() == b""  # closed, nothing served
    assert len(running.plane.connections) == 1  # only the busy one
    running.release.set()
    answer = await busy.read_answer()
    assert answer.head.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(shutdown, WAIT)


@pytest.mark.parametrize("server_yaml", ["{max_connections: 3}"])
async def test_at_the_cap_the_longest_idle_connection_makes_room(
    running: Running, raw_client: OpenRawClient
) -> None:
    idle = []
    for _ in range(3):
        client = await raw_client(running.port, framed=True)
        client.write(REQUEST)
        await client.read_answer()
        idle.append(client)
        await asyncio.sleep(0.01)  # the scenario: distinct idle times, the first the longest
    client = await raw_client(running.port, framed=True)
    client.write(REQUEST)
    answer = await client.read_answer()
    assert answer.head.startswith(b"HTTP/1.1 200")  # the new client is served
    assert await idle[0].read_to_eof() == b""  # the oldest idle closed


@pytest.mark.parametrize("server_yaml", ["{max_connections: 2}"])
async def test_at_the_cap_with_none_idle_a_new_client_gets_503(
    running: Running, raw_client: OpenRawClient
) -> None:
    busy = []
    for _ in range(2):
        client = await raw_client(running.port, framed=True)
        client.write(REQUEST.replace(b"/x", b"/slow"))
        busy.append(client)
    await running.slow_at_upstream(2)
    client = await raw_client(running.port, framed=True)
    refused = await client.read_to_eof()
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert refused.endswith(b'{"status":false,"result":"Too many connections"}')
    running.release.set()
    for one in busy:  # the busy ones were not disturbed
        assert (await one.read_answer()).head.startswith(b"HTTP/1.1 200")


@pytest.mark.timing
@pytest.mark.parametrize("server_yaml", ["{body_timeout: 0.3}"])
async def test_a_stalled_request_body_is_given_up_with_408(
    running: Running, raw_client: OpenRawClient
) -> None:
    client = await raw_client(running.port, framed=True)
    client.write(
        b"POST /upload HTTP/1.1\r\nHost: gw\r\nX-Device-Id: d1\r\nContent-Length: 10\r\n\r\nabc"
    )
    started = time.monotonic()
    answer = await client.read_to_eof()  # answered, then closed at once
    assert 0.3 <= time.monotonic() - started < 0.3 + 1.5  # the sweep runs once a second
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b'{"status":false,"result":"Request body timeout"}')
