"""One request's life without sockets: a ClientConnection and its exchange over mock
transports, on a MockLoop whose clock the test moves (tests/rig/mock_io.py).

The verdict comes from a stand-in Enforcer; the upstream connections are mock transports
the pool gets from the MockLoop, and the test plays the upstream by feeding bytes to their
protocols.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.dataplane import DataPlane
from gateway.dataplane.connection import ClientConnection
from gateway.dataplane.upstream import UpstreamConnection
from gateway.enforce import FORWARD, Verdict
from gateway.identity import HeaderLookup
from gateway.store import Store
from tests.rig.mock_io import MockLoop, MockTransport, settle

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TIMEOUT = 30.0


class Forward:
    """A stand-in Enforcer: every request is forwarded, accounted to 127.0.0.1."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    async def check(
        self, method: str, headers: HeaderLookup, peer: str | None, content_length: int | None
    ) -> Verdict:
        self.checked.append(method)
        return Verdict(FORWARD, "", {"X-RateLimit-Limit": "20"}, "allow", "d1", "127.0.0.1")


class Rig:
    def __init__(self, plane: DataPlane, loop: MockLoop, enforcer: Forward) -> None:
        self.plane = plane
        self.loop = loop
        self.enforcer = enforcer
        self.clients: list[ClientConnection] = []

    def connect(self) -> tuple[ClientConnection, MockTransport]:
        conn = self.plane.protocol()
        transport = MockTransport()
        conn.connection_made(transport)
        self.clients.append(conn)
        return conn, transport

    def close(self) -> None:
        """Every client leaves: what an exchange still holds (a body's file) is let go."""
        for conn in self.clients:
            conn.connection_lost(None)

    def upstream(self, index: int = -1) -> tuple[MockTransport, UpstreamConnection]:
        transport, protocol = self.loop.connections[index]
        assert isinstance(protocol, UpstreamConnection)
        return transport, protocol


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    extra = getattr(request, "param", "")
    settings = parse_config(f"upstream: {{timeout: {TIMEOUT}}}\n{extra}", "test")
    store = Store.memory()
    loop = MockLoop(asyncio.get_running_loop())
    plane = DataPlane(settings, store, loop=loop.as_loop())
    enforcer = Forward()
    plane.enforcer = enforcer
    rig = Rig(plane, loop, enforcer)
    yield rig
    rig.close()
    await plane.shutdown(0)
    await store.close()


