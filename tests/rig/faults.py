"""A TCP fault proxy for tests: put it between the gateway and Redis (or the upstream).

    client --> FaultProxy (127.0.0.1:<port>) --> target (host:port)

The mode applies to new and existing connections alike and can be switched at any time:

=================  =========================================================================
pass_through()     bytes flow both ways unchanged
latency(s)         every chunk from the target is held `s` seconds before it is passed on
                   (each round trip is `s` longer; order is kept, also across a switch)
black_hole()       accept and read, never answer: bytes both ways are dropped and the
                   client's socket is never closed (a frozen or partitioned peer: the client
                   can only time out); no connection to the target is opened in this mode
reset()            RST (SO_LINGER 0, then abort) every open connection, and each new one
                   right after its accept
cut_after(n)       pass the next `n` bytes from the target on each connection (counted from
                   the switch, or from the accept), then close both sides cleanly (FIN): the
                   client sees a stream that simply ends
=================  =========================================================================

A target that refuses the proxy's connection gets the client's connection reset.

Loopback only by default. Flow control is passed through (a client that stops reading
pauses the target's side and the reverse); queued latency is not bounded, so it is meant for
test traffic, not bulk transfers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from typing import Final, Literal, cast

Mode = Literal["pass", "latency", "black_hole", "reset", "cut"]

_LINGER_ZERO: Final = struct.pack("ii", 1, 0)


def rst(transport: asyncio.WriteTransport | None) -> None:
    """Close a TCP transport with an RST instead of a FIN (SO_LINGER 0, then abort)."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    transport.abort()


class _End(asyncio.Protocol):
    """One socket of a link: the accepted client's, or the one to the target."""

    def __init__(self, link: _Link, is_client: bool) -> None:
        self.link = link
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        if self.is_client:
            self.link.accepted()

    def data_received(self, data: bytes) -> None:
        if self.is_client:
            self.link.from_client(data)
        else:
            self.link.from_target(data)

    def eof_received(self) -> bool:
        self.link.ended(self)
        return True  # the link decides when this side closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.link.ended(self)

    def pause_writing(self) -> None:
        self.link.pause_reading(not self.is_client)

    def resume_writing(self) -> None:
        self.link.resume_reading(not self.is_client)


