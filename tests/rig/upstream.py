"""The suite's one upstream factory: loopback upstreams that record every request they saw
and misbehave on command.

`CountingUpstream` is a low-level aiohttp server on a free loopback port: no router (every
target arrives as sent, nothing is refused or rewritten on its side) and parser limits far
above the gateway's (whatever the gateway forwards arrives). Per path, or for every path without
its own (the switch), it answers normally, slowly (one at a time if asked: a server that
queues), streams chunks with pauses, resets the connection in the middle of its body, or
hands the request to a test's own aiohttp handler. Every answer it makes itself carries
`MARK`, so a test can tell the upstream's answers from the gateway's own.

`RawUpstream` is a raw asyncio server for what aiohttp refuses to send: it writes a given
byte string as the answer to each request (`MALFORMED` holds a corpus of broken answers), or
answers the n-th request of each connection as a script says, or runs a test's own
coroutine on each connection.

Both record a `Seen` per request: method, raw target, headers, the body's sha256 and size
(and the body itself when small), which connection it came on, and whether the body arrived
whole. `started` lists the raw paths of the request heads received, whole or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

import orjson
from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from tests.rig.faults import rst
from tests.rig.waits import until

MARK: Final = "X-Counting-Upstream"  # on every answer the upstream itself makes
LOOPBACK: Final = "127.0.0.1"
SHUTDOWN_TIMEOUT: Final = 2.0  # seconds close() gives a running handler, twice (then cut)
KEEP_BODY: Final = 64 * 1024  # a body up to this size is kept in its Seen
# Far above the gateway's own limits (8190-byte lines, 128 fields, before what it adds).
MAX_LINE: Final = 64 * 1024
MAX_HEADERS: Final = 1024

# What a request or a reply broken by the other side raises inside a handler.
_BROKEN: Final = (ConnectionError, RequestPayloadError, HttpProcessingError, ClientPayloadError)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    body_sha256: str
    body_size: int
    complete: bool = True  # False: the connection broke before the body was whole
    connection: int = 0  # which connection it came on, numbered from 1 per upstream
    body: bytes | None = None  # the body itself, when whole and at most KEEP_BODY bytes
    version: str = "HTTP/1.1"

    @property
    def request_line(self) -> str:
        """The request line it came with."""
        return f"{self.method} {self.raw_path} {self.version}"

    @property
    def path(self) -> str:
        """The raw path without its query."""
        return self.raw_path.split("?", 1)[0]

    @property
    def device_id(self) -> str | None:
        """The X-Device-Id the request carried, if any."""
        return self.headers.get("X-Device-Id")


# ---------------------------------------------------------------- behaviours


@dataclass(frozen=True)
class Reply:
    """Answer at once. `body=None`: a JSON report of what arrived (see `report`); a callable
    makes the body from the request's `Seen`."""

    status: int = 200
    body: bytes | Callable[[Seen], bytes] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Slow:
    """Wait `delay` seconds (after reading the request), then answer as `then`.

    `one_at_a_time`: the waits of all such requests run one after the other (a server that
    queues), not side by side.
    """

    delay: float
    then: Reply = Reply()
    one_at_a_time: bool = False


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


@dataclass(frozen=True)
class Handle:
    """Hand the request, its body unread, to a test's own aiohttp handler: for what no other
    behaviour does (a gate the test opens, headers sent back). Counted in `started` only:
    the body, and what to make of it, is the handler's."""

    handler: Handler


