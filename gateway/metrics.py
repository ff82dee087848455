"""Process counters in a fixed layout of int64 slots, so worker processes can share them.

One process keeps its counters in a plain array; `gateway run --workers N` maps one file
into every worker (`SharedCounters`), each worker writing its own block of slots, and the
admin listener adds the blocks up. Rendered in the Prometheus text format.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol

DECISIONS: Final = (
    "allow",
    "blocked",
    "limited",
    "unregistered",
    "invalid",
    "too_large",
    "anonymous",
    "method",
    "store_down_open",
    "store_down_closed",
    "client_busy",
    "-",
)
_DECISION_SLOT: Final = {name: 1 + i for i, name in enumerate(DECISIONS)}
_STATUS_BASE: Final = 1 + len(DECISIONS)
_STATUSES: Final = 600  # status codes 0..599 (0: no answer was sent)
SLOTS: Final = _STATUS_BASE + _STATUSES


class Metrics:
    """Counters the data plane bumps per request: a few int64 slots, no allocation."""

    __slots__ = ("_slots",)

    def __init__(self, slots: memoryview | None = None) -> None:
        self._slots = slots if slots is not None else memoryview(bytearray(SLOTS * 8)).cast("q")

    def observe(self, decision: str, status: int) -> None:
        """Count one finished request."""
        slots = self._slots
        slots[_DECISION_SLOT.get(decision, _DECISION_SLOT["-"])] += 1
        slots[_STATUS_BASE + (status if 0 <= status < _STATUSES else 0)] += 1

    @property
    def store_failures(self) -> int:
        """Store calls that failed or timed out."""
        return int(self._slots[0])

    @store_failures.setter
    def store_failures(self, value: int) -> None:
        self._slots[0] = value

    @property
    def decisions(self) -> dict[str, int]:
        """Requests by decision."""
        return {name: int(self._slots[slot]) for name, slot in _DECISION_SLOT.items()}

    @property
    def statuses(self) -> dict[int, int]:
        """Responses by status code."""
        base = _STATUS_BASE
        return {s: int(self._slots[base + s]) for s in range(_STATUSES) if self._slots[base + s]}

    def render(self) -> str:
        """These counters in the Prometheus text exposition format."""
        return render([self])


def render(blocks: Sequence[Metrics]) -> str:
    """The sum of several processes' counters in the Prometheus text exposition format."""
    decisions = {name: sum(b.decisions[name] for b in blocks) for name in DECISIONS}
    statuses: dict[int, int] = {}
    for block in blocks:
        for status, count in block.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    lines = [
        "# HELP devicegate_requests_total Requests on the public listener by decision.",
        "# TYPE devicegate_requests_total counter",
        *(f'devicegate_requests_total{{decision="{d}"}} {n}' for d, n in decisions.items() if n),
        "# HELP devicegate_responses_total Responses on the public listener by status.",
        "# TYPE devicegate_responses_total counter",
        *(f'devicegate_responses_total{{status="{s}"}} {n}' for s, n in sorted(statuses.items())),
        "# HELP devicegate_store_failures_total Store calls that failed or timed out.",
        "# TYPE devicegate_store_failures_total counter",
        f"devicegate_store_failures_total {sum(b.store_failures for b in blocks)}",
    ]
    return "\n".join(lines) + "\n"


class Renderable(Protocol):
    """Anything the admin listener can show at /metrics."""

    def render(self) -> str:
        """Prometheus text."""


class SharedCounters:
    """A file mapped into every worker: block i holds worker i's counters."""

    def __init__(self, path: Path, workers: int, *, create: bool) -> None:
        self.path = path
        self.workers = workers
        size = workers * SLOTS * 8
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._view = memoryview(self._map).cast("q")

    def block(self, index: int) -> Metrics:
        """Worker `index`'s counters."""
        return Metrics(self._view[index * SLOTS : (index + 1) * SLOTS])

    def blocks(self) -> list[Metrics]:
        """Every worker's counters."""
        return [self.block(i) for i in range(self.workers)]

    def render(self) -> str:
        """Every worker's counters added up, in the Prometheus text format."""
        return render(self.blocks())

    def close(self) -> None:
        """Unmap the file (the creator also removes it)."""
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass  # a block is still referenced; the mapping goes with the process
