"""Hostile input at the public port: smuggling, size limits, bombs, odd paths, odd ids, logs.

A real gateway (DataPlane, the real Enforcer on an embedded memory store, generous rate
limits) listens on loopback in front of the rig's `CountingUpstream` (the `upstream`
fixture: parser limits far above the gateway's, so nothing is refused on its side), which
records every request it saw. Requests go in as raw bytes through the rig's `RawClient`,
one connection each, so the test controls every byte; every answer the gateway makes
itself must be the `{"status": false, "result": ...}` envelope.

"The upstream saw a request" means it received a *complete* one. A streaming proxy sends
the head before the body has arrived, so the upstream may see the start of a request whose
body later turns out malformed or too large; what must never happen is that request
arriving whole. `started`, `complete` and `broken` record the three.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Final, NamedTuple

import orjson
import pytest

from gateway.answers import BLOCKED
from gateway.config import parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.dataplane.connection import ClientConnection
from gateway.logs import ACCESS_LOGGER, JsonFormatter
from gateway.metrics import Metrics
from gateway.store import Store
from tests.rig.client import Answer, OpenRawClient, RawClient
from tests.rig.raw_upstream import MakeRawUpstream
from tests.rig.upstream import CountingUpstream
from tests.rig.waits import until

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds: the bound on every wait for an answer, a close or the upstream
MiB = 1024 * 1024
LIMIT = MiB  # limits.max_body_bytes of the gateway under test
MAX_LINE = 8190  # request target bytes the gateway forwards (README: over 8190 -> 414)
MAX_FIELD = 8190  # header name + value bytes (over -> 431)
MAX_HEADERS = 128  # header fields per request, Host included (over -> 431)


# ---------------------------------------------------------------- the gateway


class ErrorRecords(logging.Handler):
    """Collects gateway log records at ERROR and above, or carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@dataclass(frozen=True)
class Gateway:
    """The data plane on a loopback port, its store, and what it logged at error level."""

    port: int
    plane: DataPlane
    store: Store
    upstream: CountingUpstream
    errors: ErrorRecords

    def assert_no_tracebacks(self) -> None:
        assert [r.getMessage() for r in self.errors.records] == []


StartGateway = Callable[..., Awaitable[Gateway]]

GENEROUS = {"rate": 100_000, "burst": 100_000}


@pytest.fixture
async def start_gateway(upstream: CountingUpstream) -> AsyncIterator[StartGateway]:
    """Factory: the data plane with the real Enforcer on a memory store, before `upstream`."""
    started: list[tuple[asyncio.Server, DataPlane, Store]] = []
    errors = ErrorRecords()
    gateway_log = logging.getLogger("gateway")
    gateway_log.addHandler(errors)

    async def start(
        *,
        upstream_timeout: float = 5.0,
        wrap: Callable[[Callable[[], ClientConnection]], Callable[[], asyncio.Protocol]]
        | None = None,
        request_buffering: bool = True,
    ) -> Gateway:
        config = {
            "upstream": {"url": upstream.url, "timeout": upstream_timeout},
            "limits": {"max_body_bytes": LIMIT, "request_buffering": request_buffering},
            "rate_limits": {"device": GENEROUS, "anonymous": GENEROUS},
            "devices": {"registration_limit": GENEROUS},
            "log": {"access": True},
        }
        settings = parse_config(orjson.dumps(config).decode(), "test.yaml")  # JSON is YAML
        store = Store.memory()
        await store.start()
        plane = DataPlane(settings, store, Metrics())
        if wrap is None:
            server = await start_public(plane, "127.0.0.1", 0)
        else:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(wrap(plane.protocol), "127.0.0.1", 0)
        started.append((server, plane, store))
        return Gateway(server.sockets[0].getsockname()[1], plane, store, upstream, errors)

    yield start
    gateway_log.removeHandler(errors)
    for server, plane, store in started:
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
        await store.close()


