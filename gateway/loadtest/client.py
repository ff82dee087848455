"""The load engine's HTTP/1.1 client: keep-alive connections on asyncio protocols.

A load generator has to cost far less than what it measures. aiohttp's client spends about
100 us of CPU and a Task per request, which on a small machine left the generator behind
its own schedule before the gateway was busy. Here a request is bytes built once per
device, written to an idle pooled connection; the answer is parsed by llhttp (httptools)
and reported to a callback, with no Task and no future per request.

Each request is bounded by `timeout` from the moment it is handed over (waiting for a
connection included); a request that times out takes its connection down with it, since
its answer could still arrive there. Failures are reported as `RequestFailed` subclasses
whose `kind` names them in the report.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Final, cast

import httptools
from yarl import URL

Done = Callable[[int, "RequestFailed | None"], None]  # (status, None) or (0, failure)

_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


class RequestFailed(Exception):
    """A request that got no complete answer."""

    kind = "os"


class ConnectFailed(RequestFailed):
    """No connection to the target (refused, unreachable, TLS handshake failed)."""

    kind = "connect"


class Disconnected(RequestFailed):
    """The target closed the connection before the answer was complete."""

    kind = "disconnected"


class InvalidResponse(RequestFailed):
    """The answer was not valid HTTP/1.1."""

    kind = "payload"


class RequestTimeout(RequestFailed):
    """No complete answer within the timeout."""

    kind = "timeout"


class _Request:
    """One request from hand-over to its one report."""

    __slots__ = ("conn", "data", "done", "finished", "timer")

    def __init__(self, data: bytes, done: Done) -> None:
        self.data = data
        self.done = done
        self.conn: _Connection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False

    def report(self, status: int, failure: RequestFailed | None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        self.done(status, failure)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed by llhttp."""

    def __init__(self, pool: HttpPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.request: _Request | None = None
        self._status = 0
        self._headers_done = False
        self._framed = False  # Content-Length or Transfer-Encoding: not ended by the close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, request: _Request) -> None:
        assert self.transport is not None
        self.request = request
        request.conn = self
        self._headers_done = self._framed = False
        self.transport.write(request.data)

    def data_received(self, data: bytes) -> None:
        if self.request is None:
            self.abort()  # bytes nobody asked for: the stream can no longer be trusted
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(InvalidResponse(f"invalid response: {exc}"))

    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in _FRAMING:
            self._framed = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        if request is None:
            return
        if self._status < 200:  # an interim answer (100 Continue): the real one follows
            self.request = request
            return
        reusable = self._parser.should_keep_alive() and not request.finished
        request.conn = None
        request.report(self._status, None)
        self._pool.release(self, reusable)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        request, self.request = self.request, None
        self._pool.forget(self)
        if request is None:
            return
        request.conn = None
        if exc is None and self._headers_done and not self._framed and self._status >= 200:
            request.report(self._status, None)  # an answer that ends with the connection
        elif isinstance(exc, OSError):
            failure = RequestFailed(f"connection failed: {exc}")
            failure.__cause__ = exc
            request.report(0, failure)
        else:
            request.report(0, Disconnected("the target closed the connection"))

    def _fail(self, failure: RequestFailed) -> None:
        request, self.request = self.request, None
        if request is not None:
            request.conn = None
            request.report(0, failure)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class HttpPool:
    """Up to `limit` keep-alive connections to one origin; requests wait in order for one."""

    def __init__(self, url: URL, limit: int, timeout: float) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) URL with a host: {url}")
        self._host = url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if url.scheme == "https" else None
        )
        self._limit = limit
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._connecting = 0
        self._waiting: deque[_Request] = deque()
        self._connects: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._all)

    async def warm(self, count: int) -> int:
        """Open up to `count` connections ahead of the load; returns how many are open."""
        wanted = min(count, self._limit) - len(self._all) - self._connecting
        if wanted > 0:
            self._connecting += wanted
            results = await asyncio.gather(
                *(self._open() for _ in range(wanted)), return_exceptions=True
            )
            self._connecting -= wanted
            for conn in results:
                if isinstance(conn, _Connection) and conn.transport is not None:
                    self._all.add(conn)  # kept even if cancelled below: close() aborts it
                    self.release(conn, reusable=True)
            for conn in results:
                if isinstance(conn, asyncio.CancelledError):
                    raise conn
        return len(self._all)

    def request(self, data: bytes, done: Done) -> None:
        """Send `data` (a whole request) and report its answer's status or failure to `done`."""
        request = _Request(data, done)
        request.timer = self._loop.call_later(self._timeout, self._expire, request)
        if self._closed:
            request.report(0, Disconnected("the pool is closed"))
        elif self._idle:
            self._idle.pop().send(request)
        else:
            self._waiting.append(request)
            self._connect_if_room()

    def release(self, conn: _Connection, reusable: bool) -> None:
        """A connection finished its answer: serve the next waiting request, or keep it idle."""
        if not reusable or self._closed or conn.transport is None:
            conn.abort()
            self._connect_if_room()  # its place is free for whoever waits
            return
        while self._waiting:
            request = self._waiting.popleft()
            if not request.finished:
                conn.send(request)
                return
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        """A connection is gone."""
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._connect_if_room()

    def close(self) -> None:
        """Abort every connection; requests still waiting or in flight fail."""
        self._closed = True
        for task in self._connects:
            task.cancel()
        while self._waiting:
            self._waiting.popleft().report(0, Disconnected("the pool is closed"))
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()

    def _expire(self, request: _Request) -> None:
        request.timer = None
        conn = request.conn
        request.report(0, RequestTimeout(f"no answer within {self._timeout:g} s"))
        if conn is not None:
            conn.abort()  # its answer may still come: the connection cannot be reused

    def _connect_if_room(self) -> None:
        # Timed-out requests may still sit in the queue: at worst a connection too many opens.
        while (
            not self._closed
            and len(self._waiting) > self._connecting
            and len(self._all) + self._connecting < self._limit
        ):
            self._connecting += 1
            task = self._loop.create_task(self._connect())
            self._connects.add(task)
            task.add_done_callback(self._connects.discard)

    async def _open(self) -> _Connection:
        _, conn = await asyncio.wait_for(
            self._loop.create_connection(
                lambda: _Connection(self),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            ),
            self._timeout,
        )
        return conn

    async def _connect(self) -> None:
        try:
            conn = await self._open()
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._connecting -= 1
            self._fail_one(ConnectFailed(f"cannot connect to {self._host}:{self._port}: {exc}"))
            return
        except asyncio.CancelledError:
            self._connecting -= 1
            raise
        self._connecting -= 1
        self._all.add(conn)
        self.release(conn, reusable=True)

    def _fail_one(self, failure: RequestFailed) -> None:
        """A connection attempt made for the waiting requests failed: so does the oldest."""
        while self._waiting:
            request = self._waiting.popleft()
            if not request.finished:
                request.report(0, failure)
                break
        self._connect_if_room()
