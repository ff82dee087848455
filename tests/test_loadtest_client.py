"""The load engine's HTTP/1.1 client against scripted loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from yarl import URL

from gateway.loadtest.client import (
    ConnectFailed,
    Disconnected,
    HttpPool,
    InvalidResponse,
    RequestFailed,
    RequestTimeout,
)
from gateway.loadtest.fleet import build_fleet
from gateway.loadtest.results import Recorder
from gateway.loadtest.runner import (
    WARM_CONNECTIONS,
    LoadRunner,
    error_kind,
    header_lines,
    request_prefix,
)
from gateway.loadtest.spec import LoadSpec
from tests.rig.raw_upstream import RawUpstream
from tests.rig.system import free_port
from tests.rig.waits import bounded, until

GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
WAIT = 5.0

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """How a loopback server (the rig's RawUpstream) answers here: every request head with
    `answer`; it keeps the heads it read and counts connections."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.raw = RawUpstream(serve=self.handle)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection (RawUpstream's `serve`); RawUpstream closes it after."""
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            await self.answer(reader, writer)
            if writer.is_closing():
                return

    @property
    def connections(self) -> int:
        return self.raw.connections

    @property
    def url(self) -> URL:
        return URL(f"{self.raw.url}/x")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[Scripted]]]:
    servers: list[Scripted] = []

    async def start(answer: Answer) -> Scripted:
        scripted = Scripted(answer)
        servers.append(scripted)
        await scripted.raw.start()
        return scripted

    yield start
    for scripted in servers:
        await bounded(scripted.raw.close(), "closing a scripted server")


def reply(data: bytes, *, close: bool = False) -> Answer:
    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return answer


@contextlib.contextmanager
def open_pool(url: URL, *, limit: int, timeout: float) -> Iterator[HttpPool]:
    """A pool for one test, closed after it (connections aborted, nothing left pending)."""
    pool = HttpPool(url, limit=limit, timeout=timeout)
    try:
        yield pool
    finally:
        pool.close()


async def fetch(pool: HttpPool, data: bytes = GET) -> tuple[int, RequestFailed | None]:
    done: asyncio.Future[tuple[int, RequestFailed | None]] = (
        asyncio.get_running_loop().create_future()
    )
    pool.request(data, lambda status, failure: done.set_result((status, failure)))
    return await asyncio.wait_for(done, WAIT)


async def test_requests_reuse_one_keep_alive_connection(
    serve: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await serve(reply(OK))
    with open_pool(server.url, limit=4, timeout=WAIT) as pool:
        assert [await fetch(pool) for _ in range(5)] == [(200, None)] * 5
        assert server.connections == 1 and server.heads == [GET] * 5


async def test_requests_beyond_the_limit_wait_for_a_connection_in_order(
    serve: Callable[..., Awaitable[Scripted]],
) -> None:
    async def slow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.02)  # the scenario: a server slow to answer
        writer.write(OK)

    server = await serve(slow)
    order: list[int] = []
    finished = asyncio.get_running_loop().create_future()
    with open_pool(server.url, limit=2, timeout=WAIT) as pool:
        for i in range(6):
            data = GET.replace(b"/x", f"/{i}".encode())

            def done(status: int, failure: RequestFailed | None, i: int = i) -> None:
                assert (status, failure) == (200, None)
                order.append(i)
                if len(order) == 6:
                    finished.set_result(None)

            pool.request(data, done)
        await asyncio.wait_for(finished, WAIT)
        assert server.connections == 2 and pool.connections == 2
        assert sorted(order) == list(range(6)) and order[-2:] in ([4, 5], [5, 4])


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        pytest.param(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
            201,
            id="chunked",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", 204, id="no-body"),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
            200,
            id="interim-then-final",
        ),
        pytest.param(
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nretry-after: 1\r\n\r\n",
            429,
            id="lowercase-names",
        ),
    ],
)
async def test_framed_answers_are_read_whole_and_the_connection_kept(
    serve: Callable[..., Awaitable[Scripted]], answer: bytes, status: int
) -> None:
    server = await serve(reply(answer))
    with open_pool(server.url, limit=1, timeout=WAIT) as pool:
        assert await fetch(pool) == (status, None)
        assert await fetch(pool) == (status, None)  # the stream was read to the end
        assert server.connections == 1


