"""The public listener on raw asyncio protocols. This module only re-exports, lazily.

plane.py       DataPlane: one process's data plane, built from the settings; the deadlines
connection.py  ClientConnection (llhttp request parsing, keep-alive, pipelining order, the
               half-close) and Connections, what one process's connections share
exchange.py    one request: verdict, upstream attempt(s), the answer relayed, deadlines
upload.py      a request body's way upstream: buffered whole first, or streamed
body.py        BodyBuffer: a buffered body in memory, then in an unnamed temporary file
forwarding.py  Forwarding: all an exchange sees of its process
sides.py       ClientSide, ExchangeReport, ResponseSink: what an exchange sees of each side
upstream.py    UpstreamPool and UpstreamConnection (llhttp response parsing)
flow.py        FlowControl: one per transport, reading and writing paused or not
wire.py        pure HTTP/1.1 bytes: header filtering, heads, framing, envelope answers
listener.py    start_public: the listening socket and its accept queue

Names are imported on first use (PEP 562), so that the pure `gateway.dataplane.wire`
imports without the rest of the data plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.dataplane.listener import start_public
    from gateway.dataplane.plane import DataPlane

__all__ = ["DataPlane", "start_public"]


def __getattr__(name: str) -> Any:
    if name == "DataPlane":
        from gateway.dataplane.plane import DataPlane

        globals()[name] = DataPlane
        return DataPlane
    if name == "start_public":
        from gateway.dataplane.listener import start_public

        globals()[name] = start_public
        return start_public
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
