"""A request body read whole before it goes upstream: in memory, then in a temporary file.

With `limits.request_buffering` (the default, as nginx's `proxy_request_buffering on`), an
upstream connection is taken only once the body is complete, so a client sending slowly
holds a client connection and a buffer, never an upstream connection. Up to
`limits.buffer_memory_bytes` stay in memory; the rest goes to an anonymous temporary file
(removed by the system when it is closed, whatever happens to the process). The whole
body is bounded by `limits.max_body_bytes` before it gets here.
"""

from __future__ import annotations

import tempfile
from typing import IO, Final

READ_SIZE: Final = 256 * 1024  # bytes read from the file per write to the upstream


class BodyBuffer:
    """The bytes of one request body, in arrival order."""

    __slots__ = ("_chunks", "_directory", "_file", "_memory_limit", "size")

    def __init__(self, memory_limit: int, directory: str | None) -> None:
        self._memory_limit = memory_limit
        self._directory = directory
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0

    @property
    def in_memory(self) -> bool:
        """True while the body is held in memory (no file was needed)."""
        return self._file is None

    def append(self, data: bytes) -> None:
        """Add a piece of the body; raises OSError when the temporary file cannot take it."""
        if self._file is None and self.size + len(data) > self._memory_limit:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix="devicegate-body-")
            self._file.write(b"".join(self._chunks))
            self._chunks = []
        if self._file is not None:
            self._file.write(data)
        else:
            self._chunks.append(data)
        self.size += len(data)

    def memory(self) -> bytes:
        """The whole body, when it is held in memory."""
        assert self._file is None
        return b"".join(self._chunks)

    def read(self, offset: int, size: int = READ_SIZE) -> bytes:
        """Up to `size` bytes of the body from `offset` (from the file or from memory)."""
        if self._file is None:
            return self.memory()[offset : offset + size]
        self._file.flush()
        self._file.seek(offset)
        return self._file.read(size)

    def close(self) -> None:
        """Drop the body (the temporary file goes with it)."""
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None
