"""The upstream side: a pool of keep-alive connections, responses parsed by llhttp.

A connection serves one exchange at a time. Response events go to the exchange that holds
it (a `ResponseSink`); when the response is complete and both sides allow it, the
connection returns to the pool. Bytes that arrive on an idle connection mean it cannot be
trusted any more (a desynchronised or misbehaving upstream): it is dropped. The pool opens
connections on the loop it is given (the data plane's), so it can be driven without
sockets.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final

import httptools
from yarl import URL

from gateway.config import UpstreamSettings
from gateway.dataplane.flow import FlowControl
from gateway.dataplane.sides import ResponseSink
from gateway.dataplane.wire import RawHeaders
from gateway.errors import (
    ClientBusy,
    PoolExhausted,
    UpstreamResponseInvalid,
    UpstreamUnreachable,
)

IDLE_TIMEOUT: Final = 30.0  # seconds a pooled connection may sit unused before it is closed
MAX_FIELD: Final = 8190  # one response header line, as for requests
MAX_HEADERS: Final = 128
PRUNE_AT: Final = 4096  # client addresses counted before those holding nothing are dropped


NO_BODY: Final = None
UNTIL_CLOSE: Final = -1


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream origin."""

    __slots__ = ("_head_request", "_headers", "_in_head", "_informational", "_line_bytes",
                 "_parser", "_pool", "_reason", "_received", "_until_close", "client",
                 "counted", "flow", "idle_since", "sink", "transport")  # fmt: skip

    def __init__(self, pool: UpstreamPool, client: str | None = None) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.sink: ResponseSink | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: RawHeaders = []
        self._reason = b""
        self._head_request = False
        self._informational = False
        self._until_close = False
        self._in_head = False
        self._line_bytes = 0  # bytes of the head line still being received
        self._received = False  # a byte of the current exchange's answer arrived
        self.client = client  # the address whose request holds it, while it does
        self.counted = True  # among the pool's open connections (until lost or retired)
        self.idle_since = 0.0

    # -- driven by the exchange ----------------------------------------------------------

    def begin(self, sink: ResponseSink, *, head_request: bool) -> None:
        """Hand the connection to an exchange; its response events go to `sink`."""
        self.sink = sink
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._reason = b""
        self._head_request = head_request
        self._in_head = True
        self._line_bytes = 0
        self._until_close = False
        self._received = False

    def write(self, data: bytes) -> None:
        """Send request bytes."""
        if self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection at once (the upstream must never see a complete request)."""
        self.sink = None
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        parser = self._parser
        if sink is None or parser is None:
            self.abort()  # bytes nobody asked for: this connection cannot be trusted
            return
        self._received = True
        try:
            parser.feed_data(data)
            if self._in_head:
                self._check_partial_line(data)
        except (
            httptools.HttpParserError,
            httptools.HttpParserUpgrade,
            UpstreamResponseInvalid,
        ) as exc:
            # An upgrade (101) was never asked for: Upgrade is not forwarded. -> 502.
            self._fail(exc)
        # The exchange that owned this read sends what it produced, also when the parse
        # failed after its answer had ended (a HEAD answer followed by garbage, say).
        sink.on_upstream_flush()

    def _check_partial_line(self, data: bytes) -> None:
        """Refuse a head line already past its limit before it ends: llhttp hands a line
        over only once it is complete, and would buffer one that never ends."""
        end = data.rfind(b"\n")
        self._line_bytes = len(data) - end - 1 if end >= 0 else self._line_bytes + len(data)
        if self._line_bytes > MAX_FIELD + 4:  # name, ": ", value, CRLF
            raise UpstreamResponseInvalid("upstream response head line over the limit")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        sink, self.sink = self.sink, None
        self._pool._lost(self)
        if sink is None:
            return
        if self._until_close and exc is None:
            sink.on_response_end(False)  # a body delimited by the close is complete now
            sink.on_upstream_flush()
        else:
            sink.on_upstream_failed(
                exc or ConnectionResetError("upstream closed the connection"),
                unanswered=not self._received,
            )

    def pause_writing(self) -> None:
        if self.flow is not None:
            self.flow.pause_writing()
        if self.sink is not None:
            self.sink.pause_upload()

    def resume_writing(self) -> None:
        if self.flow is not None:
            self.flow.resume_writing()
        if self.sink is not None:
            self.sink.resume_upload()

    def pause_reading(self) -> None:
        """Stop reading the answer (the client's socket is full)."""
        if self.flow is not None:
            self.flow.pause_reading()

    def resume_reading(self) -> None:
        """Read the answer again."""
        if self.flow is not None:
            self.flow.resume_reading()

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_FIELD or len(self._headers) >= MAX_HEADERS:
            raise UpstreamResponseInvalid("upstream response head over the limits")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        sink = self.sink
        assert parser is not None and sink is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            # 100 Continue / 103 Early Hints: the final response follows on this parser.
            self._informational = True
            self._headers = []
            self._reason = b""
            return
        self._informational = False
        self._in_head = False
        framing: int | None = NO_BODY
        if not self._head_request and status not in (204, 304):
            framing = UNTIL_CLOSE
            for name, value in self._headers:
                lower = name.lower()
                if lower == b"content-length":
                    framing = int(value)
                    break
            else:
                chunked = any(
                    # find(), not `in`: bytes.__contains__ first tries its argument as an
                    # integer, raising and clearing a TypeError every time.
                    n.lower() == b"transfer-encoding" and v.lower().find(b"chunked") >= 0
                    for n, v in self._headers
                )
                self._until_close = not chunked
        sink.on_response_head(status, self._reason, self._headers, framing)
        if self._head_request and self.sink is sink:
            # llhttp cannot be told that a HEAD answer has no body: end it here, and do not
            # reuse a connection whose parser still expects one.
            self.sink = None
            sink.on_response_end(False)

    def on_body(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.on_response_body(data)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        sink, self.sink = self.sink, None
        if sink is not None:
            parser = self._parser
            sink.on_response_end(parser is not None and parser.should_keep_alive())

    def _fail(self, exc: BaseException) -> None:
        sink, self.sink = self.sink, None
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.on_upstream_failed(exc, unanswered=False)


class UpstreamPool:
    """Keep-alive connections to the one upstream origin, at most `max_connections`."""

    def __init__(
        self, settings: UpstreamSettings, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        url = URL(settings.url)
        self.host = url.host or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.host_header = (url.host_port_subcomponent or self.host).encode()
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if url.scheme == "https" else None
        )
        self._connect_timeout = settings.connect_timeout
        self._max = settings.max_connections
        self._per_client = settings.per_client_limit
        self._idle: list[UpstreamConnection] = []
        self._open = 0
        # Connections each client address holds now. An address's count stays at 0 when it
        # holds none (no delete and insert per request); the zeros are dropped in bulk.
        self._held: dict[str, int] = {}
        self.loop = loop  # the data plane binds its loop; else the running one

    @property
    def open_connections(self) -> int:
        """Connections open or being opened."""
        return self._open

    def held_by(self, client: str) -> int:
        """Connections the requests of `client` hold now (being opened included)."""
        return self._held.get(client, 0)

    async def acquire(self, client: str = "") -> tuple[UpstreamConnection, bool]:
        """A connection for a request of `client` and whether it was reused; raises
        ClientBusy, PoolExhausted or UpstreamUnreachable."""
        if not self._idle and self._open >= self._max:
            raise PoolExhausted("Upstream connection limit reached")
        held = self._held.get(client, 0)
        if not held and len(self._held) >= PRUNE_AT:
            self._held = {c: n for c, n in self._held.items() if n}
        if held >= self._per_client:
            # The pool has room, but this address holds its share of it already.
            raise ClientBusy("Too many concurrent requests from this address")
        loop = self.loop or asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            conn = self._idle.pop()
            transport = conn.transport
            if transport is None or transport.is_closing() or now - conn.idle_since > IDLE_TIMEOUT:
                # Closed or closing, or idle too long: not counted from now on, so that a
                # new connection may take its place at once (its connection_lost comes later).
                self._retire(conn)
                continue
            conn.client = client
            self._held[client] = held + 1
            return conn, True
        if self._open >= self._max:
            raise PoolExhausted("Upstream connection limit reached")
        self._open += 1
        self._held[client] = held + 1  # counted while it connects, too
        try:
            async with asyncio.timeout(self._connect_timeout):
                # Made holding its client: lost at once, it still gives the count back.
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, client), self.host, self.port, ssl=self._ssl
                )
        except BaseException as exc:
            self._open -= 1
            self._held[client] -= 1
            if isinstance(exc, OSError | TimeoutError):
                raise UpstreamUnreachable(f"cannot connect to the upstream: {exc!r}") from exc
            raise
        return conn, False

    def _free(self, conn: UpstreamConnection) -> None:
        """The connection's request is over: its client holds one connection fewer."""
        client, conn.client = conn.client, None
        if client is not None:
            self._held[client] -= 1

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose exchange finished cleanly."""
        self._free(conn)
        if conn.transport is not None and not conn.transport.is_closing():
            conn.sink = None
            conn.idle_since = (self.loop or asyncio.get_running_loop()).time()
            self._idle.append(conn)

    def _retire(self, conn: UpstreamConnection) -> None:
        """Close an idle connection and stop counting it."""
        if conn.counted:
            conn.counted = False
            self._open -= 1
        if conn.transport is not None:
            conn.transport.close()

    def _lost(self, conn: UpstreamConnection) -> None:
        self._free(conn)
        if conn.counted:
            conn.counted = False
            self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Close the idle connections (busy ones close with their exchanges)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()