Behaviour = Reply | Slow | Stream | ResetMidBody | Handle
REPORT: Final = Reply()  # the default: 200 with a JSON report of the request


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
    """A low-level aiohttp upstream on a free loopback port that records every request."""

    def __init__(self, default: Behaviour = REPORT, *, keepalive_timeout: float = 75.0) -> None:
        self.seen: list[Seen] = []
        self.started: list[str] = []  # raw paths of the heads received (broken bodies too)
        self.in_progress = 0  # requests being handled now (a stuck one shows here)
        self.most_in_progress = 0  # the most ever handled at once
        self.streamed = 0  # body bytes the Stream answers' writes took
        self.streams_finished = 0  # Stream answers written to their end
        self.url = ""
        self._default: Behaviour = default
        self._by_path: dict[str, Behaviour] = {}
        self._keepalive_timeout = keepalive_timeout
        self._queue = asyncio.Lock()  # Slow(one_at_a_time=True) waits in turn
        self._connections: dict[object, int] = {}
        self._runner: web.ServerRunner | None = None

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

    @property
    def arrived(self) -> int:
        """Request heads received (a request whose body breaks counts too)."""
        return len(self.started)

    @property
    def complete(self) -> list[Seen]:
        """The requests whose body arrived whole."""
        return [s for s in self.seen if s.complete]

    @property
    def broken(self) -> list[Seen]:
        """The requests whose connection broke before their body was whole."""
        return [s for s in self.seen if not s.complete]

    def count(self, *, path: str | None = None, device_id: str | None = None) -> int:
        """Requests seen, optionally only those for a raw path (query ignored) or device."""
        return sum(
            1
            for s in self.seen
            if (path is None or s.path == path) and (device_id is None or s.device_id == device_id)
        )

    def paths(self) -> list[str]:
        """The raw paths seen, in order."""
        return [s.raw_path for s in self.seen]

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.url.rsplit(":", 1)[1])

    async def settled(self) -> None:
        """Wait (bounded) until no request is being handled."""
        await until(lambda: self.in_progress == 0, "the upstream to finish its requests")

    async def start(self, listener: socket.socket | None = None) -> str:
        """Listen on a free loopback port, or on `listener` (a bound socket with options of
        the test's own); returns the origin URL."""
        server = web.Server(
            self._handle,
            access_log=None,
            auto_decompress=False,  # a gzip body is hashed as it came
            keepalive_timeout=self._keepalive_timeout,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
        )
        # close() waits at most this long for handlers still running (aiohttp: 2 x 60 s).
        self._runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        site: web.BaseSite
        if listener is None:
            site = web.TCPSite(self._runner, LOOPBACK, 0)
        else:
            site = web.SockSite(self._runner, listener)
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

    def _connection(self, request: web.BaseRequest) -> int:
        return self._connections.setdefault(request.transport, len(self._connections) + 1)

    async def _record(self, request: web.BaseRequest) -> Seen:
        digest = hashlib.sha256()
        size = 0
        kept = bytearray()
        complete = True

        def seen() -> Seen:
            whole = complete and size <= KEEP_BODY
            return Seen(
                method=request.method,
                raw_path=request.raw_path,
                headers=request.headers,
                body_sha256=digest.hexdigest(),
                body_size=size,
                complete=complete,
                connection=self._connection(request),
                body=bytes(kept) if whole else None,
                version=f"HTTP/{request.version.major}.{request.version.minor}",
            )

        try:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
                if size <= KEEP_BODY:
                    kept += chunk
        except _BROKEN:
            complete = False
        except asyncio.CancelledError:  # the peer went away and aiohttp cancelled us
            complete = False
            self.seen.append(seen())
            raise
        self.seen.append(seen())
        return self.seen[-1]

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.started.append(request.raw_path)
        self.in_progress += 1
        self.most_in_progress = max(self.most_in_progress, self.in_progress)
        try:
            behaviour = self._by_path.get(request.rel_url.raw_path, self._default)
            if isinstance(behaviour, Handle):
                return await behaviour.handler(request)
            return await self._answer(request, behaviour)
        finally:
            self.in_progress -= 1

    async def _answer(self, request: web.BaseRequest, behaviour: Behaviour) -> web.StreamResponse:
        seen = await self._record(request)
        if isinstance(behaviour, Slow):
            if behaviour.one_at_a_time:
                async with self._queue:
                    await asyncio.sleep(behaviour.delay)  # the slowness is the behaviour
            else:
                await asyncio.sleep(behaviour.delay)  # the slowness is the behaviour
            behaviour = behaviour.then
        if isinstance(behaviour, Reply):
            return _reply(behaviour, seen)
        if isinstance(behaviour, Stream):
            return await self._stream(request, behaviour)
        assert isinstance(behaviour, ResetMidBody)
        return await self._reset_mid_body(request, behaviour)

    async def _stream(self, request: web.BaseRequest, how: Stream) -> web.StreamResponse:
        response = web.StreamResponse(status=how.status, headers={MARK: "1"})
        if how.declare_length:
            response.content_length = sum(len(c) for c in how.chunks)
        else:
            response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for i, chunk in enumerate(how.chunks):
                if i and how.delay:
                    await asyncio.sleep(how.delay)  # the pause is the behaviour
                await response.write(chunk)
                self.streamed += len(chunk)
            self.streams_finished += 1
        except _BROKEN:
            pass  # the reader went away: aiohttp closes the connection quietly
        return response

    async def _reset_mid_body(
        self, request: web.BaseRequest, how: ResetMidBody
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={MARK: "1"})
        response.content_length = how.declared
        with contextlib.suppress(*_BROKEN):
            await response.prepare(request)
            await response.write(how.sent)
        rst(request.transport)
        return response  # aiohttp sees the connection gone and logs nothing


def _reply(how: Reply, seen: Seen) -> web.Response:
    if how.body is None:
        body = report(seen)
    elif callable(how.body):
        body = how.body(seen)
    else:
        body = how.body
    headers = {MARK: "1", **how.headers}
    if how.body is None:
        headers.setdefault("Content-Type", "application/json")
    return web.Response(status=how.status, body=body, headers=headers)


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