def request(method: str = "GET", path: str = "/x", extra: str = "", body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: gw\r\nX-Device-Id: d1\r\n{extra}"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def test_a_request_goes_upstream_and_its_answer_back(rig: Rig) -> None:
    conn, client = rig.connect()
    conn.data_received(request())
    await settle()
    upstream, protocol = rig.upstream()
    sent = upstream.take()
    assert sent.startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n")
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in sent and b"X-Device-Id: d1\r\n" in sent
    protocol.data_received(OK)
    answer = client.take()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")
    assert b"X-RateLimit-Limit: 20\r\n" in answer
    assert rig.plane.metrics.decisions["allow"] == 1
    assert conn.idle_since == rig.loop.time()  # kept alive, waiting for the next request
    # The upstream connection went back to the pool: the next request reuses it.
    conn.data_received(request(path="/y"))
    await settle()
    assert len(rig.loop.connections) == 1 and upstream.take().startswith(b"GET /y ")


async def test_no_answer_head_within_the_timeout_is_a_504(rig: Rig) -> None:
    conn, client = rig.connect()
    conn.data_received(request())
    await settle()
    upstream, _ = rig.upstream()
    rig.loop.advance(TIMEOUT - 0.01)
    assert client.written == b""
    rig.loop.advance(0.02)
    assert (client.status(), client.envelope()) == (504, "Upstream timed out")
    assert upstream.aborted


async def test_silence_mid_body_cuts_the_client_never_a_504(rig: Rig) -> None:
    conn, client = rig.connect()
    conn.data_received(request())
    await settle()
    upstream, protocol = rig.upstream()
    protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    assert client.take().endswith(b"half")
    rig.loop.advance(TIMEOUT / 2)
    protocol.data_received(b"ha")  # a byte restarts the silence
    rig.loop.advance(TIMEOUT / 2 + 1)
    aborted_early = client.aborted
    rig.loop.advance(TIMEOUT)
    assert not aborted_early
    assert client.aborted and upstream.aborted
    assert b"504" not in bytes(client.written)


async def test_a_full_client_socket_pauses_the_upstream_read(rig: Rig) -> None:
    conn, _ = rig.connect()
    conn.data_received(request())
    await settle()
    upstream, protocol = rig.upstream()
    protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nstart")
    conn.pause_writing()
    assert not upstream.reading
    conn.resume_writing()
    assert upstream.reading


async def test_a_reused_connection_closed_before_a_byte_sends_a_get_again(rig: Rig) -> None:
    conn, client = rig.connect()
    conn.data_received(request())
    await settle()
    _, first = rig.upstream()
    first.data_received(OK)
    client.take()
    conn.data_received(request(path="/again"))
    await settle()
    first.connection_lost(None)  # the upstream had closed it while idle
    await settle()
    assert len(rig.loop.connections) == 2
    retry, second = rig.upstream()
    assert retry.take().startswith(b"GET /again ")
    second.data_received(OK)
    assert client.take().endswith(b"ok")


async def test_a_garbled_answer_is_a_502_and_never_sent_again(rig: Rig) -> None:
    conn, client = rig.connect()
    conn.data_received(request())
    await settle()
    _, protocol = rig.upstream()
    protocol.data_received(b"HTTP/1.1 2x0 nonsense\r\n\r\n")
    await settle()
    assert (client.status(), client.envelope()) == (502, "Invalid upstream response")
    assert len(rig.loop.connections) == 1


async def test_a_buffered_body_goes_upstream_whole_with_its_length(rig: Rig) -> None:
    conn, _ = rig.connect()
    conn.data_received(request("POST", extra="Transfer-Encoding: chunked\r\n"))
    conn.data_received(b"3\r\nabc\r\n")
    await settle()
    assert rig.loop.connections == []  # nothing upstream before the body is whole
    conn.data_received(b"2\r\nde\r\n0\r\n\r\n")
    await settle()
    upstream, _ = rig.upstream()
    sent = upstream.take()
    assert b"Content-Length: 5\r\n" in sent and b"Transfer-Encoding" not in sent
    assert sent.endswith(b"\r\n\r\nabcde")


@pytest.mark.parametrize("rig", ["limits: {buffer_memory_bytes: 4}"], indirect=True)
async def test_a_buffered_file_is_sent_only_as_fast_as_the_upstream_takes_it(rig: Rig) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: past the 4 bytes of memory, into a file
    rig.loop.high_water = 64 * 1024  # the upstream's socket takes 64 KiB at a time
    conn, _ = rig.connect()
    conn.data_received(request("PUT", body=body))
    await settle()
    upstream, _ = rig.upstream()
    steps: list[bytes] = []
    while not b"".join(steps).endswith(body):
        step = upstream.drain()
        assert 0 < len(step) <= 256 * 1024 + 512  # one read of the file (and the head)
        steps.append(step)
        assert len(steps) < 100
    assert len(steps) == 4  # 1 MiB in reads of 256 KiB, each waiting for the socket
    sent = b"".join(steps)
    assert sent.endswith(body) and b"Content-Length: 1048576\r\n" in sent


async def test_the_report_says_what_the_connection_logs(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    conn, _ = rig.connect()
    with caplog.at_level("INFO", logger="gateway.access"):
        conn.data_received(request(path="/logged?q=1"))
        await settle()
        _, protocol = rig.upstream()
        protocol.data_received(OK)
    (line,) = [r for r in caplog.records if r.name == "gateway.access"]
    fields: dict[str, Any] = line.fields  # type: ignore[attr-defined]
    assert {k: fields[k] for k in ("device_id", "method", "path", "status", "decision")} == {
        "device_id": "d1",
        "method": "GET",
        "path": "/logged?q=1",
        "status": 200,
        "decision": "allow",
    }
    assert fields["remote"] == "127.0.0.1"
