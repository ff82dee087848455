"""One request's life: verdict, upstream attempt(s), both bodies moved, its report.

An exchange sees two things only: `Forwarding`, what every exchange of the process shares
(the verdicts, the upstream pool, the limits, the loop), and its `ClientSide`, the client
connection it answers on (gateway.dataplane.sides). It reports back once, with an
`ExchangeReport` (status, decision, device id, timings, whether the connection may go on).

Events come from two protocols: the client connection (request body) and the upstream
connection (response head, body, end, failure; this is its `ResponseSink`). Writes to the
client produced by one upstream read are gathered and sent in one write. Flow control runs
both ways: a full client socket pauses the upstream's reading, a full upstream socket
pauses the client's reading (or the sending of a buffered body). Every answer the gateway
makes itself comes from gateway.answers, in the JSON envelope.

About 530 lines, on purpose: one state machine whose two halves (the request on its way
up, the answer on its way back, with the deadlines and the retry between them) read and
write the same fields; split in two files, each half would reach into the other's state.
What could leave it did: the body's way upstream (upload.py), the two sides it talks to
(sides.py), its answers (gateway.answers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from gateway import answers
from gateway.answers import Answer
from gateway.dataplane import wire
from gateway.dataplane.body import BodyBuffer
from gateway.dataplane.forwarding import Forwarding
from gateway.dataplane.report import ExchangeReport
from gateway.dataplane.sides import ClientSide, ResponseSink
from gateway.dataplane.upload import Upload
from gateway.dataplane.upstream import NO_BODY, UpstreamConnection
from gateway.enforce import FORWARD
from gateway.errors import (
    ClientBusy,
    PoolExhausted,
    UpstreamError,
    UpstreamResponseInvalid,
    UpstreamUnreachable,
)
from gateway.identity import FieldValues

log = logging.getLogger("gateway.dataplane")

# Requests sent again on a new connection when a reused one closed before a byte of the
# answer (the upstream had closed it while idle; a keep-alive race): the safe methods (RFC
# 9110 section 9.2.1), or a request the client marked with an idempotency key, as Go's
# net/http decides. PUT and DELETE are idempotent but may have been acted on already.
SAFE: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
IDEMPOTENCY_KEYS: Final = frozenset({b"idempotency-key", b"x-idempotency-key"})
BUFFER_LIMIT: Final = 1 << 20  # request body held before the verdict or an upstream; then pause
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})


class Exchange(ResponseSink):
    """One request from head to the end of its answer."""

    def __init__(
        self,
        fwd: Forwarding,
        client: ClientSide,
        method: bytes,
        target: bytes,
        headers: wire.RawHeaders,
        fields: FieldValues,
        *,
        peer: str | None,
        peer_bytes: bytes,
        peer_trusted: bool,
        keep_alive: bool,
        http11: bool,
        content_length: int | None,
        chunked: bool,
        expect_continue: bool,
    ) -> None:
        self._fwd = fwd
        self._client = client
        self._peer = peer  # the client connection's peer, as the verdict reads it
        self._peer_bytes = peer_bytes  # the same, for X-Forwarded-For
        self._peer_trusted = peer_trusted  # a trusted proxy: its forwarding headers pass
        self.method = method
        self.target = target
        self.headers = headers
        self.fields = fields
        self.http11 = http11
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.body_done = content_length in (None, 0) and not chunked
        # The body's way upstream, when there is one: buffered whole first, or streamed.
        self._upload: Upload | None = None
        if not self.body_done:
            buffer = (
                BodyBuffer(fwd.buffer_memory_bytes, fwd.buffer_dir)
                if fwd.request_buffering
                else None
            )
            self._upload = Upload(content_length, chunked, buffer)
        self._body_bytes = 0
        self._upstream: UpstreamConnection | None = None
        self._settled = False  # the current upstream attempt ended (answered, failed, cut)
        self._reused = False
        self._retried = False
        self._decided = False  # the verdict said forward
        self._refusal: Answer | None = None  # given up before its turn came
        self._out: list[bytes] = []
        self._out_chunked = False
        self._deadline: asyncio.TimerHandle | None = None
        self._last_io = 0.0
        self._task: asyncio.Task[None] | None = None
        self.client_address = ""  # the address the verdict accounts the request to
        self.head_started = False
        # -- what its report will say
        self.keep_alive = keep_alive  # the connection may serve another request after it
        self.stalled = False  # the request body will never be read to its end
        self.finished = False
        self.status = 0
        self.decision = "-"
        self.device_id: str | None = None
        self.verdict_headers: dict[str, str] | None = None
        self.started = time.perf_counter()
        self.upstream_started: float | None = None

    # -- the request's course ------------------------------------------------------------

    def start(self) -> None:
        """Its turn has come (the requests before it on the connection are answered)."""
        loop = self._fwd.loop or asyncio.get_running_loop()
        self._task = loop.create_task(self.run())

    @property
    def started_running(self) -> bool:
        """The exchange has been started (its turn came)."""
        return self._task is not None or self.finished

    @property
    def awaiting_body(self) -> bool:
        """Its request body is still coming in (the body timeout applies)."""
        return not self.body_done and not self.finished

    async def run(self, retry: bool = False) -> None:
        """Decide, then send the request upstream (`retry`: send it again, decided already).

        The task ends once the request is on its way: the upstream's events carry the
        answer to the client and end the exchange, with no task waiting for them.
        """
        try:
            if self._refusal is not None:
                self.answer(self._refusal)  # its body broke while it waited its turn
                return
            if not retry:
                client = self._client
                verdict = await self._fwd.enforcer.check(
                    self.method.decode("latin-1"), self.fields, self._peer, self.content_length
                )
                self.decision = verdict.decision
                self.device_id = verdict.device_id
                if self.finished:
                    return  # answered meanwhile (body over the limit)
                if verdict.status != FORWARD:
                    self.answer(Answer(verdict.status, verdict.reason), verdict.headers)
                    return
                self.verdict_headers = verdict.headers
                self.client_address = verdict.client
                self._decided = True
                upload = self._upload
                if upload is not None and upload.buffered and not self.body_done:
                    # Buffered: the rest of the body first; request_end() sends it on.
                    if self.expect_continue:
                        self.expect_continue = False
                        client.write(wire.CONTINUE)
                    client.resume_reading()
                    return
                self.upstream_started = time.perf_counter()
            await self._forward()
        except asyncio.CancelledError:
            self._finish()
            raise
        except Exception:
            log.exception("unexpected error in %s %r", self.method, self.target)
            if self.head_started:
                self._client.abort()  # never a complete-looking answer after a failure
                self._finish()
            else:
                self.answer(answers.INTERNAL)

    async def _forward(self) -> None:
        """One upstream attempt: a connection, then the request head and what body is here."""
        fwd, client = self._fwd, self._client
        try:
            upstream, self._reused = await fwd.pool.acquire(self.client_address)
        except ClientBusy:
            self.decision = "client_busy"
            self.answer(answers.CLIENT_BUSY, self.verdict_headers, retry_after=True)
            return
        except PoolExhausted:
            self.answer(answers.POOL_BUSY, self.verdict_headers, retry_after=True)
            return
        except UpstreamUnreachable as exc:
            log.warning("upstream unreachable: %s", exc)
            self.answer(answers.UNREACHABLE, self.verdict_headers)
            return
        if self.finished:
            fwd.pool.release(upstream)
            return
        loop = fwd.loop or asyncio.get_running_loop()
        self._settled = False
        self._upstream = upstream
        upstream.begin(self, head_request=self.method == b"HEAD")
        upload = self._upload
        if upload is not None:
            content_length, chunked = upload.framing()
        else:
            # Many origins answer 411 to a POST without a length.
            content_length, chunked = (0 if self.method in _BODY_METHODS else None), False
        head = wire.request_head(
            self.method,
            self.target,
            self.headers,
            host=fwd.pool.host_header,
            peer=self._peer_bytes,
            scheme=b"http",
            preserve_host=fwd.preserve_host,
            content_length=content_length,
            chunked=chunked,
            trusted=self._peer_trusted,
            identity=fwd.identity_names,
        )
        self._last_io = loop.time()
        self._deadline = loop.call_at(self._last_io + fwd.timeout, self._on_deadline)
        if upload is None:
            upstream.write(head)
            client.resume_reading()
            return
        try:
            upload.start(upstream, head)
        except OSError as exc:
            log.error("request body buffer unreadable: %r", exc)
            self._give_up_body(answers.INTERNAL)
            return
        if not upload.buffered:
            if self.expect_continue and not self.body_done:
                self.expect_continue = False
                client.write(wire.CONTINUE)
            client.resume_reading()

    # -- client events -------------------------------------------------------------------

    def request_body(self, data: bytes) -> None:
        """A piece of the request body arrived from the client."""
        upload = self._upload
        if self.finished or upload is None:
            return  # answered already; the connection closes after the answer
        self._body_bytes += len(data)
        if self._body_bytes > self._fwd.max_body:
            self._give_up_body(answers.BODY_TOO_LARGE)  # never complete upstream
            return
        try:
            upload.take(data)
        except OSError as exc:  # the temporary file's disk is full, say
            log.error("cannot buffer a request body: %r", exc)
            self._give_up_body(answers.NO_BUFFER)
            return
        if upload.held > BUFFER_LIMIT and not (upload.buffered and self._decided):
            # Held before the verdict (which may refuse it) or before an upstream is ready.
            self._client.pause_reading()

    def request_end(self) -> None:
        """The request body is complete."""
        self.body_done = True
        upload = self._upload
        if upload is None:
            return
        upload.finish()
        if upload.buffered and self._decided and not self.finished and self._upstream is None:
            self.upstream_started = time.perf_counter()
            loop = self._fwd.loop or asyncio.get_running_loop()
            self._task = loop.create_task(self.run(retry=True))

    def body_broken(self, answer: Answer) -> None:
        """The request could not be read to its end: the upstream never sees it complete."""
        self.stalled = True  # the parser is done with this connection: close, no lingering
        self._give_up_body(answer)

    def body_stalled(self) -> None:
        """The client stopped sending its body: the upstream never sees it complete."""
        self.stalled = True  # nothing more is coming: close without lingering
        self._give_up_body(answers.BODY_TIMEOUT)

    def _give_up_body(self, answer: Answer) -> None:
        self.keep_alive = False
        self._drop_upstream()
        if not self.started_running:
            # A pipelined request whose turn has not come: answered when it does, so the
            # answers before it are not interleaved with this one.
            self._refusal = answer
            return
        if not self.head_started:
            self.answer(answer, self.verdict_headers)
        else:
            self._client.abort()
        self._settled = True

    def client_lost(self) -> None:
        """The client went away: drop the upstream side (an upload stays incomplete)."""
        self._drop_upstream()
        if self.status == 0:
            self.status = 499
        self._settled = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        self._finish()

    def pause_download(self) -> None:
        """The client's socket is full: stop reading the upstream."""
        upstream = self._upstream
        if upstream is not None:
            upstream.pause_reading()

    def resume_download(self) -> None:
        """The client's socket drained."""
        upstream = self._upstream
        if upstream is not None:
            upstream.resume_reading()

    # -- upstream events (ResponseSink) ----------------------------------------------------

    def on_response_head(
        self, status: int, reason: bytes, headers: wire.RawHeaders, framing: int | None
    ) -> None:
        """Start the answer: the upstream's head, the gateway's framing, rate-limit headers."""
        self.head_started = True
        if self._client.closing or not self.body_done:
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
        upload = self._upload
        if upstream is not None:
            # Reused only once the whole request went out: an upstream that answered
            # before taking the rest of a body would read the next request as its tail.
            if reusable and self.body_done and (upload is None or upload.all_sent):
                self._fwd.pool.release(upstream)
            else:
                upstream.abort()
        if upload is not None:
            upload.detach()
        self._settled = True

    def on_upstream_flush(self) -> None:
        """Send what one upstream read produced, in one write."""
        if self._out:
            self._client.write(b"".join(self._out))
            self._out = []
            self._last_io = (self._fwd.loop or asyncio.get_running_loop()).time()
        if self._settled:
            self._finish()

    def on_upstream_failed(self, exc: BaseException, *, unanswered: bool) -> None:
        """The upstream connection broke or sent nonsense."""
        self._upstream = None
        if self._upload is not None:
            self._upload.detach()
        if self.finished:
            return
        if self.head_started:
            # The status line is out: the only honest signal left is a cut connection.
            log.warning("upstream broke mid-response: %r", exc)
            self._out = []
            self._client.abort()
            self._settled = True
            self._finish()
            return
        if unanswered and self._reused and not self._retried and self._replayable():
            # A pooled connection the upstream had closed: try once on a new one. A garbled
            # or partial answer is never a reason to send the request again.
            self._retried = True
            self._cancel_deadline()
            loop = self._fwd.loop or asyncio.get_running_loop()
            self._task = loop.create_task(self.run(retry=True))
            return
        # Unreachable: the connection broke; invalid: what came back is no HTTP answer.
        parse_error = isinstance(exc, UpstreamResponseInvalid) or not isinstance(
            exc, OSError | UpstreamError
        )
        log.warning("upstream failed: %r", exc)
        self.answer(answers.BAD_RESPONSE if parse_error else answers.UNREACHABLE,
                    self.verdict_headers)  # fmt: skip

    def _replayable(self) -> bool:
        """May this request be sent a second time? Safe (or keyed), and its body, if any,
        still at hand (buffered)."""
        upload = self._upload
        if not self.body_done or (upload is not None and not upload.replayable):
            return False
        if self.method in SAFE:
            return True
        return any(name.lower() in IDEMPOTENCY_KEYS for name, _ in self.headers)

    def pause_upload(self) -> None:
        """The upstream's socket is full: stop reading the client (a streamed body; a
        buffered one waits in its upload, which the connection's flow control holds)."""
        upload = self._upload
        if upload is None or not upload.buffered:
            self._client.pause_reading()

    def resume_upload(self) -> None:
        """The upstream's socket drained."""
        upload = self._upload
        if upload is None or not upload.buffered:
            self._client.resume_reading()
            return
        try:
            if upload.pump():
                self._last_io = (self._fwd.loop or asyncio.get_running_loop()).time()
        except OSError as exc:
            log.error("request body buffer unreadable: %r", exc)
            self._give_up_body(answers.INTERNAL)

    # -- deadlines -----------------------------------------------------------------------

    def _on_deadline(self) -> None:
        """No answer head within the timeout -> 504; silence mid-body as long -> cut."""
        self._deadline = None
        if self.finished or self._upstream is None:
            return
        loop = self._fwd.loop or asyncio.get_running_loop()
        timeout = self._fwd.timeout
        if self.head_started:
            due = self._last_io + timeout
            if loop.time() < due:
                self._deadline = loop.call_at(due, self._on_deadline)
                return
            log.warning("upstream silent for %.1f s mid-response", timeout)
            self._drop_upstream()
            self._client.abort()
            self._settled = True
            self._finish()
            return
        self._drop_upstream()
        self.answer(answers.TIMED_OUT, self.verdict_headers)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _drop_upstream(self) -> None:
        """Abort the upstream attempt in progress (its request never completes there)."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()
        if self._upload is not None:
            self._upload.detach()

    # -- answers and the end -------------------------------------------------------------

    def answer(
        self,
        answer: Answer,
        extra: dict[str, str] | None = None,
        *,
        retry_after: bool = False,
    ) -> None:
        """Send an envelope answer of the gateway's own and end the exchange."""
        if self.finished or self.head_started:
            return
        client = self._client
        if not self.body_done or client.closing:
            self.keep_alive = False  # the rest of the body is unread, or we are stopping
        if retry_after:
            extra = {**(extra or {}), "Retry-After": "1"}
        self.status = answer.status
        self.head_started = True
        client.write(
            wire.envelope_answer(
                answer.status,
                answer.reason,
                extra,
                keep_alive=self.keep_alive,
                http11=self.http11,
                date=self._fwd.date(),
                head_only=self.method == b"HEAD",
            )
        )
        self._settled = True
        self._finish()

    def _finish(self) -> None:
        """Report once, then let the connection go on to its next request (or close)."""
        if self.finished:
            return
        self.finished = True
        self._cancel_deadline()
        if self._upload is not None:
            self._upload.close()
        # The task's coroutine holds this exchange: drop the task, or the pair is a cycle
        # that only the cyclic collector frees (refcounting frees it now).
        self._task = None
        self._client.exchange_done(
            ExchangeReport(
                self,
                self.method,
                self.target,
                status=self.status,
                decision=self.decision,
                device_id=self.device_id,
                started=self.started,
                upstream_started=self.upstream_started,
                keep_alive=self.keep_alive,
                body_done=self.body_done,
                stalled=self.stalled,
            )
        )
