"""The embedded store's device list: pages by last activity, keyset cursors, the two searches.

The same answers as gateway.store.listing gives over Redis, from the records in memory:

- the list: most recent activity first (the activity score, then the id, both descending;
  gateway.store.native_order), `after=` strictly after a row, `page=N` up to MAX_OFFSET
  rows deep, the total that match the blocked filter;
- `match=prefix`: ids, and words of custom names, that start with the text (ASCII letters
  lower-cased, words split as lua/name_words.lua splits them), looked at in the id index's
  order then the words' order. Redis looks at SEARCH_CAP ids in each of its SHARDS shards;
  this store, having no shards, at SEARCH_CAP x SHARDS ids in all, and says `truncated`
  past them;
- `match=contains`: the whole scan in one answer (a pass over the records in memory, where
  Redis steps through its shards for at most SCAN_BUDGET seconds an answer): counted,
  ordered by activity and paged by number, with no cursor. A scan cursor a Redis store
  gave (`after=`) is followed from its shard and place in the scan's order (a shard's id
  index in order, then its custom names), as the Redis store answers when its scan from
  there ends within one answer: the next `amount` matches, and a cursor after them.

Every method reads the records as they are when it is called: nothing awaits in between.
"""

from __future__ import annotations

import heapq
import re
from typing import Final

from gateway.errors import BadRequest
from gateway.model import Device
from gateway.store.cursor import ListCursor, ScanCursor, read_list_cursor, read_scan_cursor
from gateway.store.keys import SHARDS, shard_of
from gateway.store.listing import MAX_OFFSET, SEARCH_CAP, ListPage, Match, ascii_lower, scan_cut
from gateway.store.listing_types import BlockedFilter
from gateway.store.native_blocked import NativeBlocked
from gateway.store.native_order import ActivityOrder, Key
from gateway.store.native_record import DeviceRecord

SEARCH_LOOKS: Final = SEARCH_CAP * SHARDS  # ids a search by prefix looks at, at most
# A word of a custom name: a run of bytes other than ASCII spaces and punctuation (C's
# isspace and ispunct), as lua/name_words.lua's '[^%s%p]+' over the lower-cased name.
_WORD: Final = re.compile(rb"[^\s\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e]+")


def index_entry(device_id: str) -> str:
    """An id as the id index holds it: lower-cased, then "\\0" and the id when they differ."""
    low = ascii_lower(device_id)
    return device_id if low == device_id else f"{low}\0{device_id}"


def name_words(name: str) -> set[bytes]:
    """The words of a custom name, lower-cased (ASCII letters only), as UTF-8 bytes."""
    return set(_WORD.findall(name.encode().lower()))


def _id_of(entry: str) -> str:
    """The id an index entry names (what follows the first "\\0", if any)."""
    _, sep, rest = entry.partition("\0")
    return rest if sep else entry


