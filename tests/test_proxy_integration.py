"""The proxy on real loopback sockets: a real upstream aiohttp app, the gateway in front of it."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer
from yarl import URL

from gateway.config import LimitSettings, UpstreamSettings
from gateway.proxy import Forwarder, forwarder_ctx

pytestmark = pytest.mark.integration

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StartUpstream = Callable[[Handler], Awaitable[str]]
StartGateway = Callable[..., Awaitable["Gateway"]]

MiB = 1024 * 1024
# Bounds every wait in these tests, far below pytest-timeout's 120 s.
WAIT = 10.0


def envelope(reason: str) -> dict[str, Any]:
    return {"status": False, "result": reason}


async def echo(request: web.Request) -> web.Response:
    """Report what arrived, hashing the body as it streams in."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": list(request.headers.items()),
            "sha256": digest.hexdigest(),
            "size": size,
        },
        dumps=lambda obj: orjson.dumps(obj).decode(),
    )


def seen_headers(report: dict[str, Any]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in report["headers"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def start_upstream(aiohttp_server: AiohttpServer) -> StartUpstream:
    """Start an upstream app that sends every path to `handler`; returns its origin."""

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = await aiohttp_server(app, auto_decompress=False)
        return f"http://127.0.0.1:{server.port}"

    return start


@dataclass(frozen=True)
class Gateway:
    """The proxy listening on loopback, and a client session (never decompressing) for it."""

    http: aiohttp.ClientSession
    port: int


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    """Start the proxy in front of `origin`, served the way the app wiring serves it.

    An AppRunner rather than aiohttp's TestServer: TestServer cancels a handler when its
    client leaves, which production does not do, and that would hide how the proxy notices.
    """
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(
        origin: str,
        *,
        max_body_bytes: int = 10 * MiB,
        preserve_host: bool = False,
        connect_timeout: float = 2.0,
        timeout: float = WAIT,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Gateway:
        forwarder = Forwarder(
            UpstreamSettings(
                url=origin,
                preserve_host=preserve_host,
                connect_timeout=connect_timeout,
                timeout=timeout,
                max_connections=10,
            ),
            LimitSettings(max_body_bytes=max_body_bytes),
        )

        async def handle(request: web.Request) -> web.StreamResponse:
            return await forwarder.forward(request, extra_headers)

        # The public server must never decompress either (the app wiring does the same).
        app = web.Application(handler_args={"auto_decompress": False})
        app.cleanup_ctx.append(forwarder_ctx(forwarder))
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        http = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}", auto_decompress=False)
        sessions.append(http)
        return Gateway(http, port)

    yield start
    for http in sessions:
        await http.close()
    for runner in runners:
        await runner.cleanup()


async def raw_http(gw: Gateway, request: bytes) -> tuple[bytes, bytes]:
    """Send `request` as bytes on a new connection; read to EOF; return (head, body)."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(request)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def head_fields(head: bytes) -> CIMultiDict[str]:
    return CIMultiDict(
        (name.strip(), value.strip())
        for name, _, value in (line.decode().partition(":") for line in head.split(b"\r\n")[1:])
    )


# ------------------------------------------------------------------------ bodies


class BodyRecorder:
    """An upstream handler that reads the body and records whether it arrived complete."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.outcome: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    async def handle(self, request: web.Request) -> web.Response:
        self.started.set()
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
        except BaseException:
            # Cut off: aiohttp raised, or cancelled the handler when the peer went away.
            self.outcome.set_result(("broken", size))
            raise
        self.outcome.set_result(("complete", size))
        return web.Response(text="ok")


async def test_5_mib_body_arrives_byte_identical_with_its_content_length(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(await start_upstream(echo))
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


async def test_chunked_upload_is_forwarded_chunked_and_intact(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(await start_upstream(echo))
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
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    limit = 64 * 1024
    upstream = BodyRecorder()
    gw = await start_gateway(await start_upstream(upstream.handle), max_body_bytes=limit)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * 16 * 1024
        # Only go over the limit once the upstream has the request in hand, so the test sees
        # the cut rather than a request that never left the gateway.
        await asyncio.wait_for(upstream.started.wait(), WAIT)
        yield b"b" * 64 * 1024

    async with gw.http.post("/upload", data=chunks()) as resp:
        assert resp.status == 413
        assert await resp.json() == envelope("Request body too large")
    kind, size = await asyncio.wait_for(upstream.outcome, WAIT)
    assert kind == "broken"
    assert size <= limit


async def test_declared_body_over_the_limit_is_413_before_anything_is_forwarded(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    calls = 0

    async def counted(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response()

    gw = await start_gateway(await start_upstream(counted), max_body_bytes=1024)
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        # Only the start of the body: the answer must come from the declaration alone.
        writer.write(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1025\r\n\r\n")
        writer.write(b"x" * 100)
        head = await reader.readuntil(b"\r\n\r\n")
        fields = head_fields(head)
        body = await reader.readexactly(int(fields["Content-Length"]))
        writer.close()
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 413 ")
    assert orjson.loads(body) == envelope("Request body too large")
    # The unread body makes the connection unusable for another request.
    assert fields["Connection"] == "close"
    assert calls == 0


async def test_body_exactly_at_the_limit_is_forwarded(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(await start_upstream(echo), max_body_bytes=1024)
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
    start_upstream: StartUpstream, start_gateway: StartGateway, start: bytes
) -> None:
    upstream = BodyRecorder()
    gw = await start_gateway(await start_upstream(upstream.handle))
    async with asyncio.timeout(WAIT):
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: gw\r\n" + start)
        await upstream.started.wait()
        writer.transport.abort()
        kind, size = await upstream.outcome
    assert kind == "broken"
    assert size <= 16384


# ------------------------------------------------------------------- path, query


HOSTILE_TARGETS = [
    "//evil.example/x",
    "/%2e%2e/admin",
    "/a%2Fb;c?x=%00",
    "/a/../b/./c",
    "/%ff%fe/%zz",
    "/x?b=2&a=1&a=3&empty=&=odd&plus=a+b&sp=%20",
    "/q?redirect=http://evil.example/&&x",
]


@pytest.mark.parametrize("target", HOSTILE_TARGETS)
async def test_raw_path_and_query_reach_the_upstream_byte_for_byte(
    start_upstream: StartUpstream, start_gateway: StartGateway, target: str
) -> None:
    gw = await start_gateway(await start_upstream(echo))
    head, body = await raw_http(
        gw, f"GET {target} HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n".encode()
    )
    assert head.startswith(b"HTTP/1.1 200 ")
    report = orjson.loads(body)
    assert report["raw_path"] == target


async def test_absolute_form_target_is_refused_and_not_forwarded(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    calls = 0

    async def counted(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response()

    gw = await start_gateway(await start_upstream(counted))
    head, body = await raw_http(
        gw,
        b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 400 ")
    assert orjson.loads(body) == envelope("Invalid request target")
    assert calls == 0


# ----------------------------------------------------------------------- headers


async def test_only_the_clients_own_headers_plus_forwarding_ones_reach_the_upstream(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    origin = await start_upstream(echo)
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
        # No Accept, Accept-Encoding, User-Agent or Content-Type of the gateway's own client.
        assert {name for name, _ in orjson.loads(body)["headers"]} == expected


async def test_x_forwarded_headers_and_upstream_host(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    origin = await start_upstream(echo)
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
    assert headers.getall("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert headers.getall("X-Forwarded-Proto") == ["http"]
    assert headers.getall("X-Forwarded-Host") == ["api.example.com"]
    assert headers.getall("Host") == [URL(origin).host_port_subcomponent]


@pytest.mark.parametrize("preserve", [True, False], ids=["preserve_host", "upstream_host"])
async def test_preserve_host(
    start_upstream: StartUpstream, start_gateway: StartGateway, preserve: bool
) -> None:
    origin = await start_upstream(echo)
    gw = await start_gateway(origin, preserve_host=preserve)
    async with gw.http.get("/who", headers={"Host": "api.example.com"}) as resp:
        headers = seen_headers(await resp.json())
    expected = "api.example.com" if preserve else URL(origin).host_port_subcomponent
    assert headers.getall("Host") == [expected]


async def test_hop_by_hop_headers_are_dropped_both_ways(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    hop_request: CIMultiDict[str] = CIMultiDict()

    async def handler(request: web.Request) -> web.StreamResponse:
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

    async def handler(request: web.Request) -> web.StreamResponse:
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


async def test_extra_headers_are_added_and_win_over_the_upstreams(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
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

    async def handler(request: web.Request) -> web.StreamResponse:
        cookies_seen.append(request.headers.get("Cookie"))
        return web.Response(headers={"Set-Cookie": "session=alice; Path=/"})

    gw = await start_gateway(await start_upstream(handler))
    for _ in range(2):
        # The test client keeps no cookies either, so any Cookie would come from the gateway.
        async with gw.http.get("/", cookies=None) as resp:
            assert resp.headers["Set-Cookie"] == "session=alice; Path=/"
        gw.http.cookie_jar.clear()
    assert cookies_seen == [None, None]


# ---------------------------------------------------------------------- encoding


async def test_gzip_passes_through_byte_identical_both_ways(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    upload = gzip.compress(b"upload " * 10_000)
    download = gzip.compress(b"download " * 10_000)
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
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

    async def handler(request: web.Request) -> web.StreamResponse:
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

    async def stream(request: web.Request) -> web.StreamResponse:
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
    async def sized(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 1000, content_type="application/octet-stream")

    gw = await start_gateway(await start_upstream(sized))
    head, body = await raw_http(
        gw, b"GET /sized HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n"
    )
    fields = head_fields(head)
    assert fields["Content-Length"] == "1000"
    assert "Transfer-Encoding" not in fields
    assert body == b"x" * 1000


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
    async def handler(request: web.Request) -> web.StreamResponse:
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


# ------------------------------------------------------------------------ failures


async def test_upstream_refused_is_502_envelope(start_gateway: StartGateway) -> None:
    gw = await start_gateway(f"http://127.0.0.1:{free_port()}")
    async with gw.http.get("/") as resp:
        assert resp.status == 502
        assert await resp.json() == envelope("Upstream unreachable")


async def test_upstream_slow_to_answer_is_504_envelope(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    never = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
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


@pytest.fixture
def unaccepting_listener() -> Iterator[str]:
    """A loopback listener whose accept queue is full, so new SYNs are dropped (Linux).

    Skips when the kernel completes connects anyway: then there is no way to provoke a
    connect timeout on loopback, and a refused connect is covered by its own test.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(address)
    except TimeoutError:
        pass
    else:
        pytest.skip("the kernel accepted a connect beyond the listen backlog")
    finally:
        probe.close()
    try:
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


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


@pytest.fixture
async def dribbling_upstream() -> AsyncIterator[str]:
    """A raw upstream that reads the request, then sends its head one byte every 50 ms.

    Every read on the gateway's side gets data in time, so only the deadline for the
    whole head can end the wait.
    """
    tasks: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(int(WAIT / 0.05)):
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()
        await server.wait_closed()


async def test_upstream_dribbling_its_head_is_504_at_the_deadline(
    dribbling_upstream: str, start_gateway: StartGateway
) -> None:
    gw = await start_gateway(dribbling_upstream, timeout=0.3)
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
    async def breaking(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = length
        await resp.prepare(request)
        await resp.write(b"partial")
        await asyncio.sleep(0.05)
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

    async def stalls(request: web.Request) -> web.StreamResponse:
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

    async def ticking(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(int(WAIT / 0.02)):
                await resp.write(b"data: tick\n\n")
                await asyncio.sleep(0.02)
        except BaseException:
            upstream_saw_close.set_result(None)
            raise
        return resp

    gw = await start_gateway(await start_upstream(ticking))
    resp = await gw.http.get("/")
    assert await resp.content.readuntil(b"\n\n") == b"data: tick\n\n"
    resp.close()
    await asyncio.wait_for(upstream_saw_close, WAIT)


async def test_upstream_connections_are_pooled_and_kept_alive(
    start_upstream: StartUpstream, start_gateway: StartGateway
) -> None:
    peers: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    gw = await start_gateway(await start_upstream(handler))
    for _ in range(3):
        async with gw.http.get("/") as resp:
            assert await resp.text() == "ok"
    assert len(peers) == 3
    assert len(set(peers)) == 1
