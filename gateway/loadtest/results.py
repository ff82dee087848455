"""What a run observed (pure): latencies, counts per status and error, per device, per second."""

from __future__ import annotations

import array
import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from gateway.loadtest.histogram import LatencyHistogram

ERROR_STATUS = -1  # the per-device status tally's key for a request that got no answer
LATE_AFTER_S = 0.001  # a request that leaves later than this after it was due is "late"


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """One interval of the run: requests completed in it and their latencies."""

    t: float  # seconds from the start to the end of the interval
    seconds: float  # the interval's length
    responses: int
    errors: int
    p50_us: int
    p99_us: int
    max_us: int
    total_p50_us: int  # the whole run so far, for the live progress line
    total_p99_us: int

    @property
    def per_second(self) -> float:
        """Responses per second in this interval."""
        return self.responses / self.seconds if self.seconds > 0 else 0.0


class DeviceTally:
    """Per-device counts and the window each device was active in (only devices that sent)."""

    def __init__(self, keep_send_times: bool = False) -> None:
        self.sent: Counter[int] = Counter()
        self.statuses: defaultdict[int, Counter[int]] = defaultdict(Counter)
        self.first_sent: dict[int, float] = {}
        self.last_done: dict[int, float] = {}
        # Only the enforcement check needs every send time (to model the bucket).
        self.send_times: defaultdict[int, array.array[float]] | None = (
            defaultdict(lambda: array.array("d")) if keep_send_times else None
        )

    def on_send(self, device: int, t: float) -> None:
        """Count a request as it leaves; `t` is the run clock in seconds."""
        self.sent[device] += 1
        if t < self.first_sent.get(device, math.inf):
            self.first_sent[device] = t
        if self.send_times is not None:
            self.send_times[device].append(t)

    def on_done(self, device: int, status: int, t: float) -> None:
        """Count an answer (status) or a failure (ERROR_STATUS) at time `t`."""
        self.statuses[device][status] += 1
        if t > self.last_done.get(device, -math.inf):
            self.last_done[device] = t

    def answered(self, device: int) -> int:
        """How many of the device's requests got an HTTP answer."""
        statuses = self.statuses.get(device)
        return sum(n for s, n in statuses.items() if s != ERROR_STATUS) if statuses else 0

    def times(self, device: int) -> array.array[float]:
        """The device's send times (empty unless they are kept)."""
        if self.send_times is None or device not in self.send_times:
            return array.array("d")
        return self.send_times[device]

    def window(self, device: int) -> float:
        """Seconds from the device's first send to its last answer (0 when none)."""
        span = self.last_done.get(device, -math.inf) - self.first_sent.get(device, math.inf)
        return span if math.isfinite(span) and span > 0 else 0.0


class Recorder:
    """Everything a run observed; the runner reports each request, a ticker closes intervals."""

    def __init__(self, keep_send_times: bool = False) -> None:
        self.total = LatencyHistogram()
        self._interval = LatencyHistogram()
        self.status: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.devices = DeviceTally(keep_send_times)
        self.timeline: list[TimelinePoint] = []
        self.sent = 0
        self.late_sends = 0  # open loop: requests that left more than LATE_AFTER_S late
        self.max_send_lag = 0.0  # seconds: the generator's worst delay behind its schedule
        self._interval_errors = 0
        self._last_tick = 0.0

    @property
    def completed(self) -> int:
        """Requests that got an HTTP answer."""
        return sum(self.status.values())

    @property
    def failed(self) -> int:
        """Requests that got no answer (timeout, refused, reset...)."""
        return sum(self.errors.values())

    def on_send(self, device: int, t: float, lag: float = 0.0) -> None:
        """A request leaves for `device` at run time `t`, `lag` seconds after it was due."""
        self.sent += 1
        if lag > LATE_AFTER_S:
            self.late_sends += 1
            self.max_send_lag = max(self.max_send_lag, lag)
        self.devices.on_send(device, t)

    def on_response(self, device: int, status: int, latency_us: int, t: float) -> None:
        """An answer arrived at run time `t`, `latency_us` after the request was due."""
        self.status[status] += 1
        self._interval.record(latency_us)
        self.devices.on_done(device, status, t)

    def on_error(self, device: int, kind: str, t: float) -> None:
        """A request failed without an answer at run time `t`."""
        self.errors[kind] += 1
        self._interval_errors += 1
        self.devices.on_done(device, ERROR_STATUS, t)

    def tick(self, t: float) -> TimelinePoint:
        """Close the interval ending at run time `t` and fold it into the totals."""
        interval = self._interval
        p = interval.percentiles((50.0, 99.0))
        self.total.add(interval)
        total = self.total.percentiles((50.0, 99.0))
        point = TimelinePoint(
            t=round(t, 3),
            seconds=t - self._last_tick,
            responses=interval.count,
            errors=self._interval_errors,
            p50_us=p[50.0],
            p99_us=p[99.0],
            max_us=interval.max(),
            total_p50_us=total[50.0],
            total_p99_us=total[99.0],
        )
        self.timeline.append(point)
        interval.reset()
        self._interval_errors = 0
        self._last_tick = t
        return point
