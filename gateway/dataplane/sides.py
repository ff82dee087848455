"""The two sides an exchange stands between, as it sees them.

`ClientSide` is what an exchange needs of the client connection it answers on
(gateway.dataplane.connection implements it; the exchange tells it its end with an
`ExchangeReport`); `ResponseSink` is what an upstream connection tells the exchange that
holds it (gateway.dataplane.exchange implements it). Base classes with methods only, which
tests subclass: this module stays interpreted in the compiled build (an interpreted class
cannot inherit from a compiled one), its subclasses are compiled.
"""

from __future__ import annotations

import asyncio

from gateway.dataplane.report import ExchangeReport
from gateway.dataplane.wire import RawHeaders


class ResponseSink:
    """What receives the events of an upstream response (the exchange that holds the
    connection)."""

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
    one implementation)."""

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
