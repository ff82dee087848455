"""The public listening socket: the data plane's server, and the depth of its accept queue."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Final

from gateway.dataplane.plane import DataPlane

# asyncio's own loop accepts up to `backlog` connections per readiness event and calls
# their protocols a few loop iterations later: at the connection cap (server.max_connections)
# a burst of clients would each hold a socket before the first of them is refused (cap 1000,
# 4,000 clients: 1,744 sockets held with a burst of 1024, 1,012 with 4). The server is made
# with this small burst, and the kernel's accept queue is deepened again afterwards.
ACCEPT_BURST: Final = 4


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
    burst = min(backlog, ACCEPT_BURST)
    if sock is not None:
        server = await loop.create_server(plane.protocol, sock=sock, backlog=burst)
    else:
        server = await loop.create_server(
            plane.protocol, host, port, reuse_port=reuse_port or None, backlog=burst
        )
    for listening in server.sockets:
        # A duplicate of the listening socket: listen() on it sets the shared queue's depth.
        with contextlib.closing(socket.socket(fileno=os.dup(listening.fileno()))) as dup:
            dup.listen(backlog)
    return server
