"""The load engine: open loop at a fixed arrival rate, or closed loop at a fixed concurrency.

Open loop never waits for an answer before sending the next request, and measures each
latency from the request's *intended* send time, so a stalled server (or a stalled
generator) shows up as latency instead of silently lowering the load: no coordinated
omission. Closed loop keeps C requests in flight and measures from the actual send.
Every request is bounded by the timeout, so a run ends at most `timeout` after `duration`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gateway.loadtest.fleet import Fleet
from gateway.loadtest.results import Recorder, TimelinePoint
from gateway.loadtest.schedule import arrivals, arrivals_until, post_choices

TICK_SECONDS = 1.0
MIN_CONNECTIONS = 16
MAX_CONNECTIONS = 1024
YIELD_EVERY = 64  # a dispatcher that is behind still lets answers be read this often
DRAIN_GRACE = 1.0  # seconds past the timeout before stragglers are cancelled
# Event-loop timers fire up to a millisecond late (epoll and libuv count in whole ms), which
# open loop would count as latency: the last stretch before a send is waited out by
# yielding to the loop (answers are still read meanwhile) instead of by a timer.
FINE_WAIT_S = 0.0012

# Not loop.time(): uvloop's clock ticks in whole milliseconds; this one in nanoseconds.
_now = time.monotonic


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to send, how fast and for how long."""

    target: str
    rate: float | None = None  # open loop: requests per second for the whole fleet
    concurrency: int | None = None  # closed loop: requests in flight
    duration: float = 10.0
    timeout: float = 10.0
    post_share: float = 0.0
    post_bytes: int = 256
    seed: int = 1
    connections: int | None = None  # None: sized from the load

    @property
    def open_loop(self) -> bool:
        """True for a fixed arrival rate, False for a fixed concurrency."""
        return self.concurrency is None


def connection_limit(spec: LoadSpec) -> int:
    """The connection pool's size: C in closed loop; in open loop enough for rate * timeout."""
    if spec.connections is not None:
        return spec.connections
    if spec.concurrency is not None:
        return spec.concurrency
    wanted = math.ceil((spec.rate or 0) * spec.timeout)
    return min(MAX_CONNECTIONS, max(MIN_CONNECTIONS, wanted))


def post_body(size: int) -> bytes:
    """A deterministic request body of exactly `size` bytes."""
    pattern = b"devicegate-loadtest-payload-0123456789;"
    return (pattern * (size // len(pattern) + 1))[:size]


def error_kind(exc: BaseException) -> str:
    """A short, stable name for a failed request's cause, for the error counts."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "payload"
    if isinstance(exc, aiohttp.ClientOSError | OSError):
        return "os"
    return type(exc).__name__


def latency_us(due: float, done: float) -> int:
    """Microseconds from when a request was due to when its answer was read."""
    return max(0, round((done - due) * 1_000_000))


async def wait_until(due: float) -> None:
    """Return at `due` (a time.monotonic() value), within microseconds when the CPU is free."""
    if due - _now() > FINE_WAIT_S:
        await asyncio.sleep(due - _now() - FINE_WAIT_S)  # the coarse part, on a timer
    while _now() < due:
        await asyncio.sleep(0)  # the rest: one loop turn at a time, reading answers meanwhile


class LoadRunner:
    """Drives one run of `spec` with `fleet` and reports every request to `recorder`."""

    def __init__(self, spec: LoadSpec, fleet: Fleet, recorder: Recorder) -> None:
        self._spec = spec
        self._fleet = fleet
        self._recorder = recorder
        self._url = URL(spec.target)
        self._body = post_body(spec.post_bytes)
        self._posts = post_choices(spec.post_share, spec.seed)
        self._start = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, on_tick: Callable[[TimelinePoint], None] | None = None) -> float:
        """Send the load, wait for the answers, and return the elapsed seconds."""
        connector = aiohttp.TCPConnector(
            limit=connection_limit(self._spec), limit_per_host=0, ttl_dns_cache=300
        )
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._spec.timeout),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            schedule = self._schedule()  # built before the clock starts: it can take a while
            self._start = _now()
            ticker = asyncio.create_task(self._tick(on_tick))
            try:
                if self._spec.open_loop:
                    await self._open_loop(session, schedule)
                else:
                    await self._closed_loop(session, schedule)
                await self._drain()
            finally:
                ticker.cancel()
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(ticker, *self._tasks, return_exceptions=True)
            elapsed = _now() - self._start
            point = self._recorder.tick(elapsed)
            if on_tick is not None:
                on_tick(point)
        return elapsed

    def _schedule(self) -> Iterator[tuple[float, int]]:
        if self._spec.rate is not None:
            rates = self._fleet.rates(self._spec.rate)
            return arrivals_until(rates, self._fleet.phases, self._spec.duration)
        # Closed loop: the same cadence weights decide which device sends next.
        return arrivals(self._fleet.rates(1.0), self._fleet.phases)

    async def _open_loop(
        self, session: aiohttp.ClientSession, schedule: Iterator[tuple[float, int]]
    ) -> None:
        loop = asyncio.get_running_loop()
        since_yield = 0
        for offset, device in schedule:
            due = self._start + offset  # from the schedule, never from when we got here
            if _now() < due:
                await wait_until(due)
                since_yield = 0
            elif since_yield >= YIELD_EVERY:
                await asyncio.sleep(0)
                since_yield = 0
            since_yield += 1
            task = loop.create_task(self._one(session, device, due))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _closed_loop(
        self, session: aiohttp.ClientSession, order: Iterator[tuple[float, int]]
    ) -> None:
        end = self._start + self._spec.duration
        assert self._spec.concurrency is not None
        workers = [self._worker(session, order, end) for _ in range(self._spec.concurrency)]
        await asyncio.gather(*workers)

    async def _worker(
        self, session: aiohttp.ClientSession, order: Iterator[tuple[float, int]], end: float
    ) -> None:
        while (now := _now()) < end:
            _, device = next(order)
            await self._one(session, device, now)

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._spec.timeout + DRAIN_GRACE)

    async def _one(self, session: aiohttp.ClientSession, device: int, due: float) -> None:
        recorder = self._recorder
        is_post = next(self._posts)
        sent = _now()
        recorder.on_send(device, sent - self._start, sent - due)
        try:
            async with session.request(
                "POST" if is_post else "GET",
                self._url,
                headers=self._fleet[device].headers,
                data=self._body if is_post else None,
                allow_redirects=False,
            ) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            recorder.on_error(device, error_kind(exc), _now() - self._start)
            return
        done = _now()
        recorder.on_response(device, status, latency_us(due, done), done - self._start)

    async def _tick(self, on_tick: Callable[[TimelinePoint], None] | None) -> None:
        k = 1
        while True:
            # Ticks at start + k seconds exactly, however late the previous one ran.
            await asyncio.sleep(max(0.0, self._start + k * TICK_SECONDS - _now()))
            point = self._recorder.tick(_now() - self._start)
            if on_tick is not None:
                on_tick(point)
            k = max(k + 1, math.floor((_now() - self._start) / TICK_SECONDS) + 1)
