"""The suite's one upstream factory, aiohttp side: `CountingUpstream`, a loopback upstream
that records every request it saw and misbehaves on command (tests/rig/raw_upstream.py has
its raw-socket sibling, `RawUpstream`, for answers written byte for byte).

`CountingUpstream` is a low-level aiohttp server on a free loopback port: no router (every
target arrives as sent, nothing is refused or rewritten on its side) and parser limits far
above the gateway's (whatever the gateway forwards arrives). Per path, or for every path
without its own (the switch), it answers normally, slowly (one at a time if asked: a server
that queues), streams chunks with pauses, resets the connection in the middle of its body,
or hands the request to a test's own aiohttp handler. Every answer it makes itself carries
`MARK`, so a test can tell the upstream's answers from the gateway's own.

Both upstreams record a `Seen` per request: method, raw target, headers, the body's sha256
and size (and the body itself when small), which connection it came on, and whether the
body arrived whole. `started` lists the raw paths of the request heads received, whole or
not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import orjson
from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

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
