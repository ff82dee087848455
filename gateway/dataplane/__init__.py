"""The public listener on raw asyncio protocols: client connections, exchanges, upstream pool.

connection.py  ClientConnection (llhttp request parsing, keep-alive, pipelining order)
               and DataPlane (what one process's connections share)
exchange.py    one request: verdict, upstream attempt(s), streaming both ways, answers
upstream.py    UpstreamPool and UpstreamConnection (llhttp response parsing)
wire.py        pure HTTP/1.1 bytes: header filtering, heads, framing, envelope answers
"""

from __future__ import annotations

import asyncio
import socket

from gateway.dataplane.connection import DataPlane

__all__ = ["DataPlane", "start_public"]


async def start_public(
    plane: DataPlane,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
    backlog: int = 1024,
) -> asyncio.Server:
    """Listen on host:port (or an already bound socket) and serve the data plane."""
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(plane.protocol, sock=sock, backlog=backlog)
    return await loop.create_server(
        plane.protocol, host, port, reuse_port=reuse_port or None, backlog=backlog
    )
