"""The live progress line: refreshed once a second on a terminal."""

from __future__ import annotations

from typing import TextIO

from gateway.loadtest.results import TimelinePoint


def progress_line(point: TimelinePoint, errors_so_far: int) -> str:
    """One status line: time, answers per second in the last interval, errors, p50/p99 so far."""
    return (
        f"{point.t:6.1f} s  {point.per_second:9.1f} req/s  errors {errors_so_far:<6d}  "
        f"p50 {point.total_p50_us / 1000:8.3f} ms  p99 {point.total_p99_us / 1000:8.3f} ms"
    )


class Progress:
    """Rewrites one terminal line in place with each interval's figures."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._errors = 0
        self._shown = False

    def __call__(self, point: TimelinePoint) -> None:
        self._errors += point.errors
        self._out.write("\r\x1b[2K" + progress_line(point, self._errors))
        self._out.flush()
        self._shown = True

    def finish(self) -> None:
        """End the progress line so the final table starts on a fresh one."""
        if self._shown:
            self._out.write("\n")
            self._out.flush()
