"""The open-loop arrival schedule (pure): every device on its own fixed cadence, merged in time.

Device i with rate r_i sends its k-th request at (phase_i + k) / r_i seconds after the
start: each time is computed from k, never by adding intervals up, so the schedule does
not drift however long it runs, and the fleet's total rate is the sum of the r_i.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterator, Sequence


def arrivals(rates: Sequence[float], phases: Sequence[float]) -> Iterator[tuple[float, int]]:
    """(offset in seconds, device index) of every request, in time order, without end.

    The set-up (a heap of every device) happens here, not on the first `next`, so a caller
    can build the schedule before its clock starts.
    """
    if len(rates) != len(phases):
        raise ValueError("one phase per rate")
    heap: list[tuple[float, int, int]] = []
    for index, (rate, phase) in enumerate(zip(rates, phases, strict=True)):
        if rate <= 0:
            raise ValueError("every device rate must be > 0")
        if not 0 <= phase < 1:
            raise ValueError("phases must be within [0, 1)")
        heap.append((phase / rate, index, 0))
    heapq.heapify(heap)
    return _merge(heap, rates, phases)


def _merge(
    heap: list[tuple[float, int, int]], rates: Sequence[float], phases: Sequence[float]
) -> Iterator[tuple[float, int]]:
    while heap:
        offset, index, k = heap[0]
        yield offset, index
        heapq.heapreplace(heap, ((phases[index] + (k + 1)) / rates[index], index, k + 1))


def arrivals_until(
    rates: Sequence[float], phases: Sequence[float], horizon: float
) -> Iterator[tuple[float, int]]:
    """The schedule's requests whose offset is before `horizon` seconds."""
    return itertools.takewhile(lambda event: event[0] < horizon, arrivals(rates, phases))


def post_choices(share: float, seed: int) -> Iterator[bool]:
    """An endless, seeded stream saying which request is a POST (a `share` of them)."""
    if not 0 <= share <= 1:
        raise ValueError("the POST share must be within [0, 1]")
    rng = random.Random(f"post:{seed}")
    while True:
        yield rng.random() < share
