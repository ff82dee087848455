"""Latency recording in an HDR histogram (the `hdrhistogram` package), in microseconds."""

from __future__ import annotations

from collections.abc import Sequence

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: anything slower is recorded as one hour
SIGNIFICANT_FIGURES = 3  # values are exact to 0.1 %
REPORTED_PERCENTILES: Sequence[float] = (50.0, 90.0, 99.0, 99.9)


class LatencyHistogram:
    """Latencies in microseconds, 3 significant figures, 1 us to 1 hour."""

    def __init__(self) -> None:
        self._h = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)

    def record(self, latency_us: int) -> None:
        """Record one latency; values outside the range are clamped into it."""
        self._h.record_value(min(max(latency_us, LOWEST_US), HIGHEST_US))

    @property
    def count(self) -> int:
        """How many values were recorded."""
        return int(self._h.get_total_count())

    def max(self) -> int:
        """The largest value recorded (0 when empty), to the histogram's precision."""
        return int(self._h.get_max_value()) if self.count else 0

    def min(self) -> int:
        """The smallest value recorded (0 when empty)."""
        return int(self._h.get_min_value()) if self.count else 0

    def mean(self) -> float:
        """The mean of the recorded values (0 when empty)."""
        return float(self._h.get_mean_value()) if self.count else 0.0

    def percentiles(self, wanted: Sequence[float] = REPORTED_PERCENTILES) -> dict[float, int]:
        """{percentile: value} for each percentile in `wanted`, in one pass (0s when empty)."""
        if not self.count:
            return dict.fromkeys(wanted, 0)
        values = self._h.get_percentile_to_value_dict(list(wanted))
        return {p: int(values[p]) for p in wanted}

    def add(self, other: LatencyHistogram) -> None:
        """Add every value of `other` to this histogram."""
        if other.count:
            self._h.add(other._h)

    def reset(self) -> None:
        """Forget every value."""
        self._h.reset()