class NativeListing:
    """Lists the devices of one embedded store."""

    def __init__(
        self, records: dict[str, DeviceRecord], order: ActivityOrder, blocked: NativeBlocked
    ) -> None:
        self._records = records
        self._order = order
        self._blocked = blocked

    def page(
        self,
        *,
        name: str | None,
        blocked: BlockedFilter,
        page: int,
        amount: int,
        after: str | None = None,
        match: Match = "contains",
    ) -> ListPage:
        """One page of devices, most recent activity first."""
        self._order.sync(self._records.values(), len(self._records))
        if name and match == "contains":
            return self._contains(ascii_lower(name), blocked, page, amount, after)
        cursor = read_list_cursor(after) if after else None
        offset = 0 if cursor else (page - 1) * amount
        if offset > MAX_OFFSET:
            total = self.page(name=name, blocked=blocked, page=1, amount=1, match=match).total
            if total is not None and offset >= total:
                return ListPage([], total, None)  # past the end: empty, as ever
            raise BadRequest(
                f"page: pages more than {MAX_OFFSET} rows deep are read with after=<cursor> "
                "(the X-Next-Cursor header of the page before)"
            )
        before = (cursor.score, cursor.id) if cursor else None
        want = offset + amount + 1  # one more: tells whether a next page exists
        truncated = False
        if name:
            rows, total, truncated = self._search(ascii_lower(name), blocked, want, before)
        else:
            rows, total = self._list(blocked, want, before)
        more = len(rows) > offset + amount
        rows = rows[offset : offset + amount]
        devices = [self._records[device_id].device() for _, device_id in rows]
        next_cursor = ListCursor(rows[-1][0], rows[-1][1]).encode() if more else None
        return ListPage(devices, total, next_cursor, truncated)

    def _list(self, mode: BlockedFilter, want: int, before: Key | None) -> tuple[list[Key], int]:
        """The first `want` rows after `before` that pass the filter, and how many pass it."""
        records = self._records
        if mode == "only":
            keys = [(records[i].score, i) for i in self._blocked.ids()]
            if before is not None:
                keys = [key for key in keys if key < before]
            return heapq.nlargest(want, keys), len(self._blocked)
        hide = mode == "hide"
        total = len(records) - (len(self._blocked) if hide else 0)
        rows: list[Key] = []
        if want <= 0:
            return rows, total
        for key in self._order.below(before):
            if hide and records[key[1]].blocked:
                continue
            rows.append(key)
            if len(rows) >= want:
                break
        return rows, total

    def _search(
        self, prefix: str, mode: BlockedFilter, want: int, before: Key | None
    ) -> tuple[list[Key], int, bool]:
        """Devices whose id, or a word of whose custom name, starts with `prefix`: the first
        `want` rows after `before`, how many match, and whether the search was cut short."""
        records = self._records
        looked: set[str] = set()
        matches: list[Key] = []

        def take(device_id: str) -> bool:
            if device_id in looked:
                return True
            if len(looked) >= SEARCH_LOOKS:
                return False
            looked.add(device_id)
            record = records.get(device_id)
            if record is not None and _passes(record, mode):
                matches.append((record.score, device_id))
            return True

        going = all(
            take(_id_of(entry))
            for entry in sorted(e for e in map(index_entry, records) if e.startswith(prefix))
        )
        if going:
            start = prefix.encode()
            words = sorted(
                entry
                for record in records.values()
                if record.name
                for word in name_words(record.name)
                if (entry := word + b"\0" + record.id.encode()).startswith(start)
            )
            going = all(take(_id_of(entry.decode(errors="replace"))) for entry in words)
        count = len(matches)
        if before is not None:
            matches = [key for key in matches if key < before]
        return heapq.nlargest(want, matches), count, not going

    def _contains(
        self, needle: str, mode: BlockedFilter, page: int, amount: int, after: str | None
    ) -> ListPage:
        """Devices whose id or custom name contains `needle`, scanned whole: counted, ordered
        by activity and paged by number. After a scan cursor: the next `amount` matches in
        the scan's order and a cursor for the rest, as a Redis store answers."""
        start = read_scan_cursor(after, SHARDS) if after else ScanCursor(0, b"")
        state = start.state.decode("ascii", "replace")
        resume = state[1:] if state else None  # in the cursor's shard: the index after it
        found: list[tuple[int, str, int, str]] = []  # score, id, shard, state after it
        for record in self._records.values():
            device_id = record.id
            low = ascii_lower(device_id)
            if needle in low:
                place = "i" + (device_id if low == device_id else f"{low}\0{device_id}")
            elif record.name is not None and needle in ascii_lower(record.name):
                place = ""  # a name: after the shard's ids
            else:
                continue
            if not _passes(record, mode):
                continue
            shard = 0
            if after:
                shard = shard_of(device_id)
                if shard < start.shard:
                    continue
                if shard == start.shard and place and resume is not None and place[1:] <= resume:
                    continue
            found.append((record.score, device_id, shard, place))
        if not after:
            found.sort(reverse=True)
            offset = (page - 1) * amount
            rows = found[offset : offset + amount]
            return ListPage(self._devices(rows), len(found), None)
        found.sort(key=_scan_order)
        cut = scan_cut(found, amount)
        if cut < len(found):
            _, _, at_shard, at_state = found[cut - 1]
            next_at = ScanCursor(at_shard if at_state else at_shard + 1, at_state.encode())
        else:
            next_at = ScanCursor(SHARDS, b"")
        rows = sorted(found[:cut], reverse=True)
        more = next_at.shard < SHARDS
        return ListPage(self._devices(rows), None, next_at.encode() if more else None)

    def _devices(self, rows: list[tuple[int, str, int, str]]) -> list[Device]:
        return [self._records[row[1]].device() for row in rows]


def _scan_order(found: tuple[int, str, int, str]) -> tuple[int, bool, str]:
    """A scan's order: by shard, then the shard's id index in order, then its names."""
    return found[2], found[3] == "", found[3]


def _passes(record: DeviceRecord, mode: BlockedFilter) -> bool:
    """Whether a record passes the blocked filter."""
    return mode == "all" or (mode == "only") == record.blocked
