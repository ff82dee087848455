"""Flow control of one transport: whether it is read, and whether its peer takes writes.

One object per transport, as uvicorn's `flow_control.py` and aiohttp's `base_protocol.py`
keep it: the protocol reports the transport's `pause_writing`/`resume_writing` here, and
whoever must stop or resume reading it asks here, so a pause is never sent twice nor a
resume lost. The exchange relays between the two sides: a full client socket pauses the
upstream's reading, a full upstream socket pauses the client's reading (or the buffered
body's sending).
"""

from __future__ import annotations

import asyncio


class FlowControl:
    """Reading paused or not (by us), writing paused or not (by the transport)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False

    def pause_reading(self) -> None:
        """Stop reading the transport (idempotent)."""
        if not self.read_paused:
            self.read_paused = True
            if not self._transport.is_closing():
                self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the transport again (idempotent)."""
        if self.read_paused:
            self.read_paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()

    def pause_writing(self) -> None:
        """The transport's write buffer is over its high-water mark."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The transport's write buffer drained below its low-water mark."""
        self.write_paused = False
