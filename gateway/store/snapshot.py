"""The blocked-ids snapshot: a file that lets a process started while Redis is unreachable
still refuse blocked devices.

`blocked-<key_prefix>-<12 hex>.json` in the state directory (gateway.state), the hex naming
the Redis URL without its credentials, holds a JSON object: the format, when it was written
(epoch ms), that URL, the key prefix, the epoch marker (gateway.store.epoch) and the ids.
Encoding, decoding and the name are pure; `read_snapshot` and `write_snapshot` do the I/O,
and `SnapshotWriter` writes on every change, off the event loop, one write at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from gateway.errors import SnapshotError
from gateway.state import write_atomic

log = logging.getLogger(__name__)

FORMAT: Final = 1
RETRY_DELAY: Final = 5.0  # seconds before a failed write is tried again (sooner on a change)
_CREDENTIAL_PARAMS: Final = frozenset({"password", "username"})
# File-name characters a key prefix keeps (the file says the exact prefix inside).
_NAME_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The blocked ids of one Redis dataset (URL, prefix, epoch) as one process knew them."""

    written_ms: int
    url: str  # without credentials
    key_prefix: str
    epoch: str | None
    ids: frozenset[str]


def public_url(url: str) -> str:
    """The Redis URL without a user, password or credential query parameters."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in _CREDENTIAL_PARAMS])
    # By hand: urlunsplit drops the "//" of a URL with no host (unix:///run/redis.sock).
    return f"{parts.scheme}://{host}{parts.path}" + (f"?{query}" if query else "")


def snapshot_name(key_prefix: str, url: str) -> str:
    """`blocked-<prefix>-<12 hex of a hash of the URL without credentials>.json`."""
    digest = hashlib.sha256(public_url(url).encode()).hexdigest()[:12]
    return f"blocked-{_NAME_UNSAFE.sub('_', key_prefix)}-{digest}.json"


def encode(snapshot: Snapshot) -> bytes:
    """The file's bytes (ids sorted, so equal sets make equal files)."""
    return orjson.dumps(
        {
            "format": FORMAT,
            "written_ms": snapshot.written_ms,
            "url": snapshot.url,
            "key_prefix": snapshot.key_prefix,
            "epoch": snapshot.epoch,
            "ids": sorted(snapshot.ids),
        }
    )


def decode(data: bytes, *, url: str, key_prefix: str) -> Snapshot:
    """The snapshot in `data` if it is of this Redis and prefix, else SnapshotError saying why."""
    try:
        doc: Any = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SnapshotError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise SnapshotError(f"unknown format {doc.get('format')!r} (this gateway reads {FORMAT})")
    want = public_url(url)
    if doc.get("url") != want:
        raise SnapshotError(f"written for another Redis ({doc.get('url')!r}, not {want!r})")
    if doc.get("key_prefix") != key_prefix:
        raise SnapshotError(
            f"written for another key prefix ({doc.get('key_prefix')!r}, not {key_prefix!r})"
        )
    written, epoch, ids = doc.get("written_ms"), doc.get("epoch"), doc.get("ids")
    if isinstance(written, bool) or not isinstance(written, int) or written < 0:
        raise SnapshotError("written_ms: not a time in epoch milliseconds")
    if epoch is not None and not (isinstance(epoch, str) and epoch):
        raise SnapshotError("epoch: not a token")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise SnapshotError("ids: not a list of device ids")
    return Snapshot(written, want, key_prefix, epoch, frozenset(ids))


def read_snapshot(path: Path, *, url: str, key_prefix: str) -> Snapshot | None:
    """The snapshot at `path`; None when there is no file; SnapshotError when it is unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot be read ({exc.strerror or exc})") from None
    return decode(data, url=url, key_prefix=key_prefix)


def write_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Replace the file at `path` in one step, readable by this user only; raises OSError."""
    write_atomic(path, encode(snapshot), mode=0o600)


def _content(snapshot: Snapshot) -> tuple[str, str, str | None, frozenset[str]]:
    return snapshot.url, snapshot.key_prefix, snapshot.epoch, snapshot.ids


class SnapshotWriter:
    """Writes the snapshot after every change, off the event loop and one write at a time.

    `changed()` never waits: with no write in flight it starts one; during one it asks for
    one more after it, which then takes the state of that moment. So every change ends up on
    disk, and at most one write is in flight and one more pending, however fast changes come.
    A state equal to the file's (ids, epoch) is not written again. A failed write is logged
    and counted, never raised, and tried again after `retry_delay` or at the next change.
    """

    def __init__(
        self,
        path: Path,
        take: Callable[[], Snapshot | None],
        *,
        on_disk: Snapshot | None = None,
        write: Callable[[Path, Snapshot], None] = write_snapshot,
        retry_delay: float = RETRY_DELAY,
    ) -> None:
        self.path = path
        self._take = take  # the state to write now; None: nothing worth writing yet
        self._write = write
        self._retry_delay = retry_delay
        self._on_disk = None if on_disk is None else _content(on_disk)
        self._dirty = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self.on_write: Callable[[], None] | None = None  # after every attempt
        self.written_ms: int | None = None if on_disk is None else on_disk.written_ms
        self.writes = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def busy(self) -> bool:
        """A write is in flight or pending."""
        return self._task is not None and not self._task.done()

    def changed(self) -> None:
        """The state moved: write it (now, or right after the write in flight)."""
        if self._closed:
            return
        self._dirty = True
        self._wakeup.set()
        if not self.busy:
            self._task = asyncio.create_task(self._run(), name="blocked-snapshot")

    async def _run(self) -> None:
        while self._dirty:
            self._dirty = False
            self._wakeup.clear()
            snapshot = self._take()
            if snapshot is None or _content(snapshot) == self._on_disk:
                continue
            try:
                await asyncio.to_thread(self._write, self.path, snapshot)
            except OSError as exc:
                self.failures += 1
                self.last_error = f"{exc.strerror or exc}"
                log.warning(
                    "cannot write the blocked-ids snapshot %s: %s",
                    self.path,
                    self.last_error,
                    extra={"fields": {"snapshot": str(self.path)}},
                )
                self._report()
                self._dirty = True
                # Tried again after a while, or as soon as something changes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._retry_delay):
                        await self._wakeup.wait()
                continue
            self._on_disk = _content(snapshot)
            self.written_ms = snapshot.written_ms
            self.writes += 1
            self.last_error = None
            self._report()

    def _report(self) -> None:
        if self.on_write is not None:
            self.on_write()

    async def close(self, timeout: float = 5.0) -> None:
        """Let a write in flight (and the last change) reach the disk, bounded by `timeout`;
        later changes are not written."""
        self._closed = True
        task = self._task
        if task is None or task.done():
            return
        if self.last_error is not None:
            task.cancel()  # waiting out a retry: the disk said no a moment ago
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
