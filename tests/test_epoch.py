"""The epoch marker's decision (pure): what one poll's read means for the process."""

from __future__ import annotations

import pytest

from gateway.store.epoch import EpochCheck, check_epoch, new_epoch

CASES: dict[str, tuple[str | None, str | None, EpochCheck]] = {
    "first use of this Redis: none remembered, none there": (None, None, EpochCheck.FIRST),
    "a process new to a Redis in use: adopt": (None, "e1", EpochCheck.ADOPT),
    "agreement": ("e1", "e1", EpochCheck.AGREE),
    "marker gone (restart without persistence, FLUSHALL)": ("e1", None, EpochCheck.LOST),
    "another marker (lost, and another process already set a new one)": (
        "e1",
        "e2",
        EpochCheck.REPLACED,
    ),
}


@pytest.mark.parametrize(("expected", "read", "check"), CASES.values(), ids=CASES.keys())
def test_check_epoch(expected: str | None, read: str | None, check: EpochCheck) -> None:
    assert check_epoch(expected, read) is check


def test_new_epochs_differ_and_are_tokens() -> None:
    tokens = {new_epoch() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) == 16 and int(t, 16) >= 0 for t in tokens)
