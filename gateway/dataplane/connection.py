"""The client side: one asyncio protocol per connection, requests parsed by llhttp.

llhttp (through httptools) is strict: conflicting Content-Length and Transfer-Encoding,
obs-fold, bare LF, duplicate Content-Length and unknown HTTP versions are refused, and the
connection is closed after a 400 envelope. Requests on one connection are answered in
order; a pipelined request waits for the one before it (reading pauses past a few).

`Connections` is what the client connections of one process share (the limits, the set of
open connections, the access log, and the `Forwarding` their exchanges see);
gateway.dataplane.plane builds it and runs the deadlines' sweep over it.

About 510 lines, on purpose: the llhttp callbacks and the connection's own states (the
head deadline, the pipelining queue, the half-close, the lingering close, the refusals)
read and write the same fields. The exchange (one request), the flow control and the
answers' texts live in their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Final

import httptools

from gateway import answers
from gateway.answers import Answer
from gateway.dataplane import wire
from gateway.dataplane.exchange import Exchange
from gateway.dataplane.flow import FlowControl
from gateway.dataplane.forwarding import Forwarding
from gateway.dataplane.report import ExchangeReport
from gateway.dataplane.sides import ClientSide
from gateway.errors import RequestRefused
from gateway.identity import FieldValues, IPNetwork, peer_is_trusted
from gateway.logs import ACCESS_LOGGER
from gateway.metrics import Metrics

log = logging.getLogger("gateway.dataplane")

MAX_LINE: Final = 8190  # request target, as aiohttp's default max_line_size
MAX_FIELD: Final = 8190  # one header line
MAX_HEADERS: Final = 128
REQUEST_LINE_EXTRA: Final = 64  # method, spaces, "HTTP/1.1", CRLF around the target
MAX_QUEUED: Final = 8  # pipelined requests waiting before reading pauses
LINGER: Final = 5.0  # seconds an unwanted request body is still read before the close


class Connections:
    """What the client connections of one process share, built once at start."""

    def __init__(
        self,
        forwarding: Forwarding,
        metrics: Metrics,
        *,
        enforced_headers: dict[bytes, str],
        trusted_proxies: Sequence[IPNetwork],
        header_timeout: float,
        keepalive_timeout: float,
        body_timeout: float,
        max_connections: int,
        access_log: bool,
    ) -> None:
        self.forwarding = forwarding
        self.metrics = metrics
        # The only request headers the Enforcer reads: decoded per request, the rest never.
        self.enforced_headers = enforced_headers
        self.trusted_proxies = trusted_proxies
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.access_log = access_log
        self.access_logger = logging.getLogger(ACCESS_LOGGER)
        self.connections: set[ClientConnection] = set()
        self.stopping = False  # set by shutdown(): a connection accepted after it is closed

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the connections run on, once bound."""
        return self.forwarding.loop

    def make_room(self) -> bool:
        """At the connection cap: close the longest-idle kept-alive connection, if any."""
        idle = [c for c in self.connections if c.idle_since]
        if not idle:
            return False
        min(idle, key=lambda c: c.idle_since).close_when_idle()
        return True

    def log_exchange(self, ex: ExchangeReport, remote: str | None) -> None:
        """Count the finished exchange and write its access-log line."""
        self.metrics.observe(ex.decision, ex.status)
        if not self.access_log or not self.access_logger.isEnabledFor(logging.INFO):
            return
        now = time.perf_counter()
        upstream_started = ex.upstream_started
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
                        if upstream_started is None
                        else round((now - upstream_started) * 1000, 3)
                    ),
                    "total_ms": round((now - ex.started) * 1000, 3),
                    "remote": remote,
                }
            },
        )


