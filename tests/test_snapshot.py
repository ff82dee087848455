"""The blocked-ids snapshot: its name, its decoding (table), and the coalesced writer."""

from __future__ import annotations

import logging
import stat
import threading
from pathlib import Path

import orjson
import pytest

from gateway.errors import SnapshotError
from gateway.store.snapshot import (
    FORMAT,
    Snapshot,
    SnapshotWriter,
    decode,
    encode,
    public_url,
    read_snapshot,
    snapshot_name,
    write_snapshot,
)
from tests.rig.waits import until

URL = "redis://gw:s3cret@10.0.0.5:6379/0"
PUBLIC = "redis://10.0.0.5:6379/0"
GOOD = Snapshot(1_793_748_259_787, PUBLIC, "dg", "0123456789abcdef", frozenset({"a", "b:c"}))

URLS = {
    "user and password": (URL, PUBLIC),
    "password only": ("redis://:pw@h:6379/1", "redis://h:6379/1"),
    "none to strip": ("redis://h:6379/0", "redis://h:6379/0"),
    "credential query parameters": (
        "rediss://h:6380/0?password=x&ssl_cert_reqs=none&username=u",
        "rediss://h:6380/0?ssl_cert_reqs=none",
    ),
    "unix socket": ("unix://:pw@/run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
}


@pytest.mark.parametrize(("url", "public"), URLS.values(), ids=URLS.keys())
def test_public_url_drops_credentials(url: str, public: str) -> None:
    assert public_url(url) == public


def test_the_name_says_the_prefix_and_hashes_the_url_without_credentials() -> None:
    name = snapshot_name("dg", URL)
    assert name.startswith("blocked-dg-") and name.endswith(".json")
    assert len(name) == len("blocked-dg-") + 12 + len(".json")
    assert "s3cret" not in name
    assert snapshot_name("dg", "redis://other:pw@10.0.0.5:6379/0") == name  # same Redis
    assert snapshot_name("dg", "redis://10.0.0.5:6379/1") != name  # another database
    assert snapshot_name("other", URL) != name
    assert "/" not in snapshot_name("a/../b", URL)  # a prefix never leaves the directory


def doc(**changes: object) -> bytes:
    base = orjson.loads(encode(GOOD))
    base.update(changes)
    return orjson.dumps(base)


DECODE: dict[str, tuple[bytes, str | None]] = {
    "good": (encode(GOOD), None),
    "good, credentials in the caller's URL only": (doc(url=PUBLIC), None),
    "another Redis": (doc(url="redis://10.0.0.6:6379/0"), "written for another Redis"),
    "another database": (doc(url="redis://10.0.0.5:6379/1"), "written for another Redis"),
    "another prefix": (doc(key_prefix="staging"), "written for another key prefix"),
    "an older format": (doc(format=0), "unknown format 0"),
    "a newer format": (doc(format=FORMAT + 1), f"unknown format {FORMAT + 1}"),
    "no format": (orjson.dumps({"ids": []}), "unknown format None"),
    "corrupt": (encode(GOOD)[:-7], "not JSON"),
    "empty": (b"", "not JSON"),
    "binary garbage": (b"\x00\xff\xfe", "not JSON"),
    "not an object": (b"[1, 2]", "not a JSON object"),
    "ids not a list": (doc(ids="a"), "ids: not a list of device ids"),
    "an id not a string": (doc(ids=["a", 3]), "ids: not a list of device ids"),
    "an empty id": (doc(ids=[""]), "ids: not a list of device ids"),
    "no time": (doc(written_ms=None), "written_ms: not a time"),
    "a negative time": (doc(written_ms=-1), "written_ms: not a time"),
    "an epoch not a string": (doc(epoch=7), "epoch: not a token"),
}


@pytest.mark.parametrize(("data", "problem"), DECODE.values(), ids=DECODE.keys())
def test_decode(data: bytes, problem: str | None) -> None:
    if problem is None:
        assert decode(data, url=URL, key_prefix="dg") == GOOD
        return
    with pytest.raises(SnapshotError) as caught:
        decode(data, url=URL, key_prefix="dg")
    assert problem in str(caught.value)


def test_an_epoch_may_be_absent() -> None:
    assert decode(doc(epoch=None), url=URL, key_prefix="dg").epoch is None


def test_read_snapshot_no_file_an_unreadable_one_and_a_written_one(tmp_path: Path) -> None:
    path = tmp_path / "state" / snapshot_name("dg", URL)
    assert read_snapshot(path, url=URL, key_prefix="dg") is None
    write_snapshot(path, GOOD)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_snapshot(path, url=URL, key_prefix="dg") == GOOD
    path.unlink()
    path.mkdir()  # a directory where the file should be
    with pytest.raises(SnapshotError, match="cannot be read"):
        read_snapshot(path, url=URL, key_prefix="dg")


# ---------------------------------------------------------------- the writer


class Disk:
    """A write function that records every write, can be held, and can fail."""

    def __init__(self) -> None:
        self.written: list[Snapshot] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = 0
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, path: Path, snapshot: Snapshot) -> None:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.started.set()
        try:
            assert self.gate.wait(10), "the test never let the write finish"
            if self.fail_next:
                self.fail_next -= 1
                raise OSError(28, "No space left on device")
            self.written.append(snapshot)
        finally:
            with self._lock:
                self.in_flight -= 1


