"""The upstream protocol and pool without sockets: responses fed byte by byte to an
UpstreamConnection over a mock transport, its events recorded by a sink; the pool's
connections handed out by a MockLoop (tests/rig/mock_io.py)."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import pytest

from gateway.config import parse_config
from gateway.dataplane.sides import ResponseSink
from gateway.dataplane.upstream import (
    IDLE_TIMEOUT,
    NO_BODY,
    UNTIL_CLOSE,
    UpstreamConnection,
    UpstreamPool,
)
from gateway.dataplane.wire import RawHeaders
from gateway.errors import ClientBusy, PoolExhausted, UpstreamUnreachable
from tests.rig.mock_io import MockLoop, MockTransport


class Recorder(ResponseSink):
    """Records every event of one response."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.body = b""

    def on_response_head(
        self, status: int, reason: bytes, headers: RawHeaders, framing: int | None
    ) -> None:
        self.events.append(("head", status, framing))

    def on_response_body(self, data: bytes) -> None:
        self.body += data

    def on_response_end(self, reusable: bool) -> None:
        self.events.append(("end", reusable))

    def on_upstream_failed(self, exc: BaseException, *, unanswered: bool) -> None:
        self.events.append(("failed", unanswered, type(exc).__name__))

    def on_upstream_flush(self) -> None:
        self.events.append(("flush",))

    def pause_upload(self) -> None:
        self.events.append(("pause",))

    def resume_upload(self) -> None:
        self.events.append(("resume",))

    def kinds(self) -> list[Any]:
        return [e[:2] if e[0] != "flush" else e[:1] for e in self.events if e[0] != "flush"]


def pool(extra: str = "", loop: MockLoop | None = None) -> UpstreamPool:
    settings = parse_config(f"upstream: {{{extra}}}", "test").upstream
    return UpstreamPool(settings, loop=None if loop is None else loop.as_loop())


def connected(*, head_request: bool = False) -> tuple[UpstreamConnection, MockTransport, Recorder]:
    conn = UpstreamConnection(pool())
    transport = MockTransport()
    conn.connection_made(transport)
    sink = Recorder()
    conn.begin(sink, head_request=head_request)
    return conn, transport, sink


class Case(NamedTuple):
    answer: bytes
    events: list[Any]
    body: bytes = b""


CASES = {
    "content-length": Case(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", [("head", 200), ("end", True)], b"ok"
    ),
    "chunked": Case(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        [("head", 200), ("end", True)],
        b"ok",
    ),
    "connection close": Case(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        [("head", 200), ("end", False)],
        b"ok",
    ),
    "100 continue first": Case(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        [("head", 204), ("end", True)],
    ),
    "a bad status line": Case(b"HTTP/1.1 2x0 OK\r\n\r\n", [("failed", False)]),
    "an unasked upgrade": Case(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        [("failed", False)],
    ),
    "129 headers": Case(
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(129)) + b"\r\n",
        [("failed", False)],
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("piecewise", [False, True], ids=["whole", "byte by byte"])
def test_responses(case: Case, piecewise: bool) -> None:
    conn, _, sink = connected()
    pieces = (
        [case.answer[i : i + 1] for i in range(len(case.answer))] if piecewise else [case.answer]
    )
    for piece in pieces:
        conn.data_received(piece)
    assert sink.kinds() == case.events
    assert sink.body == case.body


def test_framing_reported_with_the_head() -> None:
    for answer, framing in (
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 5),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", UNTIL_CLOSE),
        (b"HTTP/1.1 200 OK\r\n\r\n", UNTIL_CLOSE),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", NO_BODY),
    ):
        conn, _, sink = connected()
        conn.data_received(answer)
        assert sink.events[0] == ("head", int(answer.split(b" ")[1]), framing)


def test_a_head_answer_ends_at_its_head_and_is_not_reused() -> None:
    conn, _, sink = connected(head_request=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert sink.kinds() == [("head", 200), ("end", False)]


def test_a_body_until_close_ends_with_the_close() -> None:
    conn, _, sink = connected()
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\npart")
    conn.connection_lost(None)
    assert sink.kinds() == [("head", 200), ("end", False)] and sink.body == b"part"


def test_a_close_before_any_byte_is_unanswered_after_one_is_not() -> None:
    conn, _, sink = connected()
    conn.connection_lost(None)
    assert sink.events == [("failed", True, "ConnectionResetError")]
    conn, _, sink = connected()
    conn.data_received(b"HTTP/1.1 2")
    conn.connection_lost(None)
    assert sink.events[-1] == ("failed", False, "ConnectionResetError")


def test_bytes_on_an_idle_connection_drop_it() -> None:
    conn, transport, _ = connected()
    conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    conn.sink = None  # back in the pool
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.aborted


def test_the_upstreams_write_pace_reaches_the_sink_and_the_flow() -> None:
    conn, _, sink = connected()
    flow = conn.flow
    assert flow is not None
    conn.pause_writing()
    paused = flow.write_paused
    conn.resume_writing()
    assert paused and not flow.write_paused
    assert sink.events == [("pause",), ("resume",)]


async def test_the_pool_reuses_limits_and_expires_connections() -> None:
    loop = MockLoop(asyncio.get_running_loop())
    p = pool("max_connections: 2, max_connections_per_client: 1", loop)
    a, reused = await p.acquire("10.0.0.1")
    assert not reused and len(loop.connections) == 1
    with pytest.raises(ClientBusy):
        await p.acquire("10.0.0.1")  # its one share is taken
    b, _ = await p.acquire("10.0.0.2")
    with pytest.raises(PoolExhausted):
        await p.acquire("10.0.0.3")  # the pool's two are taken
    p.release(a)
    again, reused = await p.acquire("10.0.0.3")
    assert again is a and reused  # the idle one is taken again
    p.release(again)
    loop.advance(IDLE_TIMEOUT + 1)
    # An idle one past its time is closed and no longer counted: at the pool's limit (b
    # holds the other), a new connection takes its place at once, before its close ends.
    fresh, reused = await p.acquire("10.0.0.3")
    assert fresh is not a and not reused
    assert loop.connections[0][0].closed and p.open_connections == 2
    p.release(b)
    p.release(fresh)
    p.close()


async def test_a_refused_connect_is_unreachable_and_gives_its_share_back() -> None:
    loop = MockLoop(asyncio.get_running_loop())
    loop.refuse_connections = True
    p = pool("max_connections_per_client: 1", loop)
    with pytest.raises(UpstreamUnreachable):
        await p.acquire("10.0.0.1")
    assert p.held_by("10.0.0.1") == 0 and p.open_connections == 0
