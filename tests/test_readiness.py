"""What /readyz says (no I/O): the one-line result and the verbose checks."""

from __future__ import annotations

import pytest

from gateway.admin.readiness import SnapshotState, checks, ready_text
from gateway.metrics import Metrics
from gateway.store.blocked import BlockedStatus
from gateway.store.reset import StoreReset

AT = 1_793_748_259_787  # 2026-11-03T23:24:19.787Z


def status(reset: StoreReset | None = None) -> BlockedStatus:
    return BlockedStatus("redis", 12, AT, "e2", 0 if reset is None else 1, 12, reset)


def reset(*, restore: bool = True, restored: int = 12, done: bool = True) -> StoreReset:
    return StoreReset(AT, "e1", None, 12, restore, restored, done)


WRITTEN = SnapshotState("/s/blocked-dg-0123456789ab.json", AT, 0, None)
FAILING = SnapshotState("/s/blocked-dg-0123456789ab.json", AT, 3, "No space left on device")

READY_TEXT = {
    "all is well": (status(), WRITTEN, "ready"),
    "no snapshot kept": (status(), None, "ready"),
    "a reset, restored": (
        status(reset()),
        WRITTEN,
        "ready; Redis lost its data at 2026-11-03T23:24:19.787Z: 12 blocked ids restored",
    ),
    "a reset, restoring": (
        status(reset(restored=5, done=False)),
        WRITTEN,
        "ready; Redis lost its data at 2026-11-03T23:24:19.787Z: restoring blocked ids, "
        "5 of 12 so far",
    ),
    "a reset, restore_blocks false": (
        status(reset(restore=False, restored=0)),
        WRITTEN,
        "ready; Redis lost its data at 2026-11-03T23:24:19.787Z: 12 blocked ids not restored "
        "(redis.restore_blocks is false)",
    ),
    "the snapshot cannot be written": (
        status(),
        FAILING,
        "ready; blocked-ids snapshot not written: No space left on device",
    ),
    "both": (
        status(reset()),
        FAILING,
        "ready; Redis lost its data at 2026-11-03T23:24:19.787Z: 12 blocked ids restored; "
        "blocked-ids snapshot not written: No space left on device",
    ),
}


@pytest.mark.parametrize(("blocked", "snapshot", "text"), READY_TEXT.values(), ids=READY_TEXT)
def test_ready_text(blocked: BlockedStatus, snapshot: SnapshotState | None, text: str) -> None:
    assert ready_text(blocked, snapshot) == text


def test_checks_show_every_process_the_snapshot_and_the_last_reset() -> None:
    worker, lost = Metrics(), Metrics()
    worker.show_blocked("supervisor", 12, 0, 0)
    result = checks(
        reachable=True,
        blocked=status(reset()),
        processes=[("worker-0", worker), ("worker-1", lost)],
        snapshot=FAILING,
        now_ms=AT + 2500,
    )
    assert result == {
        "store": {"reachable": True},
        "blocked_ids": {
            "known": True,
            "source": "redis",
            "count": 12,
            "as_of": "2026-11-03T23:24:19.787Z",
            "processes": {
                "worker-0": {"known": True, "source": "supervisor", "count": 12},
                "worker-1": {"known": False, "source": None, "count": 0},
            },
        },
        "snapshot": {
            "path": "/s/blocked-dg-0123456789ab.json",
            "written": "2026-11-03T23:24:19.787Z",
            "age_s": 2.5,
            "write_failures": 3,
            "last_error": "No space left on device",
        },
        "resets": 1,
        "last_reset": {
            "at": "2026-11-03T23:24:19.787Z",
            "blocked_ids_known": 12,
            "restored": 12,
            "restore": True,
            "done": True,
            "summary": "Redis lost its data at 2026-11-03T23:24:19.787Z: 12 blocked ids restored",
        },
    }


def test_checks_without_a_snapshot_or_a_reset() -> None:
    result = checks(
        reachable=False,
        blocked=BlockedStatus(None, 0, None, None, 0, 0, None),
        processes=[],
        snapshot=None,
        now_ms=AT,
    )
    assert result["blocked_ids"]["known"] is False and result["blocked_ids"]["source"] is None
    assert (result["snapshot"], result["last_reset"]) == (None, None)
