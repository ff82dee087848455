"""One request's life: verdict, upstream attempt(s), both bodies streamed, its log line.

Events come from two protocols: the client connection (request body) and the upstream
connection (response head, body, end, failure). Writes to the client produced by one
upstream read are gathered and sent in one `transport.write`. Flow control runs both ways:
a full client socket pauses the upstream read, a full upstream socket pauses the client
read. Every answer the gateway makes itself is the JSON envelope.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from gateway.dataplane import wire
from gateway.dataplane.body import BodyBuffer
from gateway.dataplane.upstream import NO_BODY, ClientBusy, PoolExhausted, UpstreamConnection
from gateway.enforce import FORWARD, Verdict
from gateway.envelope import REASON_BODY_TOO_LARGE
from gateway.errors import UpstreamError, UpstreamUnreachable
from gateway.identity import FieldValues

if TYPE_CHECKING:
    from gateway.dataplane.connection import ClientConnection

log = logging.getLogger("gateway.dataplane")

REASON_UNREACHABLE: Final = "Upstream unreachable"
REASON_TIMED_OUT: Final = "Upstream timed out"
REASON_BAD_RESPONSE: Final = "Invalid upstream response"
REASON_BUSY: Final = "Upstream connection limit reached"
REASON_CLIENT_BUSY: Final = "Too many concurrent requests from this address"
REASON_NO_BUFFER: Final = "Cannot buffer the request body"
REASON_INTERNAL: Final = "Internal error"
REASON_BODY_TIMEOUT: Final = "Request body timeout"

# Requests sent again on a new connection when a reused one closed before a byte of the
# answer (the upstream had closed it while idle; a keep-alive race): the safe methods (RFC
# 9110 section 9.2.1), or a request the client marked with an idempotency key, as Go's
# net/http decides. PUT and DELETE are idempotent but may have been acted on already.
SAFE: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
IDEMPOTENCY_KEYS: Final = frozenset({b"idempotency-key", b"x-idempotency-key"})
BUFFER_LIMIT: Final = 1 << 20  # request body held while the verdict is pending; then pause
NOT_SENDING: Final = -1


class Exchange:
    """One request from head to the end of its answer."""

    __slots__ = (
        "_body",
        "_body_bytes",
        "_buffer",
        "_buffered",
        "_deadline",
        "_decided",
        "_last_io",
        "_out",
        "_out_chunked",
        "_refusal",
        "_retried",
        "_reused",
        "_send_offset",
        "_sent_body",
        "_settled",
        "_upload_paused",
        "_upstream",
        "body_done",
        "chunked",
        "client",
        "conn",
        "content_length",
        "decision",
        "device_id",
        "expect_continue",
        "fields",
        "finished",
        "head_started",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "stalled",
        "started",
        "status",
        "target",
        "task",
        "upstream_started",
        "verdict_headers",
    )  # fmt: skip

    def __init__(
        self,
        conn: ClientConnection,
        method: bytes,
        target: bytes,
        headers: wire.RawHeaders,
        fields: FieldValues,
        *,
        keep_alive: bool,
        http11: bool,
        content_length: int | None,
        chunked: bool,
        expect_continue: bool,
    ) -> None:
        self.conn = conn
        self.http11 = http11
        self.method = method
        self.target = target
        self.headers = headers
        self.fields = fields
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.body_done = content_length in (None, 0) and not chunked
        plane = conn.plane
        # With request buffering the body is read whole before an upstream is taken.
        self._body: BodyBuffer | None = (
            BodyBuffer(plane.buffer_memory_bytes, plane.buffer_dir)
            if plane.request_buffering and not self.body_done
            else None
        )
        self._send_offset = NOT_SENDING  # where the buffered body's file is being sent from
        self._upload_paused = False
        self._decided = False  # the verdict said forward
        self.client = ""
        self._body_bytes = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._upstream: UpstreamConnection | None = None
        self._settled = False  # the current upstream attempt ended (answered, failed, cut)
        self._reused = False
        self._retried = False
        self._refusal: tuple[int, str] | None = None  # given up before its turn came
        self._sent_body = False
        self._out: list[bytes] = []
        self._out_chunked = False
        self._deadline: asyncio.TimerHandle | None = None
        self._last_io = 0.0
        self.head_started = False
        self.stalled = False
        self.finished = False
        self.status = 0
        self.decision = "-"
        self.device_id: str | None = None
        self.verdict_headers: dict[str, str] | None = None
        self.started = time.perf_counter()
        self.upstream_started: float | None = None
        self.task: asyncio.Task[None] | None = None

    # -- the request's course ------------------------------------------------------------

    async def run(self, retry: bool = False) -> None:
        """Decide, then send the request upstream (`retry`: send it again, decided already).

        The task ends once the request is on its way: the upstream's events carry the
        answer to the client and end the exchange, with no task waiting for them.
        """
        try:
            if self._refusal is not None:
                self.answer(*self._refusal)  # its body broke while it waited its turn
                return
            if not retry:
                verdict = await self.conn.plane.enforcer.check(
                    self.method.decode("latin-1"),
                    self.fields,
                    self.conn.peer,
                    self.content_length,
                )
                self.decision = verdict.decision
                self.device_id = verdict.device_id
                if self.finished:
                    return  # answered meanwhile (body over the limit)
                if verdict.status != FORWARD:
                    self._answer_verdict(verdict)
                    return
                self.verdict_headers = verdict.headers
                self.client = verdict.client
                self._decided = True
                if self._body is not None and not self.body_done:
                    # Buffered: the rest of the body first; request_end() sends it on.
                    if self.expect_continue:
                        self.expect_continue = False
                        self.conn.write(wire.CONTINUE)
                    self.conn.resume_reading()
                    return
                self.upstream_started = time.perf_counter()
            await self._forward()
        except asyncio.CancelledError:
            self._finish()
            raise
        except Exception:
            log.exception("unexpected error in %s %r", self.method, self.target)
            if self.head_started:
                self.conn.abort()  # never a complete-looking answer after a failure
                self._finish()
            else:
                self.answer(500, REASON_INTERNAL)

    def _answer_verdict(self, verdict: Verdict) -> None:
        self.answer(verdict.status, verdict.reason, verdict.headers)

    async def _forward(self) -> None:
        """One upstream attempt: a connection, then the request head and what body is here."""
        plane = self.conn.plane
        try:
            upstream, self._reused = await plane.pool.acquire(self.client)
        except ClientBusy:
            self.decision = "client_busy"
            self.answer(429, REASON_CLIENT_BUSY, self.verdict_headers, retry_after=True)
            return
        except PoolExhausted:
            self.answer(503, REASON_BUSY, self.verdict_headers, retry_after=True)
            return
        except UpstreamUnreachable as exc:
            log.warning("upstream unreachable: %s", exc)
            self.answer(502, REASON_UNREACHABLE, self.verdict_headers)
            return
        if self.finished:
            plane.pool.release(upstream)
            return
        loop = self.conn.loop
        self._settled = False
        self._upstream = upstream
        upstream.begin(self, head_request=self.method == b"HEAD")
        body = self._body
        content_length = self.content_length if body is None else body.size
        chunked = self.chunked and content_length is None
        if content_length is None and not chunked and self.method in _BODY_METHODS:
            content_length = 0  # many origins answer 411 to a POST without a length
        head = wire.request_head(
            self.method,
            self.target,
            self.headers,
            host=plane.pool.host_header,
            peer=self.conn.peer_bytes,
            scheme=b"http",
            preserve_host=plane.preserve_host,
            content_length=content_length,
            chunked=chunked,
            trusted=self.conn.peer_trusted,
            identity=plane.identity_names,
        )
        self._last_io = loop.time()
        self._deadline = loop.call_at(self._last_io + plane.timeout, self._on_deadline)
        if body is not None:
            # Buffered: a Content-Length (a chunked upload is re-framed), then the body.
            self._sent_body = body.size > 0
            if body.in_memory:
                upstream.write(head + body.memory())
            else:
                upstream.write(head)
                self._send_offset = 0
                self._upload_paused = False
                self._pump()
            return
        parts = [head]
        for piece in self._buffer:
            parts.append(wire.chunk(piece) if chunked else piece)
        self._sent_body = bool(self._buffer)
        self._buffer = []
        self._buffered = 0
        if self.body_done and chunked:
            parts.append(wire.LAST_CHUNK)
        upstream.write(b"".join(parts))
        if self.expect_continue and not self.body_done:
            self.expect_continue = False
            self.conn.write(wire.CONTINUE)
        self.conn.resume_reading()

    def _pump(self) -> None:
        """Send the buffered body's file on while the upstream's socket takes it."""
        body, upstream = self._body, self._upstream
        if body is None or upstream is None:
            return
        while self._send_offset != NOT_SENDING and not self._upload_paused:
            try:
                data = body.read(self._send_offset)
            except OSError as exc:
                log.error("request body buffer unreadable: %r", exc)
                self._give_up_body(500, REASON_INTERNAL)
                return
            if not data:
                self._send_offset = NOT_SENDING
                return
            self._send_offset += len(data)
            upstream.write(data)  # may call pause_upload() before it returns
            self._last_io = self.conn.loop.time()

    # -- client events -------------------------------------------------------------------

    def request_body(self, data: bytes) -> None:
        """A piece of the request body arrived from the client."""
        if self.finished:
            return  # answered already; the connection closes after the answer
        self._body_bytes += len(data)
        if self._body_bytes > self.conn.plane.max_body:
            self._body_over_limit()
            return
        body = self._body
        if body is not None:
            try:
                body.append(data)
            except OSError as exc:  # the temporary file's disk is full, say
                log.error("cannot buffer a request body: %r", exc)
                self._give_up_body(503, REASON_NO_BUFFER)
                return
            if not self._decided and body.size > BUFFER_LIMIT:
                self.conn.pause_reading()  # the verdict may still refuse it
            return
        upstream = self._upstream
        if upstream is not None:
            self._sent_body = True
            framed = self.chunked and self.content_length is None
            upstream.write(wire.chunk(data) if framed else data)
        elif not self.finished:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > BUFFER_LIMIT:
                self.conn.pause_reading()

    def request_end(self) -> None:
        """The request body is complete."""
        self.body_done = True
        if self._body is not None:
            if self._decided and not self.finished and self._upstream is None:
                self.upstream_started = time.perf_counter()
                self.task = self.conn.loop.create_task(self.run(retry=True))
            return
        upstream = self._upstream
        if upstream is not None and self.chunked and self.content_length is None:
            upstream.write(wire.LAST_CHUNK)

    def _body_over_limit(self) -> None:
        """Cut the body: the upstream never sees a complete over-limit request."""
        self._give_up_body(413, REASON_BODY_TOO_LARGE)

    def body_broken(self, status: int, reason: str) -> None:
        """The request could not be read to its end: the upstream never sees it complete."""
        self.stalled = True  # the parser is done with this connection: close, no lingering
        self._give_up_body(status, reason)

    def body_stalled(self) -> None:
        """The client stopped sending its body: the upstream never sees it complete."""
        self.stalled = True  # nothing more is coming: close without lingering
        self._give_up_body(408, REASON_BODY_TIMEOUT)

    def _give_up_body(self, status: int, reason: str) -> None:
        self.keep_alive = False
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()
        if self.task is None and not self.finished:
            # A pipelined request whose turn has not come: answered when it does, so the
            # answers before it are not interleaved with this one.
            self._refusal = (status, reason)
            return
        if not self.head_started:
            self.answer(status, reason, self.verdict_headers)
        else:
            self.conn.abort()
        self._settle()

    def client_lost(self) -> None:
        """The client went away: drop the upstream side (an upload stays incomplete)."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()
        if self.status == 0:
            self.status = 499
        self._settle()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._finish()

    # -- upstream events (ResponseSink) ----------------------------------------------------

    def on_response_head(
        self, status: int, reason: bytes, headers: wire.RawHeaders, framing: int | None
    ) -> None:
        """Start the answer: the upstream's head, the gateway's framing, rate-limit headers."""
        self.head_started = True
        if self.conn.closing or not self.body_done:
            # Shutting down, or the upstream answered before the upload ended (the rest of
            # it is not forwarded): tell the client this connection ends with the answer.
            self.keep_alive = False
        self.status = status
        content_length: int | None = None
        chunked = False
        if framing is NO_BODY:
            if self.method == b"HEAD" or status == 304:
                for name, value in headers:
                    if name.lower() == b"content-length" and value.strip().isdigit():
                        content_length = int(value)
                        break
        elif framing >= 0:
            content_length = framing
        elif self.http11:
            chunked = True
        else:
            self.keep_alive = False  # an HTTP/1.0 client reads to the close
        self._out_chunked = chunked
        self._out.append(
            wire.response_head(
                status,
                reason,
                headers,
                self.verdict_headers,
                content_length=content_length,
                chunked=chunked,
                keep_alive=self.keep_alive,
                http11=self.http11,
            )
        )

    def on_response_body(self, data: bytes) -> None:
        """Relay a piece of the body."""
        self._out.append(wire.chunk(data) if self._out_chunked else data)

    def on_response_end(self, reusable: bool) -> None:
        """The answer is complete: close the framing, give the connection back."""
        if self._out_chunked:
            self._out.append(wire.LAST_CHUNK)
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            # Reused only once the whole request went out: an upstream that answered
            # before taking the rest of a body would read the next request as its tail.
            if reusable and self.body_done and self._send_offset == NOT_SENDING:
                self.conn.plane.pool.release(upstream)
            else:
                upstream.abort()
        self._send_offset = NOT_SENDING
        self._settle()

    def on_upstream_flush(self) -> None:
        """Send what one upstream read produced, in one write."""
        if self._out:
            self.conn.write(b"".join(self._out))
            self._out = []
            self._last_io = self.conn.loop.time()
        if self._settled:
            self._finish()

    def on_upstream_failed(self, exc: BaseException, *, unanswered: bool) -> None:
        """The upstream connection broke or sent nonsense."""
        self._upstream = None
        if self.finished:
            return
        if self.head_started:
            # The status line is out: the only honest signal left is a cut connection.
            log.warning("upstream broke mid-response: %r", exc)
            self._out = []
            self.conn.abort()
            self._settle()
            self._finish()
            return
        if unanswered and self._reused and not self._retried and self._replayable():
            # A pooled connection the upstream had closed: try once on a new one. A garbled
            # or partial answer is never a reason to send the request again.
            self._retried = True
            self._cancel_deadline()
            self.task = self.conn.loop.create_task(self.run(retry=True))
            return
        parse_error = not isinstance(exc, OSError | UpstreamError)
        log.warning("upstream failed: %r", exc)
        self.answer(502, REASON_BAD_RESPONSE if parse_error else REASON_UNREACHABLE,
                    self.verdict_headers)  # fmt: skip

    def _replayable(self) -> bool:
        """May this request be sent a second time? Safe (or keyed), and its body, if any,
        still at hand (buffered)."""
        if not self.body_done or (self._sent_body and self._body is None):
            return False
        if self.method in SAFE:
            return True
        return any(name.lower() in IDEMPOTENCY_KEYS for name, _ in self.headers)

    def pause_upload(self) -> None:
        """The upstream's socket is full: stop sending the buffered body, or reading the
        client's."""
        if self._body is not None:
            self._upload_paused = True
        else:
            self.conn.pause_reading()

    def resume_upload(self) -> None:
        """The upstream's socket drained."""
        if self._body is not None:
            self._upload_paused = False
            self._pump()
        else:
            self.conn.resume_reading()

    def pause_download(self) -> None:
        """The client's socket is full: stop reading the upstream."""
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_download(self) -> None:
        """The client's socket drained."""
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    # -- deadlines -----------------------------------------------------------------------

    def _on_deadline(self) -> None:
        """No answer head within the timeout -> 504; silence mid-body as long -> cut."""
        self._deadline = None
        if self.finished or self._upstream is None:
            return
        loop = self.conn.loop
        timeout = self.conn.plane.timeout
        if self.head_started:
            due = self._last_io + timeout
            if loop.time() < due:
                self._deadline = loop.call_at(due, self._on_deadline)
                return
            log.warning("upstream silent for %.1f s mid-response", timeout)
            upstream, self._upstream = self._upstream, None
            upstream.abort()
            self.conn.abort()
            self._settle()
            self._finish()
            return
        upstream, self._upstream = self._upstream, None
        upstream.abort()
        self.answer(504, REASON_TIMED_OUT, self.verdict_headers)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # -- answers and the end -------------------------------------------------------------

    def answer(
        self,
        status: int,
        reason: str,
        extra: dict[str, str] | None = None,
        *,
        retry_after: bool = False,
    ) -> None:
        """Send an envelope answer of the gateway's own and end the exchange."""
        if self.finished or self.head_started:
            return
        if not self.body_done or self.conn.closing:
            self.keep_alive = False  # the rest of the body is unread, or we are stopping
        if retry_after:
            extra = {**(extra or {}), "Retry-After": "1"}
        self.status = status
        self.head_started = True
        self.conn.write(
            wire.envelope_answer(
                status,
                reason,
                extra,
                keep_alive=self.keep_alive,
                http11=self.http11,
                date=self.conn.plane.date(),
                head_only=self.method == b"HEAD",
            )
        )
        self._settle()
        self._finish()

    def _settle(self) -> None:
        self._settled = True

    def _finish(self) -> None:
        """Log once, then let the connection go on to its next request (or close)."""
        if self.finished:
            return
        self.finished = True
        self._cancel_deadline()
        if self._body is not None:
            self._body.close()
        # The task's coroutine holds this exchange: drop the task, or the pair is a cycle
        # that only the cyclic collector frees (refcounting frees it now).
        self.task = None
        self.conn.exchange_done(self)


_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
