"""The load engine: open loop at a fixed arrival rate, or closed loop at a fixed concurrency.

Open loop never waits for an answer before sending the next request, and measures each
latency from the request's *intended* send time, so a stalled server (or a stalled
generator) shows up as latency instead of silently lowering the load: no coordinated
omission. Closed loop keeps C requests in flight and measures from the actual send.
Every request is bounded by the timeout, so a run ends at most `timeout` after `duration`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping

import aiohttp
from yarl import URL

from gateway.loadtest.client import HttpPool, RequestFailed
from gateway.loadtest.fleet import DEVICE_CACHE, Fleet
from gateway.loadtest.results import Recorder, TimelinePoint
from gateway.loadtest.schedule import arrivals, arrivals_until, post_choices
from gateway.loadtest.spec import LoadSpec, connection_limit

TICK_SECONDS = 1.0
BURST_LIMIT = 64  # a dispatcher that is behind still lets answers be read this often
WARM_CONNECTIONS = 16  # opened before the clock starts (never more than the pool's size)
DRAIN_GRACE = 1.0  # seconds past the timeout before stragglers are cut

# Not loop.time(): uvloop's clock ticks in whole milliseconds; this one in nanoseconds.
_now = time.monotonic


def post_body(size: int) -> bytes:
    """A deterministic request body of exactly `size` bytes."""
    pattern = b"devicegate-loadtest-payload-0123456789;"
    return (pattern * (size // len(pattern) + 1))[:size]


def error_kind(exc: BaseException) -> str:
    """A short, stable name for a failed request's cause, for the error counts.

    The engine's own failures name themselves; aiohttp's are named the same way (the
    chaos bench's probe uses its client).
    """
    if isinstance(exc, RequestFailed):
        return exc.kind
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


def request_prefix(url: URL) -> tuple[bytes, bytes]:
    """The request line's target and the Host header line, for every request to `url`."""
    target = (url.raw_path_qs or "/").encode("ascii")
    default_port = 443 if url.scheme == "https" else 80
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    if url.port is not None and url.port != default_port:
        host = f"{host}:{url.port}"
    return target, f"Host: {host}\r\n".encode("ascii")


def header_lines(headers: Mapping[str, str]) -> bytes:
    """`Name: value` lines, each ended by CRLF (values as UTF-8, as a device would send)."""
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()


class LoadRunner:
    """Drives one run of `spec` with `fleet` and reports every request to `recorder`.

    Everything happens in callbacks on the running loop: the dispatcher sends what the
    schedule says is due, each answer (or failure) is recorded as it arrives, and in
    closed loop each answer sends the next request. The run is over when the schedule is
    spent (open loop) or `duration` has passed (closed loop), and every request has ended.
    """

    def __init__(self, spec: LoadSpec, fleet: Fleet, recorder: Recorder) -> None:
        self._spec = spec
        self._fleet = fleet
        self._recorder = recorder
        self._url = URL(spec.target)
        self._target, self._host_line = request_prefix(self._url)
        self._body = post_body(spec.post_bytes)
        self._posts = post_choices(spec.post_share, spec.seed)
        self._requests: dict[int, tuple[bytes, bytes]] = {}  # device -> (GET, POST head)
        self._start = 0.0
        self._end = 0.0
        self._in_flight = 0
        self._sending = True
        self._schedule: Iterator[tuple[float, int]] = iter(())
        self._next: tuple[float, int] | None = None
        self._pool: HttpPool | None = None
        self._sent: asyncio.Future[None] | None = None
        self._finished: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, on_tick: Callable[[TimelinePoint], None] | None = None) -> float:
        """Send the load, wait for the answers, and return the elapsed seconds."""
        loop = asyncio.get_running_loop()
        spec = self._spec
        self._pool = HttpPool(self._url, connection_limit(spec), spec.timeout)
        self._sent = loop.create_future()
        self._finished = loop.create_future()
        # Built before the clock starts, so the first second measures the target, not setup:
        # the schedule, the requests of the devices the cache holds, a few open connections.
        self._schedule = self._make_schedule()
        for device in range(min(len(self._fleet), DEVICE_CACHE)):
            self._request_bytes(device)
        await self._pool.warm(WARM_CONNECTIONS)
        gc.collect()
        gc.freeze()  # what setup built is not walked by the collections during the run
        self._start = _now()
        self._end = self._start + spec.duration
        ticker = asyncio.create_task(self._tick(on_tick))
        try:
            if spec.open_loop:
                self._next = next(self._schedule, None)
                self._dispatch()
            else:
                assert spec.concurrency is not None
                for _ in range(spec.concurrency):
                    self._send_next()
                self._timer = loop.call_later(spec.duration, self._stop_sending)
            await self._sent  # the schedule is spent, or the duration is over
            # Every request ends within its timeout; the grace covers a generator that stalls.
            await asyncio.wait([self._finished], timeout=spec.timeout + DRAIN_GRACE)
        finally:
            self._sending = False
            if self._timer is not None:
                self._timer.cancel()
            self._pool.close()
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            gc.unfreeze()
        elapsed = _now() - self._start
        point = self._recorder.tick(elapsed)
        if on_tick is not None:
            on_tick(point)
        return elapsed

    def _make_schedule(self) -> Iterator[tuple[float, int]]:
        if self._spec.rate is not None:
            rates = self._fleet.rates(self._spec.rate)
            return arrivals_until(rates, self._fleet.phases, self._spec.duration)
        # Closed loop: the same cadence weights decide which device sends next.
        return arrivals(self._fleet.rates(1.0), self._fleet.phases)

    # -- open loop -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Send what is due (a bounded burst when behind), then sleep until the next one."""
        self._timer = None
        if not self._sending:
            return
        now = _now()
        burst = 0
        while (event := self._next) is not None:
            due = self._start + event[0]  # from the schedule, never from when we got here
            if due > now:
                self._timer = asyncio.get_running_loop().call_later(due - now, self._dispatch)
                return
            if burst == BURST_LIMIT:
                self._timer = asyncio.get_running_loop().call_later(0, self._dispatch)
                return
            self._send(event[1], due, now)
            self._next = next(self._schedule, None)
            burst += 1
            now = _now()
        self._stop_sending()

    # -- closed loop ---------------------------------------------------------------------

    def _send_next(self) -> None:
        now = _now()
        if self._sending and now < self._end:
            _, device = next(self._schedule)
            self._send(device, now, now)

    # -- both ----------------------------------------------------------------------------

    def _stop_sending(self) -> None:
        self._sending = False
        if self._sent is not None and not self._sent.done():
            self._sent.set_result(None)
        self._check_finished()

    def _check_finished(self) -> None:
        finished = self._finished
        if not self._sending and self._in_flight == 0 and finished is not None:
            if not finished.done():
                finished.set_result(None)

    def _send(self, device: int, due: float, now: float) -> None:
        recorder = self._recorder
        recorder.on_send(device, now - self._start, now - due)
        get, post_head = self._request_bytes(device)
        data = post_head + self._body if next(self._posts) else get
        self._in_flight += 1
        assert self._pool is not None
        self._pool.request(data, functools.partial(self._on_done, device, due))

    def _on_done(self, device: int, due: float, status: int, failure: RequestFailed | None) -> None:
        done = _now()
        self._in_flight -= 1
        if failure is None:
            self._recorder.on_response(device, status, latency_us(due, done), done - self._start)
        else:
            self._recorder.on_error(device, error_kind(failure), done - self._start)
        if not self._spec.open_loop:
            self._send_next()
        self._check_finished()

    def _request_bytes(self, device: int) -> tuple[bytes, bytes]:
        """Device `device`'s whole GET request and its POST head (the body follows it)."""
        cached = self._requests.get(device)
        if cached is not None:
            return cached
        if len(self._requests) >= DEVICE_CACHE:
            self._requests.clear()  # a large fleet: keep memory bounded, rebuild on demand
        lines = self._host_line + header_lines(self._fleet[device].headers) + b"Accept: */*\r\n"
        get = b"GET " + self._target + b" HTTP/1.1\r\n" + lines + b"\r\n"
        post_head = (
            b"POST " + self._target + b" HTTP/1.1\r\n" + lines
            + b"Content-Type: application/octet-stream\r\n"
            + b"Content-Length: " + str(len(self._body)).encode() + b"\r\n\r\n"
        )  # fmt: skip
        self._requests[device] = (get, post_head)
        return get, post_head

    async def _tick(self, on_tick: Callable[[TimelinePoint], None] | None) -> None:
        k = 1
        while True:
            # Ticks at start + k seconds exactly, however late the previous one ran.
            await asyncio.sleep(max(0.0, self._start + k * TICK_SECONDS - _now()))
            point = self._recorder.tick(_now() - self._start)
            if on_tick is not None:
                on_tick(point)
            k = max(k + 1, math.floor((_now() - self._start) / TICK_SECONDS) + 1)
