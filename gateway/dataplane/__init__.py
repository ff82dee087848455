"""The public listener on raw asyncio protocols. This module only re-exports, lazily.

connection.py  ClientConnection (llhttp request parsing, keep-alive, pipelining order)
               and DataPlane (what one process's connections share)
exchange.py    one request: verdict, upstream attempt(s), streaming both ways, answers
upstream.py    UpstreamPool and UpstreamConnection (llhttp response parsing)
body.py        BodyBuffer: a request body read whole before it goes upstream
wire.py        pure HTTP/1.1 bytes: header filtering, heads, framing, envelope answers
listener.py    start_public: the listening socket and its accept queue

Names are imported on first use (PEP 562), so that the pure `gateway.dataplane.wire`
imports without the rest of the data plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.dataplane.connection import DataPlane
    from gateway.dataplane.listener import start_public

__all__ = ["DataPlane", "start_public"]


def __getattr__(name: str) -> Any:
    if name == "DataPlane":
        from gateway.dataplane.connection import DataPlane

        globals()[name] = DataPlane
        return DataPlane
    if name == "start_public":
        from gateway.dataplane.listener import start_public

        globals()[name] = start_public
        return start_public
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
