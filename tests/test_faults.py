"""The fault-injection tools themselves: FaultProxy, CountingUpstream and RawUpstream.

Each FaultProxy mode is proved against an echo server on loopback (a RawUpstream running
`Echo.serve`); each upstream behaviour against a plain client. These tools carry the fault
tests, so they must do exactly what they claim.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httptools
import orjson
import pytest
from yarl import URL

from tests.rig.client import OpenRawClient, RawClient
from tests.rig.faults import FaultProxy
from tests.rig.raw_upstream import MALFORMED, MakeRawUpstream, RawUpstream
from tests.rig.system import free_port
from tests.rig.upstream import MARK, CountingUpstream, Reply, ResetMidBody, Slow, Stream
from tests.rig.waits import until

pytestmark = pytest.mark.integration

WAIT = 5.0  # bounds every wait in this file
QUIET = 0.3  # how long "nothing arrives" is watched for


@pytest.fixture(autouse=True)
def quiet(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The tools log nothing at WARNING or above (no stray tracebacks in the tests using them)."""
    caplog.set_level(logging.WARNING)
    yield
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


# ---------------------------------------------------------------- an echo server


class Echo:
    """How the proxy's target answers here (a RawUpstream's `serve`): it sends back every
    byte it reads, and counts them."""

    def __init__(self) -> None:
        self.received = 0
        self.open = 0
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection; RawUpstream closes it after."""
        self.open += 1
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            self.open -= 1


@pytest.fixture
async def echo(make_raw_upstream: MakeRawUpstream) -> Echo:
    """A loopback echo server (the rig's RawUpstream running `Echo.serve`)."""
    server = Echo()
    server.port = (await make_raw_upstream(serve=server.serve)).port
    return server


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", echo.port)
    await p.start()
    yield p
    await p.close()


async def round_trip(client: RawClient, data: bytes) -> tuple[bytes, float]:
    """Send `data`, read as many bytes back; (bytes, seconds it took)."""
    started = time.monotonic()
    client.write(data)
    got = await client.read_exactly(len(data))
    return got, time.monotonic() - started


# ---------------------------------------------------------------- FaultProxy


async def test_pass_through_forwards_both_ways_unchanged(
    proxy: FaultProxy, echo: Echo, raw_client: OpenRawClient
) -> None:
    client = await raw_client(proxy.port, timeout=WAIT)
    assert (await round_trip(client, b"hello"))[0] == b"hello"
    big = bytes(range(256)) * 8192  # 2 MiB: more than the socket buffers, flow control runs
    got, _ = await round_trip(client, big)
    assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
    assert echo.received == 5 + len(big)
    assert (proxy.accepted, proxy.open_connections) == (1, 1)


TIMER_TICK = 0.002  # a millisecond of uvloop's clock, and one of rounding


@pytest.mark.timing
async def test_latency_holds_every_answer_and_can_be_lifted_in_order(
    proxy: FaultProxy, raw_client: OpenRawClient
) -> None:
    client = await raw_client(proxy.port, timeout=WAIT)
    _, base = await round_trip(client, b"x")
    proxy.latency(0.2)
    got, took = await round_trip(client, b"slow")
    assert got == b"slow"
    # uvloop's clock and timers tick in whole milliseconds: a hold may end up to 1 ms early.
    assert 0.2 - TIMER_TICK <= took < 0.2 + 0.1 + base
    fresh = await raw_client(proxy.port, timeout=WAIT)  # a new connection gets the latency too
    assert 0.2 - TIMER_TICK <= (await round_trip(fresh, b"new"))[1] < 0.3 + base

    # Lifted while an answer is still held: what follows does not overtake it.
    client.write(b"first")
    await until(lambda: proxy.held == len(b"first"), '"first" to be back, held at the proxy')
    proxy.pass_through()
    client.write(b"second")
    got = await client.read_exactly(11)
    assert got == b"firstsecond"
    assert (await round_trip(client, b"fast"))[1] < 0.1


async def test_black_hole_accepts_and_never_answers_but_keeps_sockets_open(
    proxy: FaultProxy, echo: Echo, raw_client: OpenRawClient
) -> None:
    before = await raw_client(proxy.port, timeout=WAIT)
    assert (await round_trip(before, b"ping"))[0] == b"ping"
    proxy.black_hole()
    during = await raw_client(proxy.port, timeout=WAIT)  # still accepted
    for client in (before, during):
        client.write(b"anyone?")
        assert await client.silent(QUIET)  # no answer, and no EOF: the socket stays open
        assert not client.reader.at_eof()
    assert echo.received == 4  # nothing got through to the target
    assert proxy.open_connections == 2

    proxy.pass_through()
    for client in (before, during):
        assert (await round_trip(client, b"back"))[0] == b"back"


async def test_reset_sends_rst_to_open_and_to_new_connections(
    proxy: FaultProxy, echo: Echo, raw_client: OpenRawClient
) -> None:
    open_one = await raw_client(proxy.port, timeout=WAIT)
    await round_trip(open_one, b"hi")
    proxy.reset()
    with pytest.raises(ConnectionResetError):
        await open_one.read_some(1)
    new_one = await raw_client(proxy.port, timeout=WAIT)  # the accept happens, then the RST
    with pytest.raises(ConnectionResetError):
        await new_one.read_some(1)
    await until(lambda: echo.open == 0, "the target side to be dropped too", WAIT)
    assert proxy.open_connections == 0


async def test_cut_after_passes_n_bytes_from_the_target_then_closes(
    proxy: FaultProxy, echo: Echo, raw_client: OpenRawClient
) -> None:
    client = await raw_client(proxy.port, timeout=WAIT)
    await round_trip(client, b"warm")  # bytes before the switch do not count
    proxy.cut_after(4)
    client.write(b"0123456789")
    assert await client.read_to_eof() == b"0123"  # then a clean EOF
    fresh = await raw_client(proxy.port, timeout=WAIT)
    fresh.write(b"abcdef")
    assert await fresh.read_to_eof() == b"abcd"
    proxy.cut_after(0)
    at_once = await raw_client(proxy.port, timeout=WAIT)
    assert await at_once.read_to_eof() == b""
    await until(lambda: echo.open == 0, "the target side to be dropped too", WAIT)


async def test_a_refused_target_resets_the_client_connection(raw_client: OpenRawClient) -> None:
    proxy = FaultProxy("127.0.0.1", free_port())  # nothing listens there
    await proxy.start()
    try:
        client = await raw_client(proxy.port, timeout=WAIT)
        client.write(b"hello?")
        with pytest.raises(ConnectionResetError):
            await client.read_to_eof()
        assert proxy.open_connections == 0
    finally:
        await proxy.close()


async def test_close_cuts_every_connection_and_stops_listening(
    proxy: FaultProxy, raw_client: OpenRawClient
) -> None:
    client = await raw_client(proxy.port, timeout=WAIT)
    await round_trip(client, b"hi")
    await proxy.close()
    with pytest.raises(ConnectionResetError):
        await client.read_some(1)
    with pytest.raises(ConnectionRefusedError):
        await RawClient.connect(proxy.port, timeout=WAIT)


# ---------------------------------------------------------------- CountingUpstream


async def test_counting_upstream_records_every_request_and_reports_it(
    upstream: CountingUpstream, http: aiohttp.ClientSession
) -> None:
    body = b"payload" * 1000
    target = URL(f"{upstream.url}/api/%2e%2e/x;y?q=1&q=2", encoded=True)  # sent as is
    async with http.post(target, data=body, headers={"X-Device-Id": "d1"}) as r:
        assert r.status == 200 and r.headers[MARK] == "1"
        answer = orjson.loads(await r.read())
    async with http.get(f"{upstream.url}/other") as r:
        assert r.status == 200
    first, second = upstream.seen
    assert (first.method, first.raw_path, first.device_id) == (
        "POST",
        "/api/%2e%2e/x;y?q=1&q=2",
        "d1",
    )
    assert (first.body_sha256, first.body_size, first.complete) == (
        hashlib.sha256(body).hexdigest(),
        len(body),
        True,
    )
    assert first.headers["X-Device-Id"] == "d1"
    assert answer == {
        "upstream": True,
        "method": "POST",
        "path": "/api/%2e%2e/x;y?q=1&q=2",
        "device": "d1",
        "sha256": first.body_sha256,
        "size": len(body),
    }
    assert (second.method, second.body_size, second.device_id) == ("GET", 0, None)
    assert upstream.count() == 2 and upstream.arrived == 2
    assert upstream.count(path="/other") == 1 and upstream.count(device_id="d1") == 1


async def test_a_behaviour_per_path_beats_the_switch(
    upstream: CountingUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behave(Reply(status=503, body=b"down", headers={"Retry-After": "7"}))
    upstream.behave(Reply(status=201, body=b"made"), path="/made")
    async with http.get(f"{upstream.url}/made?x=1") as r:
        assert (r.status, await r.read()) == (201, b"made")
    async with http.get(f"{upstream.url}/else") as r:
        assert (r.status, await r.read(), r.headers["Retry-After"]) == (503, b"down", "7")
        assert r.headers[MARK] == "1"
    upstream.forget("/made")
    async with http.get(f"{upstream.url}/made") as r:
        assert r.status == 503
    assert upstream.count() == 3


@pytest.mark.timing
async def test_slow_answers_after_its_delay(
    upstream: CountingUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behave(Slow(0.25, Reply(body=b"late")), path="/slow")
    started = time.monotonic()
    async with http.get(f"{upstream.url}/slow") as r:
        assert await r.read() == b"late"
    assert 0.25 <= time.monotonic() - started < 0.25 + 0.5
    started = time.monotonic()
    async with http.get(f"{upstream.url}/fast") as r:
        await r.read()
    assert time.monotonic() - started < 0.2


@pytest.mark.timing
@pytest.mark.parametrize("declare_length", [False, True])
async def test_stream_sends_its_chunks_with_pauses(
    upstream: CountingUpstream, http: aiohttp.ClientSession, declare_length: bool
) -> None:
    upstream.behave(Stream((b"one", b"two", b"three"), delay=0.15, declare_length=declare_length))
    arrivals: list[tuple[float, bytes]] = []
    async with http.get(f"{upstream.url}/s") as r:
        if declare_length:
            assert r.headers["Content-Length"] == "11"
        else:
            assert r.headers["Transfer-Encoding"] == "chunked"
        async for chunk in r.content.iter_any():
            arrivals.append((time.monotonic(), chunk))
    assert b"".join(c for _, c in arrivals) == b"onetwothree"
    assert len(arrivals) == 3
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert all(g >= 0.12 for g in gaps), gaps


async def test_reset_mid_body_cuts_the_connection_with_an_rst(
    upstream: CountingUpstream, raw_client: OpenRawClient
) -> None:
    upstream.behave(ResetMidBody(sent=b"y" * 1000, declared=100_000))
    client = await raw_client(upstream.port, timeout=WAIT)
    client.write(b"GET /r HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    with pytest.raises(ConnectionResetError):
        while True:
            data = await client.read_some()
            assert data, "a clean EOF: expected an RST"
            received += data
    # Whatever arrived before the RST is a head announcing far more than was sent.
    if received:
        assert b"Content-Length: 100000" in received
        assert len(received.partition(b"\r\n\r\n")[2]) <= 1000
    assert upstream.count(path="/r") == 1


async def test_a_body_the_client_breaks_off_is_recorded_as_incomplete(
    upstream: CountingUpstream, raw_client: OpenRawClient
) -> None:
    client = await raw_client(upstream.port, timeout=WAIT)
    await client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"z" * 10)
    await until(lambda: upstream.arrived == 1, "the request head", WAIT)
    client.reset()
    await until(lambda: len(upstream.seen) == 1, "the broken request to be recorded", WAIT)
    [seen] = upstream.seen
    assert (seen.raw_path, seen.body_size, seen.complete) == ("/up", 10, False)


# ---------------------------------------------------------------- RawUpstream


async def raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes on a new connection; read until the server closes."""
    client = await RawClient.connect(int(url.rsplit(":", 1)[1]), timeout=WAIT)
    try:
        client.write(request)
        return await client.read_to_eof()
    finally:
        await client.close()


def test_the_malformed_corpus_is_refused_by_a_strict_parser() -> None:
    for name, answer in MALFORMED.items():
        parser = httptools.HttpResponseParser(object())
        if name == "oversized_headers":
            assert len(answer.partition(b"\r\n\r\n")[0]) > 64 * 1024  # beyond any sane limit
            continue
        with pytest.raises(httptools.HttpParserError):
            parser.feed_data(answer)


async def test_raw_upstream_writes_each_answer_verbatim_and_records_the_request() -> None:
    raw = RawUpstream()
    url = await raw.start()
    try:
        for name, answer in MALFORMED.items():
            raw.answer_with(answer, path=f"/{name}")
        for name, answer in MALFORMED.items():
            got = await raw_exchange(url, f"GET /{name}?n=1 HTTP/1.1\r\nHost: u\r\n\r\n".encode())
            assert got == answer, name
        plain = await raw_exchange(url, b"GET /plain HTTP/1.1\r\nHost: u\r\n\r\n")
        assert plain.startswith(b"HTTP/1.1 200 OK\r\n") and MARK.encode() in plain
        chunked = (
            b"POST /c HTTP/1.1\r\nHost: u\r\nX-Device-Id: d9\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        await raw_exchange(url, chunked)
        assert [s.raw_path for s in raw.seen] == [
            *(f"/{name}?n=1" for name in MALFORMED),
            "/plain",
            "/c",
        ]
        last = raw.seen[-1]
        assert (last.method, last.device_id, last.body_size) == ("POST", "d9", 5)
        assert last.body_sha256 == hashlib.sha256(b"abcde").hexdigest()
    finally:
        await raw.close()


async def test_raw_upstream_keeps_the_connection_open_when_asked() -> None:
    raw = RawUpstream(b"HTTP/1.1 204 No Content\r\n\r\n", close=False)
    url = await raw.start()
    client = await RawClient.connect(int(url.rsplit(":", 1)[1]), timeout=WAIT)
    try:
        for i in range(3):
            client.write(f"POST /k{i} HTTP/1.1\r\nHost: u\r\nContent-Length: 2\r\n\r\nhi".encode())
            answer = await client.read_until(b"\r\n\r\n")
            assert answer == b"HTTP/1.1 204 No Content\r\n\r\n"
        assert [s.raw_path for s in raw.seen] == ["/k0", "/k1", "/k2"]
    finally:
        await client.close()
        await raw.close()
