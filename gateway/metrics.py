"""Process counters in a fixed layout of int64 slots, so worker processes can share them.

One process keeps its counters in a plain array; `gateway run --workers N` maps one file
into every worker (`SharedCounters`), each worker writing its own block of slots, and the
admin listener adds the blocks up. Rendered in the Prometheus text format. Besides the
request counters, each block shows its process's hold on the blocked ids (known or not, from
where, how many, store resets seen, ids restored, the snapshot's state): those are rendered
per process (`process="worker-0"`), so a worker that does not know the blocked ids shows.
"""

from __future__ import annotations

import mmap
import os
import time
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
    "store_down_unknown",
    "client_busy",
    "-",
)
_DECISION_SLOT: Final = {name: 1 + i for i, name in enumerate(DECISIONS)}
_STATUS_BASE: Final = 1 + len(DECISIONS)
_STATUSES: Final = 600  # status codes 0..599 (0: no answer was sent)
# Per-process gauges and counters of the blocked ids, after the statuses.
_BLOCKED_SOURCE: Final = _STATUS_BASE + _STATUSES  # index into BLOCKED_SOURCES
_BLOCKED_IDS: Final = _BLOCKED_SOURCE + 1
_STORE_RESETS: Final = _BLOCKED_SOURCE + 2
_BLOCKS_RESTORED: Final = _BLOCKED_SOURCE + 3
_SNAPSHOT_KEPT: Final = _BLOCKED_SOURCE + 4  # 1: this process writes the snapshot
_SNAPSHOT_WRITTEN_MS: Final = _BLOCKED_SOURCE + 5  # epoch ms of the file on disk, 0: none
_SNAPSHOT_FAILURES: Final = _BLOCKED_SOURCE + 6
SLOTS: Final = _BLOCKED_SOURCE + 7

# Where a process's blocked ids came from; "none": it does not know them.
BLOCKED_SOURCES: Final = ("none", "redis", "supervisor", "snapshot")


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

    def show_blocked(self, source: str, count: int, resets: int, restored: int) -> None:
        """This process's hold on the blocked ids (`source` one of BLOCKED_SOURCES)."""
        slots = self._slots
        slots[_BLOCKED_SOURCE] = BLOCKED_SOURCES.index(source)
        slots[_BLOCKED_IDS] = count
        slots[_STORE_RESETS] = resets
        slots[_BLOCKS_RESTORED] = restored

    def show_snapshot(self, written_ms: int | None, failures: int) -> None:
        """This process writes the snapshot: when the file on disk was written, failed writes."""
        slots = self._slots
        slots[_SNAPSHOT_KEPT] = 1
        slots[_SNAPSHOT_WRITTEN_MS] = written_ms or 0
        slots[_SNAPSHOT_FAILURES] = failures

    @property
    def blocked_source(self) -> str:
        """Where this process's blocked ids came from ("none": it does not know them)."""
        code = int(self._slots[_BLOCKED_SOURCE])
        return BLOCKED_SOURCES[code] if 0 <= code < len(BLOCKED_SOURCES) else "none"

    @property
    def blocked_ids(self) -> int:
        """Blocked ids this process holds."""
        return int(self._slots[_BLOCKED_IDS])

    @property
    def store_resets(self) -> int:
        """Times this process found Redis without the gateway's data."""
        return int(self._slots[_STORE_RESETS])

    @property
    def blocks_restored(self) -> int:
        """Blocked ids this process blocked again after a reset."""
        return int(self._slots[_BLOCKS_RESTORED])

    @property
    def snapshot(self) -> tuple[int, int] | None:
        """(written epoch ms or 0, failed writes) when this process writes the snapshot."""
        slots = self._slots
        if not slots[_SNAPSHOT_KEPT]:
            return None
        return int(slots[_SNAPSHOT_WRITTEN_MS]), int(slots[_SNAPSHOT_FAILURES])

    @property
    def decisions(self) -> dict[str, int]:
        """Requests by decision."""
        return {name: int(self._slots[slot]) for name, slot in _DECISION_SLOT.items()}

    @property
    def statuses(self) -> dict[int, int]:
        """Responses by status code."""
        base = _STATUS_BASE
        return {s: int(self._slots[base + s]) for s in range(_STATUSES) if self._slots[base + s]}

    def processes(self) -> list[tuple[str, Metrics]]:
        """This one process, named."""
        return [("main", self)]

    def render(self) -> str:
        """These counters in the Prometheus text exposition format."""
        return render([self], ["main"])


