"""Upstream faults injected for real (the reliability issue, section "Upstream faults").

The whole gateway runs (the real Enforcer over a real redis-server, so every answer also
shows that enforcement ran) in front of upstreams that misbehave: a `FaultProxy` between the
gateway and a `CountingUpstream` (black hole, reset, cut mid-body), `CountingUpstream`'s own
behaviours (slow, streamed, reset mid-body), `RawUpstream` writing broken answers byte for
byte (or as a script says, per request of a connection), a listener that never accepts, and
a `CountingUpstream` that closes idle connections after one second. Each test shows one
promise of the README's "Failure behaviour" table and checks that the gateway logged no
traceback.

`tests/test_proxy_integration.py` shows several of these against a stub enforcer with
handlers written for one test each (refused, slow, connect timeout, mid-stream breaks, the
pool limit, gzip, a redirect); here the same promises are held by the fault tools, with the
next request through the same gateway checked after every fault.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar, Final, Literal

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Settings
from tests.rig.client import RawClient, head_fields
from tests.rig.faults import FaultProxy
from tests.rig.gateway import (
    Answer,
    Gateway,
    StartGateway,
    assert_envelope,
    assert_no_traceback,
    figure,
    make_settings,
    send,
)
from tests.rig.raw_upstream import MALFORMED, MakeRawUpstream, RawUpstream, Script
from tests.rig.redis_server import RedisServer
from tests.rig.system import free_port
from tests.rig.upstream import (
    MARK,
    Behaviour,
    CountingUpstream,
    MakeUpstream,
    Reply,
    ResetMidBody,
    Seen,
    Slow,
    Stream,
)
from tests.rig.waits import bounded, until

pytestmark = pytest.mark.integration

WAIT: Final = 10.0  # bounds every wait for an answer or a connection's end
# Added to a deadline before a test calls it missed: scheduling on a busy 2-core CI machine.
MARGIN: Final = 1.5
UNREACHABLE: Final = {"status": False, "result": "Upstream unreachable"}
TIMED_OUT: Final = {"status": False, "result": "Upstream timed out"}
BAD_RESPONSE: Final = {"status": False, "result": "Invalid upstream response"}
BUSY: Final = {"status": False, "result": "Upstream connection limit reached"}
# What the gateway adds to a proxied answer's head: the rate-limit state, and its own
# Connection header.
GATEWAY_OWN: Final = frozenset(
    {"ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining",
     "x-ratelimit-reset", "connection"}
)  # fmt: skip

Proxies = Callable[[int], Awaitable[FaultProxy]]


# ---------------------------------------------------------------- helpers


def settings_for(
    upstream: CountingUpstream, store_url: str, origin: str | None = None, **keys: float
) -> Settings:
    """`make_settings` with these `upstream.*` keys, in front of `origin` when given (a fault
    proxy, a raw upstream, a dead port) instead of the CountingUpstream."""
    if "timeout" in keys:  # the config refuses a connect timeout (2 s) over the timeout
        keys.setdefault("connect_timeout", min(2.0, keys["timeout"]))
    pairs = ", ".join(f"{name}: {value}" for name, value in keys.items())
    settings = make_settings(upstream, store_url, extra=f"upstream: {{{pairs}}}\n" if pairs else "")
    if origin is None:
        return settings
    return replace(settings, upstream=replace(settings.upstream, url=origin))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def proxy_url(proxy: FaultProxy) -> str:
    return f"http://{proxy.url_host}"


def raw_request(
    method: str, path: str, device: str, body: bytes = b"", *, close: bool, extra: str = ""
) -> bytes:
    """One HTTP/1.1 request with the device's id (and `extra` header lines), as bytes."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", f"X-Device-Id: {device}"]
    if extra:
        lines.append(extra)
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(frozen=True)
class Ended:
    """Everything one request on a new connection got before the gateway ended it."""

    data: bytes

    @property
    def head(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[0]

    @property
    def status(self) -> int | None:
        """The status of the (first) head, None when no whole head arrived."""
        if b"\r\n\r\n" not in self.data:
            return None
        return int(self.head.split(b" ", 2)[1])

    @property
    def fields(self) -> CIMultiDict[str]:
        return head_fields(self.head)

    @property
    def body(self) -> bytes:
        """Every byte after the first head (its framing still on)."""
        return self.data.partition(b"\r\n\r\n")[2]

    def complete_looking(self) -> bool:
        """Whether a client could take the body for a whole one."""
        fields = self.fields
        if "Content-Length" in fields:
            return len(self.body) >= int(fields["Content-Length"])
        return chunked_complete(self.body)


def chunked_complete(body: bytes) -> bool:
    """Whether `body` holds a whole chunked encoding, through its last chunk."""
    rest = body
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return False
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            return False
        if size == 0:
            return rest.startswith(b"\r\n")
        if len(rest) < size + 2 or rest[size : size + 2] != b"\r\n":
            return False
        rest = rest[size + 2 :]


async def until_ended(gw: Gateway, request: bytes) -> Ended:
    """Send `request` on a new connection and read until the gateway ends it (FIN or RST)."""
    client = await RawClient.connect(port_of(gw.url), timeout=WAIT)
    try:
        client.write(request)
        return Ended(await client.read_to_end())  # an abort is as final as a FIN here
    finally:
        client.abort()


async def post(http: aiohttp.ClientSession, base: str, path: str, body: bytes) -> Answer:
    """POST `body` to `path` with a device id; the answer is read whole."""
    started = time.monotonic()
    device = "poster"
    async with http.post(f"{base}{path}", data=body, headers={"X-Device-Id": device}) as r:
        data = await r.read()
    took = time.monotonic() - started
    return Answer(r.status, r.headers, data, path, device, started, took)


async def served_after(
    http: aiohttp.ClientSession, gw: Gateway, upstream: CountingUpstream
) -> None:
    """The next request through `gw`, a POST (never retried by the gateway, so a broken
    connection given back to its pool would fail it), is answered 200 by the upstream,
    whole, and reached it once."""
    body = b"after the fault " + str(time.monotonic_ns()).encode()
    answer = await post(http, gw.url, "/after", body)
    assert answer.status == 200 and answer.from_upstream and answer.enforced, answer
    report = answer.json()
    assert report["sha256"] == hashlib.sha256(body).hexdigest(), report
    assert [s.body_sha256 for s in upstream.seen if s.raw_path == "/after"] == [report["sha256"]]


def assert_gateway_answer(answer: Answer, expected: Mapping[str, object]) -> None:
    """An envelope of the gateway's own, after the Enforcer allowed the request."""
    assert_envelope(answer)
    assert not answer.from_upstream, answer
    assert answer.json() == expected, answer
    # The verdict's rate-limit state rides on the gateway's own answer: Redis was asked.
    assert answer.enforced, answer


# ---------------------------------------------------------------- refused, reset, silent


@pytest.mark.timing
@pytest.mark.parametrize("fault", ["refused", "reset_at_accept"])
async def test_an_upstream_refusing_or_resetting_before_the_answer_is_a_fast_502_envelope(
    fault: Literal["refused", "reset_at_accept"],
    upstream: CountingUpstream,
    real_redis: RedisServer,
    proxies: Proxies,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    proxy = await proxies(port_of(upstream.url))
    if fault == "refused":
        origin = f"http://127.0.0.1:{free_port()}"
    else:
        proxy.reset()
        origin = proxy_url(proxy)
    gw = await start_gateway(settings_for(upstream, real_redis.url, origin))
    answers = [await send(http, gw.url, "d-refused") for _ in range(3)]
    for answer in answers:
        assert answer.status == 502
        assert_gateway_answer(answer, UNREACHABLE)
        assert answer.took < 1.0  # a refusal costs no timeout
    figure(f"{fault} 502 slowest s", max(a.took for a in answers))
    assert upstream.count() == 0
    if fault == "reset_at_accept":
        proxy.pass_through()  # the upstream is back: nothing of the fault is left behind
        answer = await send(http, gw.url, "d-refused")
        assert answer.status == 200 and answer.from_upstream
    assert_no_traceback(gateway_log)


@pytest.mark.timing
async def test_a_black_holed_upstream_is_a_504_envelope_at_the_timeout(
    upstream: CountingUpstream,
    real_redis: RedisServer,
    proxies: Proxies,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    timeout = 0.5
    proxy = await proxies(port_of(upstream.url))
    proxy.black_hole()
    settings = settings_for(upstream, real_redis.url, proxy_url(proxy), timeout=timeout)
    gw = await start_gateway(settings)
    answers = await asyncio.gather(*(send(http, gw.url, f"d-hole-{i}") for i in range(3)))
    for answer in answers:
        assert answer.status == 504
        assert_gateway_answer(answer, TIMED_OUT)
        assert timeout <= answer.took < timeout + MARGIN, answer.took
    figure("black hole 504 fastest s", min(a.took for a in answers))
    figure("black hole 504 slowest s", max(a.took for a in answers))
    assert upstream.count() == 0
    # The timed-out connections were dropped, not pooled: after the partition heals, the
    # next request opens a new one and is answered.
    await until(lambda: proxy.open_connections == 0, "the gateway to drop the silent connections")
    proxy.pass_through()
    answer = await send(http, gw.url, "d-hole-0")
    assert answer.status == 200 and answer.from_upstream
    assert proxy.accepted == 4
    assert_no_traceback(gateway_log)


@pytest.mark.timing
async def test_a_connect_timeout_is_a_502_envelope_at_the_connect_timeout(
    unaccepting_listener: str,
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    connect_timeout = 0.3
    settings = settings_for(
        upstream, real_redis.url, unaccepting_listener, connect_timeout=connect_timeout, timeout=5
    )
    gw = await start_gateway(settings)
    answer = await send(http, gw.url, "d-connect")
    assert answer.status == 502
    assert_gateway_answer(answer, UNREACHABLE)
    # The connect timeout ended it, not upstream.timeout (5 s).
    assert connect_timeout <= answer.took < connect_timeout + MARGIN, answer.took
    figure("connect timeout 502 s", answer.took)
    assert gw.plane.pool.open_connections == 0  # the failed connect left no slot taken
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- broken mid-answer

BODY: Final = 64 * 1024
CHUNKS: Final = (b"a" * 8192,) * (BODY // 8192)


@dataclass(frozen=True)
class MidBody:
    """An upstream answer that breaks after its head: how, and through what."""

    behaviour: Behaviour
    cut_after: int | None  # FaultProxy.cut_after(n) between gateway and upstream; None: direct


MID_BODY: Final = {
    # An RST from the upstream itself after 1 KiB of a declared 1 MiB.
    "reset_mid_content_length": MidBody(ResetMidBody(sent=b"x" * 1024, declared=1 << 20), None),
    # A clean FIN after 20,000 bytes (head included) of a 64 KiB answer.
    "cut_mid_content_length": MidBody(Stream(CHUNKS, declare_length=True), 20_000),
    "cut_mid_chunked": MidBody(Stream(CHUNKS), 20_000),
}


@pytest.mark.parametrize("name", MID_BODY)
async def test_an_upstream_breaking_mid_body_cuts_the_client_and_its_connection_is_not_reused(
    name: str,
    upstream: CountingUpstream,
    real_redis: RedisServer,
    proxies: Proxies,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    case = MID_BODY[name]
    upstream.behave(case.behaviour, path="/broken")
    proxy: FaultProxy | None = None
    origin = None
    if case.cut_after is not None:
        proxy = await proxies(port_of(upstream.url))
        proxy.cut_after(case.cut_after)
        origin = proxy_url(proxy)
    gw = await start_gateway(settings_for(upstream, real_redis.url, origin))

    ended = await until_ended(gw, raw_request("GET", "/broken", "d-broken", close=False))
    # The status line was already out: the only honest signal left is the cut.
    assert ended.status == 200, ended.data[:300]
    assert MARK in ended.fields
    assert not ended.complete_looking(), (ended.fields, len(ended.body))
    assert b"HTTP/1.1 5" not in ended.body  # no answer of the gateway's own after the 200
    figure(f"{name} body bytes before the cut", len(ended.body))
    assert upstream.count(path="/broken") == 1

    if proxy is not None:
        accepted = proxy.accepted
        proxy.pass_through()
    await served_after(http, gw, upstream)
    if proxy is not None:
        assert proxy.accepted == accepted + 1  # a new upstream connection, not the cut one
    assert_no_traceback(gateway_log)


@pytest.mark.timing
async def test_a_stream_silent_past_the_timeout_is_cut_never_turned_into_a_504(
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    timeout = 0.5
    # The second event would come three timeouts after the first.
    upstream.behave(Stream((b"data: first\n\n", b"data: second\n\n"), delay=3 * timeout),
                    path="/events")  # fmt: skip
    gw = await start_gateway(settings_for(upstream, real_redis.url, timeout=timeout))
    client = await RawClient.connect(port_of(gw.url), timeout=WAIT)
    try:
        sent_at = time.monotonic()
        client.write(raw_request("GET", "/events", "d-events", close=False))
        head = await client.read_until(b"\r\n\r\n")
        first = await client.read_until(b"data: first\n\n\r\n")
        first_at = time.monotonic()
        try:
            rest = await client.read_to_eof()
        except ConnectionResetError:
            rest = b""
        cut_at = time.monotonic()
    finally:
        client.abort()
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert head_fields(head[:-4])["Transfer-Encoding"] == "chunked"
    body = first + rest
    assert not chunked_complete(body), body
    assert b"second" not in body
    assert b"HTTP/1.1" not in body and b"Upstream timed out" not in body  # no 504 after a 200
    # Cut by the silence deadline: not before the timeout had passed since the request
    # (the client may read the first event late on a busy machine, so not measured from it).
    assert cut_at - sent_at >= timeout, cut_at - sent_at
    assert cut_at - first_at < timeout + MARGIN, cut_at - first_at
    figure("mid-stream silence cut after the first event s", cut_at - first_at)
    answer = await send(http, gw.url, "d-events")
    assert answer.status == 200 and answer.from_upstream
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- malformed answers

_LINE_NAME: Final = b"X-Big"


def answer_with_line(length: int) -> bytes:
    """An answer with one header line whose name + value is `length` bytes (limit 8190)."""
    value = b"a" * (length - len(_LINE_NAME))
    return b"HTTP/1.1 200 OK\r\n" + _LINE_NAME + b": " + value + b"\r\nContent-Length: 2\r\n\r\nok"


def answer_with_headers(count: int) -> bytes:
    """An answer with `count` header lines, Content-Length included (limit 128)."""
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(count - 1))
    return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 2\r\n\r\nok"


MALFORMED_ANSWERS: Final = {
    **MALFORMED,
    # One header line just past the limit (name + value over 8190 bytes, as for requests).
    "header_line_over_8190": answer_with_line(8191),
    "129_headers": answer_with_headers(129),
    "chunk_size_overflow": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffff\r\nok\r\n0\r\n\r\n"
    ),
    "bad_chunk_size_after_a_good_chunk": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n-1\r\nx\r\n0\r\n\r\n"
    ),
}  # fmt: skip

# What the client gets: a 502 envelope when the head is refused, a cut when the body breaks
# after a 200 head went out.
Outcome = Literal["502", "cut"]
MALFORMED_OUTCOME: Final[Mapping[str, Outcome]] = {
    "bad_status_line": "502",
    "nul_in_header": "502",
    "content_length_and_chunked": "502",
    "negative_content_length": "502",
    "oversized_headers": "502",
    "bad_chunk_size": "cut",
    "header_line_over_8190": "502",
    "129_headers": "502",
    "chunk_size_overflow": "cut",
    "bad_chunk_size_after_a_good_chunk": "cut",
}


@pytest.mark.parametrize("name", MALFORMED_ANSWERS)
async def test_a_malformed_answer_is_a_502_or_a_cut_and_the_next_request_is_served(
    name: str,
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    raw = RawUpstream(close=False)  # keeps its side open: the gateway must drop it
    raw.answer_with(MALFORMED_ANSWERS[name], path="/bad")
    await raw.start()
    try:
        gw = await start_gateway(settings_for(upstream, real_redis.url, raw.url))
        ended = await until_ended(gw, raw_request("GET", "/bad", "d-bad", close=True))
        if MALFORMED_OUTCOME[name] == "502":
            assert ended.status == 502, ended.data[:300]
            assert orjson.loads(ended.body) == BAD_RESPONSE
            assert "RateLimit" in ended.fields
        else:
            assert ended.status in (None, 200), ended.data[:300]
            assert not ended.complete_looking(), ended.data[:300]
            assert b"HTTP/1.1 5" not in ended.body  # no answer of the gateway's own after a 200
        # The next request, on the same gateway and upstream, is answered whole.
        ended = await until_ended(gw, raw_request("POST", "/good", "d-bad", b"next", close=True))
        assert ended.status == 200 and ended.body == b"ok", ended.data[:300]
        assert [(s.method, s.raw_path) for s in raw.seen] == [("GET", "/bad"), ("POST", "/good")]
    finally:
        await asyncio.wait_for(raw.close(), WAIT)
    assert_no_traceback(gateway_log)


AT_THE_LIMITS: Final = {
    "header_line_of_8190": answer_with_line(8190),
    "128_headers": answer_with_headers(128),
}


@pytest.mark.parametrize("name", AT_THE_LIMITS)
async def test_an_answer_head_at_the_limits_is_forwarded(
    name: str,
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    """The control for the two limit cases above: one byte or one header less passes."""
    raw = RawUpstream(AT_THE_LIMITS[name])
    await raw.start()
    try:
        gw = await start_gateway(settings_for(upstream, real_redis.url, raw.url))
        ended = await until_ended(gw, raw_request("GET", "/", "d-limits", close=True))
    finally:
        await asyncio.wait_for(raw.close(), WAIT)
    assert ended.status == 200 and ended.body == b"ok", ended.data[:300]
    sent = AT_THE_LIMITS[name].partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    forwarded = ended.head.split(b"\r\n")[1:]
    assert [line for line in forwarded if line in sent] == sent  # every line, in order
    assert_no_traceback(gateway_log)


@dataclass
class EndlessHeaderLine:
    """How a RawUpstream answers here: with a header line that goes on, 64 KiB every 10 ms,
    up to 4 MiB, then ends it. Counts the bytes the gateway let it send before cutting it
    off."""

    PIECE: ClassVar[int] = 64 * 1024
    PIECES: ClassVar[int] = 64
    sent: int = 0
    finished: bool = False

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection (RawUpstream's `serve`): a cut by the gateway ends it there."""
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(self.PIECES):
            writer.write(b"a" * self.PIECE)
            await asyncio.wait_for(writer.drain(), WAIT)
            self.sent += self.PIECE
            await asyncio.sleep(0.01)  # the trickle is the scenario: a line still arriving
        self.finished = True
        writer.write(b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # until the gateway closes


async def test_an_upstream_header_line_that_never_ends_is_refused_past_the_limit(
    make_raw_upstream: MakeRawUpstream,
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    endless = EndlessHeaderLine()
    raw = await make_raw_upstream(serve=endless.serve)
    try:
        gw = await start_gateway(settings_for(upstream, real_redis.url, raw.url, timeout=5))
        answer = await send(http, gw.url, "d-endless")
        sent_at_answer, finished_at_answer = endless.sent, endless.finished
    finally:
        await bounded(raw.close(), "closing the endless upstream")
    figure("endless header line bytes sent before the answer", sent_at_answer)
    assert answer.status == 502
    assert_gateway_answer(answer, BAD_RESPONSE)
    # Refused while the line was still going on, after about 8 KiB, not 4 MiB later.
    assert not finished_at_answer
    assert sent_at_answer < 1 << 20
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- the pool


@pytest.mark.timing
async def test_an_exhausted_pool_answers_a_fast_503_and_leaks_no_connection(
    upstream: CountingUpstream,
    real_redis: RedisServer,
    proxies: Proxies,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    pool, timeout, hold = 2, 5.0, 1.5
    upstream.behave(Slow(hold), path="/r/slow")
    proxy = await proxies(port_of(upstream.url))  # the upstream's view of the connections
    # One client address takes the whole pool here (the per-client share is its own test).
    settings = settings_for(
        upstream,
        real_redis.url,
        proxy_url(proxy),
        timeout=timeout,
        max_connections=pool,
        max_connections_per_client=pool,
    )
    gw = await start_gateway(settings)
    slow = [asyncio.create_task(send(http, gw.url, "slow")) for _ in range(pool)]
    try:
        await until(lambda: upstream.in_progress == pool, "the slow requests to hold the pool")
        refused = await asyncio.gather(*(send(http, gw.url, f"d-fast-{i}") for i in range(6)))
        still_held = upstream.in_progress
    finally:
        held = await asyncio.wait_for(asyncio.gather(*slow), WAIT)
    assert still_held == pool  # the 503s came while both connections were busy
    for answer in refused:
        assert answer.status == 503
        assert_gateway_answer(answer, BUSY)
        assert answer.headers["Retry-After"] == "1"
        assert answer.took < 1.0  # not queued behind the slow ones, nowhere near the timeout
    figure("pool exhausted 503 slowest s", max(a.took for a in refused))
    assert [a.status for a in held] == [200] * pool
    assert upstream.count(path="/r/slow") == pool
    assert sum(upstream.count(path=f"/r/d-fast-{i}") for i in range(6)) == 0

    # Nothing leaked: the pool's connections serve the next requests, no more are opened.
    assert gw.plane.pool.open_connections <= pool and proxy.open_connections <= pool
    for i in range(4):
        answer = await send(http, gw.url, f"d-after-{i}")
        assert answer.status == 200 and answer.from_upstream
    assert proxy.accepted == pool
    assert gw.plane.pool.open_connections <= pool and proxy.open_connections <= pool
    figure("pool connections opened in all", proxy.accepted)
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- passed through untouched


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A connection's whole life at a trap: closed at once (RawUpstream closes it)."""


GZ: Final = gzip.compress(orjson.dumps([{"reading": i, "unit": "kPa"} for i in range(500)]))
TRAP_ORIGIN: Final = "{trap}"  # replaced by the trap listener's origin


def upstream_answer(
    status_line: bytes, headers: list[bytes], body: bytes, *, chunked: bool
) -> bytes:
    """Bytes of an upstream answer whose framing header comes last (where the gateway puts
    its own), so its head lines can be compared with the gateway's one for one."""
    if chunked:
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:1000], body[1000:]) if p)
        return b"\r\n".join([status_line, *headers, b"Transfer-Encoding: chunked"]) + (
            b"\r\n\r\n" + framed + b"0\r\n\r\n"
        )
    lines = [status_line, *headers, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


UNTOUCHED: Final = {
    "500": (b"HTTP/1.1 500 Internal Server Error",
            [b"Content-Type: text/html; charset=utf-8", b"X-Request-Id: r-500"],
            b"<html><body>stack trace hidden</body></html>", False),
    "502_of_the_upstreams_own": (b"HTTP/1.1 502 Bad Gateway",
            [b"Content-Type: application/json", b"Cache-Control: no-store"],
            b'{"error": "database proxy down"}', False),
    "503_with_its_retry_after": (b"HTTP/1.1 503 Maintenance Window",
            [b"Retry-After: 120", b"Content-Type: text/plain"], b"back at noon", False),
    "504_chunked": (b"HTTP/1.1 504 Gateway Timeout", [b"Content-Type: text/plain"],
            b"slow backend " * 200, True),
    "301": (b"HTTP/1.1 301 Moved Permanently", [b"Location: {trap}/moved"], b"", False),
    "302_with_a_cookie": (b"HTTP/1.1 302 Found",
            [b"Location: {trap}/login?next=%2Fapi", b"Set-Cookie: s=1; HttpOnly"], b"go", False),
    "303": (b"HTTP/1.1 303 See Other", [b"Location: {trap}/result/7"], b"", False),
    "307": (b"HTTP/1.1 307 Temporary Redirect", [b"Location: {trap}/tmp"], b"again", False),
    "308": (b"HTTP/1.1 308 Permanent Redirect", [b"Location: {trap}/perm"], b"", False),
    "gzip": (b"HTTP/1.1 200 OK",
            [b"Content-Type: application/json", b"Content-Encoding: gzip",
             b"Vary: Accept-Encoding"], GZ, False),
    "gzip_chunked": (b"HTTP/1.1 200 OK",
            [b"Content-Type: application/json", b"Content-Encoding: gzip"], GZ, True),
}  # fmt: skip


@pytest.mark.parametrize("name", UNTOUCHED)
async def test_5xx_redirects_and_gzip_pass_through_byte_identical_and_unfollowed(
    name: str,
    make_raw_upstream: MakeRawUpstream,
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    trap = await make_raw_upstream(serve=hang_up)  # a listener nobody should connect to
    status_line, headers, body, chunked = UNTOUCHED[name]
    headers = [h.replace(TRAP_ORIGIN.encode(), trap.url.encode()) for h in headers]
    raw = RawUpstream(upstream_answer(status_line, headers, body, chunked=chunked), close=False)
    await raw.start()
    try:
        gw = await start_gateway(settings_for(upstream, real_redis.url, raw.url))
        client = await RawClient.connect(port_of(gw.url), timeout=WAIT)
        try:
            client.write(
                raw_request(
                    "GET", "/thing", "d-untouched", close=False, extra="Accept-Encoding: gzip"
                )
            )
            got = await client.read_answer()
        finally:
            client.abort()
    finally:
        await asyncio.wait_for(raw.close(), WAIT)
    lines = got.head.split(b"\r\n")
    assert lines[0] == status_line  # the upstream's own reason phrase too
    theirs = [h for h in lines[1:] if h.split(b":", 1)[0].decode().lower() not in GATEWAY_OWN]
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
    assert theirs == [*headers, framing]
    assert "X-RateLimit-Remaining" in got.fields  # the gateway's only addition: enforcement ran
    assert hashlib.sha256(got.body).hexdigest() == hashlib.sha256(body).hexdigest()
    if name.startswith("gzip"):
        assert gzip.decompress(got.body) == gzip.decompress(GZ)  # never decompressed on the way
    assert [s.raw_path for s in raw.seen] == ["/thing"]
    assert raw.seen[0].headers["Accept-Encoding"] == "gzip"
    assert trap.connections == 0  # nobody followed the Location
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- the keep-alive race

# Seconds between one answer and the next request: around the upstream's 1 s idle close.
GAPS: Final = (0.95, 1.05, 0.98, 1.02, 1.0, 0.96, 1.04, 0.99)


def key_of(seen: Seen) -> bytes:
    """A request's own key, which the idle-closing upstream answers with: a POST's body, a
    GET's tag (its query's `n`)."""
    if seen.method == "POST":
        assert seen.body is not None
        return seen.body
    return URL(seen.raw_path).query["n"].encode()


def keys(upstream: CountingUpstream, method: str) -> Counter[str]:
    """How often each key of `method` requests reached the upstream."""
    return Counter(key_of(s).decode() for s in upstream.seen if s.method == method)


def connections(upstream: CountingUpstream, method: str) -> int:
    """The upstream connections `method` requests came on."""
    return len({s.connection for s in upstream.seen if s.method == method})


async def test_requests_meeting_the_upstreams_idle_close_get_200_and_posts_are_never_doubled(
    make_upstream: MakeUpstream,
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    # An upstream whose keep-alive timeout is 1 s, answering each request with its key.
    closing = await make_upstream(Reply(body=key_of), keepalive_timeout=1.0)
    # One gateway per method, run side by side: each pool sees only its own method.
    gets_gw = await start_gateway(settings_for(upstream, real_redis.url, closing.url))
    posts_gw = await start_gateway(settings_for(upstream, real_redis.url, closing.url))

    async def gets() -> list[Answer]:
        answers = []
        for gap in (0.0, *GAPS):
            await asyncio.sleep(gap)  # the scenario: a gap around the upstream's idle close
            answers.append(await send(http, gets_gw.url, "d-race-get"))
        return answers

    async def posts() -> list[Answer]:
        answers = []
        for i, gap in enumerate((0.0, *GAPS)):
            await asyncio.sleep(gap)  # the scenario: a gap around the upstream's idle close
            answers.append(await post(http, posts_gw.url, "/upload", f"reading-{i}".encode()))
        return answers

    try:
        got, posted = await asyncio.wait_for(asyncio.gather(gets(), posts()), 3 * WAIT)
    finally:
        await bounded(closing.close(), "closing the idle-closing upstream")

    for answer in got:
        assert answer.status == 200 and answer.from_upstream, answer
        assert answer.body == answer.tag.encode()  # its own answer, not a stale one
    get_keys = keys(closing, "GET")
    assert set(get_keys) == {a.tag for a in got}
    figure("keep-alive race GET upstream connections", connections(closing, "GET"))
    figure("keep-alive race GET sent twice", sum(n > 1 for n in get_keys.values()))

    post_keys = keys(closing, "POST")
    failed = 0
    for i, answer in enumerate(posted):
        key = f"reading-{i}"
        if answer.status == 200:
            assert answer.body == key.encode() and post_keys[key] == 1, (answer, post_keys)
        else:
            failed += 1
            assert answer.status == 502, answer
            assert_gateway_answer(answer, UNREACHABLE)
    assert all(n == 1 for n in post_keys.values()), post_keys  # never sent twice
    figure("keep-alive race POST upstream connections", connections(closing, "POST"))
    figure("keep-alive race POST 502", failed)
    # The fault was real: the upstream did close idle connections under the gateway.
    assert connections(closing, "GET") > 1 and connections(closing, "POST") > 1
    assert_no_traceback(gateway_log)


# ---------------------------------------------------------------- when a request is sent again

# Answered on a connection's second request (a reused, pooled one): the first is answered
# OK and kept alive, so the gateway pools the connection and sends the next request on it.
GARBLED: Final = {
    **MALFORMED_ANSWERS,
    "switching_protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n",
}
# Answered, then the upstream closes: part of an answer is an answer.
CUT_SHORT: Final = {
    "head_then_close": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok",
    "half_a_status_line_then_close": b"HTTP/1.1 2",
    "continue_then_close": b"HTTP/1.1 100 Continue\r\n\r\n",
}
OK_KEEP_ALIVE: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_CLOSE: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def through(
    start_gateway: StartGateway,
    upstream: CountingUpstream,
    store_url: str,
    script: Script,
    request: bytes,
) -> tuple[Ended, RawUpstream]:
    """Warm a pooled connection with one GET, then send `request` on a new client
    connection: the gateway sends it on the pooled upstream connection, a RawUpstream that
    answers the n-th request of each connection with `script(n)`."""
    scripted = RawUpstream(script=script)
    await scripted.start()
    try:
        gw = await start_gateway(settings_for(upstream, store_url, scripted.url))
        warm = await until_ended(gw, raw_request("GET", "/warm", "d-replay", close=True))
        assert warm.status == 200, warm.data[:200]
        ended = await until_ended(gw, request)
    finally:
        await asyncio.wait_for(scripted.close(), WAIT)
    return ended, scripted


REQUESTS: Final = {
    "GET": raw_request("GET", "/r", "d-replay", close=True),
    "HEAD": raw_request("HEAD", "/r", "d-replay", close=True),
    "OPTIONS": raw_request("OPTIONS", "/r", "d-replay", close=True),
    "PUT_empty": raw_request("PUT", "/r", "d-replay", close=True, extra="Content-Length: 0"),
    "DELETE": raw_request("DELETE", "/r", "d-replay", close=True),
    "POST": raw_request("POST", "/r", "d-replay", b"x", close=True),
    "PUT_keyed": raw_request(
        "PUT", "/r", "d-replay", close=True, extra="Content-Length: 0\r\nIdempotency-Key: k-1"
    ),
    "DELETE_keyed": raw_request(
        "DELETE", "/r", "d-replay", close=True, extra="X-Idempotency-Key: k-2"
    ),
}


@pytest.mark.parametrize("method", REQUESTS)
@pytest.mark.parametrize("answer", [*GARBLED, *CUT_SHORT])
async def test_a_garbled_answer_on_a_reused_connection_is_never_sent_again(
    answer: str,
    method: str,
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    ended, scripted = await through(
        start_gateway,
        upstream,
        real_redis.url,
        lambda n: (
            OK_KEEP_ALIVE
            if n == 1
            else GARBLED[answer]
            if answer in GARBLED
            else (CUT_SHORT[answer], "close")
        ),
        REQUESTS[method],
    )
    # Once, and only once: a byte of an answer came back, so the upstream may have acted.
    assert scripted.count(path="/r") == 1, scripted.seen
    assert ended.status in (502, 200, None), ended.data[:300]
    if ended.status != 502:  # the head was out (a 200 of a broken body): cut, never whole
        assert not ended.complete_looking(), ended.data[:300]
    assert_no_traceback(gateway_log)


# Which requests are sent again when the reused connection closes before a byte of answer.
REPLAYED: Final = {
    "GET": True,
    "HEAD": True,
    "OPTIONS": True,
    "PUT_empty": False,  # idempotent, but it may have been acted on: not without a key
    "DELETE": False,
    "POST": False,
    "PUT_keyed": True,
    "DELETE_keyed": True,
}


@pytest.mark.parametrize("method", REQUESTS)
async def test_only_a_safe_or_keyed_request_is_sent_again_after_a_silent_close(
    method: str,
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    # Each connection: the first request answered and kept alive, the second met by a
    # close without a byte (what an upstream's idle timeout looks like mid-race).
    ended, scripted = await through(
        start_gateway,
        upstream,
        real_redis.url,
        lambda n: OK_KEEP_ALIVE if n == 1 else None,
        REQUESTS[method],
    )
    if REPLAYED[method]:
        assert scripted.count(path="/r") == 2, scripted.seen
        assert ended.status == 200, ended.data[:300]
        # The second attempt went on a new connection, not the one that closed.
        assert len({s.connection for s in scripted.seen if s.raw_path == "/r"}) == 2
    else:
        assert scripted.count(path="/r") == 1, scripted.seen
        assert ended.status == 502, ended.data[:300]
        assert orjson.loads(ended.body) == UNREACHABLE
    assert_no_traceback(gateway_log)


async def test_a_request_is_sent_again_at_most_once(
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    # The retry's new connection closes without a byte too: 502, and two sends in all.
    warmed = False

    def script(n: int) -> bytes | None:
        nonlocal warmed
        if not warmed:
            warmed = True
            return OK_KEEP_ALIVE
        return None

    ended, scripted = await through(
        start_gateway, upstream, real_redis.url, script, REQUESTS["GET"]
    )
    assert scripted.count(path="/r") == 2, scripted.seen
    assert ended.status == 502 and orjson.loads(ended.body) == UNREACHABLE


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried(
    upstream: CountingUpstream,
    real_redis: RedisServer,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    # No keep-alive race can explain a new connection's silent close: the upstream failed.
    scripted = RawUpstream(script=lambda n: None)
    await scripted.start()
    try:
        gw = await start_gateway(settings_for(upstream, real_redis.url, scripted.url))
        ended = await until_ended(gw, REQUESTS["GET"])
    finally:
        await asyncio.wait_for(scripted.close(), WAIT)
    assert scripted.count(path="/r") == 1 and ended.status == 502
