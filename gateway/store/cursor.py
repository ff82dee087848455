"""The admin list's continuation cursors (pure): opaque, URL-safe, checked when read back.

A page's answer names where the next one starts; the caller passes it back as `after=`.

- A position in the list (`ListCursor`): the last row's last activity and id. The list is
  ordered by last activity, then id, both descending, so the next page is every entry
  strictly after that pair: what a device did in between moves it, but never repeats or
  skips one that did not move.
- A position in a substring scan (`ScanCursor`): the shard and where in it the scan
  stopped (`lua/scan.lua`'s state).

Both travel as base64url text with a one-letter kind, so a cursor of one kind is refused
where the other is expected, with a message rather than a wrong page.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Final

from gateway.errors import BadRequest

MAX_CURSOR: Final = 400  # characters: an id (128) and a score, or a scan state, encoded
_NOT_A_CURSOR: Final = "after: not a cursor this API gave"


@dataclass(frozen=True, slots=True)
class ListCursor:
    """After this entry of the list (or of a search's matches)."""

    score: int  # last activity, ms
    id: str

    def encode(self) -> str:
        return _encode(f"l{self.score}:{self.id}".encode())


@dataclass(frozen=True, slots=True)
class ScanCursor:
    """Where a substring scan goes on: a shard and the state `lua/scan.lua` gave."""

    shard: int
    state: bytes

    def encode(self) -> str:
        return _encode(b"s%d:" % self.shard + self.state)


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(text: str) -> bytes:
    if not text or len(text) > MAX_CURSOR:
        raise BadRequest(_NOT_A_CURSOR)
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadRequest(_NOT_A_CURSOR) from None


def read_list_cursor(text: str) -> ListCursor:
    """A list cursor as `ListCursor.encode` wrote it; BadRequest for anything else."""
    raw = _decode(text)
    score, sep, device_id = raw[1:].partition(b":")
    if raw[:1] != b"l" or not sep or not score.isdigit() or not device_id:
        raise BadRequest(_NOT_A_CURSOR)
    try:
        return ListCursor(int(score), device_id.decode("ascii"))
    except UnicodeDecodeError:
        raise BadRequest(_NOT_A_CURSOR) from None


def read_scan_cursor(text: str, shards: int) -> ScanCursor:
    """A scan cursor as `ScanCursor.encode` wrote it, for a shard below `shards`."""
    raw = _decode(text)
    shard, sep, state = raw[1:].partition(b":")
    if raw[:1] != b"s" or not sep or not shard.isdigit() or int(shard) >= shards:
        raise BadRequest(_NOT_A_CURSOR)
    return ScanCursor(int(shard), state)