class ClientConnection(ClientSide):
    """One client connection."""

    def __init__(self, hub: Connections) -> None:
        super().__init__()
        self.hub = hub
        self._fwd = hub.forwarding
        self.loop = hub.loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
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
        # A refusal raised inside an llhttp callback, which httptools wraps in its own
        # HttpParserCallbackError: recorded here before it is raised and read back from
        # here, never from the exception's `__context__`, which depends on whatever
        # exception was being handled around the loop.
        self._rejected: RequestRefused | None = None
        self._in_head = False
        self._line_bytes = 0  # bytes of the head line still being received
        self._request_line_done = False
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
        self.flow = FlowControl(self.transport)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        hub = self.hub
        if peer:
            self.peer = str(peer[0])
            self.peer_bytes = self.peer.encode()
            self.peer_trusted = peer_is_trusted(self.peer, hub.trusted_proxies)
        if hub.stopping:
            # Accepted in the instant between the listener's close and this callback: it
            # has sent nothing yet, and the process is going away.
            self._closing = True
            transport.close()
            return
        if len(hub.connections) >= hub.max_connections and not hub.make_room():
            self._closing = True
            answer = answers.TOO_MANY_CONNECTIONS
            self.write(wire.envelope_answer(answer.status, answer.reason, keep_alive=False))
            transport.close()
            return
        hub.connections.add(self)
        # A new connection must send its head in time; a kept-alive one only once it starts.
        self.head_deadline = self.loop.time() + hub.header_timeout

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
                    ex.body_broken(answers.UPGRADE_WITH_BODY)
        except (httptools.HttpParserError, RequestRefused) as exc:
            rejected, self._rejected = self._rejected, None
            if rejected is not None:
                self._refuse(Answer(rejected.status, rejected.reason))
            elif isinstance(exc, httptools.HttpParserCallbackError):
                # A callback failed on something other than a refusal: a bug of ours.
                log.error("request parsing failed: %r", exc.__context__ or exc)
                self._refuse(answers.BAD_REQUEST)
            elif self.linger_until:
                self.abort()
            else:
                bad = answers.BAD_REQUEST
                self._refuse(Answer(bad.status, f"{bad.reason}: {exc}"))

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
                raise self._refusal(answers.TARGET_TOO_LONG)
        elif self._line_bytes > MAX_FIELD + 4:  # name, ": ", value, CRLF
            raise self._refusal(answers.HEADER_TOO_LARGE)

    def _refusal(self, answer: Answer) -> RequestRefused:
        """Record a refusal (data_received reads it back after llhttp stops) and return it."""
        self._rejected = RequestRefused(answer.status, answer.reason)
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
            parsing.body_broken(answers.BODY_INCOMPLETE)
        elif self._in_head and not self._queue:
            self._refuse(answers.HEAD_INCOMPLETE)
        if not self._queue and self.transport is not None:
            self.transport.close()  # nothing left to answer
        return True  # keep the transport: exchange_done closes it after the last answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._closing = True
        self.hub.connections.discard(self)
        queue, self._queue = self._queue, deque()
        for ex in queue:
            ex.client_lost()

    def pause_writing(self) -> None:
        if self.flow is not None:
            self.flow.pause_writing()
        if self._queue:
            self._queue[0].pause_download()

    def resume_writing(self) -> None:
        if self.flow is not None:
            self.flow.resume_writing()
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
            self.head_deadline = self.loop.time() + self.hub.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE:
            raise self._refusal(answers.TARGET_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_FIELD:
            raise self._refusal(answers.HEADER_TOO_LARGE)
        if not self._in_head:
            return  # a trailer field: never promoted to a header upstream (they are dropped)
        self._headers.append((name, value))
        if len(self._headers) > MAX_HEADERS:
            raise self._refusal(answers.TOO_MANY_HEADERS)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.head_deadline = 0.0
        if self._closing:
            return  # a request after the one that closes the connection is not served
        parser = self._parser
        method = parser.get_method()
        url = self._url
        version = parser.get_http_version()  # a new string each call: asked once
        if version != "1.1" and version != "1.0":
            # llhttp reads HTTP/0.9 and 2.0 request lines; only HTTP/1.x is served here.
            raise self._refusal(answers.VERSION)
        if (
            not url.startswith(b"/")
            and not (url == b"*" and method == b"OPTIONS")
            and method != b"CONNECT"  # authority-form; the Enforcer answers it with 405
        ):
            # Absolute- or authority-form: only the configured upstream is ever contacted.
            raise self._refusal(answers.INVALID_TARGET)
        content_length: int | None = None
        chunked = False
        expect = False
        hosts = 0
        # The same pass picks the few headers the Enforcer reads, decoded as aiohttp would
        # (the rest stay bytes).
        wanted = self.hub.enforced_headers
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
                    raise self._refusal(answers.TRANSFER_CODING)
                chunked = True
            elif lower == b"expect":
                expect = value.strip().lower() == b"100-continue"
            elif lower == b"host":
                hosts += 1
        if hosts > 1:
            raise self._refusal(answers.DUPLICATE_HOST)
        ex = Exchange(
            self._fwd,
            self,
            method,
            url,
            self._headers,
            fields,
            peer=self.peer,
            peer_bytes=self.peer_bytes,
            peer_trusted=self.peer_trusted,
            keep_alive=parser.should_keep_alive() and not self._closing,
            http11=version == "1.1",
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
        ex.start()
        flow = self.flow
        if flow is not None and flow.write_paused:
            ex.pause_download()

    def exchange_done(self, report: ExchangeReport) -> None:
        """Called once per exchange when its answer is complete (or given up): logs its
        report, then serves the next request, closes, or waits idle."""
        self.hub.log_exchange(report, self.peer)
        queue = self._queue
        if queue and queue[0] is report.exchange:
            queue.popleft()
        else:
            for ex in queue:
                if ex is report.exchange:
                    queue.remove(ex)
                    break
        transport = self.transport
        if transport is None:
            return
        if not report.keep_alive or self._closing:
            self._closing = True
            if not report.body_done and not report.stalled:
                # Closing with unread data makes the kernel send RST, which can destroy
                # the answer before the client reads it: read and drop the rest first.
                self.linger_until = self.loop.time() + LINGER
                if self.flow is not None:
                    self.flow.resume_reading()
            else:
                transport.close()
            return
        if queue:
            self._start(queue[0])
            if len(queue) <= MAX_QUEUED:
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
        if self.flow is not None and self.transport is not None:
            self.flow.pause_reading()

    def resume_reading(self) -> None:
        """Read the client again, unless too many pipelined requests wait."""
        if self.flow is not None and self.transport is not None and len(self._queue) <= MAX_QUEUED:
            self.flow.resume_reading()

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

    def _refuse(self, answer: Answer) -> None:
        """A request that cannot be parsed: answer it in the envelope and close."""
        if self._parsing is not None:
            # Broken after its head (a bad chunk, say): the exchange gives the body up (the
            # upstream never sees it complete) and answers in its turn, or cuts an answer
            # in progress. Nothing more is read; the requests before it are answered first.
            self._no_more = True
            self._parsing.body_broken(answer)
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
                answer.status,
                answer.reason,
                keep_alive=False,
                date=self._fwd.date(),
                head_only=head_only,
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
        return ex is not None and ex.awaiting_body

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
            self._refuse(answers.HEAD_TIMEOUT)
        else:
            self.close_when_idle()  # not a byte of a request: nothing to answer
