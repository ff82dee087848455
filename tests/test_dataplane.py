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
from tests.rig.upstream import Handle, MakeUpstream, Reply

pytestmark = pytest.mark.integration

WAIT = 10.0
REQUEST = b"GET /x HTTP/1.1\r\nHost: gw\r\nX-Device-Id: d1\r\n\r\n"


@dataclass
class Running:
    plane: DataPlane
    server: asyncio.Server
    port: int
    release: asyncio.Event


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
    yield Running(plane, server, server.sockets[0].getsockname()[1], release)
    release.set()
    server.close()
    await plane.shutdown(1.0)
    await server.wait_closed()
    await store.close()


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


@pytest.mark.parametrize("server_yaml", ["{keepalive_timeout: 0.3}"])
async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(
    running: Running,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(REQUEST)
    answer = await asyncio.wait_for(read_answer(reader), WAIT)
    assert answer.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed by the gateway
    assert 0.3 <= time.monotonic() - started < 2.5  # the sweep runs once a second
    writer.close()


@pytest.mark.parametrize("server_yaml", ["{keepalive_timeout: 0.3}"])
async def test_a_busy_connection_is_not_closed_as_idle(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(REQUEST.replace(b"/x", b"/slow"))
    await asyncio.sleep(1.5)  # longer than the idle timeout, while the answer is pending
    running.release.set()
    answer = await asyncio.wait_for(read_answer(reader), WAIT)
    assert answer.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_graceful_shutdown_finishes_answers_in_flight_and_closes_idle_ones(
    running: Running,
) -> None:
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", running.port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", running.port)
    idle_writer.write(REQUEST)
    await asyncio.wait_for(read_answer(idle_reader), WAIT)
    busy_writer.write(REQUEST.replace(b"/x", b"/slow"))
    await asyncio.sleep(0.2)
    running.server.close()
    shutdown = asyncio.ensure_future(running.plane.shutdown(WAIT))
    assert await asyncio.wait_for(idle_reader.read(), WAIT) == b""  # idle: closed at once
    await asyncio.sleep(0.2)
    assert not shutdown.done()  # waits for the answer in flight
    running.release.set()
    answer = await asyncio.wait_for(read_answer(busy_reader), WAIT)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in answer.lower()
    await asyncio.wait_for(shutdown, WAIT)
    busy_writer.close()
    idle_writer.close()


async def test_a_connection_accepted_once_shutdown_began_is_closed_not_served(
    running: Running,
) -> None:
    # The listener closes just before shutdown() begins, but a connection already in the
    # accept queue can still reach connection_made: it must not hold the stop.
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", running.port)
    busy_writer.write(REQUEST.replace(b"/x", b"/slow"))
    await asyncio.sleep(0.2)
    shutdown = asyncio.ensure_future(running.plane.shutdown(WAIT))
    await asyncio.sleep(0)
    late_reader, late_writer = await asyncio.open_connection("127.0.0.1", running.port)
    late_writer.write(REQUEST)
    assert await asyncio.wait_for(late_reader.read(), WAIT) == b""  # closed, nothing served
    assert len(running.plane.connections) == 1  # only the busy one
    running.release.set()
    answer = await asyncio.wait_for(read_answer(busy_reader), WAIT)
    assert answer.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(shutdown, WAIT)
    busy_writer.close()
    late_writer.close()


@pytest.mark.parametrize("server_yaml", ["{max_connections: 3}"])
async def test_at_the_cap_the_longest_idle_connection_makes_room(running: Running) -> None:
    idle = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(REQUEST)
        await asyncio.wait_for(read_answer(reader), WAIT)
        idle.append((reader, writer))
        await asyncio.sleep(0.01)  # distinct idle times: the first is the longest idle
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(REQUEST)
    answer = await asyncio.wait_for(read_answer(reader), WAIT)
    assert answer.startswith(b"HTTP/1.1 200")  # the new client is served
    assert await asyncio.wait_for(idle[0][0].read(), WAIT) == b""  # the oldest idle closed
    for _, w in [*idle, (reader, writer)]:
        w.close()


@pytest.mark.parametrize("server_yaml", ["{max_connections: 2}"])
async def test_at_the_cap_with_none_idle_a_new_client_gets_503(running: Running) -> None:
    busy = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(REQUEST.replace(b"/x", b"/slow"))
        busy.append((reader, writer))
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    refused = await asyncio.wait_for(reader.read(), WAIT)
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert refused.endswith(b'{"status":false,"result":"Too many connections"}')
    running.release.set()
    for r, _ in busy:  # the busy ones were not disturbed
        assert (await asyncio.wait_for(read_answer(r), WAIT)).startswith(b"HTTP/1.1 200")
    for _, w in [*busy, (reader, writer)]:
        w.close()


@pytest.mark.parametrize("server_yaml", ["{body_timeout: 0.3}"])
async def test_a_stalled_request_body_is_given_up_with_408(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: gw\r\nX-Device-Id: d1\r\nContent-Length: 10\r\n\r\nabc"
    )
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), WAIT)  # answered, then closed at once
    assert 0.3 <= time.monotonic() - started < 0.3 + 1.5  # the sweep runs once a second
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b'{"status":false,"result":"Request body timeout"}')
    writer.close()
