"""The two sides an exchange stands between, as it sees them.

`ClientSide` is what an exchange needs of the client connection it answers on
(gateway.dataplane.connection implements it), and `ExchangeReport` what the exchange tells
it when it ends; `ResponseSink` is what an upstream connection tells the exchange that
holds it (gateway.dataplane.exchange implements it). Base classes rather than
typing.Protocols: compiled, their calls dispatch natively.
"""

from __future__ import annotations

import asyncio

from gateway.dataplane.wire import RawHeaders


class ResponseSink:
    """What receives the events of an upstream response (the exchange that holds the
    connection). A base class rather than a typing.Protocol: compiled, its calls dispatch
    natively."""

    def on_response_head(
        self, status: int, reason: bytes, headers: RawHeaders, framing: int | None
    ) -> None:
        """The head arrived. `framing`: Content-Length, or -1 chunked/until close, or None."""
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        """A piece of the body arrived."""
        raise NotImplementedError

    def on_response_end(self, reusable: bool) -> None:
        """The response is complete."""
        raise NotImplementedError

    def on_upstream_failed(self, exc: BaseException, *, unanswered: bool) -> None:
        """The connection failed or sent something unparsable. `unanswered`: it closed
        before a single byte of an answer arrived (the only case a retry may follow)."""
        raise NotImplementedError

    def on_upstream_flush(self) -> None:
        """One read from the socket was handled: send what it produced."""
        raise NotImplementedError

    def pause_upload(self) -> None:
        """The upstream's socket buffer is full: stop sending the request's body."""
        raise NotImplementedError

    def resume_upload(self) -> None:
        """The upstream's socket buffer drained."""
        raise NotImplementedError


class ClientSide(asyncio.Protocol):
    """The client connection as its exchanges see it (gateway.dataplane.connection is the
    one implementation): a base class, not a typing.Protocol, so that compiled calls
    dispatch natively."""

    def __init__(self) -> None:
        self.peer: str | None = None
        self.peer_bytes = b"unknown"
        self.peer_trusted = False  # a trusted proxy: its forwarding headers are passed on

    @property
    def closing(self) -> bool:
        """True once the connection will close after the answer in progress."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        """Send bytes to the client."""
        raise NotImplementedError

    def abort(self) -> None:
        """Cut the connection (a broken answer must never look complete)."""
        raise NotImplementedError

    def pause_reading(self) -> None:
        """Stop reading the client."""
        raise NotImplementedError

    def resume_reading(self) -> None:
        """Read the client again."""
        raise NotImplementedError

    def exchange_done(self, report: ExchangeReport) -> None:
        """Called once per exchange when its answer is complete (or given up)."""
        raise NotImplementedError


class ExchangeReport:
    """What an exchange tells its connection when it ends: the fields of its access-log
    line, and whether the connection may serve another request after it."""

    def __init__(
        self,
        exchange: object,
        method: bytes,
        target: bytes,
        *,
        status: int,
        decision: str,
        device_id: str | None,
        started: float,
        upstream_started: float | None,
        keep_alive: bool,
        body_done: bool,
        stalled: bool,
    ) -> None:
        self.exchange = exchange  # which one ended (the connection holds it in its queue)
        self.method = method
        self.target = target
        self.status = status  # 0: no answer was sent; 499: the client left first
        self.decision = decision
        self.device_id = device_id
        self.started = started  # perf_counter() when its head was read
        self.upstream_started = upstream_started  # perf_counter() when it went upstream
        self.keep_alive = keep_alive  # the connection may serve another request
        self.body_done = body_done  # the request body was read to its end
        self.stalled = stalled  # the body will never be read to its end: close at once
