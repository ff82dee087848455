"""What `/readyz` says (no I/O): the one-line result, and the checks behind `?verbose=1`.

Ready is "the store answers". Things an operator must hear about without the gateway being
unready are added to the line: a loss of Redis's data seen during this run (and how far the
blocked ids were restored), a snapshot that cannot be written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.metrics import Metrics
from gateway.model import iso_ms
from gateway.store.blocked import BlockedStatus
from gateway.store.reset import StoreReset

READY = "ready"


@dataclass(frozen=True, slots=True)
class SnapshotState:
    """The snapshot as the process that writes it sees it."""

    path: str
    written_ms: int | None
    write_failures: int
    last_error: str | None


def reset_text(reset: StoreReset) -> str:
    """One detected reset, in a sentence fragment."""
    at = iso_ms(reset.at_ms)
    if not reset.restore:
        return (
            f"Redis lost its data at {at}: {reset.known} blocked ids not restored "
            "(redis.restore_blocks is false)"
        )
    if reset.done:
        return f"Redis lost its data at {at}: {reset.restored} blocked ids restored"
    return (
        f"Redis lost its data at {at}: restoring blocked ids, "
        f"{reset.restored} of {reset.known} so far"
    )


def ready_text(blocked: BlockedStatus, snapshot: SnapshotState | None) -> str:
    """The result of a ready `/readyz`: "ready", and what else an operator must know."""
    parts = [READY]
    if blocked.last_reset is not None:
        parts.append(reset_text(blocked.last_reset))
    if snapshot is not None and snapshot.last_error is not None:
        parts.append(f"blocked-ids snapshot not written: {snapshot.last_error}")
    return "; ".join(parts)


def checks(
    *,
    reachable: bool,
    blocked: BlockedStatus,
    processes: Sequence[tuple[str, Metrics]],
    snapshot: SnapshotState | None,
    now_ms: int,
) -> dict[str, Any]:
    """Every check of `/readyz?verbose=1`, as a JSON object."""
    reset = blocked.last_reset
    return {
        "store": {"reachable": reachable},
        "blocked_ids": {
            "known": blocked.known,
            "source": blocked.source,
            "count": blocked.count,
            "as_of": iso_ms(blocked.as_of_ms),
            "processes": {
                name: {
                    "known": m.blocked_source != "none",
                    "source": None if m.blocked_source == "none" else m.blocked_source,
                    "count": m.blocked_ids,
                }
                for name, m in processes
            },
        },
        "snapshot": None
        if snapshot is None
        else {
            "path": snapshot.path,
            "written": iso_ms(snapshot.written_ms),
            "age_s": None
            if snapshot.written_ms is None
            else round(max(0, now_ms - snapshot.written_ms) / 1000, 3),
            "write_failures": snapshot.write_failures,
            "last_error": snapshot.last_error,
        },
        "resets": blocked.resets,
        "last_reset": None
        if reset is None
        else {
            "at": iso_ms(reset.at_ms),
            "blocked_ids_known": reset.known,
            "restored": reset.restored,
            "restore": reset.restore,
            "done": reset.done,
            "summary": reset_text(reset),
        },
    }
