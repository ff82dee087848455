"""The client side: one asyncio protocol per connection, requests parsed by llhttp.

llhttp (through httptools) is strict: conflicting Content-Length and Transfer-Encoding,
obs-fold, bare LF, duplicate Content-Length and unknown HTTP versions are refused, and the
connection is closed after a 400 envelope. Requests on one connection are answered in
order; a pipelined request waits for the one before it (reading pauses past a few).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from email.utils import formatdate
from typing import Final

import httptools

from gateway.config import DeviceHeaders, Settings
from gateway.dataplane import wire
from gateway.dataplane.exchange import Exchange
from gateway.dataplane.upstream import UpstreamPool
from gateway.enforce import Decider, Enforcer
from gateway.identity import FieldValues, peer_is_trusted
from gateway.logs import ACCESS_LOGGER
from gateway.metrics import Metrics
from gateway.store import Store

log = logging.getLogger("gateway.dataplane")

MAX_LINE: Final = 8190  # request target, as aiohttp's default max_line_size
MAX_FIELD: Final = 8190  # one header line
MAX_HEADERS: Final = 128
REQUEST_LINE_EXTRA: Final = 64  # method, spaces, "HTTP/1.1", CRLF around the target
MAX_QUEUED: Final = 8  # pipelined requests waiting before reading pauses
LINGER: Final = 5.0  # seconds an unwanted request body is still read before the close


class _Reject(Exception):
    """A request the connection refuses itself (a size limit, a version, a framing).

    Raised from inside llhttp's callbacks, which httptools turns into its own
    HttpParserCallbackError: the protocol records the refusal before raising
    (`ClientConnection._refusal`) and reads it back from there, never from the exception's
    `__context__`, which depends on whatever exception was being handled around the loop.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class DataPlane:
    """What every client connection of one process shares, built once at start."""

    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.enforcer: Decider = Enforcer(settings, store, self.metrics)
        self.pool = UpstreamPool(settings.upstream)
        self.timeout = settings.upstream.timeout
        self.max_body = settings.limits.max_body_bytes
        self.request_buffering = settings.limits.request_buffering
        self.buffer_memory_bytes = settings.limits.buffer_memory_bytes
        self.buffer_dir = settings.limits.buffer_dir
        self.preserve_host = settings.upstream.preserve_host
        # The only request headers the Enforcer reads: decoded per request, the rest never.
        names = [getattr(settings.devices.headers, f) for f in DeviceHeaders.__slots__]
        # Lower-cased names as the raw bytes compare and as the FieldValues key, made once.
        self.enforced_headers: dict[bytes, str] = {
            n.lower().encode(): n.lower() for n in [*names, "X-Forwarded-For"]
        }
        # The device headers go upstream as enforced: never hop-by-hop, no lookalikes.
        self.identity_names = frozenset(n.lower().encode() for n in names)
        self.trusted_proxies = settings.server.trusted_proxies
        self.header_timeout = settings.server.header_timeout
        self.keepalive_timeout = settings.server.keepalive_timeout
        self.body_timeout = settings.server.body_timeout
        self.max_connections = settings.server.max_connections
        self.access_log = settings.log.access
        self.access_logger = logging.getLogger(ACCESS_LOGGER)
        self.connections: set[ClientConnection] = set()
        self.stopping = False  # set by shutdown(): a connection accepted after it is closed
        # Python 3.11's get_running_loop() calls getpid() each time: look it up once.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._date = b""
        self._date_second = -1
        self._sweeper: asyncio.TimerHandle | None = None

    def protocol(self) -> ClientConnection:
        """A protocol factory for `loop.create_server`."""
        if self._sweeper is None:
            self.loop = asyncio.get_running_loop()
            self._sweep()
        return ClientConnection(self)

    def _sweep(self) -> None:
        """Once a second: enforce the connection deadlines (keep-alive idle, request head,
        lingering close).

        One timer for all connections instead of timers per request, as nginx does it.
        """
        loop = self.loop or asyncio.get_running_loop()
        now = loop.time()
        idle_before = now - self.keepalive_timeout
        silent_before = now - self.body_timeout
        for conn in list(self.connections):
            if 0 < conn.idle_since < idle_before:
                conn.close_when_idle()
            elif 0 < conn.head_deadline < now:
                conn.head_timed_out()
            elif 0 < conn.linger_until < now:
                conn.abort()
            elif conn.awaiting_body and conn.last_read < silent_before:
                conn.body_timed_out()
        self._sweeper = loop.call_later(1.0, self._sweep)

    def make_room(self) -> bool:
        """At the connection cap: close the longest-idle kept-alive connection, if any."""
        idle = [c for c in self.connections if c.idle_since]
        if not idle:
            return False
        min(idle, key=lambda c: c.idle_since).close_when_idle()
        return True

    def date(self) -> bytes:
        """The HTTP Date header value, formatted once per second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date

    def log_exchange(self, ex: Exchange) -> None:
        """Count the finished exchange and write its access-log line."""
        self.metrics.observe(ex.decision, ex.status)
        if not self.access_log or not self.access_logger.isEnabledFor(logging.INFO):
            return
        now = time.perf_counter()
        self.access_logger.info(
            "request",
            extra={
                "fields": {
                    "device_id": ex.device_id,
                    "method": ex.method.decode("latin-1"),
                    "path": ex.target.decode("latin-1"),
                    "status": ex.status,
                    "decision": ex.decision,
                    "upstream_ms": (
                        None
                        if ex.upstream_started is None
                        else round((now - ex.upstream_started) * 1000, 3)
                    ),
                    "total_ms": round((now - ex.started) * 1000, 3),
                    "remote": ex.conn.peer,
                }
            },
        )

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now; give busy ones up to `timeout`, then cut them."""
        self.stopping = True
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        self.pool.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class ClientConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.loop = plane.loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.peer_bytes = b"unknown"
        self.peer_trusted = False  # a trusted proxy: its forwarding headers are passed on
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Exchange] = deque()
        self._parsing: Exchange | None = None
        self._url = b""
        self._headers: wire.RawHeaders = []
        self._closing = False
        # No request follows those queued (the client half-closed, or the request being
        # read broke): the queue is answered in order, then the connection closes.
        self._no_more = False
        self._rejected: _Reject | None = None  # set by a callback that refuses the request
        self._in_head = False
        self._line_bytes = 0  # bytes of the head line still being received
        self._request_line_done = False
        self._paused = False
        self._write_paused = False
        self.idle_since = 0.0  # loop time the connection became idle; 0 while busy
        self.head_deadline = 0.0  # loop time the request head must be complete by; 0: none
        self.linger_until = 0.0  # reading an unwanted body before closing, until then
        self.last_read = 0.0  # loop time of the last bytes from the client

    @property
    def closing(self) -> bool:
        """True once the connection will close after the answer in progress."""
        return self._closing or (self._no_more and len(self._queue) <= 1)

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        plane = self.plane
        if peer:
            self.peer = str(peer[0])
            self.peer_bytes = self.peer.encode()
            self.peer_trusted = peer_is_trusted(self.peer, plane.trusted_proxies)
        if plane.stopping:
            # Accepted in the instant between the listener's close and this callback: it
            # has sent nothing yet, and the process is going away.
            self._closing = True
            transport.close()
            return
        if len(plane.connections) >= plane.max_connections and not plane.make_room():
            self._closing = True
            self.write(wire.envelope_answer(503, "Too many connections", keep_alive=False))
            transport.close()
            return
        plane.connections.add(self)
        # A new connection must send its head in time; a kept-alive one only once it starts.
        self.head_deadline = self.loop.time() + self.plane.header_timeout

    def data_received(self, data: bytes) -> None:
        if (self._closing or self._no_more) and not self.linger_until:
            return
        self.idle_since = 0.0
        self.last_read = self.loop.time()
        try:
            self._parser.feed_data(data)
            if self._in_head:
                self._check_partial_line(data)
        except httptools.HttpParserUpgrade:
            # Upgrade is hop-by-hop and never forwarded; llhttp stops reading here, so what
            # follows (frames of another protocol, or the body of an upgrade offer such as
            # curl's h2c POST) cannot be read: a declared body is refused, and the
            # connection ends with this answer.
            self._closing = True
            ex = self._queue[-1] if self._queue else None
            if ex is not None:
                ex.keep_alive = False
                if ex.content_length or ex.chunked:
                    ex.body_broken(400, "A request offering an upgrade cannot carry a body")
        except (httptools.HttpParserError, _Reject) as exc:
            rejected, self._rejected = self._rejected, None
            if rejected is not None:
                self._refuse(rejected.status, rejected.reason)
            elif isinstance(exc, httptools.HttpParserCallbackError):
                # A callback failed on something other than a refusal: a bug of ours.
                log.error("request parsing failed: %r", exc.__context__ or exc)
                self._refuse(400, "Bad request")
            elif self.linger_until:
                self.abort()
            else:
                self._refuse(400, f"Bad request: {exc}")

    def _check_partial_line(self, data: bytes) -> None:
        """Refuse a head line that is already past its limit before it ends.

        llhttp hands a header over only once its line is complete: without this, a line
        that never ends would be buffered until the head deadline.
        """
        end = data.rfind(b"\n")
        self._line_bytes = len(data) - end - 1 if end >= 0 else self._line_bytes + len(data)
        if end >= 0:
            self._request_line_done = True  # a line ended since this request began
        if not self._request_line_done:
            # Still the request line: the target's own limit (414, checked as it arrives)
            # plus the method, the version and the spaces.
            if self._line_bytes > MAX_LINE + REQUEST_LINE_EXTRA:
                raise self._refusal(414, "Request target too long")
        elif self._line_bytes > MAX_FIELD + 4:  # name, ": ", value, CRLF
            raise self._refusal(431, "Request header too large")

    def _refusal(self, status: int, reason: str) -> _Reject:
        """Record a refusal (data_received reads it back after llhttp stops) and return it."""
        self._rejected = _Reject(status, reason)
        return self._rejected

    def eof_received(self) -> bool:
        """The client shut its sending side (SHUT_WR): answer what it sent, then close.

        Complete requests are still answered, in order (`printf ... | socat` half-closes
        right after its request); a request whose head or body was cut short never
        completes: 400, or dropped when answers to earlier requests are still due.
        """
        self._no_more = True
        parsing = self._parsing
        if parsing is not None and not parsing.body_done:
            parsing.body_broken(400, "Request body incomplete")
        elif self._in_head and not self._queue:
            self._refuse(400, "Request head incomplete")
        if not self._queue and self.transport is not None:
            self.transport.close()  # nothing left to answer
        return True  # keep the transport: exchange_done closes it after the last answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._closing = True
        self.plane.connections.discard(self)
        queue, self._queue = self._queue, deque()
        for ex in queue:
            ex.client_lost()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._queue:
            self._queue[0].pause_download()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._queue:
            self._queue[0].resume_download()

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._in_head = True
        self._line_bytes = 0
        self._request_line_done = False
        if not self.head_deadline:
            self.head_deadline = self.loop.time() + self.plane.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE:
            raise self._refusal(414, "Request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_FIELD:
            raise self._refusal(431, "Request header too large")
        if not self._in_head:
            return  # a trailer field: never promoted to a header upstream (they are dropped)
        self._headers.append((name, value))
        if len(self._headers) > MAX_HEADERS:
            raise self._refusal(431, "Too many request headers")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.head_deadline = 0.0
        if self._closing:
            return  # a request after the one that closes the connection is not served
        parser = self._parser
        method = parser.get_method()
        url = self._url
        if parser.get_http_version() not in ("1.0", "1.1"):
            # llhttp reads HTTP/0.9 and 2.0 request lines; only HTTP/1.x is served here.
            raise self._refusal(505, "HTTP version not supported")
        if (
            not url.startswith(b"/")
            and not (url == b"*" and method == b"OPTIONS")
            and method != b"CONNECT"  # authority-form; the Enforcer answers it with 405
        ):
            # Absolute- or authority-form: only the configured upstream is ever contacted.
            raise self._refusal(400, "Invalid request target")
        content_length: int | None = None
        chunked = False
        expect = False
        hosts = 0
        # The same pass picks the few headers the Enforcer reads, decoded as aiohttp would
        # (the rest stay bytes).
        wanted = self.plane.enforced_headers
        fields = FieldValues()
        for name, value in self._headers:
            lower = name.lower()
            key = wanted.get(lower)
            if key is not None:
                text = value.decode("utf-8", "surrogateescape")
                if key in fields:
                    fields[key].append(text)
                else:
                    fields[key] = [text]
            if lower == b"content-length":
                content_length = int(value)  # llhttp has validated it
            elif lower == b"transfer-encoding":
                # llhttp accepts it only with chunked last; another coding before chunked
                # would be lost in re-framing, so it is refused (RFC 9112 section 6.1).
                if value.strip().lower() != b"chunked":
                    raise self._refusal(501, "Unsupported transfer coding")
                chunked = True
            elif lower == b"expect":
                expect = value.strip().lower() == b"100-continue"
            elif lower == b"host":
                hosts += 1
        if hosts > 1:
            raise self._refusal(400, "Duplicate Host header")
        ex = Exchange(
            self,
            method,
            url,
            self._headers,
            fields,
            keep_alive=parser.should_keep_alive() and not self._closing,
            http11=parser.get_http_version() == "1.1",
            content_length=content_length,
            chunked=chunked,
            expect_continue=expect,
        )
        self._parsing = ex
        self._queue.append(ex)
        if len(self._queue) == 1:
            self._start(ex)
        elif len(self._queue) > MAX_QUEUED:
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.request_body(body)

    def on_message_complete(self) -> None:
        ex, self._parsing = self._parsing, None
        if ex is not None:
            ex.request_end()
        if self.linger_until and self.transport is not None:
            self.transport.close()  # the unwanted body is read: now the close is clean

    # -- exchanges -----------------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        ex.task = self.loop.create_task(ex.run())
        if self._write_paused:
            ex.pause_download()

    def exchange_done(self, ex: Exchange) -> None:
        """Called once per exchange when its answer is complete (or given up)."""
        self.plane.log_exchange(ex)
        if self._queue and self._queue[0] is ex:
            self._queue.popleft()
        elif ex in self._queue:
            self._queue.remove(ex)
        transport = self.transport
        if transport is None:
            return
        if not ex.keep_alive or self._closing:
            self._closing = True
            if not ex.body_done and not ex.stalled:
                # Closing with unread data makes the kernel send RST, which can destroy
                # the answer before the client reads it: read and drop the rest first.
                self.linger_until = self.loop.time() + LINGER
                self._paused = True
                self.resume_reading()
            else:
                transport.close()
            return
        if self._queue:
            self._start(self._queue[0])
            if len(self._queue) <= MAX_QUEUED:
                self.resume_reading()
        elif self._no_more:
            transport.close()  # the half-closed client has every answer it asked for
        else:
            self._mark_idle()

    def write(self, data: bytes) -> None:
        """Send bytes to the client."""
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        """Stop reading the client (its body waits, or the upstream's socket is full)."""
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the client again."""
        if self._paused and self.transport is not None and len(self._queue) <= MAX_QUEUED:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Cut the connection (a broken answer must never look complete)."""
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def close_when_idle(self) -> None:
        """Graceful stop: close now if idle, else after the answer in progress."""
        self._closing = True
        if not self._queue and self.transport is not None:
            self.transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        """A request that cannot be parsed: answer it in the envelope and close."""
        if self._parsing is not None:
            # Broken after its head (a bad chunk, say): the exchange gives the body up (the
            # upstream never sees it complete) and answers in its turn, or cuts an answer
            # in progress. Nothing more is read; the requests before it are answered first.
            self._no_more = True
            self._parsing.body_broken(status, reason)
            return
        self._closing = True
        if self._queue:
            return  # the answer in progress goes out first; then the connection closes
        try:
            head_only = self._parser.get_method() == b"HEAD"
        except httptools.HttpParserError:
            head_only = False  # the method itself could not be read
        self.write(
            wire.envelope_answer(
                status, reason, keep_alive=False, date=self.plane.date(), head_only=head_only
            )
        )
        if self.transport is not None:
            self.transport.close()

    def _mark_idle(self) -> None:
        self.idle_since = self.loop.time()

    @property
    def awaiting_body(self) -> bool:
        """A request whose body is still coming in is being handled."""
        ex = self._parsing
        return ex is not None and not ex.body_done and not ex.finished

    def body_timed_out(self) -> None:
        """No byte of the request body for `server.body_timeout`: give the request up."""
        if self._parsing is not None:
            self._parsing.body_stalled()

    def head_timed_out(self) -> None:
        """The request head did not come in time: 408 for a started head, then close."""
        self.head_deadline = 0.0
        if self._queue:
            self._closing = True  # an answer is in progress; close after it
        elif self._in_head:
            self._refuse(408, "Request head timeout")
        else:
            self.close_when_idle()  # not a byte of a request: nothing to answer
