"""gateway.state: where state files live, and that they are replaced whole."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.state import state_dir, write_atomic

CASES = {
    "configured": ("/srv/dg", {"HOME": "/home/u"}, Path("/srv/dg")),
    "configured_with_tilde": ("~/dg", {}, Path("~/dg").expanduser()),
    "disabled": (False, {"HOME": "/home/u"}, None),
    "xdg": (None, {"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}, Path("/x/state/devicegate")),
    "xdg_relative_is_ignored": (
        None,
        {"XDG_STATE_HOME": "rel", "HOME": "/home/u"},
        Path("/home/u/.local/state/devicegate"),
    ),
    "home": (None, {"HOME": "/home/u"}, Path("/home/u/.local/state/devicegate")),
    "nowhere": (None, {}, None),
}


@pytest.mark.parametrize(("configured", "env", "expected"), CASES.values(), ids=CASES.keys())
def test_state_dir(configured: Any, env: dict[str, str], expected: Path | None) -> None:
    assert state_dir(configured, env) == expected


def test_write_atomic_makes_the_directory_and_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "file"
    write_atomic(path, b"one")
    assert path.read_bytes() == b"one"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file"]  # no scratch file left


def test_a_failed_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "file"
    write_atomic(path, b"kept")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, b"lost")
    assert path.read_bytes() == b"kept"
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_an_unwritable_directory_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        write_atomic(blocker / "file", b"x")
