"""A request body on its way upstream: read whole first (the default), or streamed.

Buffered (`limits.request_buffering`): the body collects in a `BodyBuffer` (memory, then an
unnamed temporary file) and goes upstream only once complete, with its Content-Length (a
chunked upload is re-framed); the file part is sent only as fast as the upstream's socket
takes it. Streamed: the pieces that came before an upstream connection was ready wait
here, then every piece is written upstream as it arrives, re-chunked when the client sent
chunks. Either way the exchange decides (the verdict, the limits, the answers); this only
holds and moves bytes, and says how much it holds so that the client can be paused.
"""

from __future__ import annotations

from typing import Final

from gateway.dataplane import wire
from gateway.dataplane.body import BodyBuffer
from gateway.dataplane.upstream import UpstreamConnection

NOT_SENDING: Final = -1  # no part of a buffered file is waiting to go upstream


class Upload:
    """One request body: what arrived, what went upstream, and how."""

    def __init__(
        self, content_length: int | None, chunked: bool, buffer: BodyBuffer | None
    ) -> None:
        self._buffer = buffer  # None: streamed
        # Streamed and chunked from the client (no length declared): chunked upstream too.
        self._chunk = buffer is None and chunked and content_length is None
        self._content_length = content_length
        self._pending: list[bytes] = []  # streamed pieces that came before the upstream
        self._upstream: UpstreamConnection | None = None
        self._offset = NOT_SENDING
        self.held = 0  # bytes held here and not yet sent upstream
        self.done = False  # the whole body arrived
        self.sent = False  # a byte of it went upstream

    @property
    def buffered(self) -> bool:
        """Read whole before it goes upstream."""
        return self._buffer is not None

    @property
    def replayable(self) -> bool:
        """Could it be sent again from the start? Buffered and complete, or nothing sent."""
        return self.done and (self._buffer is not None or not self.sent)

    @property
    def all_sent(self) -> bool:
        """Nothing of it waits to go upstream (the connection may then be reused)."""
        return self.done and self._offset == NOT_SENDING and not self._pending

    def take(self, data: bytes) -> None:
        """A piece arrived from the client; raises OSError when the buffer cannot hold it."""
        buffer = self._buffer
        if buffer is not None:
            buffer.append(data)
            self.held = buffer.size
            return
        upstream = self._upstream
        if upstream is not None:
            self.sent = True
            upstream.write(wire.chunk(data) if self._chunk else data)
            return
        self._pending.append(data)
        self.held += len(data)

    def finish(self) -> None:
        """The whole body arrived."""
        self.done = True
        upstream = self._upstream
        if upstream is not None and self._chunk:
            upstream.write(wire.LAST_CHUNK)

    def framing(self) -> tuple[int | None, bool]:
        """The upstream head's framing: (Content-Length or None, chunked)."""
        if self._buffer is not None:
            return self._buffer.size, False
        return self._content_length, self._chunk

    def start(self, upstream: UpstreamConnection, head: bytes) -> None:
        """Send the head and what is here; a buffered file follows as the socket takes it.

        Raises OSError when the buffer's file cannot be read.
        """
        self._upstream = upstream
        buffer = self._buffer
        if buffer is not None:
            self.sent = buffer.size > 0
            if buffer.in_memory:
                upstream.write(head + buffer.memory())
            else:
                upstream.write(head)
                self._offset = 0
                self.pump()
            return
        parts = [head]
        for piece in self._pending:
            parts.append(wire.chunk(piece) if self._chunk else piece)
        self.sent = self.sent or bool(self._pending)
        self._pending = []
        self.held = 0
        if self.done and self._chunk:
            parts.append(wire.LAST_CHUNK)
        upstream.write(b"".join(parts))

    def pump(self) -> bool:
        """Send the buffered file on while the upstream takes it; True if anything went.

        Raises OSError when the file cannot be read.
        """
        buffer, upstream = self._buffer, self._upstream
        if buffer is None or upstream is None:
            return False
        moved = False
        flow = upstream.flow
        while self._offset != NOT_SENDING and (flow is None or not flow.write_paused):
            data = buffer.read(self._offset)
            if not data:
                self._offset = NOT_SENDING
                break
            self._offset += len(data)
            upstream.write(data)  # may pause the flow before it returns
            moved = True
        return moved

    def detach(self) -> None:
        """The upstream attempt is over (answered, failed or cut): stop sending to it."""
        self._upstream = None
        self._offset = NOT_SENDING

    def close(self) -> None:
        """Drop the body (a buffered file goes with it)."""
        self.detach()
        self._pending = []
        if self._buffer is not None:
            self._buffer.close()
