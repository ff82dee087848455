"""The client protocol without sockets: refusals of the request head, whatever surrounds the
loop.

A ClientConnection is driven by hand (connection_made, data_received) over a transport that
records what is written (tests/rig/mock_io.py), its deadlines by a loop whose clock the test
moves. The refusals are raised inside llhttp's callbacks; the status they
get must not depend on the exception being handled around the loop (`gateway run` once ran
its loop inside `except ImportError` when uvloop was missing, and every refusal became a
400 with an error log line).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import NamedTuple

import pytest

from gateway.config import parse_config
from gateway.dataplane import DataPlane
from gateway.dataplane.connection import ClientConnection
from gateway.enforce import Verdict
from gateway.identity import HeaderLookup
from gateway.store import Store
from tests.rig.mock_io import MockLoop, MockTransport, settle


@pytest.fixture
async def plane() -> AsyncIterator[DataPlane]:
    store = Store.memory()
    plane = DataPlane(parse_config("", "test"), store)
    yield plane
    await plane.shutdown(0.1)
    await store.close()


def connect(plane: DataPlane) -> tuple[ClientConnection, MockTransport]:
    conn = plane.protocol()
    transport = MockTransport()
    conn.connection_made(transport)
    return conn, transport


class Refusal(NamedTuple):
    request: bytes
    status: int
    reason: str


def _head(*lines: bytes) -> bytes:
    return b"\r\n".join([*lines, b"", b""])


REFUSALS = {
    "target_over_8190": Refusal(
        _head(b"GET /" + b"t" * 9000 + b" HTTP/1.1", b"Host: gw"), 414, "Request target too long"
    ),
    "header_over_8190": Refusal(
        _head(b"GET / HTTP/1.1", b"Host: gw", b"X-Big: " + b"v" * 9000),
        431,
        "Request header too large",
    ),
    "header_line_never_ending": Refusal(
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"v" * 9000, 431, "Request header too large"
    ),
    "129_headers": Refusal(
        _head(b"GET / HTTP/1.1", *(b"X-H%d: v" % i for i in range(129))),
        431,
        "Too many request headers",
    ),
    "gzip_then_chunked": Refusal(
        _head(b"POST / HTTP/1.1", b"Host: gw", b"Transfer-Encoding: gzip, chunked"),
        501,
        "Unsupported transfer coding",
    ),
    "absolute_form": Refusal(
        _head(b"GET http://elsewhere.test/ HTTP/1.1", b"Host: gw"), 400, "Invalid request target"
    ),
    "two_hosts": Refusal(
        _head(b"GET / HTTP/1.1", b"Host: a", b"Host: b"), 400, "Duplicate Host header"
    ),
}


class Surrounding(NamedTuple):
    name: str
    exception: BaseException | None


SURROUNDINGS = [
    Surrounding("nothing handled", None),
    # What `gateway run` looked like without uvloop: the loop ran inside the handler.
    Surrounding("inside except ImportError", ModuleNotFoundError("No module named 'uvloop'")),
    Surrounding("inside except KeyError", KeyError("unrelated")),
]


def feed(conn: ClientConnection, data: bytes, around: BaseException | None) -> None:
    if around is None:
        conn.data_received(data)
        return
    try:
        raise around
    except BaseException:
        conn.data_received(data)


@pytest.mark.parametrize("around", SURROUNDINGS, ids=[s.name for s in SURROUNDINGS])
@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
async def test_a_refusal_keeps_its_status_whatever_exception_surrounds_the_loop(
    plane: DataPlane, case: Refusal, around: Surrounding, caplog: pytest.LogCaptureFixture
) -> None:
    conn, transport = connect(plane)
    with caplog.at_level(logging.WARNING):
        feed(conn, case.request, around.exception)
    assert (transport.status(), transport.envelope()) == (case.status, case.reason)
    assert transport.closed
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


class HalfClose(NamedTuple):
    sent: bytes
    status: int | None  # None: nothing is answered
    reason: str = ""


HALF_CLOSES = {
    "nothing sent": HalfClose(b"", None),
    "half a request line": HalfClose(b"GET /x HT", 400, "Request head incomplete"),
    "a head without its blank line": HalfClose(
        b"GET /x HTTP/1.1\r\nHost: gw\r\n", 400, "Request head incomplete"
    ),
    "a body cut short": HalfClose(
        _head(b"POST /x HTTP/1.1", b"Host: gw", b"Content-Length: 10") + b"abc",
        400,
        "Request body incomplete",
    ),
    "a chunked body cut short": HalfClose(
        _head(b"POST /x HTTP/1.1", b"Host: gw", b"Transfer-Encoding: chunked") + b"3\r\nabc\r\n",
        400,
        "Request body incomplete",
    ),
}


@pytest.mark.parametrize("case", HALF_CLOSES.values(), ids=HALF_CLOSES.keys())
async def test_a_half_close_cutting_a_request_short_is_answered_then_closed(
    plane: DataPlane, case: HalfClose
) -> None:
    conn, transport = connect(plane)
    if case.sent:
        conn.data_received(case.sent)
    assert conn.eof_received() is True  # the transport stays open for the answer
    await asyncio.sleep(0)  # let an exchange that was started run its first step
    if case.status is None:
        assert transport.written == b""
    else:
        assert (transport.status(), transport.envelope()) == (case.status, case.reason)
        assert b"Connection: close" in transport.written
    assert transport.closed


@pytest.fixture
async def timed() -> AsyncIterator[tuple[DataPlane, MockLoop]]:
    """A plane on a MockLoop: the sweep's deadlines fire when the test moves the clock."""
    store = Store.memory()
    loop = MockLoop(asyncio.get_running_loop())
    settings = parse_config(
        "server: {header_timeout: 10, keepalive_timeout: 75, body_timeout: 30}", "test"
    )
    plane = DataPlane(settings, store, loop=loop.as_loop())
    yield plane, loop
    await plane.shutdown(0)
    await store.close()


async def test_a_head_sent_too_slowly_gets_408_at_the_header_timeout(
    timed: tuple[DataPlane, MockLoop],
) -> None:
    plane, loop = timed
    conn, transport = connect(plane)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: g")
    loop.advance(10.5)  # the sweep runs once a second
    assert transport.written == b""
    loop.advance(1.0)
    assert (transport.status(), transport.envelope()) == (408, "Request head timeout")
    assert transport.closed


async def test_an_idle_kept_alive_connection_closes_at_the_keepalive_timeout(
    timed: tuple[DataPlane, MockLoop],
) -> None:
    plane, loop = timed
    conn, transport = connect(plane)
    conn.data_received(b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # answered, closed
    assert transport.closed
    loop.refuse_connections = True  # the answer is a 502, which keeps the connection alive
    conn, transport = connect(plane)
    conn.data_received(b"OPTIONS * HTTP/1.1\r\nHost: g\r\n\r\n")  # anonymous: forwarded
    for _ in range(200):
        await settle()
        if transport.written:
            break
    assert transport.status() == 502 and not transport.closed
    loop.advance(74)
    assert not transport.closed
    loop.advance(2)
    assert transport.closed


async def test_pipelined_requests_past_eight_pause_the_reading(plane: DataPlane) -> None:
    conn, transport = connect(plane)
    plane.enforcer = Slow()
    conn.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: g\r\n\r\n" % i for i in range(9)))
    assert not transport.reading  # nine waiting: the client is not read on
    await plane.shutdown(0)


class Slow:
    """A stand-in Enforcer that never decides (the first request holds the line)."""

    async def check(
        self, method: str, headers: HeaderLookup, peer: str | None, content_length: int | None
    ) -> Verdict:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")
