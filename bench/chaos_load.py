"""Load and observation for the chaos scenarios: the loadtest engine plus a per-request log,
and a probe that reads what the load cannot see (headers, bodies).

The load is gateway.loadtest's LoadRunner, open loop at a fixed rate (closed loop to measure
capacity), with a simulated fleet. `ChaosRecorder` keeps, besides the loadtest's counts,
one `Sample` per request with its real send and answer times (time.monotonic(), the clock of
every event a scenario stamps), so requests can be sorted by when they left relative to a
kill, a freeze or a signal. The `Probe` sends one request every 50 ms as a device of its own
and keeps the headers that say whether Redis decided (the rate-limit headers are never
invented without it), the Retry-After and the envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.loadtest.fleet import Fleet
from gateway.loadtest.results import ERROR_STATUS, Recorder
from gateway.loadtest.runner import LoadRunner, error_kind
from gateway.loadtest.spec import LoadSpec

PROBE_INTERVAL = 0.05  # seconds between probe requests
UNAVAILABLE = {"status": False, "result": "Service temporarily unavailable"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One load request: who sent it, when it left, when it ended and how."""

    device: int
    sent: float
    done: float
    status: int  # ERROR_STATUS when no answer came
    error: str = ""  # the loadtest's error kind when no answer came

    @property
    def service(self) -> float:
        """Seconds from the actual send to the end (the generator's own lag left out)."""
        return self.done - self.sent


class ChaosRecorder(Recorder):
    """The loadtest's Recorder that also keeps one Sample per request.

    The runner reports a request's send and its end from the same task, so the task
    pairs them up.
    """

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[Sample] = []
        self._sent: dict[asyncio.Task[Any] | None, float] = {}

    def on_send(self, device: int, t: float, lag: float = 0.0) -> None:
        self._sent[asyncio.current_task()] = time.monotonic()
        super().on_send(device, t, lag)

    def _end(self, device: int, status: int, error: str) -> None:
        done = time.monotonic()
        sent = self._sent.pop(asyncio.current_task(), math.nan)
        self.samples.append(Sample(device, sent, done, status, error))

    def on_response(self, device: int, status: int, latency_us: int, t: float) -> None:
        self._end(device, status, "")
        super().on_response(device, status, latency_us, t)

    def on_error(self, device: int, kind: str, t: float) -> None:
        self._end(device, ERROR_STATUS, kind)
        super().on_error(device, kind, t)


def start_load(
    url: str,
    fleet: Fleet,
    recorder: Recorder,
    *,
    rate: float | None = None,
    concurrency: int | None = None,
    duration: float,
    timeout: float = 5.0,
) -> asyncio.Task[float]:
    """Run the loadtest engine as a task (open loop with `rate`, closed with `concurrency`)."""
    spec = LoadSpec(
        target=url,
        rate=rate,
        concurrency=concurrency,
        duration=duration,
        timeout=timeout,
        seed=fleet.seed,
    )
    return asyncio.create_task(LoadRunner(spec, fleet, recorder).run())


@dataclass(frozen=True, slots=True)
class ProbeAnswer:
    """One probe request and what its answer said."""

    sent: float
    done: float
    status: int  # ERROR_STATUS when no answer came
    enforced: bool  # the rate-limit headers are there: Redis decided
    retry_after: str | None
    body: Any
    error: str = ""

    @property
    def took(self) -> float:
        return self.done - self.sent


class Probe:
    """A device of its own asking every PROBE_INTERVAL, one request at a time."""

    def __init__(self, url: str, device_id: str, timeout: float = 5.0) -> None:
        self.url = f"{url}/probe"
        self.headers = {"X-Device-Id": device_id, "X-App-Name": "ChaosProbe"}
        self.timeout = timeout
        self.answers: list[ProbeAnswer] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[ProbeAnswer]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, self.timeout + 1)
        return self.answers

    async def ask(self, session: aiohttp.ClientSession) -> ProbeAnswer:
        """One request, read whole."""
        sent = time.monotonic()
        try:
            async with session.get(self.url, headers=self.headers) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return ProbeAnswer(
                sent, time.monotonic(), ERROR_STATUS, False, None, None, error_kind(exc)
            )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        enforced = "RateLimit" in headers and "X-RateLimit-Remaining" in headers
        return ProbeAnswer(
            sent, time.monotonic(), status, enforced, headers.get("Retry-After"), body
        )

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                self.answers.append(await self.ask(session))
                await asyncio.sleep(PROBE_INTERVAL)


def first_enforced(answers: Sequence[ProbeAnswer], since: float) -> float | None:
    """Seconds from `since` to the end of the first enforced answer sent after it."""
    for answer in answers:
        if answer.sent >= since and answer.enforced:
            return answer.done - since
    return None


def outcomes(statuses: Iterable[tuple[int, str]]) -> dict[str, int]:
    """{"200": n, "403": n, "err:timeout": n} from (status, error kind) pairs."""
    counts = Counter(
        f"err:{error}" if status == ERROR_STATUS else str(status) for status, error in statuses
    )
    return dict(sorted(counts.items()))


def sample_outcomes(samples: Iterable[Sample]) -> dict[str, int]:
    return outcomes((s.status, s.error) for s in samples)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds rounded to 0.1 ms (None stays None, nan becomes None)."""
    if seconds is None or math.isnan(seconds):
        return None
    return round(seconds * 1000, 1)