async def test_an_answer_ended_by_the_close_counts_and_the_next_request_reconnects(
    serve: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await serve(reply(b"HTTP/1.1 200 OK\r\n\r\nread until the close", close=True))
    with open_pool(server.url, limit=1, timeout=WAIT) as pool:
        assert await fetch(pool) == (200, None)
        assert await fetch(pool) == (200, None)
        assert server.connections == 2


async def test_connection_close_is_honoured(serve: Callable[..., Awaitable[Scripted]]) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    server = await serve(reply(answer))  # the server keeps it open: the client must not reuse
    with open_pool(server.url, limit=1, timeout=WAIT) as pool:
        assert [await fetch(pool) for _ in range(3)] == [(200, None)] * 3
        assert server.connections == 3


async def test_a_close_before_the_answer_is_complete_is_disconnected(
    serve: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", close=True))
    with open_pool(server.url, limit=1, timeout=WAIT) as pool:
        status, failure = await fetch(pool)
        assert status == 0 and isinstance(failure, Disconnected)
        assert error_kind(failure) == "disconnected"


async def test_an_invalid_answer_is_a_payload_error_and_drops_the_connection(
    serve: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await serve(reply(b"SMTP ready\r\n\r\n"))
    with open_pool(server.url, limit=1, timeout=WAIT) as pool:
        status, failure = await fetch(pool)
        assert status == 0 and isinstance(failure, InvalidResponse)
        assert error_kind(failure) == "payload"
        await until(lambda: pool.connections == 0, "the pool to drop the connection")


async def test_a_timeout_fails_the_request_and_takes_its_connection_down(
    serve: Callable[..., Awaitable[Scripted]],
) -> None:
    async def first_hangs(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections == 1:
            await reader.read(1)  # silent until the client gives up and hangs up
            writer.close()
            return
        writer.write(OK)

    server = await serve(first_hangs)
    with open_pool(server.url, limit=1, timeout=0.2) as pool:
        status, failure = await fetch(pool)
        assert status == 0 and isinstance(failure, RequestTimeout)
        assert error_kind(failure) == "timeout"
        # The late answer can never be mistaken for the next request's: a new connection.
        assert await fetch(pool) == (200, None)
        assert server.connections == 2


async def test_a_refused_connection_fails_each_waiting_request_as_connect() -> None:
    with open_pool(URL(f"http://127.0.0.1:{free_port()}/"), limit=4, timeout=WAIT) as pool:
        results = await asyncio.gather(*(fetch(pool) for _ in range(3)))
        assert [status for status, _ in results] == [0, 0, 0]
        assert all(isinstance(f, ConnectFailed) and error_kind(f) == "connect" for _, f in results)


async def test_close_fails_what_is_in_flight_and_refuses_what_comes_after(
    serve: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await serve(reply(b""))  # never answers
    pool = HttpPool(server.url, limit=1, timeout=WAIT)
    pending = asyncio.ensure_future(fetch(pool))
    await until(lambda: server.heads, "the request to reach the server")
    pool.close()
    status, failure = await pending
    assert status == 0 and isinstance(failure, RequestFailed)
    status, failure = await fetch(pool)
    assert status == 0 and isinstance(failure, Disconnected) and "closed" in str(failure)


def test_a_url_without_a_host_is_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        HttpPool(URL("ftp://example.com/"), limit=1, timeout=1.0)


@pytest.mark.parametrize(
    ("url", "target", "host"),
    [
        ("http://127.0.0.1:8080/api/v1?status=open", b"/api/v1?status=open", b"127.0.0.1:8080"),
        ("http://example.com", b"/", b"example.com"),
        ("https://example.com:443/x", b"/x", b"example.com"),
        ("http://[::1]:9000/a%20b", b"/a%20b", b"[::1]:9000"),
    ],
)
def test_request_prefix(url: str, target: bytes, host: bytes) -> None:
    assert request_prefix(URL(url)) == (target, b"Host: " + host + b"\r\n")


def test_header_lines_are_crlf_terminated_utf8() -> None:
    assert header_lines({"X-Device-Id": "d1", "X-Device-Model": "Galaxy Tab é"}) == (
        b"X-Device-Id: d1\r\nX-Device-Model: Galaxy Tab \xc3\xa9\r\n"
    )


async def test_a_run_prepares_before_its_clock_starts_and_leaves_the_collector_as_it_was(
    serve: Callable[..., Awaitable[Scripted]],
) -> None:
    server = await serve(reply(OK))
    spec = LoadSpec(str(server.url), rate=50.0, duration=0.3, timeout=WAIT)
    fleet = build_fleet(3, seed=1)
    runner = LoadRunner(spec, fleet, Recorder())
    frozen_during: list[int] = []
    asyncio.get_running_loop().call_later(0.1, lambda: frozen_during.append(gc.get_freeze_count()))
    await runner.run()
    # The first requests found connections open (a few requests, WARM_CONNECTIONS opened) ...
    assert server.connections == WARM_CONNECTIONS and len(server.heads) >= 5
    # ... the setup was out of the collector's sight during the run, and is back after it.
    assert frozen_during and frozen_during[0] > 0
    assert gc.get_freeze_count() == 0
