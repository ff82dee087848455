"""The suite's one upstream factory, raw side: `RawUpstream`, a raw asyncio server for what
aiohttp refuses to send. It writes a given byte string as the answer to each request
(`MALFORMED` holds a corpus of broken answers), or answers the n-th request of each
connection as a script says, or runs a test's own coroutine on each connection; it records a
`Seen` (tests/rig/upstream.py) per request it reads.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Literal, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from tests.rig.upstream import KEEP_BODY, LOOPBACK, MARK, Seen

_OK: Final = b"HTTP/1.1 200 OK\r\n" + MARK.encode() + b": 1\r\nContent-Length: 2\r\n\r\nok"

MALFORMED: Final[Mapping[str, bytes]] = {
    "bad_status_line": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "nul_in_header": b"HTTP/1.1 200 OK\r\nX-Evil: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "content_length_and_chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "negative_content_length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok",
    # Well-formed but huge: 128 KiB of one header line (llhttp itself sets no size limit).
    "oversized_headers": (
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (128 * 1024) + b"\r\nContent-Length: 2\r\n\r\nok"
    ),
    "bad_chunk_size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n"
    ),
}

# A scripted answer: bytes written with the connection kept open, (bytes, "close") written
# then closed, None: the connection closed at once without a byte.
RawAnswer = bytes | tuple[bytes, Literal["close"]] | None
Script = Callable[[int], RawAnswer]  # the n-th request of a connection (from 1) -> its answer
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CLOSE_GRACE: Final = 5.0  # seconds close() lets aborted connections end by themselves


class RawUpstream:
    """A raw asyncio upstream for answers written byte for byte (or any raw loopback server
    a test needs: a trap nobody may reach, a Redis that never answers, an echo).

    By default each request is read whole (Content-Length or chunked body) and recorded,
    then the answer for its raw path (or the default) is written verbatim, and with `close`
    the connection is closed after it (else the next request on it is read). With `script`,
    the n-th request of each connection is answered as `script(n)` says. With `serve`, a
    test's own coroutine runs on each connection and nothing is recorded but `connections`.
    """

    def __init__(
        self,
        answer: bytes = _OK,
        *,
        close: bool = True,
        script: Script | None = None,
        serve: Serve | None = None,
    ) -> None:
        self.seen: list[Seen] = []
        self.connections = 0  # connections accepted
        self.url = ""
        self.close_after = close
        self._default = answer
        self._by_path: dict[str, bytes] = {}
        self._script = script
        self._custom = serve
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def answer_with(self, answer: bytes, *, path: str | None = None) -> None:
        """The bytes to answer `path` with (raw path without the query), or by default."""
        if path is None:
            self._default = answer
        else:
            self._by_path[path] = answer

    def count(self, *, path: str | None = None) -> int:
        """Requests seen, optionally only those for a raw path (query ignored)."""
        return sum(1 for s in self.seen if path is None or s.path == path)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.url.rsplit(":", 1)[1])

    async def start(self) -> str:
        """Listen on a free loopback port; returns the origin URL."""
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.url = f"http://{LOOPBACK}:{self._server.sockets[0].getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        # Aborted, a connection's reader sees the end and its task returns by itself; a
        # test's own coroutine may wait on anything else, so it is cancelled at once.
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        if tasks:
            grace = 0.0 if self._custom is not None else CLOSE_GRACE
            _, stuck = await asyncio.wait(tasks, timeout=grace)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _answer(self, seen: Seen, n: int) -> RawAnswer:
        if self._script is not None:
            return self._script(n)
        answer = self._by_path.get(seen.path, self._default)
        return (answer, "close") if self.close_after else answer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        number = self.connections
        try:
            if self._custom is not None:
                await self._custom(reader, writer)
                return
            n = 0
            while (seen := await _read_request(reader, number)) is not None:
                self.seen.append(seen)
                n += 1
                answer = self._answer(seen, n)
                if answer is None:
                    break
                writer.write(answer if isinstance(answer, bytes) else answer[0])
                await writer.drain()
                if not isinstance(answer, bytes):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except RuntimeError:
            if not writer.transport.is_closing():
                raise
            # uvloop's word for a write on a connection close() aborted meanwhile
        except asyncio.CancelledError:
            # Cancelled by close(): end quietly (Python 3.11's start_server would log a
            # cancelled connection task as an error).
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader, connection: int) -> Seen | None:
    """One request from the stream (None at a clean end before a new request).

    A head over the StreamReader's limit (64 KiB) raises LimitOverrunError: the connection
    is dropped.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    digest = hashlib.sha256()
    body = bytearray()
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            n = int(size_line.split(b";", 1)[0], 16)
            if n == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer fields
                break
            body += (await reader.readexactly(n + 2))[:-2]
    elif (length := int(headers.get("Content-Length", "0"))) > 0:
        body += await reader.readexactly(length)
    digest.update(body)
    return Seen(
        method=method,
        raw_path=target,
        headers=CIMultiDictProxy(headers),
        body_sha256=digest.hexdigest(),
        body_size=len(body),
        connection=connection,
        body=bytes(body) if len(body) <= KEEP_BODY else None,
        version=version,
    )


class MakeRawUpstream(Protocol):
    """The `make_raw_upstream` fixture: a started RawUpstream, closed after the test."""

    async def __call__(
        self,
        answer: bytes = ...,
        *,
        close: bool = ...,
        script: Script | None = ...,
        serve: Serve | None = ...,
    ) -> RawUpstream: ...