@pytest.fixture
async def gw(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


# ---------------------------------------------------------------- a raw client


Connect = Callable[[Gateway], Awaitable[RawClient]]


@pytest.fixture
def connect(raw_client: OpenRawClient) -> Connect:
    """Open a raw connection to a gateway; every answer read on it must be framed."""

    async def open_(gateway: Gateway) -> RawClient:
        return await raw_client(gateway.port, framed=True)

    return open_


async def exchange(connect: Connect, gateway: Gateway, request: bytes) -> Answer:
    """Send one request on a new connection and read the answer."""
    client = await connect(gateway)
    await client.send(request)
    return await client.read_answer()


# ---------------------------------------------------------------- request smuggling


LLHTTP = "Bad request: "  # llhttp's message follows; only this prefix is checked


class Refused(NamedTuple):
    request: bytes
    status: int
    reason: str = LLHTTP  # the gateway's own reason, or LLHTTP


POST = b"POST /smuggle HTTP/1.1\r\nHost: gw\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
VERSION = "HTTP version not supported"

SMUGGLING = {
    "cl-then-te": Refused(
        POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400
    ),
    "te-then-cl": Refused(
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400
    ),
    "duplicate-cl-same": Refused(POST + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
    "duplicate-cl-different": Refused(
        POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx", 400
    ),
    "cl-list": Refused(POST + b"Content-Length: 1, 1\r\n\r\nx", 400),
    # llhttp refuses a sign; leading zeros are plain digits (see ACCEPTED).
    "cl-plus-sign": Refused(POST + b"Content-Length: +1\r\n\r\nx", 400),
    "cl-negative": Refused(POST + b"Content-Length: -1\r\n\r\nx", 400),
    "obs-fold": Refused(b"GET / HTTP/1.1\r\nHost: gw\r\nX-A: b\r\n c\r\n\r\n", 400),
    "bare-cr-ends-header": Refused(b"GET / HTTP/1.1\r\nHost: gw\rX-A: b\r\n\r\n", 400),
    "bare-cr-in-value": Refused(b"GET / HTTP/1.1\r\nHost: gw\r\nX-A: b\rc\r\n\r\n", 400),
    "bare-lf-line-endings": Refused(b"GET / HTTP/1.1\nHost: gw\n\n", 400),
    "bare-lf-after-header": Refused(b"GET / HTTP/1.1\r\nHost: gw\nX-A: b\r\n\r\n", 400),
    "chunk-ext-invalid": Refused(CHUNKED + b'1;a"b\r\nx\r\n0\r\n\r\n', 400),
    "chunk-ext-bare-lf": Refused(CHUNKED + b"1;a\nx\r\n0\r\n\r\n", 400),
    "chunk-size-negative": Refused(CHUNKED + b"-1\r\nx\r\n0\r\n\r\n", 400),
    "chunk-size-hex-overflow": Refused(CHUNKED + b"1ffffffffffffffff\r\nx\r\n0\r\n\r\n", 400),
    "chunk-size-non-hex": Refused(CHUNKED + b"zz\r\nx\r\n0\r\n\r\n", 400),
    "te-chunked-identity": Refused(
        POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400
    ),
    "te-xchunked": Refused(
        POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501, "Unsupported transfer coding"
    ),
    "te-gzip-chunked": Refused(
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        "Unsupported transfer coding",
    ),
    # OWS may be a tab, but llhttp refuses "chunked<HTAB>", and only after the head: the
    # request is already on its way upstream when it turns out malformed (as for the chunks).
    "te-trailing-tab": Refused(POST + b"Transfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n", 400),
    "te-line-leading-space": Refused(POST + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te-space-before-colon": Refused(POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "header-name-space-before-colon": Refused(
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-A : b\r\n\r\n", 400
    ),
    "nul-in-header-value": Refused(b"GET / HTTP/1.1\r\nHost: gw\r\nX-A: b\x00c\r\n\r\n", 400),
    "nul-in-header-name": Refused(b"GET / HTTP/1.1\r\nHost: gw\r\nX-\x00A: b\r\n\r\n", 400),
    "space-in-method": Refused(b"G ET / HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    "http-0.9-request-line": Refused(b"GET /\r\n\r\n", 505, VERSION),
    "http-0.9-version": Refused(b"GET / HTTP/0.9\r\nHost: gw\r\n\r\n", 505, VERSION),
    "http-1.2": Refused(b"GET / HTTP/1.2\r\nHost: gw\r\n\r\n", 400),
    "http-2.0": Refused(b"GET / HTTP/2.0\r\nHost: gw\r\n\r\n", 505, VERSION),
    "http-3": Refused(b"GET / HTTP/3\r\nHost: gw\r\n\r\n", 400),
    "lowercase-http": Refused(b"GET / http/1.1\r\nHost: gw\r\n\r\n", 400),
    "duplicate-host": Refused(
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Duplicate Host header"
    ),
    "raw-non-ascii-path": Refused(b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_ambiguous_or_malformed_request_is_refused_and_the_connection_closed(
    start_gateway: StartGateway, connect: Connect, case: Refused
) -> None:
    # A short upstream timeout: a request wrongly held open ends (as a 504) in 2 s.
    gateway = await start_gateway(upstream_timeout=2.0)
    client = await connect(gateway)
    await client.send(case.request)
    answer = await client.read_answer()
    assert answer.status == case.status
    reason = answer.envelope()
    if case.reason == LLHTTP:
        assert reason.startswith(LLHTTP), reason
    else:
        assert reason == case.reason
    assert answer.fields["Connection"] == "close"
    assert await client.closed()
    await gateway.upstream.settled()
    assert gateway.upstream.complete == []  # the gateway accepted none of them
    gateway.assert_no_tracebacks()


class Accepted(NamedTuple):
    request: bytes
    body: bytes  # what the upstream must receive


ACCEPTED = {
    # Leading zeros are digits (RFC 9110 section 8.6); the gateway re-frames the length.
    "cl-leading-zeros": Accepted(POST + b"Content-Length: 0003\r\n\r\nabc", b"abc"),
    # Optional white space around a field value is part of HTTP, not an ambiguity.
    "te-value-ows": Accepted(
        POST + b"Transfer-Encoding:  chunked \r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"abc"
    ),
    "chunk-size-leading-zeros": Accepted(CHUNKED + b"0003\r\nabc\r\n0\r\n\r\n", b"abc"),
    "chunk-ext-valid": Accepted(CHUNKED + b'3;name="va lue";x\r\nabc\r\n0\r\n\r\n', b"abc"),
}


@pytest.mark.parametrize("case", ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_unusual_but_unambiguous_framing_is_forwarded_once(
    gw: Gateway, connect: Connect, case: Accepted
) -> None:
    # The corpus above is refused by llhttp's rules, not by a blanket dislike of odd bytes.
    answer = await exchange(connect, gw, case.request)
    assert answer.status == 200
    [seen] = gw.upstream.complete
    assert seen.body_sha256 == hashlib.sha256(case.body).hexdigest()
    gw.assert_no_tracebacks()


# ---------------------------------------------------------------- size limits


def target_request(length: int) -> bytes:
    target = b"/" + b"t" * (length - 1)
    return b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n"


def field_request(length: int) -> bytes:
    name = b"X-Big"
    return (
        b"GET /f HTTP/1.1\r\nHost: gw\r\n"
        + name
        + b": "
        + b"v" * (length - len(name))
        + b"\r\n\r\n"
    )


def headers_request(count: int) -> bytes:
    extra = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(count - 1))  # plus Host
    return b"GET /h HTTP/1.1\r\nHost: gw\r\n" + extra + b"\r\n"


class Edge(NamedTuple):
    request: bytes
    status: int
    reason: str | None = None


EDGES = {
    "target-at-limit": Edge(target_request(MAX_LINE), 200),
    "target-one-past": Edge(target_request(MAX_LINE + 1), 414, "Request target too long"),
    "header-line-at-limit": Edge(field_request(MAX_FIELD), 200),
    "header-line-one-past": Edge(field_request(MAX_FIELD + 1), 431, "Request header too large"),
    "headers-at-limit": Edge(headers_request(MAX_HEADERS), 200),
    "headers-one-past": Edge(headers_request(MAX_HEADERS + 1), 431, "Too many request headers"),
}


class CountingReads:
    """Counts data_received calls of the client connections it wraps (proves 1-byte reads).

    It wraps the protocols rather than patching them: the data plane may run compiled, and a
    compiled class's methods cannot be replaced on an instance.
    """

    def __init__(self) -> None:
        self.reads = 0

    def wrap(self, factory: Callable[[], ClientConnection]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory whose protocols count their reads, then pass everything on."""
        return lambda: _CountedConnection(factory(), self)


class _CountedConnection(asyncio.Protocol):
    """A client connection seen through a counter of its reads."""

    def __init__(self, inner: ClientConnection, counter: CountingReads) -> None:
        self._inner = inner
        self._counter = counter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._counter.reads += 1
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def x_headers(head_lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The X- header fields of head lines, as (name, value), forwarding ones left out."""
    pairs = [tuple(line.split(b": ", 1)) for line in head_lines if line]
    return [(n, v) for n, v in pairs if n.startswith(b"X-") and not n.startswith(b"X-Forwarded-")]


@pytest.mark.parametrize("delivery", ["whole", "bytewise"])
@pytest.mark.parametrize("edge", EDGES.values(), ids=EDGES.keys())
async def test_head_size_limits_at_the_edge(
    start_gateway: StartGateway, connect: Connect, edge: Edge, delivery: str
) -> None:
    counter = CountingReads()
    gateway = await start_gateway(wrap=counter.wrap)
    client = await connect(gateway)
    if delivery == "whole":
        await client.send(edge.request)
        answer = await client.read_answer()
    else:
        reading = asyncio.ensure_future(client.read_answer())
        try:
            sent = await client.send_bytewise(edge.request, reading.done)
            answer = await asyncio.wait_for(reading, WAIT)
        finally:
            reading.cancel()
        # Delivered byte by byte: the limits hold across llhttp callbacks, not per read.
        assert counter.reads >= 0.9 * sent
    upstream = gateway.upstream
    assert answer.status == edge.status
    if edge.status == 200:
        [seen] = upstream.complete
        request_line, _, *fields = edge.request.split(b"\r\n")
        assert seen.raw_path.encode() == request_line.split(b" ")[1]
        got = [(n.encode(), v.encode()) for n, v in seen.headers.items()]
        assert x_headers([b"%s: %s" % pair for pair in got]) == x_headers(fields)
    else:
        assert answer.envelope() == edge.reason
        assert answer.fields["Connection"] == "close"
        assert await client.closed()
        await upstream.settled()
        assert upstream.started == []
    gateway.assert_no_tracebacks()


async def test_a_request_target_that_never_ends_is_refused_once_past_the_limit(
    gw: Gateway, connect: Connect
) -> None:
    client = await connect(gw)
    await client.send(b"GET /" + b"t" * 64 * 1024)  # no end of line: the 414 cannot wait
    answer = await client.read_answer()
    assert (answer.status, answer.envelope()) == (414, "Request target too long")
    assert await client.closed()


GROWING_LINES = {
    "later-header": pytest.param(b"GET / HTTP/1.1\r\nHost: gw\r\nX-Big: ", id="later-header"),
    "first-header": pytest.param(
        b"GET / HTTP/1.1\r\nX-Big: ",
        id="first-header",
    ),
}


@pytest.mark.parametrize("start", GROWING_LINES.values())
async def test_a_header_line_that_never_ends_is_refused_once_past_the_limit(
    gw: Gateway, connect: Connect, start: bytes
) -> None:
    # httptools hands a header over only once its line is complete: the gateway must count
    # the bytes of a line still arriving, across reads, or buffer it until the head deadline.
    client = await connect(gw)
    await client.send(start)
    # 1 KiB past the limit in 1 KiB writes, then nothing more (no end of line): the answer
    # must come now. (Sending on after the gateway closed would only draw a reset.)
    for _ in range(MAX_FIELD // 1024 + 2):
        await client.send(b"v" * 1024)
        await asyncio.sleep(0)
    try:
        # The head deadline is 10 s away; a refusal past the limit comes at once.
        async with asyncio.timeout(3.0):
            answer: Answer | None = await client.read_answer()
    except TimeoutError:
        answer = None
    assert answer is not None, "no answer while the header line kept growing"
    assert (answer.status, answer.envelope()) == (431, "Request header too large")
    assert await client.closed()


# ---------------------------------------------------------------- body limits


async def test_content_length_body_at_the_limit_is_forwarded_byte_identical(
    gw: Gateway, connect: Connect
) -> None:
    body = os.urandom(LIMIT)
    answer = await exchange(
        connect, gw, POST + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % LIMIT + body
    )
    assert answer.status == 200
    [seen] = gw.upstream.complete
    assert (seen.body_size, seen.body_sha256) == (LIMIT, hashlib.sha256(body).hexdigest())
    assert seen.headers["Content-Length"] == str(LIMIT)
    gw.assert_no_tracebacks()


async def test_content_length_one_byte_past_the_limit_is_413_before_the_upstream_sees_it(
    gw: Gateway, connect: Connect
) -> None:
    client = await connect(gw)
    await client.send(POST + b"Content-Length: %d\r\n\r\n" % (LIMIT + 1) + b"b" * (LIMIT + 1))
    answer = await client.read_answer()
    assert (answer.status, answer.envelope()) == (413, "Request body too large")
    assert answer.fields["Connection"] == "close"
    assert await client.closed()
    assert gw.upstream.started == []
    gw.assert_no_tracebacks()


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("buffering", [True, False], ids=["buffered", "streamed"])
async def test_chunked_body_at_the_limit_is_forwarded_byte_identical(
    start_gateway: StartGateway, connect: Connect, buffering: bool
) -> None:
    gw = await start_gateway(request_buffering=buffering)
    parts = [os.urandom(n) for n in (1, LIMIT // 2, LIMIT // 2 - 2, 1)]
    assert sum(map(len, parts)) == LIMIT
    answer = await exchange(connect, gw, CHUNKED + chunked(parts))
    assert answer.status == 200
    [seen] = gw.upstream.complete
    assert (seen.body_size, seen.body_sha256) == (
        LIMIT,
        hashlib.sha256(b"".join(parts)).hexdigest(),
    )
    if buffering:  # read whole first, then sent with its length
        assert seen.headers["Content-Length"] == str(LIMIT)
        assert "Transfer-Encoding" not in seen.headers
    else:
        assert seen.headers["Transfer-Encoding"] == "chunked"
    gw.assert_no_tracebacks()


@pytest.mark.parametrize("buffering", [True, False], ids=["buffered", "streamed"])
async def test_chunked_body_one_byte_past_the_limit_never_reaches_the_upstream_whole(
    start_gateway: StartGateway, connect: Connect, buffering: bool
) -> None:
    gw = await start_gateway(request_buffering=buffering)
    client = await connect(gw)
    await client.send(CHUNKED + b"%x\r\n" % LIMIT + b"c" * LIMIT + b"\r\n")
    if not buffering:
        # The upstream is receiving the request when the byte past the limit arrives.
        await until(lambda: gw.upstream.started, "the upstream to receive the request")
    await client.send(b"1\r\nc\r\n0\r\n\r\n")
    answer = await client.read_answer()
    assert (answer.status, answer.envelope()) == (413, "Request body too large")
    assert await client.closed()
    await gw.upstream.settled()
    assert gw.upstream.complete == []
    if buffering:
        assert gw.upstream.started == []  # nothing of it ever left the gateway
    else:
        [broken] = gw.upstream.broken
        assert broken.body_size <= LIMIT
    gw.assert_no_tracebacks()


@cache
def gzip_bomb(layers: int) -> bytes:
    """256 MiB of zeros gzipped `layers` times: 255 KiB for one layer, 590 bytes for two."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MiB)
    data = b"".join(packer.compress(zeros) for _ in range(256)) + packer.flush()
    for _ in range(layers - 1):
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        data = packer.compress(data) + packer.flush()
    return data


def memory_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        status = f.read()
    match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.parametrize("layers", [1, 2], ids=["gzip", "gzip-gzip"])
async def test_gzip_bomb_request_body_is_forwarded_compressed_without_memory_growth(
    gw: Gateway, connect: Connect, layers: int
) -> None:
    bomb = gzip_bomb(layers)
    assert len(bomb) < LIMIT
    coding = b", ".join([b"gzip"] * layers)
    request = (
        b"POST /bomb HTTP/1.1\r\nHost: gw\r\nContent-Encoding: %s\r\nContent-Type: "
        b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (coding, len(bomb))
        + bomb
    )
    # A first round trip warms up buffers and lazy imports; the second is measured.
    assert (await exchange(connect, gw, request)).status == 200
    peak_known = reset_peak_rss()
    before = memory_kib("VmRSS")
    answer = await exchange(connect, gw, request)
    after = memory_kib("VmRSS")
    assert answer.status == 200
    seen = gw.upstream.complete[-1]
    assert seen.body_sha256 == hashlib.sha256(bomb).hexdigest()
    assert seen.body_size == len(bomb)
    assert seen.headers["Content-Encoding"] == coding.decode()
    # Inflating the 256 MiB anywhere in this process (gateway or upstream) would show here.
    assert after - before < 20 * 1024, f"RSS grew by {(after - before) // 1024} MiB"
    if peak_known:
        assert memory_kib("VmHWM") - before < 20 * 1024
    gw.assert_no_tracebacks()


# ---------------------------------------------------------------- paths and targets


HOSTILE_PATHS = {
    "dot-segments": "/a/../../b/./c/..",
    "encoded-dot-segments": "/%2e%2e/%2E%2E/admin",
    "encoded-slashes": "/a%2Fb%2f..%2fc",
    "semicolon-params": "/a;jsessionid=1/b;x=y?c=d;e",
    "percent-nul": "/a%00b?x=%00",
    "double-encoding": "/%252e%252e/%25252F",
    "encoded-non-ascii": "/caf%C3%A9/%E2%80%A8/%ff%fe",
    "encoded-controls": "/%0d%0aSet-Cookie:%20x=1/%1b[31m",
    "double-slash-host": "//evil.example/x",
    "backslashes": "/a\\..\\b",
    "quotes-and-brackets": "/a\"b'c[d]{e}|f^g`h<i>",
    "fragment": "/a#frag?not=query",
    "empty-query": "/x?",
    "very-long-query": "/q?" + "&".join(f"k{i}=%25v{i}" for i in range(500)),
}


@pytest.mark.parametrize("path", HOSTILE_PATHS.values(), ids=HOSTILE_PATHS.keys())
async def test_hostile_raw_path_reaches_the_upstream_byte_identical(
    gw: Gateway, connect: Connect, path: str
) -> None:
    assert len(path) < MAX_LINE
    answer = await exchange(
        connect, gw, f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.status == 200
    assert [seen.raw_path for seen in gw.upstream.complete] == [path]
    gw.assert_no_tracebacks()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A connection's whole life at a trap: closed at once (RawUpstream closes it)."""


async def test_absolute_form_and_connect_never_contact_anything(
    gw: Gateway, connect: Connect, make_raw_upstream: MakeRawUpstream
) -> None:
    trap = await make_raw_upstream(serve=hang_up)  # a listener nobody should ever connect to
    port = trap.port
    for target in (
        b"http://evil.example/",
        b"http://127.0.0.1:%d/x" % port,
        b"HTTP://127.0.0.1:%d/x" % port,
        b"https://127.0.0.1:%d/" % port,
    ):
        answer = await exchange(
            connect, gw, b"GET " + target + b" HTTP/1.1\r\nHost: evil.example\r\n\r\n"
        )
        assert (answer.status, answer.envelope()) == (400, "Invalid request target")
        assert answer.fields["Connection"] == "close"
    connect_ = await exchange(
        connect,
        gw,
        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port),
    )
    assert (connect_.status, connect_.envelope()) == (405, "Method not allowed")
    assert "CONNECT" not in connect_.fields["Allow"]
    # Watching for a connection that must never come: a quiet period, not a wait for a state
    # (an attempt made while the answers were decided would have landed by now).
    await asyncio.sleep(0.1)
    assert trap.connections == 0
    assert gw.upstream.started == []
    gw.assert_no_tracebacks()


# ---------------------------------------------------------------- key isolation


LOOKALIKE_IDS = ["a", "a:", "a:b", "{a}", "a}", "*", "a*", "{a}:b", "{a", "a:*", "dev:a"]


async def test_lookalike_device_ids_are_distinct_devices(gw: Gateway, connect: Connect) -> None:
    async def status_of(device_id: str) -> int:
        answer = await exchange(
            connect,
            gw,
            f"GET /k HTTP/1.1\r\nHost: gw\r\nX-Device-Id: {device_id}\r\n\r\n".encode(),
        )
        return answer.status

    assert [await status_of(i) for i in LOOKALIKE_IDS] == [200] * len(LOOKALIKE_IDS)
    await gw.store.block("{a}")
    after = {i: await status_of(i) for i in LOOKALIKE_IDS}
    assert after == {i: 403 if i == "{a}" else 200 for i in LOOKALIKE_IDS}
    for device_id in LOOKALIKE_IDS:
        device = await gw.store.get_device(device_id)
        assert device is not None
        assert (device.request_count, device.blocked) == (2, device_id == "{a}"), device_id
    blocked = await gw.store.list_devices(blocked="only")
    assert [d.id for d in blocked[0]] == ["{a}"]
    assert len(gw.upstream.complete) == 2 * len(LOOKALIKE_IDS) - 1
    gw.assert_no_tracebacks()


async def test_blocked_lookalike_answer_is_the_blocked_envelope(
    gw: Gateway, connect: Connect
) -> None:
    await gw.store.block("a:")
    answer = await exchange(connect, gw, b"GET / HTTP/1.1\r\nHost: gw\r\nX-Device-Id: a:\r\n\r\n")
    assert (answer.status, answer.envelope()) == BLOCKED
    assert gw.upstream.started == []


# ---------------------------------------------------------------- answers stay in order


async def test_a_pipelined_request_that_breaks_is_answered_after_those_before_it(
    gw: Gateway, connect: Connect
) -> None:
    # One write: the first request is still being decided when the second one's body
    # breaks. Its 400 must come after the first answer, never inside it.
    client = await connect(gw)
    await client.send(
        b"GET /first HTTP/1.1\r\nHost: gw\r\n\r\n"
        + CHUNKED.replace(b"/smuggle", b"/second")
        + b"zz\r\nnot a chunk\r\n"
    )
    first = await client.read_answer()
    assert first.status == 200
    second = await client.read_answer()
    assert (second.status, second.envelope()) == (400, LLHTTP + "Invalid character in chunk size")
    assert await client.closed()
    assert gw.upstream.started == ["/first"]
    gw.assert_no_tracebacks()


# ---------------------------------------------------------------- what the upstream may trust

VOUCHED_SPOOFS: Final = {
    "Connection names the id header": b"Connection: X-Device-Id\r\nX_Device_Id: blk-1\r\n",
    "Connection names it in another case, among others": (
        b"Connection: keep-alive, x-DEVICE-id, X-App-Name\r\nX-Device_Id: blk-1\r\n"
    ),
    "an underscore lookalike alone": b"X_DEVICE_ID: blk-1\r\n",
}


@pytest.mark.parametrize("spoof", VOUCHED_SPOOFS.values(), ids=VOUCHED_SPOOFS.keys())
async def test_the_upstream_receives_the_device_headers_the_gateway_enforced(
    gw: Gateway, connect: Connect, spoof: bytes
) -> None:
    await gw.store.block("blk-1")
    request = (
        b"GET /who HTTP/1.1\r\nHost: gw\r\nX-Device-Id: dev-ok\r\nX-App-Name: Shop\r\n"
        + spoof
        + b"\r\n"
    )
    answer = await exchange(connect, gw, request)
    assert answer.status == 200
    (seen,) = gw.upstream.complete
    names = [name.lower().replace("_", "-") for name in seen.headers]
    # Exactly one field that any server could read as the device id: the one enforced.
    assert names.count("x-device-id") == 1
    assert seen.headers.getall("X-Device-Id") == ["dev-ok"]
    assert seen.headers.getall("X-App-Name") == ["Shop"]
    gw.assert_no_tracebacks()


async def test_a_comma_list_in_the_id_header_is_refused(gw: Gateway, connect: Connect) -> None:
    await gw.store.block("blk-1")
    answer = await exchange(
        connect, gw, b"GET / HTTP/1.1\r\nHost: gw\r\nX-Device-Id: blk-1,dev-ok\r\n\r\n"
    )
    assert (answer.status, answer.envelope()) == (
        400,
        "Invalid X-Device-Id header: must not contain commas",
    )
    assert gw.upstream.started == []


async def test_a_client_cannot_tell_the_upstream_its_address(gw: Gateway, connect: Connect) -> None:
    # No trusted proxies in this gateway's config: what the client says of earlier hops goes.
    answer = await exchange(
        connect,
        gw,
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Device-Id: dev-ok\r\n"
        b"X-Forwarded-For: 10.9.9.9\r\nX-Real-IP: 10.9.9.9\r\nForwarded: for=10.9.9.9\r\n"
        b"X-Forwarded-Proto: https\r\nX_Forwarded_For: 10.9.9.9\r\n\r\n",
    )
    assert answer.status == 200
    (seen,) = gw.upstream.complete
    assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.headers.getall("X-Forwarded-Proto") == ["http"]
    for gone in ("X-Real-IP", "Forwarded", "X_Forwarded_For"):
        assert gone not in seen.headers
    gw.assert_no_tracebacks()


# ---------------------------------------------------------------- log injection


class JsonLines(logging.Handler):
    """Renders every record with the gateway's JsonFormatter, as production writes it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def access_log() -> Iterator[JsonLines]:
    handler = JsonLines()
    logger = logging.getLogger(ACCESS_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


QUOTES_ID = '"\\' * 20 + '\\"\\n"}{'  # visible ASCII: a valid id, full of JSON specials
LINE_BREAKERS = re.compile("[\x00-\x1f\x7f\u0085\u2028\u2029]")


async def test_hostile_header_values_still_give_one_json_access_line_per_request(
    gw: Gateway, connect: Connect, access_log: JsonLines
) -> None:
    u2028 = "\u2028".encode()
    csi = "\u009b".encode()  # the 8-bit ANSI escape (CSI): UTF-8 bytes llhttp lets through
    requests: list[tuple[bytes, int, str | None]] = [
        # (header lines, status, device id in the log line)
        (b"X-Device-Id: " + QUOTES_ID.encode(), 200, QUOTES_ID),
        (b"X-Device-Id: d1\r\nX-Note: a" + u2028 + b"b", 200, "d1"),
        (b"X-Device-Id: d1\r\nX-Note: " + csi + b"31mred" + csi + b"0m", 200, "d1"),
        (b"X-Device-Id: d1\r\nX-App-Name: evil" + u2028 + b"app", 400, None),
        (b"X-Device-Id: d1\r\nX-App-Name: " + csi + b"2J", 400, None),
        (b"X-Device-Id: d" + u2028 + b"1", 400, None),
        (b"X-Device-Id: " + b'"' * 129, 400, None),
    ]
    path = "/log/%1b[31m%0d%0a%e2%80%a8?q=\"\\'"
    for headers, status, _ in requests:
        request = f"GET {path} HTTP/1.1\r\nHost: gw\r\n".encode() + headers + b"\r\n\r\n"
        answer = await exchange(connect, gw, request)
        assert answer.status == status
        if status != 200:
            answer.envelope()
    # A raw ESC (C0) is refused by llhttp before any exchange: no access line for it.
    refused = await exchange(
        connect, gw, b"GET / HTTP/1.1\r\nHost: gw\r\nX-Device-Id: d1\r\nX-Note: \x1b[2J\r\n\r\n"
    )
    assert refused.status == 400

    lines = access_log.lines
    assert len(lines) == len(requests)
    for line in lines:
        assert len(line.splitlines()) == 1, line
        assert LINE_BREAKERS.search(line) is None, line
    entries = [orjson.loads(line) for line in lines]
    assert [(e["device_id"], e["status"], e["path"]) for e in entries] == [
        (device_id, status, path) for _, status, device_id in requests
    ]
    gw.assert_no_tracebacks()
