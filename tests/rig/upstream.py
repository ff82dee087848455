"""Upstreams for fault tests: they record every request they saw and misbehave on command.

`CountingUpstream` is an aiohttp app on a free loopback port. Per path, or for every path
without its own (the switch), it answers normally, slowly, streams chunks with pauses, or
resets the connection in the middle of its body. Every answer it makes carries `MARK`, so a
test can tell the upstream's answers from the gateway's own.

`RawUpstream` is a raw asyncio server for what aiohttp refuses to send: it writes a given
byte string as the answer to each request (`MALFORMED` holds a corpus of broken answers).

Both record a `Seen` per request: method, raw target, headers, and the body's sha256 and size
(`complete` is false when the body never arrived whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import orjson
from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from tests.rig.faults import rst

MARK: Final = "X-Counting-Upstream"  # on every answer the upstream itself makes
LOOPBACK: Final = "127.0.0.1"
SHUTDOWN_TIMEOUT: Final = 2.0  # seconds close() gives a running handler, twice (then cut)

# What a request or a reply broken by the other side raises inside a handler.
_BROKEN: Final = (ConnectionError, RequestPayloadError, HttpProcessingError, ClientPayloadError)


@dataclass(frozen=True)
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    body_sha256: str
    body_size: int
    complete: bool = True  # False: the connection broke before the body was whole

    @property
    def device_id(self) -> str | None:
        """The X-Device-Id the request carried, if any."""
        return self.headers.get("X-Device-Id")


# ---------------------------------------------------------------- behaviours


@dataclass(frozen=True)
class Reply:
    """Answer at once. `body=None`: a JSON report of what arrived (see `report`)."""

    status: int = 200
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Slow:
    """Wait `delay` seconds (after reading the request), then answer as `then`."""

    delay: float
    then: Reply = Reply()


@dataclass(frozen=True)
class Stream:
    """Send `chunks` with `delay` seconds before each one after the first.

    Chunked transfer coding unless `declare_length`, which sends a Content-Length of the total.
    """

    chunks: tuple[bytes, ...]
    delay: float = 0.0
    status: int = 200
    declare_length: bool = False


@dataclass(frozen=True)
class ResetMidBody:
    """Announce `declared` bytes, send `sent` of them, then reset the connection (RST)."""

    sent: bytes = b"x" * 1024
    declared: int = 1 << 20


Behaviour = Reply | Slow | Stream | ResetMidBody


def report(seen: Seen) -> bytes:
    """The default answer body: what the upstream saw, as JSON."""
    return orjson.dumps(
        {
            "upstream": True,
            "method": seen.method,
            "path": seen.raw_path,
            "device": seen.device_id,
            "sha256": seen.body_sha256,
            "size": seen.body_size,
        }
    )


class CountingUpstream:
    """An aiohttp upstream on a free loopback port that records every request it saw."""

    def __init__(self, default: Behaviour = Reply()) -> None:
        self.seen: list[Seen] = []
        self.arrived = 0  # request heads received (a request whose body breaks counts too)
        self.in_progress = 0  # requests being handled now (a stuck one shows here)
        self.url = ""
        self._default: Behaviour = default
        self._by_path: dict[str, Behaviour] = {}
        self._runner: web.AppRunner | None = None

    # -- control -----------------------------------------------------------------------

    def behave(self, behaviour: Behaviour, *, path: str | None = None) -> None:
        """How to answer `path` (the raw path without the query), or, without one, every
        path that has no behaviour of its own."""
        if path is None:
            self._default = behaviour
        else:
            self._by_path[path] = behaviour

    def forget(self, path: str) -> None:
        """`path` follows the switch again."""
        self._by_path.pop(path, None)

    def count(self, *, path: str | None = None, device_id: str | None = None) -> int:
        """Requests seen, optionally only those for a raw path (query ignored) or device."""
        return sum(
            1
            for s in self.seen
            if (path is None or s.raw_path.split("?", 1)[0] == path)
            and (device_id is None or s.device_id == device_id)
        )

    def paths(self) -> list[str]:
        """The raw paths seen, in order."""
        return [s.raw_path for s in self.seen]

    async def start(self) -> str:
        """Listen on a free loopback port; returns the origin URL."""
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # close() waits at most this long for handlers still running (aiohttp: 2 x 60 s).
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- serving -----------------------------------------------------------------------

    async def _record(self, request: web.Request) -> Seen:
        digest = hashlib.sha256()
        size = 0
        complete = True
        try:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
        except _BROKEN:
            complete = False
        seen = Seen(
            request.method, request.raw_path, request.headers, digest.hexdigest(), size, complete
        )
        self.seen.append(seen)
        return seen

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.arrived += 1
        self.in_progress += 1
        try:
            return await self._answer(request)
        finally:
            self.in_progress -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        behaviour = self._by_path.get(request.rel_url.raw_path, self._default)
        seen = await self._record(request)
        if isinstance(behaviour, Slow):
            await asyncio.sleep(behaviour.delay)
            behaviour = behaviour.then
        if isinstance(behaviour, Reply):
            body = report(seen) if behaviour.body is None else behaviour.body
            headers = {MARK: "1", **behaviour.headers}
            if behaviour.body is None:
                headers.setdefault("Content-Type", "application/json")
            return web.Response(status=behaviour.status, body=body, headers=headers)
        if isinstance(behaviour, Stream):
            return await self._stream(request, behaviour)
        return await self._reset_mid_body(request, behaviour)

    async def _stream(self, request: web.Request, how: Stream) -> web.StreamResponse:
        response = web.StreamResponse(status=how.status, headers={MARK: "1"})
        if how.declare_length:
            response.content_length = sum(len(c) for c in how.chunks)
        else:
            response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for i, chunk in enumerate(how.chunks):
                if i and how.delay:
                    await asyncio.sleep(how.delay)
                await response.write(chunk)
        except _BROKEN:
            pass  # the reader went away: aiohttp closes the connection quietly
        return response

    async def _reset_mid_body(self, request: web.Request, how: ResetMidBody) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={MARK: "1"})
        response.content_length = how.declared
        with contextlib.suppress(*_BROKEN):
            await response.prepare(request)
            await response.write(how.sent)
        rst(request.transport)
        return response  # aiohttp sees the connection gone and logs nothing


# ---------------------------------------------------------------- raw answers

_OK: Final = b"HTTP/1.1 200 OK\r\n" + MARK.encode() + b": 1\r\nContent-Length: 2\r\n\r\nok"

MALFORMED: Final[Mapping[str, bytes]] = {
    "bad_status_line": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "nul_in_header": b"HTTP/1.1 200 OK\r\nX-Evil: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "content_length_and_chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "negative_content_length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok",
    # Well-formed but huge: 128 KiB of one header line (llhttp itself sets no size limit).
    "oversized_headers": (
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (128 * 1024) + b"\r\nContent-Length: 2\r\n\r\nok"
    ),
    "bad_chunk_size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n"
    ),
}


class RawUpstream:
    """A raw asyncio upstream that writes a given byte string as the answer to each request.

    The request is read whole (Content-Length or chunked body) and recorded first; then the
    answer for its raw path (or the default) is written verbatim, and with `close` the
    connection is closed after it (else the next request on it is read).
    """

    def __init__(self, answer: bytes = _OK, *, close: bool = True) -> None:
        self.seen: list[Seen] = []
        self.url = ""
        self.close_after = close
        self._default = answer
        self._by_path: dict[str, bytes] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def answer_with(self, answer: bytes, *, path: str | None = None) -> None:
        """The bytes to answer `path` with (raw path without the query), or by default."""
        if path is None:
            self._default = answer
        else:
            self._by_path[path] = answer

    async def start(self) -> str:
        """Listen on a free loopback port; returns the origin URL."""
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.url = f"http://{LOOPBACK}:{self._server.sockets[0].getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        # Aborted, a connection's reader sees the end and its task returns by itself:
        # cancelling it instead makes Python 3.11's start_server log the cancellation.
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                seen = await _read_request(reader)
                if seen is None:
                    break
                self.seen.append(seen)
                path = seen.raw_path.split("?", 1)[0]
                writer.write(self._by_path.get(path, self._default))
                await writer.drain()
                if self.close_after:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Seen | None:
    """One request from the stream (None at a clean end before a new request).

    A head over the StreamReader's limit (64 KiB) raises LimitOverrunError: the connection
    is dropped.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    digest = hashlib.sha256()
    size = 0
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            n = int(size_line.split(b";", 1)[0], 16)
            if n == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer fields
                break
            data = await reader.readexactly(n + 2)
            digest.update(data[:-2])
            size += n
    elif (length := int(headers.get("Content-Length", "0"))) > 0:
        data = await reader.readexactly(length)
        digest.update(data)
        size = length
    return Seen(method, target, CIMultiDictProxy(headers), digest.hexdigest(), size)
