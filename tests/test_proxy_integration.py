"""The data plane on real loopback sockets: a real upstream in front of which it proxies.

The gateway is the real `gateway.dataplane` listener; its enforcer is replaced by a stub that
forwards everything (adding the rate-limit headers a test asks for), so these tests exercise
exactly the proxy. Upstreams are the rig's: a `CountingUpstream` (with a behaviour, or a
handler written for the test), or a `RawUpstream` where a test needs byte-level control of
the upstream's side.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import parse_config
from gateway.dataplane import DataPlane, start_public
from gateway.dataplane.upstream import PRUNE_AT, UpstreamPool
from gateway.enforce import FORWARD, Verdict
from gateway.identity import HeaderLookup
from gateway.metrics import Metrics
from gateway.store import Store
from tests.rig.client import OpenRawClient, RawClient, head_fields
from tests.rig.raw_upstream import MakeRawUpstream, RawAnswer, RawUpstream, Serve
from tests.rig.system import free_port
from tests.rig.upstream import (
    Behaviour,
    CountingUpstream,
    Handle,
    Handler,
    MakeUpstream,
    Reply,
    Seen,
)
from tests.rig.waits import until

pytestmark = pytest.mark.integration

StartUpstream = Callable[[Handler | Behaviour], Awaitable[str]]
StartRawUpstream = Callable[[Serve], Awaitable[str]]
StartGateway = Callable[..., Awaitable["Gateway"]]

MiB = 1024 * 1024
# Bounds every wait in these tests, far below pytest-timeout's 120 s.
WAIT = 10.0
# Long enough to move tens of MiB over loopback; bounds a wait that a bug turns into a hang.
DRAIN = 3.0


def envelope(reason: str) -> dict[str, Any]:
    return {"status": False, "result": reason}


def echo_report(seen: Seen) -> bytes:
    """What arrived, as JSON: method, raw path, headers, the body's sha256 and size."""
    return orjson.dumps(
        {
            "method": seen.method,
            "raw_path": seen.raw_path,
            "headers": list(seen.headers.items()),
            "sha256": seen.body_sha256,
            "size": seen.body_size,
        }
    )


ECHO: Final = Reply(body=echo_report, headers={"Content-Type": "application/json"})
OK: Final = Reply(body=b"ok")


def seen_headers(report: dict[str, Any]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in report["headers"])


@pytest.fixture
def start_upstream(make_upstream: MakeUpstream) -> StartUpstream:
    """Start the rig's CountingUpstream answering every path as `how` says (a behaviour, or
    a handler of the test's own); returns its origin."""

    async def start(how: Handler | Behaviour) -> str:
        return (await make_upstream(Handle(how) if callable(how) else how)).url

    return start


@pytest.fixture
def start_raw_upstream(make_raw_upstream: MakeRawUpstream) -> StartRawUpstream:
    """Start the rig's RawUpstream running `serve` per connection; returns its origin."""

    async def start(serve: Serve) -> str:
        return (await make_raw_upstream(serve=serve)).url

    return start


async def outcome(upstream: CountingUpstream) -> tuple[str, int]:
    """How the body of the upstream's one request ended: "complete" or "broken" (cut off),
    and the bytes that arrived."""
    await until(lambda: upstream.seen, "the upstream to see the request body end")
    [seen] = upstream.seen
    return ("complete" if seen.complete else "broken"), seen.body_size


class AllowAll:
    """An enforcer stand-in: every request is forwarded, with `headers` added to its answer."""

    def __init__(self, headers: Mapping[str, str] | None) -> None:
        self.headers = dict(headers) if headers else None

    async def check(
        self,
        method: str,
        headers: HeaderLookup,
        peer: str | None,
        content_length: int | None,
    ) -> Verdict:
        extra = None if self.headers is None else dict(self.headers)
        return Verdict(FORWARD, "", extra, "allow")


@dataclass(frozen=True)
class Gateway:
    """The data plane listening on loopback, and a client session (never decompressing)."""

    http: aiohttp.ClientSession
    port: int
    plane: DataPlane


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    """Start the data plane in front of `origin`, served as `gateway run` serves it.

    `enforcer="real"` keeps the real Enforcer (on an embedded memory store) for the one
    behaviour that now lives there: a declared Content-Length over the limit.
    """
    started: list[tuple[asyncio.Server, DataPlane, Store, aiohttp.ClientSession]] = []

    async def start(
        origin: str,
        *,
        max_body_bytes: int = 10 * MiB,
        preserve_host: bool = False,
        connect_timeout: float = 2.0,
        timeout: float = WAIT,
        max_connections: int = 10,
        max_connections_per_client: int | None = None,
        extra_headers: Mapping[str, str] | None = None,
        enforcer: Literal["stub", "real"] = "stub",
        server: Mapping[str, float] | None = None,
        limits: Mapping[str, object] | None = None,
    ) -> Gateway:
        config: dict[str, object] = {
            "upstream": {
                "url": origin,
                "preserve_host": preserve_host,
                "connect_timeout": min(connect_timeout, timeout),
                "timeout": timeout,
                "max_connections": max_connections,
                "max_connections_per_client": max_connections_per_client,
            },
            "limits": {"max_body_bytes": max_body_bytes, **(limits or {})},
            "server": dict(server or {}),
        }
        settings = parse_config(orjson.dumps(config).decode(), "test")  # JSON is YAML
        store = Store.memory()
        await store.start()
        plane = DataPlane(settings, store, Metrics())
        if enforcer == "stub":
            # The plane only awaits check(); the stub has that one method.
            plane.enforcer = AllowAll(extra_headers)
        listener = await start_public(plane, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        http = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}", auto_decompress=False)
        started.append((listener, plane, store, http))
        return Gateway(http, port, plane)

    yield start
    for server, plane, store, http in started:
        await http.close()
        server.close()
        await plane.shutdown(1.0)
        await server.wait_closed()
        await store.close()


async def raw_http(gw: Gateway, request: bytes) -> tuple[bytes, bytes]:
    """Send `request` as bytes on a new connection; read to EOF; return (head, body)."""
    client = await RawClient.connect(gw.port, timeout=WAIT)
    try:
        await client.send(request)
        data = await client.read_to_eof()
    finally:
        await client.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


Connect = Callable[[Gateway], Awaitable[RawClient]]


@pytest.fixture
def connect(raw_client: OpenRawClient) -> Connect:
    """Open raw client connections (the rig's RawClient) to a gateway; all aborted at
    teardown."""

    async def open_(gw: Gateway) -> RawClient:
        return await raw_client(gw.port, timeout=WAIT)

    return open_


# ------------------------------------------------------------------------ bodies


