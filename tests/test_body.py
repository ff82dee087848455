"""gateway.dataplane.body: a request body held in memory, then in a temporary file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.dataplane.body import READ_SIZE, BodyBuffer


def read_all(body: BodyBuffer) -> bytes:
    out, offset = b"", 0
    while data := body.read(offset):
        out += data
        offset += len(data)
    return out


def test_a_body_within_the_memory_part_stays_in_memory(tmp_path: Path) -> None:
    body = BodyBuffer(10, str(tmp_path))
    for piece in (b"abc", b"", b"defghij"):
        body.append(piece)
    assert body.in_memory and body.size == 10
    assert body.memory() == b"abcdefghij" == read_all(body)
    assert list(tmp_path.iterdir()) == []


def test_past_the_memory_part_everything_moves_to_an_unnamed_file(tmp_path: Path) -> None:
    body = BodyBuffer(10, str(tmp_path))
    data = os.urandom(3 * READ_SIZE + 7)
    body.append(data[:8])
    body.append(data[8:])
    assert not body.in_memory and body.size == len(data)
    assert read_all(body) == data  # in order, the memory part first
    assert body.read(5, 4) == data[5:9]
    assert list(tmp_path.iterdir()) == []  # unlinked from the start
    body.close()
    body.close()  # twice is harmless


def test_an_unusable_directory_raises_oserror_when_the_file_is_needed(tmp_path: Path) -> None:
    body = BodyBuffer(4, str(tmp_path / "missing"))
    body.append(b"1234")
    with pytest.raises(OSError):
        body.append(b"5")


def test_no_memory_part_spills_at_once(tmp_path: Path) -> None:
    body = BodyBuffer(0, str(tmp_path))
    body.append(b"x")
    assert not body.in_memory and read_all(body) == b"x"
    body.close()
