"""Answers read off a raw client connection, their framing undone (tests that speak bytes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from multidict import CIMultiDict

WAIT = 10.0  # bounds reading one answer


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
    head: bytes
    fields: CIMultiDict[str]
    body: bytes


async def read_answer(reader: asyncio.StreamReader, *, head_request: bool = False) -> Answer:
    """Read one response: by Content-Length, chunked, or (neither) to the end of stream."""
    async with asyncio.timeout(WAIT):
        head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
        status = int(head.split(b" ", 2)[1])
        fields = head_fields(head)
        if head_request or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "Content-Length" in fields:
            body = await reader.readexactly(int(fields["Content-Length"]))
        elif fields.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            assert await reader.readuntil(b"\r\n") == b"\r\n"  # no trailers
            body = b"".join(parts)
        else:
            body = await reader.read()
    return Answer(status, head, fields, body)