async def test_5_mib_body_arrives_byte_identical_with_its_content_length(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(await start_upstream(ECHO))
    body = os.urandom(5 * MiB)
    # A file-like body: aiohttp sends it with its Content-Length, without a warning.
    async with gw.http.post("/upload", data=io.BytesIO(body)) as resp:
        assert resp.status == 200
        report = await resp.json()
    assert report["size"] == len(body)
    assert report["sha256"] == hashlib.sha256(body).hexdigest()
    headers = seen_headers(report)
    assert headers["Content-Length"] == str(5 * MiB)
    assert "Transfer-Encoding" not in headers


async def test_5_mib_streamed_download_arrives_byte_identical(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    body = os.urandom(5 * MiB)

    async def download(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for start in range(0, len(body), 256 * 1024):
            await resp.write(body[start : start + 256 * 1024])
        return resp

    gw = await start_gateway(await start_upstream(download))
    async with gw.http.get("/download") as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        got = await asyncio.wait_for(resp.read(), WAIT)
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


# The tests below that follow a body on its way upstream run with request buffering off
# (streaming, `limits.request_buffering: false`); the buffered default has its own below.
STREAMING: Final = {"request_buffering": False}


async def test_chunked_upload_is_forwarded_chunked_and_intact(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(await start_upstream(ECHO), limits=STREAMING)
    parts = [os.urandom(100_000) for _ in range(5)]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await asyncio.sleep(0)

    async with gw.http.put("/upload", data=chunks()) as resp:
        assert resp.status == 200
        report = await resp.json()
    assert report["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    headers = seen_headers(report)
    assert headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in headers


async def test_chunked_body_over_the_limit_is_cut_and_answered_413(
    make_upstream: MakeUpstream, start_gateway: StartGateway
) -> None:
    limit = 64 * 1024
    upstream = await make_upstream()
    gw = await start_gateway(upstream.url, max_body_bytes=limit, limits=STREAMING)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * 16 * 1024
        # Only go over the limit once the upstream has the request in hand, so the test sees
        # the cut rather than a request that never left the gateway.
        await until(lambda: upstream.arrived, "the upstream to have the request")
        yield b"b" * 64 * 1024

    async with gw.http.post("/upload", data=chunks()) as resp:
        assert resp.status == 413
        assert await resp.json() == envelope("Request body too large")
    kind, size = await outcome(upstream)
    assert kind == "broken"
    assert size <= limit


async def test_declared_body_over_the_limit_is_413_before_anything_is_forwarded(
    make_upstream: MakeUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    # The declared size is judged with the verdict (Enforcer.check), so the real one runs.
    upstream = await make_upstream(OK)
    gw = await start_gateway(upstream.url, max_body_bytes=1024, enforcer="real")
    client = await connect(gw)
    # Only the start of the body: the answer must come from the declaration alone.
    await client.send(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1025\r\n\r\n")
    await client.send(b"x" * 100)
    answer = await client.read_answer()
    assert answer.status == 413
    assert orjson.loads(answer.body) == envelope("Request body too large")
    # The unread body makes the connection unusable for another request.
    assert answer.fields["Connection"] == "close"
    assert await client.closed()
    assert upstream.arrived == 0


async def test_declared_body_over_the_limit_that_a_verdict_let_through_is_still_cut(
    make_upstream: MakeUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    # Defence in depth: the byte count while streaming holds even when the verdict forwards.
    upstream = await make_upstream()
    gw = await start_gateway(upstream.url, max_body_bytes=1024, limits=STREAMING)
    client = await connect(gw)
    await client.send(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1025\r\n\r\n")
    await client.send(b"x" * 1000)
    await until(lambda: upstream.arrived, "the upstream to have the request")
    await client.send(b"x" * 25)
    answer = await client.read_answer()
    assert answer.status == 413
    assert orjson.loads(answer.body) == envelope("Request body too large")
    kind, size = await outcome(upstream)
    assert kind == "broken"
    assert size <= 1024


async def test_a_client_still_sending_an_over_limit_body_reads_the_413(
    make_upstream: MakeUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    upstream = await make_upstream(OK)
    gw = await start_gateway(upstream.url, max_body_bytes=MiB, enforcer="real")
    client = await connect(gw)
    size = 8 * MiB
    client.write(b"PUT /big HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % size)
    client.write(b"z" * size)  # the whole body at once, as a plain client does
    answer = await client.read_answer()
    assert answer.status == 413
    assert orjson.loads(answer.body) == envelope("Request body too large")
    assert upstream.arrived == 0


async def test_body_exactly_at_the_limit_is_forwarded(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(await start_upstream(ECHO), max_body_bytes=1024)
    async with gw.http.post("/upload", data=b"x" * 1024) as resp:
        assert resp.status == 200
        assert (await resp.json())["size"] == 1024

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        yield b"x" * 24

    async with gw.http.post("/upload", data=chunks()) as resp:
        assert resp.status == 200
        assert (await resp.json())["size"] == 1024


ABANDONED_UPLOADS = {
    "content-length": b"Content-Length: 100000\r\n\r\n" + b"a" * 16384,
    "chunked": b"Transfer-Encoding: chunked\r\n\r\n4000\r\n" + b"a" * 16384 + b"\r\n",
}


@pytest.mark.parametrize("start", ABANDONED_UPLOADS.values(), ids=ABANDONED_UPLOADS.keys())
async def test_client_abandoning_its_upload_never_yields_a_complete_upstream_request(
    make_upstream: MakeUpstream, start_gateway: StartGateway, start: bytes
) -> None:
    upstream = await make_upstream()
    gw = await start_gateway(upstream.url, limits=STREAMING)
    client = await RawClient.connect(gw.port, timeout=WAIT)
    client.write(b"POST /upload HTTP/1.1\r\nHost: gw\r\n" + start)
    await until(lambda: upstream.arrived, "the upstream to have the request")
    client.abort()
    kind, size = await outcome(upstream)
    assert kind == "broken"
    assert size <= 16384


async def test_upstream_answering_before_reading_the_upload_leaves_no_stuck_connection(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    """An upstream may answer (401, 413...) without reading the body. The client gets that
    answer, and its connection then either closes or reads the rest of the body and serves
    the next request; it must not sit with reading paused.
    """
    answer_now = asyncio.Event()

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        # Let the body fill the socket buffers first: the gateway stops reading the client.
        await asyncio.wait_for(answer_now.wait(), WAIT)
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()
        await asyncio.sleep(WAIT)  # the scenario: silent, the connection open, body unread

    gw = await start_gateway(
        await start_raw_upstream(early), max_body_bytes=64 * MiB, limits=STREAMING
    )
    client = await connect(gw)
    size = 32 * MiB
    client.write(b"PUT /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % size)
    uploading = asyncio.ensure_future(client.send(b"u" * size))
    try:
        # The upload stalls: the upstream reads nothing and the gateway applies backpressure.
        done, _ = await asyncio.wait([uploading], timeout=0.5)
        assert not done
        answer_now.set()
        answer = await client.read_answer()
        assert answer.status == 401
        assert answer.body == b"nope"
        if answer.fields.get("Connection") == "close":
            assert await client.closed()
            return
        # The gateway reads (and drops) the rest of the body; ~28 MiB on loopback.
        await asyncio.wait_for(uploading, DRAIN)
        await client.send(b"GET /next HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        assert (await client.read_answer()).status in (200, 401, 502)
    finally:
        uploading.cancel()
        await asyncio.gather(uploading, return_exceptions=True)


# ------------------------------------------------------------------- path, query


HOSTILE_TARGETS = [
    "//evil.example/x",
    "/%2e%2e/admin",
    "/a%2Fb;c?x=%00",
    "/a/../b/./c",
    "/%ff%fe/%zz",
    "/%7e%7E",
    "/user@evil.example:80/x",
    "/x?b=2&a=1&a=3&empty=&=odd&plus=a+b&sp=%20",
    "/q?redirect=http://evil.example/&&x",
    # aiohttp's client turned "/x?" into "/x"; the raw data plane keeps the empty query.
    "/x?",
    "/x??",
]


@pytest.mark.parametrize("target", HOSTILE_TARGETS)
async def test_raw_path_and_query_reach_the_upstream_byte_for_byte(
    start_upstream: StartUpstream, start_gateway: StartGateway, target: str
) -> None:
    gw = await start_gateway(await start_upstream(ECHO))
    head, body = await raw_http(
        gw, f"GET {target} HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n".encode()
    )
    assert head.startswith(b"HTTP/1.1 200 ")
    report = orjson.loads(body)
    assert report["raw_path"] == target


async def test_absolute_form_target_is_refused_and_not_forwarded(
    make_upstream: MakeUpstream, start_gateway: StartGateway
) -> None:
    upstream = await make_upstream(OK)
    gw = await start_gateway(upstream.url)
    head, body = await raw_http(
        gw,
        b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 400 ")
    assert orjson.loads(body) == envelope("Invalid request target")
    assert upstream.arrived == 0


# ----------------------------------------------------------------------- headers


async def test_only_the_clients_own_headers_plus_forwarding_ones_reach_the_upstream(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    origin = await start_upstream(ECHO)
    gw = await start_gateway(origin)
    for request, expected in [
        (
            b"GET /x HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n",
            {"Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"},
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 3\r\n"
            b"Connection: close\r\n\r\nabc",
            {"Host", "Content-Length", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"},
        ),
    ]:
        _, body = await raw_http(gw, request)
        # No Accept, Accept-Encoding, User-Agent or Content-Type of the gateway's own.
        assert {name for name, _ in orjson.loads(body)["headers"]} == expected


async def test_only_the_upstreams_own_headers_reach_the_client(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway
) -> None:
    # aiohttp's server used to add Server, Date and a default Content-Type; the raw plane
    # adds nothing of its own to a forwarded answer but its framing.
    async def bare(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Up: 1\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    gw = await start_gateway(await start_raw_upstream(bare))
    head, body = await raw_http(gw, b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK",
        b"X-Up: 1",
        b"Content-Length: 2",
        b"Connection: close",
    ]
    assert body == b"ok"


async def test_x_forwarded_headers_and_upstream_host(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    origin = await start_upstream(ECHO)
    gw = await start_gateway(origin)
    async with gw.http.get(
        "/who",
        headers={
            "Host": "api.example.com",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "gopher",
        },
    ) as resp:
        headers = seen_headers(await resp.json())
    # No trusted proxies configured: the client's own X-Forwarded-For is replaced, not
    # extended (test_wire holds the trusted cases).
    assert headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert headers.getall("X-Forwarded-Proto") == ["http"]
    assert headers.getall("X-Forwarded-Host") == ["api.example.com"]
    assert headers.getall("Host") == [URL(origin).host_port_subcomponent]


@pytest.mark.parametrize("preserve", [True, False], ids=["preserve_host", "upstream_host"])
async def test_preserve_host(
    start_upstream: StartUpstream, start_gateway: StartGateway, preserve: bool
) -> None:
    origin = await start_upstream(ECHO)
    gw = await start_gateway(origin, preserve_host=preserve)
    async with gw.http.get("/who", headers={"Host": "api.example.com"}) as resp:
        headers = seen_headers(await resp.json())
    expected = "api.example.com" if preserve else URL(origin).host_port_subcomponent
    assert headers.getall("Host") == [expected]


async def test_hop_by_hop_headers_are_dropped_both_ways(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    hop_request: CIMultiDict[str] = CIMultiDict()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        hop_request.extend(request.headers)
        return web.Response(
            text="ok",
            headers=CIMultiDict(
                [
                    ("Connection", "X-Hop-Resp"),
                    ("X-Hop-Resp", "secret"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Authenticate", "Basic"),
                    ("Upgrade", "h2c"),
                    ("Trailer", "X-Sum"),
                    ("X-End", "kept"),
                ]
            ),
        )

    gw = await start_gateway(await start_upstream(handler))
    async with gw.http.get(
        "/hop",
        headers=CIMultiDict(
            [
                ("Connection", "keep-alive, X-Hop-Req"),
                ("X-Hop-Req", "secret"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Proxy-Authorization", "Basic eDp5"),
                ("Proxy-Connection", "keep-alive"),
                ("Upgrade", "h2c"),
                ("Trailer", "X-Sum"),
                ("X-End", "kept"),
            ]
        ),
    ) as resp:
        assert resp.status == 200
        got = resp.headers
        for name in ("X-Hop-Resp", "Keep-Alive", "Proxy-Authenticate", "Upgrade", "Trailer"):
            assert name not in got, name
        assert got.get("Connection", "").lower() != "x-hop-resp"
        assert got["X-End"] == "kept"
    for name in (
        "X-Hop-Req",
        "Keep-Alive",
        "TE",
        "Proxy-Authorization",
        "Proxy-Connection",
        "Upgrade",
        "Trailer",
        "Transfer-Encoding",
    ):
        assert name not in hop_request, name
    assert "x-hop-req" not in hop_request.get("Connection", "").lower()
    assert hop_request["X-End"] == "kept"


async def test_repeated_headers_are_kept_apart_both_ways(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    received: list[str] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        received.extend(request.headers.getall("X-Multi"))
        return web.Response(
            headers=CIMultiDict(
                [
                    ("Set-Cookie", "a=1; Path=/"),
                    ("Set-Cookie", "b=2; Path=/; HttpOnly"),
                    ("Set-Cookie", "c=3, d=4"),
                ]
            )
        )

    gw = await start_gateway(await start_upstream(handler))
    async with gw.http.get(
        "/cookies", headers=CIMultiDict([("X-Multi", "one"), ("X-Multi", "two, three")])
    ) as resp:
        assert resp.headers.getall("Set-Cookie") == [
            "a=1; Path=/",
            "b=2; Path=/; HttpOnly",
            "c=3, d=4",
        ]
    assert received == ["one", "two, three"]


async def test_request_trailers_never_become_upstream_headers(
    start_upstream: StartUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    gw = await start_gateway(await start_upstream(ECHO))
    client = await connect(gw)
    await client.send(
        b"POST /t HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"\r\n3\r\nabc\r\n0\r\nX-Injected: 1\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    answer = await client.read_answer()
    assert answer.status == 200
    report = orjson.loads(answer.body)
    assert report["size"] == 3
    headers = seen_headers(report)
    assert "X-Injected" not in headers
    assert headers.getall("X-Forwarded-For") == ["127.0.0.1"]


async def test_extra_headers_are_added_and_win_over_the_upstreams(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(headers={"X-RateLimit-Remaining": "99", "X-Up": "1"})

    extra = {"RateLimit": '"device";r=4;t=1', "X-RateLimit-Remaining": "4"}
    gw = await start_gateway(await start_upstream(handler), extra_headers=extra)
    async with gw.http.get("/") as resp:
        assert resp.headers.getall("X-RateLimit-Remaining") == ["4"]
        assert resp.headers["RateLimit"] == '"device";r=4;t=1'
        assert resp.headers["X-Up"] == "1"

    refused = await start_gateway(f"http://127.0.0.1:{free_port()}", extra_headers=extra)
    async with refused.http.get("/") as resp:
        assert resp.status == 502
        assert resp.headers["RateLimit"] == '"device";r=4;t=1'


async def test_cookies_set_by_the_upstream_are_not_replayed_for_other_clients(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    cookies_seen: list[str | None] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        cookies_seen.append(request.headers.get("Cookie"))
        return web.Response(headers={"Set-Cookie": "session=alice; Path=/"})

    gw = await start_gateway(await start_upstream(handler))
    for _ in range(2):
        # The test client keeps no cookies either, so any Cookie would come from the gateway.
        async with gw.http.get("/", cookies=None) as resp:
            assert resp.headers["Set-Cookie"] == "session=alice; Path=/"
        gw.http.cookie_jar.clear()
    assert cookies_seen == [None, None]


async def test_proxy_environment_variables_are_ignored(
    start_upstream: StartUpstream, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp's session needed trust_env=False; the raw pool must never read them either.
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    gw = await start_gateway(await start_upstream(ECHO))
    head, body = await raw_http(gw, b"GET /e HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert orjson.loads(body)["raw_path"] == "/e"


# ---------------------------------------------------------------------- encoding


async def test_gzip_passes_through_byte_identical_both_ways(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    upload = gzip.compress(b"upload " * 10_000)
    download = gzip.compress(b"download " * 10_000)
    seen: dict[str, Any] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen["body"] = await request.read()
        seen["headers"] = request.headers.copy()
        return web.Response(
            body=download,
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    gw = await start_gateway(await start_upstream(handler))
    async with gw.http.post(
        "/gz",
        data=upload,
        headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip, br"},
    ) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(download))
        assert await resp.read() == download
    assert seen["body"] == upload
    assert seen["headers"]["Content-Encoding"] == "gzip"
    assert seen["headers"].getall("Accept-Encoding") == ["gzip, br"]


async def test_redirect_is_passed_through_not_followed(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    paths: list[str] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        paths.append(request.raw_path)
        if request.raw_path == "/old":
            return web.Response(status=302, headers={"Location": "/new"})
        return web.Response(text="new")

    gw = await start_gateway(await start_upstream(handler))
    async with gw.http.get("/old", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/new"
    assert paths == ["/old"]


# --------------------------------------------------------------------- streaming


@pytest.mark.parametrize("content_type", ["text/event-stream", "application/octet-stream"])
async def test_streamed_response_reaches_the_client_before_the_upstream_finishes(
    start_upstream: StartUpstream, start_gateway: StartGateway, content_type: str
) -> None:
    release = asyncio.Event()

    async def stream(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await release.wait()
        await resp.write(b"data: second\n\n")
        return resp

    gw = await start_gateway(await start_upstream(stream))
    try:
        async with gw.http.get("/events") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == content_type
            assert resp.headers["Transfer-Encoding"] == "chunked"
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), WAIT)
            assert first == b"data: first\n\n"
            assert not release.is_set()
            release.set()
            assert await asyncio.wait_for(resp.read(), WAIT) == b"data: second\n\n"
    finally:
        release.set()


async def test_upstream_content_length_is_preserved(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    async def sized(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b"x" * 1000, content_type="application/octet-stream")

    gw = await start_gateway(await start_upstream(sized))
    head, body = await raw_http(
        gw, b"GET /sized HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n"
    )
    fields = head_fields(head)
    assert fields["Content-Length"] == "1000"
    assert "Transfer-Encoding" not in fields
    assert body == b"x" * 1000


async def test_upstream_body_delimited_by_its_close_reaches_a_1_1_client_chunked(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    async def old_style(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, ")
        await writer.drain()
        writer.write(b"until the close")
        await writer.drain()

    gw = await start_gateway(await start_raw_upstream(old_style))
    client = await connect(gw)
    await client.send(b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n")
    answer = await client.read_answer()
    assert answer.status == 200
    assert answer.fields["Transfer-Encoding"] == "chunked"
    assert answer.body == b"all of it, until the close"
    # The framing was the gateway's own, so the client's connection stays usable.
    await client.send(b"GET /b HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert (await client.read_answer()).body == b"all of it, until the close"


EMPTY_CASES = {
    "HEAD keeps the upstream's Content-Length": (b"HEAD", b"/doc", b"200", "1234"),
    "204": (b"GET", b"/204", b"204", None),
    "304": (b"GET", b"/304", b"304", None),
}


@pytest.mark.parametrize(
    ("method", "path", "status", "length"), EMPTY_CASES.values(), ids=EMPTY_CASES.keys()
)
async def test_answers_without_a_body(
    start_upstream: StartUpstream,
    start_gateway: StartGateway,
    method: bytes,
    path: bytes,
    status: bytes,
    length: str | None,
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.raw_path == "/204":
            return web.Response(status=204)
        if request.raw_path == "/304":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(body=b"d" * 1234, content_type="text/plain")

    gw = await start_gateway(await start_upstream(handler))
    head, body = await raw_http(
        gw, method + b" " + path + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    assert head.split(b" ")[1] == status
    assert body == b""
    fields = head_fields(head)
    assert "Transfer-Encoding" not in fields
    assert fields.get("Content-Length") == length


async def test_head_then_get_on_one_client_connection(
    start_upstream: StartUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    async def doc(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b"d" * 1234, content_type="text/plain")

    gw = await start_gateway(await start_upstream(doc))
    client = await connect(gw)
    await client.send(b"HEAD /doc HTTP/1.1\r\nHost: gw\r\n\r\n")
    head = await client.read_answer(head_request=True)
    assert (head.status, head.fields["Content-Length"], head.body) == (200, "1234", b"")
    await client.send(b"GET /doc HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    get = await client.read_answer()
    assert (get.status, get.body) == (200, b"d" * 1234)


async def test_head_gets_only_the_head_of_an_envelope_answer(
    start_gateway: StartGateway, connect: Connect
) -> None:
    gw = await start_gateway(f"http://127.0.0.1:{free_port()}")
    client = await connect(gw)
    await client.send(b"HEAD /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    head = await client.read_answer(head_request=True)
    assert head.status == 502
    assert int(head.fields["Content-Length"]) == len(orjson.dumps(envelope("Upstream unreachable")))
    # No body followed: the next bytes on the connection are the next answer's.
    await client.send(b"GET /x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    get = await client.read_answer()
    assert get.status == 502
    assert orjson.loads(get.body) == envelope("Upstream unreachable")


# ------------------------------------------------------------------------ failures


async def test_upstream_refused_is_502_envelope(start_gateway: StartGateway) -> None:
    gw = await start_gateway(f"http://127.0.0.1:{free_port()}")
    async with gw.http.get("/") as resp:
        assert resp.status == 502
        assert await resp.json() == envelope("Upstream unreachable")


async def test_upstream_closing_before_it_answers_is_502_envelope(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway
) -> None:
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    gw = await start_gateway(await start_raw_upstream(hangs_up))
    async with gw.http.get("/") as resp:
        assert resp.status == 502
        assert await resp.json() == envelope("Upstream unreachable")


async def test_malformed_upstream_answer_is_502_envelope(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(WAIT)  # the scenario: silent after that, the connection open

    gw = await start_gateway(await start_raw_upstream(garbage))
    async with gw.http.get("/") as resp:
        assert resp.status == 502
        assert await resp.json() == envelope("Invalid upstream response")


INTERIM = {
    "100 Continue": b"HTTP/1.1 100 Continue\r\n\r\n",
    "103 Early Hints": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
}


@pytest.mark.parametrize("interim", INTERIM.values(), ids=INTERIM.keys())
async def test_upstream_interim_answers_are_not_forwarded(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway, interim: bytes
) -> None:
    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(interim)
        await writer.drain()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
        await writer.drain()

    gw = await start_gateway(await start_raw_upstream(hints))
    head, body = await raw_http(gw, b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert "Link" not in head_fields(head)
    assert body == b"final"


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"X-Big: " + b"x" * (128 * 1024) + b"\r\n", id="128-KiB-header-line"),
        pytest.param(b"".join(b"X-H%d: v\r\n" % i for i in range(200)), id="200-headers"),
    ],
)
async def test_an_oversized_upstream_head_is_502_envelope(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway, head: bytes
) -> None:
    # The upstream's head has the same limits as a client's: past them it is no valid answer.
    async def oversized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(WAIT)  # the scenario: silent after that, the connection open

    gw = await start_gateway(await start_raw_upstream(oversized))
    async with gw.http.get("/") as resp:
        assert resp.status == 502
        assert await resp.json() == envelope("Invalid upstream response")


async def test_unsolicited_101_from_the_upstream_is_502_envelope(
    start_raw_upstream: StartRawUpstream,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Upgrade is hop-by-hop and never forwarded, so a 101 is an answer nobody asked for.
    async def switches(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                     b"Upgrade: h2c\r\n\r\nPRI * HTTP/2.0")  # fmt: skip
        await writer.drain()
        await asyncio.sleep(WAIT)  # the scenario: silent after that, the connection open

    gw = await start_gateway(await start_raw_upstream(switches))
    async with gw.http.get("/") as resp:
        assert resp.status == 502
        assert await resp.json() == envelope("Invalid upstream response")
    # Handled as a bad answer, not as a crash of the protocol callback.
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_upstream_slow_to_answer_is_504_envelope(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    never = asyncio.Event()

    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        await never.wait()
        return web.Response()

    gw = await start_gateway(await start_upstream(slow), timeout=0.3)
    started = time.monotonic()
    try:
        async with gw.http.get("/") as resp:
            assert resp.status == 504
            assert await resp.json() == envelope("Upstream timed out")
        assert time.monotonic() - started < WAIT / 2
    finally:
        never.set()


async def test_connect_timeout_is_502_envelope(
    unaccepting_listener: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(unaccepting_listener, connect_timeout=0.3, timeout=WAIT)
    started = time.monotonic()
    async with gw.http.get("/") as resp:
        assert resp.status == 502
        assert await resp.json() == envelope("Upstream unreachable")
    elapsed = time.monotonic() - started
    # The connect timeout, not the whole-request deadline, ended it.
    assert 0.25 <= elapsed < WAIT / 2


async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, then send a head one byte every 50 ms, never finishing it.

    Every read on the gateway's side gets data in time, so only the deadline for the whole
    head can end the wait.
    """
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(int(WAIT / 0.05)):
        writer.write(b"X")
        await writer.drain()
        await asyncio.sleep(0.05)  # the dribble is the scenario


async def test_upstream_dribbling_its_head_is_504_at_the_deadline(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(await start_raw_upstream(dribble), timeout=0.3)
    started = time.monotonic()
    async with gw.http.get("/") as resp:
        assert resp.status == 504
        assert await resp.json() == envelope("Upstream timed out")
    assert time.monotonic() - started < WAIT / 2


BREAKS = {
    "chunked": None,
    "content-length": 100_000,
}


@pytest.mark.parametrize("length", BREAKS.values(), ids=BREAKS.keys())
async def test_upstream_breaking_mid_stream_cuts_the_client_connection(
    start_upstream: StartUpstream, start_gateway: StartGateway, length: int | None
) -> None:
    async def breaking(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = length
        await resp.prepare(request)
        await resp.write(b"partial")
        await asyncio.sleep(0.05)  # the scenario: the partial body goes out before the cut
        assert request.transport is not None
        request.transport.abort()
        return resp

    gw = await start_gateway(await start_upstream(breaking))
    async with gw.http.get("/") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), WAIT)


async def test_upstream_silent_mid_stream_cuts_the_client_connection(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    never = asyncio.Event()

    async def stalls(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await never.wait()
        return resp

    gw = await start_gateway(await start_upstream(stalls), timeout=0.3)
    try:
        async with gw.http.get("/") as resp:
            assert resp.status == 200
            assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(resp.read(), WAIT)
    finally:
        never.set()


async def test_client_leaving_mid_stream_closes_the_upstream_connection(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    upstream_saw_close: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def ticking(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(int(WAIT / 0.02)):
                await resp.write(b"data: tick\n\n")
                await asyncio.sleep(0.02)  # the ticks' pace is the scenario
        except BaseException:
            upstream_saw_close.set_result(None)
            raise
        return resp

    gw = await start_gateway(await start_upstream(ticking))
    resp = await gw.http.get("/")
    assert await resp.content.readuntil(b"\n\n") == b"data: tick\n\n"
    resp.close()
    await asyncio.wait_for(upstream_saw_close, WAIT)


# ------------------------------------------------------------- upstream pool


async def test_upstream_connections_are_pooled_and_kept_alive(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    peers: list[object] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    gw = await start_gateway(await start_upstream(handler))
    for _ in range(3):
        async with gw.http.get("/") as resp:
            assert await resp.text() == "ok"
    assert len(peers) == 3
    assert len(set(peers)) == 1


@pytest.mark.timing
async def test_pool_limit_answers_a_fast_503_envelope(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.raw_path == "/slow":
            started.set()
            await release.wait()
        return web.Response(text="ok")

    extra = {"RateLimit": '"device";r=4;t=1'}
    gw = await start_gateway(await start_upstream(handler), max_connections=1, extra_headers=extra)
    slow = asyncio.ensure_future(gw.http.get("/slow"))
    try:
        await asyncio.wait_for(started.wait(), WAIT)
        began = time.monotonic()
        async with gw.http.get("/fast") as resp:
            assert resp.status == 503
            assert await resp.json() == envelope("Upstream connection limit reached")
            assert resp.headers["Retry-After"] == "1"
            assert resp.headers["RateLimit"] == '"device";r=4;t=1'
        assert time.monotonic() - began < 1.0
        release.set()
        async with await asyncio.wait_for(slow, WAIT) as resp:
            assert await resp.text() == "ok"
    finally:
        release.set()
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
    # The one connection is free again.
    async with gw.http.get("/fast") as resp:
        assert await resp.text() == "ok"


def one_answer_per_connection(n: int) -> RawAnswer:
    """A RawUpstream script: the first request on each connection answered (keep-alive),
    the next one met by a hang-up: a pooled connection whose idle timeout fired just as the
    gateway reused it."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" if n == 1 else None


def request_lines(upstream: RawUpstream) -> list[bytes]:
    """The request line of every request it read."""
    return [seen.request_line.encode() for seen in upstream.seen]


async def test_a_get_on_a_stale_pooled_connection_is_retried_on_a_fresh_one(
    make_raw_upstream: MakeRawUpstream, start_gateway: StartGateway
) -> None:
    upstream = await make_raw_upstream(script=one_answer_per_connection)
    gw = await start_gateway(upstream.url)
    for path in ("/1", "/2"):
        async with gw.http.get(path) as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
    assert request_lines(upstream) == [b"GET /1 HTTP/1.1", b"GET /2 HTTP/1.1", b"GET /2 HTTP/1.1"]


async def test_a_post_on_a_stale_pooled_connection_is_never_sent_twice(
    make_raw_upstream: MakeRawUpstream, start_gateway: StartGateway
) -> None:
    upstream = await make_raw_upstream(script=one_answer_per_connection)
    gw = await start_gateway(upstream.url)
    async with gw.http.get("/1") as resp:
        assert resp.status == 200
    async with gw.http.post("/p", data=b"payload") as resp:
        assert resp.status == 502
        assert await resp.json() == envelope("Upstream unreachable")
    assert request_lines(upstream) == [b"GET /1 HTTP/1.1", b"POST /p HTTP/1.1"]


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_pooled_connection_the_upstream_closed_while_idle_is_not_used(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway, method: str
) -> None:
    requests: list[bytes] = []

    async def closes_when_idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        requests.append(head.split(b"\r\n", 1)[0])
        length = head_fields(head).get("Content-Length")
        if length:
            await reader.readexactly(int(length))
        # A keep-alive answer, then the upstream's idle timeout closes the connection.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    gw = await start_gateway(await start_raw_upstream(closes_when_idle))
    async with gw.http.get("/1") as resp:
        assert resp.status == 200
    await until(lambda: not gw.plane.pool.open_connections, "the gateway to see the close")
    async with gw.http.request(method, "/2", data=b"x" if method == "POST" else None) as resp:
        assert (resp.status, await resp.text()) == (200, "ok")
    assert requests == [b"GET /1 HTTP/1.1", f"{method} /2 HTTP/1.1".encode()]


# ------------------------------------------------------- client connections


async def test_keep_alive_answers_three_requests_on_one_connection_in_order(
    start_upstream: StartUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    gw = await start_gateway(await start_upstream(ECHO))
    client = await connect(gw)
    for n in range(3):
        await client.send(b"GET /r%d HTTP/1.1\r\nHost: gw\r\n\r\n" % n)
        answer = await client.read_answer()
        assert answer.status == 200
        assert "Connection" not in answer.fields
        assert orjson.loads(answer.body)["raw_path"] == f"/r{n}"


async def test_pipelined_requests_are_answered_in_order(
    start_upstream: StartUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        if request.raw_path == "/slow":
            await asyncio.sleep(0.05)  # were answers concurrent, /fast would overtake it
        return web.Response(body=request.raw_path.encode() + b" " + body)

    gw = await start_gateway(await start_upstream(handler))
    client = await connect(gw)
    await client.send(
        b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n"
        b"POST /post HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /fast HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    bodies = [(await client.read_answer()).body for _ in range(3)]
    assert bodies == [b"/slow ", b"/post abc", b"/fast "]
    assert await client.closed()


async def test_many_pipelined_requests_past_the_queue_bound_are_all_answered_in_order(
    start_upstream: StartUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    gw = await start_gateway(await start_upstream(ECHO))
    client = await connect(gw)
    count = 30  # well past the queue bound, where the gateway pauses reading
    await client.send(b"".join(b"GET /p%d HTTP/1.1\r\nHost: gw\r\n\r\n" % n for n in range(count)))
    for n in range(count):
        answer = await client.read_answer()
        assert orjson.loads(answer.body)["raw_path"] == f"/p{n}"


async def test_http_1_0_client_gets_a_close_delimited_answer_to_a_chunked_stream(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    async def stream(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)  # chunked to the gateway: no length is known
        await resp.write(b"one ")
        await resp.write(b"two")
        return resp

    gw = await start_gateway(await start_upstream(stream))
    head, body = await raw_http(gw, b"GET /s HTTP/1.0\r\nHost: gw\r\n\r\n")
    fields = head_fields(head)
    assert head.split(b" ")[1] == b"200"
    assert "Transfer-Encoding" not in fields  # HTTP/1.0 has no chunked coding
    assert "Content-Length" not in fields
    assert fields["Connection"] == "close"
    assert body == b"one two"


async def test_http_1_0_keep_alive_client_is_told_the_connection_persists(
    start_upstream: StartUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    gw = await start_gateway(await start_upstream(ECHO))
    client = await connect(gw)
    for n in range(2):
        await client.send(b"GET /k%d HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\r\n" % n)
        answer = await client.read_answer()
        assert answer.fields["Connection"].lower() == "keep-alive"
        assert orjson.loads(answer.body)["raw_path"] == f"/k{n}"


async def test_upgrade_request_is_answered_as_plain_http_and_the_connection_closed(
    start_upstream: StartUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    # Upgrade is hop-by-hop: the upstream gets a plain GET; what the client would send next
    # is not HTTP/1.1, so the gateway closes after the answer and says so.
    gw = await start_gateway(await start_upstream(ECHO))
    client = await connect(gw)
    await client.send(
        b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    answer = await client.read_answer()
    assert answer.status == 200
    assert answer.fields["Connection"] == "close"
    headers = seen_headers(orjson.loads(answer.body))
    assert "Upgrade" not in headers
    assert "Connection" not in headers
    assert headers["Sec-WebSocket-Version"] == "13"
    assert await client.closed()


async def test_expect_100_continue_gets_100_before_the_final_answer(
    start_upstream: StartUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    gw = await start_gateway(await start_upstream(ECHO))
    client = await connect(gw)
    await client.send(
        b"POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await client.read_answer()
    assert interim.head == b"HTTP/1.1 100 Continue"
    await client.send(b"hello")
    final = await client.read_answer()
    assert final.status == 200
    report = orjson.loads(final.body)
    assert report["size"] == 5
    assert "Expect" not in seen_headers(report)  # the gateway answered it itself


OVERSIZED_HEADS = {
    "request target over 8190 bytes -> 414": (
        b"GET /" + b"a" * 8190 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
        414,
        "Request target too long",
    ),
    "header line over 8190 bytes -> 431": (
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"b" * 8190 + b"\r\n\r\n",
        431,
        "Request header too large",
    ),
    "more than 128 header lines -> 431": (
        b"GET / HTTP/1.1\r\nHost: gw\r\n" + b"X-Many: 1\r\n" * 128 + b"\r\n",
        431,
        "Too many request headers",
    ),
}


@pytest.mark.parametrize(
    ("request_", "status", "reason"), OVERSIZED_HEADS.values(), ids=OVERSIZED_HEADS.keys()
)
async def test_oversized_request_head_is_refused_and_the_connection_closed(
    make_upstream: MakeUpstream,
    start_gateway: StartGateway,
    connect: Connect,
    request_: bytes,
    status: int,
    reason: str,
) -> None:
    upstream = await make_upstream(OK)
    gw = await start_gateway(upstream.url)
    client = await connect(gw)
    await client.send(request_)
    answer = await client.read_answer()
    assert answer.status == status
    assert orjson.loads(answer.body) == envelope(reason)
    assert answer.fields["Connection"] == "close"
    assert await client.closed()
    assert upstream.arrived == 0


async def test_request_head_at_the_size_limits_is_forwarded(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    # Sizes only: a JSON echo of an 8 KiB header would be noise in a failure report.
    seen: list[int] = []

    async def sizes(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(len(request.raw_path) + len(request.headers.get("X-Big", "")))
        return web.Response(text="ok")

    gw = await start_gateway(await start_upstream(sizes))
    target = b"/" + b"a" * 4000
    value = b"b" * (8190 - len(b"X-Big"))  # name + value exactly at the line limit
    head, _ = await raw_http(
        gw,
        b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nX-Big: " + value + b"\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 200 ")
    assert seen == [len(target) + len(value)]


CONFLICTING_FRAMING = {
    "Content-Length then Transfer-Encoding": (
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    ),
    "Transfer-Encoding then Content-Length": (
        b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"
    ),
}


@pytest.mark.parametrize("framing", CONFLICTING_FRAMING.values(), ids=CONFLICTING_FRAMING.keys())
async def test_conflicting_framing_is_400_and_close_and_never_forwarded(
    make_upstream: MakeUpstream, start_gateway: StartGateway, connect: Connect, framing: bytes
) -> None:
    upstream = await make_upstream(OK)
    gw = await start_gateway(upstream.url)
    client = await connect(gw)
    await client.send(
        b"POST /x HTTP/1.1\r\nHost: gw\r\n" + framing + b"\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
    )
    answer = await client.read_answer()
    assert answer.status == 400
    report = orjson.loads(answer.body)
    assert report["status"] is False
    assert report["result"].startswith("Bad request")
    assert answer.fields["Connection"] == "close"
    assert await client.closed()
    assert upstream.arrived == 0


async def test_client_stalling_mid_head_is_closed(
    start_upstream: StartUpstream,
    start_gateway: StartGateway,
    connect: Connect,
) -> None:
    gw = await start_gateway(
        await start_upstream(ECHO), server={"header_timeout": 0.2, "keepalive_timeout": 0.2}
    )
    silent = await connect(gw)
    stalled = await connect(gw)
    await stalled.send(b"GET / HTTP/1.1\r\nHost: gw\r\n")
    # The sweep runs once a second: a 0.2 s deadline is caught within about 1.2 s.
    async with asyncio.timeout(DRAIN):
        assert await silent.read_to_eof() == b""  # not a byte sent: closed without a word
        answer = await stalled.read_to_eof()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b'{"status":false,"result":"Request head timeout"}')


# ------------------------------------------------------------- request buffering (default)


async def test_slow_uploads_hold_no_upstream_connection(
    make_upstream: MakeUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    # The probe's case: four clients trickle POST bodies in front of a pool of four. Streamed,
    # they held every upstream connection and every other client got 503; buffered, the
    # pool is untouched until a body is complete.
    upstream = await make_upstream(OK)
    gw = await start_gateway(upstream.url, max_connections=4, max_connections_per_client=4)
    trickling = []
    for i in range(4):
        client = await connect(gw)
        await client.send(b"POST /slow-%d HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\nab" % i)
        trickling.append(client)
    for _ in range(6):
        async with gw.http.get("/other") as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
    assert gw.plane.pool.open_connections <= 1  # the GETs shared one; no upload holds any
    assert upstream.arrived == 6
    for client in trickling:
        await client.send(b"cdefghij")
        answer = await client.read_answer()
        assert (answer.status, answer.body) == (200, b"ok")
    assert upstream.arrived == 10


async def test_a_body_past_the_memory_part_goes_through_a_file_and_arrives_intact(
    start_upstream: StartUpstream, start_gateway: StartGateway, tmp_path: Path
) -> None:
    # The upstream reads slowly: the file is sent only as fast as its socket takes it.
    async def slow_echo(request: web.BaseRequest) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            digest.update(chunk)
            size += len(chunk)
            await asyncio.sleep(0.001)  # the scenario: an upstream that reads slowly
        return web.json_response(
            {"sha256": digest.hexdigest(), "size": size, "headers": list(request.headers.items())}
        )

    gw = await start_gateway(
        await start_upstream(slow_echo),
        limits={"buffer_memory_bytes": 64 * 1024, "buffer_dir": str(tmp_path)},
    )
    body = os.urandom(6 * MiB)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 512 * 1024):
            yield body[start : start + 512 * 1024]

    async with gw.http.put("/big", data=chunks()) as resp:  # chunked from the client
        assert resp.status == 200
        report = await resp.json()
    assert (report["size"], report["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    headers = seen_headers(report)
    assert headers["Content-Length"] == str(len(body))  # re-framed with its length
    assert "Transfer-Encoding" not in headers
    assert list(tmp_path.iterdir()) == []  # the temporary file never had a name


async def test_a_body_that_cannot_be_buffered_is_a_503_and_never_forwarded(
    make_upstream: MakeUpstream, start_gateway: StartGateway, tmp_path: Path
) -> None:
    upstream = await make_upstream(OK)
    gw = await start_gateway(
        upstream.url,
        limits={"buffer_memory_bytes": 1024, "buffer_dir": str(tmp_path / "missing")},
    )
    async with gw.http.post("/up", data=b"x" * 4096) as resp:
        assert resp.status == 503
        assert await resp.json() == envelope("Cannot buffer the request body")
    assert upstream.arrived == 0
    async with gw.http.post("/small", data=b"x" * 100) as resp:  # memory needs no file
        assert resp.status == 200


async def test_expect_continue_is_answered_by_the_gateway_once_it_decided(
    start_upstream: StartUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    gw = await start_gateway(await start_upstream(ECHO))
    client = await connect(gw)
    await client.send(
        b"PUT /e HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert await client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    await client.send(b"hello")
    answer = await client.read_answer()
    assert answer.status == 200
    report = orjson.loads(answer.body)
    assert report["size"] == 5
    assert "Expect" not in seen_headers(report)


async def test_a_keyed_upload_on_a_stale_pooled_connection_is_sent_again_whole(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway
) -> None:
    # Buffered, the body is still at hand: a request the client marked idempotent may go
    # again when the reused connection closed before a byte of answer.
    seen: list[tuple[bytes, bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(int(head_fields(head).get("Content-Length", "0")))
            seen.append((head.split(b"\r\n", 1)[0], body))
            if not first:
                writer.transport.abort()
                return
            first = False
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    gw = await start_gateway(await start_raw_upstream(serve))
    async with gw.http.get("/warm") as resp:
        assert resp.status == 200
    async with gw.http.put("/keyed", data=b"payload", headers={"Idempotency-Key": "k"}) as resp:
        assert (resp.status, await resp.text()) == (200, "ok")
    assert seen[1:] == [(b"PUT /keyed HTTP/1.1", b"payload")] * 2


# ------------------------------------------------------------- one client's share of the pool


async def test_one_address_holds_at_most_its_share_of_the_pool(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    started = 0
    release = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal started
        if request.raw_path.startswith("/slow"):
            started += 1
            await release.wait()
        return web.Response(text="ok")

    # A pool of 4, two per address (the real Enforcer: it says which address a request is
    # from); 127.0.0.2 is another client on loopback.
    gw = await start_gateway(
        await start_upstream(handler),
        max_connections=4,
        max_connections_per_client=2,
        enforcer="real",
    )
    slow = [asyncio.ensure_future(gw.http.get(f"/slow{i}")) for i in range(2)]
    other = aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{gw.port}",
        connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)),
    )
    try:
        await until(lambda: started >= 2, "both slow requests at the upstream")
        async with gw.http.get("/third") as resp:
            assert resp.status == 429
            assert await resp.json() == envelope("Too many concurrent requests from this address")
            assert resp.headers["Retry-After"] == "1"
        async with other.get("/elsewhere") as resp:  # another address still has room
            assert (resp.status, await resp.text()) == (200, "ok")
        assert gw.plane.pool.held_by("127.0.0.1") == 2
    finally:
        release.set()
        for response in await asyncio.gather(*slow, return_exceptions=True):
            if isinstance(response, aiohttp.ClientResponse):
                response.release()
        await other.close()
    # Every way a request ends gives its share back.
    pool = gw.plane.pool
    await until(
        lambda: not (pool.held_by("127.0.0.1") or pool.held_by("127.0.0.2")), "the shares back"
    )
    async with gw.http.get("/after") as resp:
        assert resp.status == 200
    assert gw.plane.metrics.decisions["client_busy"] == 1


async def test_an_address_share_is_given_back_however_the_request_ends(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    # Answered, reset by the upstream, garbled, the client leaving: never a leaked share.
    answer_hang = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            if path == b"/reset":
                writer.transport.abort()
                return
            if path == b"/garbled":
                writer.write(b"HTTP/1.1 2x0 nonsense\r\n\r\n")
            else:
                if path == b"/hang":
                    await answer_hang.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    gw = await start_gateway(
        await start_raw_upstream(serve),
        max_connections=2,
        max_connections_per_client=1,
        enforcer="real",
    )
    pool = gw.plane.pool
    for path in ("/ok", "/reset", "/garbled", "/ok"):
        async with gw.http.get(path) as resp:
            assert resp.status in (200, 502)
        assert pool.held_by("127.0.0.1") == 0, path

    async def waiting_client() -> RawClient:
        client = await connect(gw)
        await client.send(b"GET /hang HTTP/1.1\r\nHost: gw\r\n\r\n")
        await until(lambda: pool.held_by("127.0.0.1"), "the request to hold its share")
        return client

    # A reset: the client is gone for sure; its request is dropped at once.
    (await waiting_client()).reset()
    await until(lambda: not pool.held_by("127.0.0.1"), "the reset request's share back")
    # A FIN after a complete request reads as a half-close: the answer is still due, so
    # the share is held until the upstream answers, then given back.
    (await waiting_client()).abort()
    for _ in range(10):
        await asyncio.sleep(0.01)  # a quiet period, watching the share stay held
        assert pool.held_by("127.0.0.1") == 1
    answer_hang.set()
    await until(lambda: not pool.held_by("127.0.0.1"), "the answered request's share back")


async def test_an_upstream_answering_before_taking_a_buffered_body_is_not_reused(
    start_raw_upstream: StartRawUpstream, start_gateway: StartGateway, connect: Connect
) -> None:
    # The body goes from its file as fast as the upstream takes it; this upstream answers
    # at once and reads none of it. The connection must not go back to the pool with the
    # rest of the body unsent: the next request would be read as the body's tail.
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if first:
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")
                await writer.drain()
                await asyncio.sleep(WAIT)  # the scenario: silent, the connection open, body unread
                return
            length = int(head_fields(head).get("Content-Length", "0"))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    gw = await start_gateway(await start_raw_upstream(serve), max_body_bytes=64 * MiB, timeout=3.0)
    client = await connect(gw)
    size = 16 * MiB  # past the 1 MiB memory part: sent from its file
    await client.send(b"PUT /up HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % size)
    await client.send(b"u" * size)
    answer = await client.read_answer()
    assert (answer.status, answer.body) == (401, b"nope")
    async with gw.http.get("/next") as resp:
        assert (resp.status, await resp.text()) == (200, "ok")
    assert connections == 2


async def test_the_per_address_counts_stay_bounded(
    start_raw_upstream: StartRawUpstream,
) -> None:
    # Every address ever seen would otherwise keep an entry: those holding nothing are
    # dropped once PRUNE_AT addresses are counted.
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    origin = await start_raw_upstream(idle)
    pool = UpstreamPool(parse_config(f"upstream: {{url: '{origin}'}}", "test").upstream)
    conn, reused = await pool.acquire("198.51.100.1")
    assert not reused
    pool.release(conn)
    for i in range(3 * PRUNE_AT):
        conn, reused = await pool.acquire(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        assert reused
        pool.release(conn)
    assert len(pool._held) <= PRUNE_AT + 1
    assert pool.held_by("10.0.0.1") == 0
    pool.close()
