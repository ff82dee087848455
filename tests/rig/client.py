"""The suite's one raw HTTP client: `RawClient` (a loopback connection that speaks bytes) and
`read_answer` (one answer read off a stream, its framing undone). Every read is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import orjson
from multidict import CIMultiDict

from tests.rig.faults import rst

WAIT: Final = 10.0  # bounds every connect, drain and read


def head_fields(head: bytes) -> CIMultiDict[str]:
    """The header fields of a response head (its status line left out)."""
    return CIMultiDict(
        (name.strip(), value.strip())
        for name, _, value in (line.decode().partition(":") for line in head.split(b"\r\n")[1:])
    )


@dataclass(frozen=True)
class Answer:
    """One response read off a raw connection, its framing undone."""

    status: int
    head: bytes  # the status line and the header lines, without the blank line
    fields: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)

    def envelope(self) -> Any:
        """The reason in the body, checked to be the gateway's `{status: false, result}`."""
        assert self.fields.get("Content-Type") == "application/json", self.fields
        data = orjson.loads(self.body)
        assert isinstance(data, dict) and data.keys() == {"status", "result"}, data
        assert data["status"] is False and isinstance(data["result"], str), data
        return data["result"]


@dataclass
class Progress:
    """How far one answer got, filled in while it arrives: a cut answer keeps what came."""

    received: int = 0  # bytes read, head and framing included
    head: bytes = b""
    head_at: float | None = None  # time.monotonic() when the whole head was in
    status: int = 0  # once the head is in
    fields: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytearray = field(default_factory=bytearray)