class State:
    """The blocked set as the writer's `take` sees it."""

    def __init__(self) -> None:
        self.ids: frozenset[str] = frozenset()
        self.clock = 1000

    def take(self) -> Snapshot:
        self.clock += 1
        return Snapshot(self.clock, PUBLIC, "dg", "e1", self.ids)


async def test_every_change_reaches_the_disk_with_one_write_in_flight(tmp_path: Path) -> None:
    disk, state = Disk(), State()
    writer = SnapshotWriter(tmp_path / "s.json", state.take, write=disk)
    disk.gate.clear()
    state.ids = frozenset({"d0"})
    writer.changed()
    await until(disk.started.is_set, "the first write to start")
    for i in range(1, 50):  # changes while the first write is held
        state.ids = frozenset(f"d{j}" for j in range(i + 1))
        writer.changed()
    disk.gate.set()
    await until(lambda: not writer.busy, "the writes to finish")
    assert disk.most_in_flight == 1
    # The first state, then one more write with the last state: never one per change.
    assert [len(s.ids) for s in disk.written] == [1, 50]
    assert writer.written_ms == disk.written[-1].written_ms
    assert writer.writes == 2 and writer.failures == 0


async def test_an_unchanged_state_is_not_written_again(tmp_path: Path) -> None:
    disk, state = Disk(), State()
    state.ids = frozenset({"a"})
    on_disk = state.take()
    writer = SnapshotWriter(tmp_path / "s.json", state.take, write=disk, on_disk=on_disk)
    writer.changed()
    await until(lambda: not writer.busy, "the writer to settle")
    assert disk.written == []
    assert writer.written_ms == on_disk.written_ms
    state.ids = frozenset({"a", "b"})
    writer.changed()
    await until(lambda: not writer.busy, "the write")
    assert [s.ids for s in disk.written] == [frozenset({"a", "b"})]


async def test_a_failed_write_is_reported_then_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk, state = Disk(), State()
    path = tmp_path / "s.json"
    reports: list[tuple[int, str | None]] = []
    writer = SnapshotWriter(path, state.take, write=disk, retry_delay=0.05)
    writer.on_write = lambda: reports.append((writer.failures, writer.last_error))
    disk.fail_next = 1
    state.ids = frozenset({"a"})
    with caplog.at_level(logging.WARNING, logger="gateway.store.snapshot"):
        writer.changed()
        await until(lambda: writer.writes == 1, "the write after the failure")
    assert reports == [(1, "No space left on device"), (1, None)]
    assert [s.ids for s in disk.written] == [frozenset({"a"})]
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in record.getMessage() and "No space left" in record.getMessage()
    assert record.exc_info is None  # a line, never a traceback


async def test_a_real_write_is_atomic_and_private_and_close_waits_for_it(tmp_path: Path) -> None:
    state = State()
    path = tmp_path / "state" / "s.json"
    writer = SnapshotWriter(path, state.take)
    state.ids = frozenset({"x", "y"})
    writer.changed()
    await writer.close()
    assert read_snapshot(path, url=PUBLIC, key_prefix="dg") == Snapshot(
        writer.written_ms or 0, PUBLIC, "dg", "e1", frozenset({"x", "y"})
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.json"]
    writer.changed()  # after close: ignored
    assert not writer.busy


async def test_an_unwritable_directory_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    state = State()
    writer = SnapshotWriter(blocker / "s.json", state.take, retry_delay=60)
    writer.changed()
    await until(lambda: writer.failures == 1, "the failure")
    assert writer.last_error is not None and writer.written_ms is None
    await writer.close()
    assert not writer.busy
