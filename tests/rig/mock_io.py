"""Transports and a loop for driving the data plane's protocols without sockets.

In the style of uvicorn's tests/protocols: a `MockTransport` records what a protocol writes
and whether it paused, closed or aborted; a `MockLoop` runs tasks on the real loop but keeps
its own clock, whose timers fire only when a test calls `advance(seconds)`, and hands out
`MockTransport`s for `create_connection` (the upstream pool's connections).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Coroutine
from typing import Any, cast

import orjson


class MockTransport(asyncio.Transport):
    """Records writes and state changes; the peer is 127.0.0.1."""

    def __init__(
        self,
        peer: tuple[str, int] = ("127.0.0.1", 40000),
        *,
        protocol: asyncio.BaseProtocol | None = None,
        high_water: int | None = None,
    ) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.peer = peer
        # Past `high_water` unread bytes, the protocol is told to pause writing, as a real
        # transport does from inside write(); drain() empties it and resumes the protocol.
        self._protocol = protocol
        self._high_water = high_water
        self.write_paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += data
        if (
            self._high_water is not None
            and self._protocol is not None
            and not self.write_paused
            and len(self.written) > self._high_water
        ):
            self.write_paused = True
            self._protocol.pause_writing()

    def drain(self) -> bytes:
        """Take what was written and let the protocol write again."""
        data = self.take()
        if self.write_paused and self._protocol is not None:
            self.write_paused = False
            self._protocol.resume_writing()
        return data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def take(self) -> bytes:
        """What was written since the last take."""
        data, self.written = bytes(self.written), bytearray()
        return data

    def status(self) -> int:
        """The status code of the first answer written."""
        return int(bytes(self.written).split(b" ", 2)[1])

    def envelope(self) -> Any:
        """The `result` of the first answer's envelope."""
        return orjson.loads(bytes(self.written).split(b"\r\n\r\n", 1)[1])["result"]


class MockTimer:
    """A timer of the MockLoop's clock."""

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class MockLoop:
    """Tasks on the real loop; a clock and timers of its own; mock upstream connections."""

    def __init__(self, real: asyncio.AbstractEventLoop, start: float = 1000.0) -> None:
        self._real = real
        self._now = start
        self._timers: list[tuple[float, int, MockTimer]] = []
        self._seq = itertools.count()
        self.connections: list[tuple[MockTransport, asyncio.Protocol]] = []
        self.refuse_connections = False
        self.high_water: int | None = None  # given to every connection it makes

    def time(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> MockTimer:
        timer = MockTimer(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> MockTimer:
        return self.call_at(self._now + delay, callback, *args)

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self._real.create_task(coro)

    async def create_connection(
        self, factory: Callable[[], asyncio.Protocol], host: str, port: int, **kwargs: Any
    ) -> tuple[MockTransport, asyncio.Protocol]:
        if self.refuse_connections:
            raise ConnectionRefusedError(111, "Connection refused")
        protocol = factory()
        transport = MockTransport((host, port), protocol=protocol, high_water=self.high_water)
        protocol.connection_made(transport)
        self.connections.append((transport, protocol))
        return transport, protocol

    def advance(self, seconds: float) -> None:
        """Move the clock on, firing every timer that falls due, in order."""
        until = self._now + seconds
        while self._timers and self._timers[0][0] <= until:
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if not timer.cancelled:
                timer.callback(*timer.args)
        self._now = until

    def as_loop(self) -> asyncio.AbstractEventLoop:
        """Typed as the loop the data plane takes (it uses only what this class has)."""
        return cast(asyncio.AbstractEventLoop, self)


async def settle(rounds: int = 5) -> None:
    """Let tasks started on the real loop run their next steps."""
    for _ in range(rounds):
        await asyncio.sleep(0)