async def read_answer(
    reader: asyncio.StreamReader,
    *,
    head_request: bool = False,
    skip_interim: bool = False,
    framed: bool = False,
    progress: Progress | None = None,
    timeout: float = WAIT,
) -> Answer:
    """Read one response: by Content-Length, chunked, or (neither) to the end of stream.

    `skip_interim`: 100 Continue answers are read past (any other 1xx fails the test);
    `framed`: an answer delimited by the close fails the test; `progress` is filled in as
    bytes arrive. A cut raises IncompleteReadError (or ConnectionResetError).
    """
    got = progress if progress is not None else Progress()

    async def take(read: Awaitable[bytes]) -> bytes:
        try:
            data = await read
        except asyncio.IncompleteReadError as exc:
            got.received += len(exc.partial)
            raise
        got.received += len(data)
        return data

    async with asyncio.timeout(timeout):
        while True:
            head = (await take(reader.readuntil(b"\r\n\r\n")))[:-4]
            assert head.startswith(b"HTTP/1."), head[:80]
            status = int(head.split(b" ", 2)[1])
            if not (skip_interim and 100 <= status < 200):
                break
            assert status == 100, head
        fields: CIMultiDict[str] = CIMultiDict()
        for line in head.split(b"\r\n")[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep, f"malformed header line {line!r}"
            fields.add(name.strip(), value.strip())
        got.head, got.head_at, got.status, got.fields = head, time.monotonic(), status, fields
        if head_request or status in (204, 304) or 100 <= status < 200:
            pass
        elif "Content-Length" in fields:
            got.body += await take(reader.readexactly(int(fields["Content-Length"])))
        elif fields.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int((await take(reader.readuntil(b"\r\n"))).split(b";", 1)[0], 16):
                chunk = await take(reader.readexactly(size + 2))
                assert chunk[-2:] == b"\r\n", chunk[-2:]
                got.body += chunk[:-2]
            assert await take(reader.readuntil(b"\r\n")) == b"\r\n"  # no trailers
        else:
            assert not framed, f"an answer delimited by the close: {head!r}"
            got.body += await take(reader.read())
    return Answer(status, head, fields, bytes(got.body))


async def answers_in(data: bytes) -> list[Answer]:
    """Every answer in `data` (what a connection received up to its close), in order; a
    last answer cut short raises IncompleteReadError."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    found = []
    while not reader.at_eof():
        found.append(await read_answer(reader))
    return found


Ending = Literal["eof", "reset", "more"]


class RawClient:
    """One raw loopback connection: send bytes, read answers (or whatever comes), half-close,
    close; every connect, drain and read bounded by `timeout`.

    `framed`: every answer read must carry Content-Length or chunked coding.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float = WAIT,
        framed: bool = False,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.framed = framed

    @classmethod
    async def connect(
        cls, port: int, host: str = "127.0.0.1", *, timeout: float = WAIT, framed: bool = False
    ) -> RawClient:
        """A new connection to host:port."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, timeout=timeout, framed=framed)

    @classmethod
    async def over(
        cls, sock: socket.socket, *, timeout: float = WAIT, framed: bool = False
    ) -> RawClient:
        """A client on a socket already connected (made with options of the test's own)."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, timeout=timeout, framed=framed)

    # -- sending ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue `data` without waiting for the socket to take it."""
        self.writer.write(data)

    async def send(self, data: bytes) -> None:
        """Write `data` and wait (bounded) until the socket took it."""
        self.writer.write(data)
        async with asyncio.timeout(self.timeout):
            await self.writer.drain()

    async def send_bytewise(self, data: bytes, done: Callable[[], bool]) -> int:
        """One byte per write (TCP_NODELAY: one segment each), yielding to the loop between
        them so the peer reads them one by one. Stops once `done()` (the answer is in:
        writing on after the peer closed would draw a reset). Returns the bytes sent."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(self.timeout):
            for i in range(len(data)):
                if done():
                    return i
                self.writer.write(data[i : i + 1])
                await self.writer.drain()
                # Twice: once for the loop to see the byte, once for the peer to read it.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
        return len(data)

    # -- reading ------------------------------------------------------------------------

    async def read_answer(
        self,
        *,
        head_request: bool = False,
        skip_interim: bool = False,
        progress: Progress | None = None,
    ) -> Answer:
        """One answer, its framing undone (see `read_answer`)."""
        return await read_answer(
            self.reader,
            head_request=head_request,
            skip_interim=skip_interim,
            framed=self.framed,
            progress=progress,
            timeout=self.timeout,
        )

    async def read_exactly(self, n: int) -> bytes:
        """Exactly `n` bytes."""
        async with asyncio.timeout(self.timeout):
            return await self.reader.readexactly(n)

    async def read_until(self, separator: bytes = b"\r\n\r\n") -> bytes:
        """Everything up to and including `separator`."""
        async with asyncio.timeout(self.timeout):
            return await self.reader.readuntil(separator)

    async def read_some(self, n: int = 65536) -> bytes:
        """What one read gives (at most `n` bytes; b"" at the end of the stream)."""
        async with asyncio.timeout(self.timeout):
            return await self.reader.read(n)

    async def read_to_eof(self) -> bytes:
        """Everything until the peer closes (a reset raises ConnectionResetError)."""
        async with asyncio.timeout(self.timeout):
            return await self.reader.read()

    async def read_to_end(self) -> bytes:
        """Everything until the peer ends the connection, by a FIN or a reset (the bytes
        that came before a reset are kept)."""
        received = bytearray()
        async with asyncio.timeout(self.timeout):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    break  # as final as a FIN here
                if not data:
                    break
                received += data
        return bytes(received)

    async def closed(self) -> bool:
        """True when the peer closed the connection with nothing more to say (a reset
        counts as closed)."""
        async with asyncio.timeout(self.timeout):
            try:
                return await self.reader.read() == b""
            except ConnectionResetError:
                return True

    async def ending(self) -> Ending:
        """How the connection goes on: "eof" (a clean close), "reset", or "more" (bytes)."""
        try:
            async with asyncio.timeout(self.timeout):
                data = await self.reader.read(1)
        except ConnectionResetError:
            return "reset"
        return "eof" if data == b"" else "more"

    async def silent(self, seconds: float) -> bool:
        """True when nothing (not even the end of the stream) arrives for `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                await self.reader.read(1)
        except TimeoutError:
            return True
        return False

    # -- ending -------------------------------------------------------------------------

    def half_close(self) -> None:
        """Shut the sending side (a FIN); answers can still be read."""
        self.writer.write_eof()

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes and all."""
        self.writer.transport.abort()

    def reset(self) -> None:
        """Close with an RST instead of a FIN."""
        rst(self.writer.transport)

    async def close(self) -> None:
        """Close cleanly (a FIN after what is queued), bounded; a peer already gone is fine."""
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(self.timeout):
                await self.writer.wait_closed()


class OpenRawClient(Protocol):
    """The `raw_client` fixture: a RawClient connected to a loopback port, aborted after the
    test."""

    async def __call__(
        self, port: int, *, timeout: float = ..., framed: bool = ...
    ) -> RawClient: ...