# The per-process series: name, type, help.
_PROCESS_SERIES: Final = (
    ("devicegate_blocked_ids_known", "gauge",
     "Whether the process knows the blocked ids (1) or not (0), and from where "
     "(redis, supervisor, snapshot; none)."),
    ("devicegate_blocked_ids", "gauge",
     "Blocked ids the process holds for when Redis cannot answer."),
    ("devicegate_store_resets_total", "counter",
     "Times the process found that Redis had lost the gateway's data."),
    ("devicegate_blocks_restored_total", "counter",
     "Blocked ids the process blocked again in Redis after a reset."),
    ("devicegate_blocked_snapshot_age_seconds", "gauge",
     "Seconds since the blocked-ids snapshot on disk was written."),
    ("devicegate_blocked_snapshot_write_failures_total", "counter",
     "Failed writes of the blocked-ids snapshot."),
)  # fmt: skip


def _per_process(named: Sequence[tuple[str, Metrics]], now_ms: int) -> list[str]:
    """The blocked-ids series, one sample per process labelled by its name."""
    samples: dict[str, list[str]] = {metric: [] for metric, _, _ in _PROCESS_SERIES}
    for name, block in named:
        label = f'process="{name}"'
        source = block.blocked_source
        known = int(source != "none")
        samples["devicegate_blocked_ids_known"].append(f'{{{label},source="{source}"}} {known}')
        samples["devicegate_blocked_ids"].append(f"{{{label}}} {block.blocked_ids}")
        samples["devicegate_store_resets_total"].append(f"{{{label}}} {block.store_resets}")
        samples["devicegate_blocks_restored_total"].append(f"{{{label}}} {block.blocks_restored}")
        snapshot = block.snapshot
        if snapshot is not None:  # only the process that writes it
            written_ms, failures = snapshot
            if written_ms:
                age = max(0, now_ms - written_ms) / 1000
                samples["devicegate_blocked_snapshot_age_seconds"].append(f"{{{label}}} {age:.3f}")
            samples["devicegate_blocked_snapshot_write_failures_total"].append(
                f"{{{label}}} {failures}"
            )
    lines: list[str] = []
    for metric, kind, text in _PROCESS_SERIES:
        if samples[metric]:
            lines.append(f"# HELP {metric} {text}")
            lines.append(f"# TYPE {metric} {kind}")
            lines.extend(f"{metric}{sample}" for sample in samples[metric])
    return lines


def render(
    blocks: Sequence[Metrics], names: Sequence[str] | None = None, *, now_ms: int | None = None
) -> str:
    """Several processes' counters in the Prometheus text exposition format: request counters
    added up, the blocked-ids series per process (`names`, default their index)."""
    if names is None:
        names = [str(i) for i in range(len(blocks))]
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
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
        *_per_process(list(zip(names, blocks, strict=True)), now_ms),
        "# HELP devicegate_store_failures_total Store calls that failed or timed out.",
        "# TYPE devicegate_store_failures_total counter",
        f"devicegate_store_failures_total {sum(b.store_failures for b in blocks)}",
    ]
    return "\n".join(lines) + "\n"


class Renderable(Protocol):
    """Anything the admin listener can show at /metrics."""

    def render(self) -> str:
        """Prometheus text."""

    def processes(self) -> list[tuple[str, Metrics]]:
        """Each process's counters, by name (for /readyz?verbose=1)."""


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

    def processes(self) -> list[tuple[str, Metrics]]:
        """Every worker's counters, named `worker-<i>`."""
        return [(f"worker-{i}", block) for i, block in enumerate(self.blocks())]

    def render(self) -> str:
        """Every worker's counters added up, in the Prometheus text format."""
        named = self.processes()
        return render([m for _, m in named], [n for n, _ in named])

    def close(self) -> None:
        """Unmap the file (the creator also removes it)."""
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass  # a block is still referenced; the mapping goes with the process