class _Link:
    """One client connection and, when the mode forwards, its connection to the target."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.loop = asyncio.get_running_loop()
        self.client = _End(self, is_client=True)
        self.target: _End | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.to_target: list[bytes] = []  # client bytes waiting for the target connection
        self.to_client: deque[tuple[float, bytes]] = deque()  # (due loop time, bytes)
        self.timer: asyncio.TimerHandle | None = None
        self.budget: int | None = None  # bytes left before the cut (cut mode)
        self.close_when_flushed = False
        self.closed = False

    # -- modes -------------------------------------------------------------------------

    def accepted(self) -> None:
        self.proxy.links.add(self)
        self.proxy.accepted += 1
        self.apply_mode()

    def apply_mode(self) -> None:
        """Follow the proxy's current mode (at the accept, and at every switch)."""
        mode = self.proxy.mode
        if mode == "reset":
            self.close(reset=True)
            return
        if mode == "black_hole":
            self.to_target.clear()
            self.to_client.clear()
            return
        self.budget = self.proxy.cut_bytes if mode == "cut" else None
        if self.budget == 0:
            self.close_when_flushed = True
        if self.target is None and self.connecting is None and not self.close_when_flushed:
            self.connecting = self.loop.create_task(self._connect())
        self._pump()

    async def _connect(self) -> None:
        try:
            _, end = await self.loop.create_connection(
                lambda: _End(self, is_client=False), self.proxy.target_host, self.proxy.target_port
            )
        except OSError:
            self.connecting = None
            self.close(reset=True)  # the target refuses: the client is reset, as it would be
            return
        self.connecting = None
        if self.closed:
            assert end.transport is not None
            end.transport.abort()
            return
        self.target = end
        pending, self.to_target = self.to_target, []
        if self.proxy.mode != "black_hole" and end.transport is not None:
            for data in pending:
                end.transport.write(data)

    # -- bytes -------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.proxy.mode == "black_hole" or self.closed:
            return
        target = self.target
        if target is not None and target.transport is not None:
            target.transport.write(data)
        else:
            self.to_target.append(data)

    def from_target(self, data: bytes) -> None:
        mode = self.proxy.mode
        if mode == "black_hole" or self.closed or self.close_when_flushed:
            return
        if self.budget is not None:
            data = data[: self.budget]
            self.budget -= len(data)
            if self.budget == 0:
                self.close_when_flushed = True
        delay = self.proxy.delay if mode == "latency" else 0.0
        self.to_client.append((self.loop.time() + delay, data))
        self._pump()

    def _pump(self) -> None:
        """Pass on the bytes that are due, in order; come back for the rest."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.client.transport
        now = self.loop.time()
        while self.to_client and self.to_client[0][0] <= now:
            _, data = self.to_client.popleft()
            if transport is not None and data:
                transport.write(data)
        if self.to_client:
            self.timer = self.loop.call_at(self.to_client[0][0], self._pump)
        elif self.close_when_flushed:
            self.close()

    def pause_reading(self, client_side: bool) -> None:
        end = self.client if client_side else self.target
        if end is not None and end.transport is not None and not end.transport.is_closing():
            end.transport.pause_reading()

    def resume_reading(self, client_side: bool) -> None:
        end = self.client if client_side else self.target
        if end is not None and end.transport is not None and not end.transport.is_closing():
            end.transport.resume_reading()

    # -- the end -----------------------------------------------------------------------

    def ended(self, end: _End) -> None:
        """One side sent EOF or went away."""
        if self.closed:
            return
        if end.is_client:
            self.close()
            return
        if end is not self.target:
            return  # a late callback of a target connection already let go
        self.target = None
        if end.transport is not None:
            end.transport.close()
        if self.proxy.mode == "black_hole":
            return  # a black hole keeps the client's socket open whatever the target does
        self.close_when_flushed = True  # what the target sent first still reaches the client
        self._pump()

    def close(self, *, reset: bool = False) -> None:
        """Close both sides: RST with `reset`, else the client gets a FIN after its bytes."""
        if self.closed:
            return
        self.closed = True
        self.proxy.links.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connecting is not None:
            self.connecting.cancel()
        self.to_client.clear()
        self.to_target.clear()
        target, self.target = self.target, None
        if target is not None and target.transport is not None:
            if reset:
                rst(target.transport)
            else:
                target.transport.abort()
        if reset:
            rst(self.client.transport)
        elif self.client.transport is not None:
            self.client.transport.close()


class FaultProxy:
    """A TCP proxy on a loopback port whose behaviour a test switches at any time."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.cut_bytes = 0
        self.accepted = 0  # connections accepted so far
        self.links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return len(self.links)

    @property
    def held(self) -> int:
        """Bytes from the target held back (latency), not yet passed on to a client."""
        return sum(len(data) for link in self.links for _, data in link.to_client)

    @property
    def url_host(self) -> str:
        """host:port to point a client at."""
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        """Listen on a free port of `host`; returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Link(self).client, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _switch(self, mode: Mode) -> None:
        self.mode = mode
        for link in list(self.links):
            link.apply_mode()

    def pass_through(self) -> None:
        """Forward bytes unchanged."""
        self._switch("pass")

    def latency(self, seconds: float) -> None:
        """Hold every chunk from the target `seconds` before passing it on."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self.delay = seconds
        self._switch("latency")

    def black_hole(self) -> None:
        """Accept and read, never answer; keep every socket open."""
        self._switch("black_hole")

    def reset(self) -> None:
        """RST every open connection and each new one."""
        self._switch("reset")

    def cut_after(self, n_bytes: int) -> None:
        """Pass `n_bytes` more from the target on each connection, then close both sides."""
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        self.cut_bytes = n_bytes
        self._switch("cut")

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
        links, self.links = list(self.links), set()
        tasks = [link.connecting for link in links if link.connecting is not None]
        for link in links:
            link.close(reset=True)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        # Let the aborted transports run their connection_lost callbacks and release sockets.
        for _ in range(3):
            await asyncio.sleep(0)