# A scripted answer: bytes written with the connection kept open, (bytes, "close") written
# then closed, None: the connection closed at once without a byte.
RawAnswer = bytes | tuple[bytes, Literal["close"]] | None
Script = Callable[[int], RawAnswer]  # the n-th request of a connection (from 1) -> its answer
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CLOSE_GRACE: Final = 5.0  # seconds close() lets aborted connections end by themselves


class RawUpstream:
    """A raw asyncio upstream for answers written byte for byte (or any raw loopback server
    a test needs: a trap nobody may reach, a Redis that never answers, an echo).

    By default each request is read whole (Content-Length or chunked body) and recorded,
    then the answer for its raw path (or the default) is written verbatim, and with `close`
    the connection is closed after it (else the next request on it is read). With `script`,
    the n-th request of each connection is answered as `script(n)` says. With `serve`, a
    test's own coroutine runs on each connection and nothing is recorded but `connections`.
    """

    def __init__(
        self,
        answer: bytes = _OK,
        *,
        close: bool = True,
        script: Script | None = None,
        serve: Serve | None = None,
    ) -> None:
        self.seen: list[Seen] = []
        self.connections = 0  # connections accepted
        self.url = ""
        self.close_after = close
        self._default = answer
        self._by_path: dict[str, bytes] = {}
        self._script = script
        self._custom = serve
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def answer_with(self, answer: bytes, *, path: str | None = None) -> None:
        """The bytes to answer `path` with (raw path without the query), or by default."""
        if path is None:
            self._default = answer
        else:
            self._by_path[path] = answer

    def count(self, *, path: str | None = None) -> int:
        """Requests seen, optionally only those for a raw path (query ignored)."""
        return sum(1 for s in self.seen if path is None or s.path == path)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.url.rsplit(":", 1)[1])

    async def start(self) -> str:
        """Listen on a free loopback port; returns the origin URL."""
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.url = f"http://{LOOPBACK}:{self._server.sockets[0].getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        # Aborted, a connection's reader sees the end and its task returns by itself; a
        # test's own coroutine may wait on anything else, so it is cancelled at once.
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        if tasks:
            grace = 0.0 if self._custom is not None else CLOSE_GRACE
            _, stuck = await asyncio.wait(tasks, timeout=grace)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _answer(self, seen: Seen, n: int) -> RawAnswer:
        if self._script is not None:
            return self._script(n)
        answer = self._by_path.get(seen.path, self._default)
        return (answer, "close") if self.close_after else answer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        number = self.connections
        try:
            if self._custom is not None:
                await self._custom(reader, writer)
                return
            n = 0
            while (seen := await _read_request(reader, number)) is not None:
                self.seen.append(seen)
                n += 1
                answer = self._answer(seen, n)
                if answer is None:
                    break
                writer.write(answer if isinstance(answer, bytes) else answer[0])
                await writer.drain()
                if not isinstance(answer, bytes):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except RuntimeError:
            if not writer.transport.is_closing():
                raise
            # uvloop's word for a write on a connection close() aborted meanwhile
        except asyncio.CancelledError:
            # Cancelled by close(): end quietly (Python 3.11's start_server would log a
            # cancelled connection task as an error).
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader, connection: int) -> Seen | None:
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
    method, target, version = request_line.split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    digest = hashlib.sha256()
    body = bytearray()
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            n = int(size_line.split(b";", 1)[0], 16)
            if n == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer fields
                break
            body += (await reader.readexactly(n + 2))[:-2]
    elif (length := int(headers.get("Content-Length", "0"))) > 0:
        body += await reader.readexactly(length)
    digest.update(body)
    return Seen(
        method=method,
        raw_path=target,
        headers=CIMultiDictProxy(headers),
        body_sha256=digest.hexdigest(),
        body_size=len(body),
        connection=connection,
        body=bytes(body) if len(body) <= KEEP_BODY else None,
        version=version,
    )


# ---------------------------------------------------------------- the factories' types


class MakeUpstream(Protocol):
    """The `make_upstream` fixture: a started CountingUpstream, closed after the test."""

    async def __call__(
        self,
        default: Behaviour = ...,
        *,
        keepalive_timeout: float = ...,
        listener: socket.socket | None = ...,
    ) -> CountingUpstream: ...


class MakeRawUpstream(Protocol):
    """The `make_raw_upstream` fixture: a started RawUpstream, closed after the test."""

    async def __call__(
        self,
        answer: bytes = ...,
        *,
        close: bool = ...,
        script: Script | None = ...,
        serve: Serve | None = ...,
    ) -> RawUpstream: ...
