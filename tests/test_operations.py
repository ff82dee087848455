"""Operations, on a real `gateway run` process: graceful stop under load, the bound on it, overload.

Each test starts `python -m gateway run --config <tmp yaml>` (one process, or `--workers 2`
under the supervisor) on free loopback ports, in front of a `CountingUpstream`, over
`memory://` or a real redis-server. Clients are raw sockets, so every byte of an answer is
accounted for: a request is either answered completely (status, framing, body bytes and
content) or not answered at all (refused, or closed before a byte of its answer), and a
request the upstream saw is always answered completely.

- SIGTERM under load: listeners close first (new connections refused), answers in flight
  finish (kept-alive connections close cleanly after them, saying `Connection: close` when
  the head was written after the signal), the process exits 0, no traceback.
- `server.shutdown_timeout` bounds the stop: answers still in flight after it are cut, never
  complete-looking, and the process exits 0 right after it.
- Overload at twice the measured capacity: the process stays up, its memory stays bounded,
  and sequential latency is back to normal within 5 s of the load stopping.

Figures are printed (`pytest -s` or `-rP` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import re
import signal
import statistics
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import orjson
import pytest

from tests.rig.client import Progress, RawClient
from tests.rig.gateway import figure
from tests.rig.redis_server import RedisServer
from tests.rig.system import REPO, children, free_port
from tests.rig.upstream import MARK, CountingUpstream, MakeUpstream, Reply, Slow, Stream
from tests.rig.waits import until, until_async

pytestmark = pytest.mark.integration

WAIT: Final = 15.0  # bounds every wait for a process, a line of output or an answer
TOKEN: Final = "operations-admin-token-0123456789"
LISTENING: Final = '"message":"listening"'

Kind = Literal["slow", "stream", "fast"]

SLOW_DELAY: Final = 1.5  # seconds the upstream holds a slow answer
SLOW_BODY: Final = hashlib.sha256(b"slow").hexdigest().encode() * 1600  # 102,400 bytes
STREAM_CHUNKS: Final = tuple(  # six distinct chunks of 16 KiB
    hashlib.sha256(bytes([i])).hexdigest().encode() * 256 for i in range(6)
)
STREAM_DELAY: Final = 0.25  # seconds before each chunk after the first: 1.25 s an answer
STREAM_BODY: Final = b"".join(STREAM_CHUNKS)  # 98,304 bytes


def expected_body(kind: Kind) -> bytes | None:
    """The body a complete answer of this kind carries (fast ones: a JSON report)."""
    return {"slow": SLOW_BODY, "stream": STREAM_BODY, "fast": None}[kind]


# ---------------------------------------------------------------- the gateway process


@dataclass
class GatewayProcess:
    """A running `gateway run` subprocess and where it listens."""

    proc: asyncio.subprocess.Process
    port: int
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def signal(self, sig: int) -> float:
        """Send `sig`; returns time.monotonic() at the send."""
        self.proc.send_signal(sig)
        return time.monotonic()

    async def exited(self, within: float) -> tuple[int, float]:
        """(exit code, time.monotonic() when it was seen), waiting at most `within` s."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            pytest.fail(f"the gateway did not exit within {within} s; stderr:\n{self.stderr}")
        return code, time.monotonic()

    def rss_bytes(self) -> int:
        """Resident memory of the process and its workers."""
        total = 0
        for pid in [self.proc.pid, *children(self.proc.pid)]:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total


StartGateway = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """Factory: a `gateway run` subprocess, ready (its "listening" line is out)."""
    started: list[GatewayProcess] = []

    async def start(
        upstream_url: str,
        redis_url: str,
        *,
        workers: int = 1,
        shutdown_timeout: float = 30.0,
        loop: str | None = None,
    ) -> GatewayProcess:
        port = free_port()
        config = tmp_path / f"gateway-{len(started)}.yaml"
        # Buckets no request meets: these tests are about the process, not the limits.
        config.write_text(
            f"server: {{listen: '127.0.0.1:{port}', shutdown_timeout: {shutdown_timeout}}}\n"
            f"admin: {{listen: '127.0.0.1:{free_port()}', token: '{TOKEN}'}}\n"
            f"upstream: {{url: '{upstream_url}'}}\n"
            f"redis: {{url: '{redis_url}'}}\n"
            "rate_limits: {device: {rate: 1000000, burst: 1000000}}\n"
            "devices: {registration_limit: {rate: 1000, burst: 10000}}\n"
            "log: {access: false, level: info}\n"
        )
        stderr_path = tmp_path / f"gateway-{len(started)}.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        if loop is not None:
            env["DEVICEGATE_LOOP"] = loop
        argv = ["-m", "gateway", "run", "--config", str(config), "--workers", str(workers)]
        with stderr_path.open("wb") as stderr:  # the child keeps its own copy
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *argv, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
                cwd=REPO, env=env,
            )  # fmt: skip
        gateway = GatewayProcess(proc, port, stderr_path)
        started.append(gateway)

        def listening() -> bool:
            if proc.returncode is not None:
                pytest.fail(f"the gateway exited; stderr:\n{gateway.stderr}")
            return LISTENING in gateway.stderr

        await until(listening, lambda: f"the gateway to start; stderr:\n{gateway.stderr}", WAIT)
        return gateway

    yield start
    for gateway in started:
        if gateway.proc.returncode is None:
            gateway.proc.kill()
            await asyncio.wait_for(gateway.proc.wait(), WAIT)


@pytest.fixture
async def upstream(make_upstream: MakeUpstream) -> CountingUpstream:
    """The rig's upstream, with slow answers at /slow and streamed ones at /stream."""
    up = await make_upstream()
    up.behave(Slow(SLOW_DELAY, Reply(body=SLOW_BODY)), path="/slow")
    up.behave(Stream(STREAM_CHUNKS, delay=STREAM_DELAY), path="/stream")
    return up


def assert_no_traceback(gateway: GatewayProcess) -> None:
    """Neither the process nor a worker logged an exception."""
    text = gateway.stderr
    assert "Traceback" not in text, text
    assert '"level":"error"' not in text, text


# ---------------------------------------------------------------- a raw HTTP/1.1 client


@dataclass
class Answer:
    """One request and what came back, byte for byte; filled in while it arrives."""

    kind: Kind
    path: str
    keep_alive: bool
    sent_at: float = 0.0
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    body: bytearray = field(default_factory=bytearray)
    received: int = 0  # bytes of the answer read, head and framing included
    head_at: float | None = None
    ended_at: float = 0.0
    complete: bool = False
    error: str | None = None  # how an incomplete answer ended: eof, reset

    @property
    def tag(self) -> str:
        return self.path.rsplit("=", 1)[1]

    @property
    def says_close(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def check_complete(self) -> None:
        """A complete answer is the upstream's 200 with the whole body for its path."""
        assert self.complete and self.status == 200, self
        assert MARK.lower() in self.headers, self  # the upstream's answer, not the gateway's
        expected = expected_body(self.kind)
        if expected is None:
            assert orjson.loads(self.body)["path"] == self.path, self
        else:
            assert len(self.body) == len(expected), (self.path, len(self.body))
            assert hashlib.sha256(self.body).digest() == hashlib.sha256(expected).digest()

    def __repr__(self) -> str:
        return (
            f"Answer({self.path} keep_alive={self.keep_alive} status={self.status} "
            f"received={self.received} body={len(self.body)} complete={self.complete} "
            f"error={self.error})"
        )


def request_bytes(path: str, *, keep_alive: bool, device: str = "ops-1") -> bytes:
    connection = "" if keep_alive else "Connection: close\r\n"
    return (
        f"GET {path} HTTP/1.1\r\nHost: gateway.test\r\nX-Device-Id: {device}\r\n{connection}\r\n"
    ).encode()


async def read_into(client: RawClient, answer: Answer, got: Progress | None = None) -> None:
    """Read one answer into `answer` (the rig's read_answer, its progress kept in `got`: a
    cut one shows how far it got); never raises for a cut."""
    got = Progress() if got is None else got
    try:
        await client.read_answer(progress=got)
        answer.complete = True
    except asyncio.IncompleteReadError:
        answer.error = "eof"
    except ConnectionResetError:
        answer.error = "reset"
    finally:
        answer.ended_at = time.monotonic()
        answer.received = got.received
        answer.head_at = got.head_at
        answer.status = got.status
        answer.headers = {name.lower(): value for name, value in got.fields.items()}
        answer.body += got.body


_tags = itertools.count()


def next_path(kind: Kind) -> str:
    return f"/{kind}?n={next(_tags)}"


# ---------------------------------------------------------------- 1. SIGTERM under load

# Each client's round of requests: slow and streamed answers, with quick ones between.
ROUND: Final[tuple[Kind, ...]] = ("slow", "fast", "stream", "fast")


class Caller:
    """A caller sending requests one after the other until the gateway refuses it.

    Fresh clients open a connection per request (`Connection: close`); kept-alive ones
    reuse theirs until the gateway closes it, checking how it ended, then connect again.
    """

    def __init__(self, port: int, index: int, *, keep_alive: bool) -> None:
        self.port = port
        self.keep_alive = keep_alive
        self.kinds = itertools.islice(itertools.cycle(ROUND), index % len(ROUND), None)
        self.answers: list[Answer] = []
        self.ends: list[tuple[Answer, str]] = []  # a closing answer, and how the close came
        self.current: Answer | None = None
        self.refused_at: float | None = None

    async def run(self) -> None:
        while True:
            try:
                client = await RawClient.connect(self.port, timeout=WAIT)
            except (ConnectionRefusedError, ConnectionResetError):
                # Reset: the handshake had completed in the listener's backlog when the
                # listener closed, so the gateway never accepted it. No request was sent.
                self.refused_at = time.monotonic()
                return
            try:
                await self._serve(client)
            finally:
                client.abort()

    async def _serve(self, client: RawClient) -> None:
        while True:
            kind = next(self.kinds)
            answer = Answer(kind, next_path(kind), self.keep_alive, sent_at=time.monotonic())
            self.answers.append(answer)
            self.current = answer
            try:
                await client.send(request_bytes(answer.path, keep_alive=self.keep_alive))
            except ConnectionError:
                answer.error = "reset"
                return
            await read_into(client, answer)
            self.current = None
            if not (answer.complete and self.keep_alive):
                return
            if answer.says_close:
                self.ends.append((answer, await client.ending()))
                return


async def probe_refused(port: int) -> float:
    """time.monotonic() when a new connection to `port` is first refused.

    A reset during connect counts too: the handshake was queued in the listener's backlog when
    the listener closed, which is the same moment seen from the other side.
    """

    async def refused() -> bool:
        try:
            client = await RawClient.connect(port, timeout=WAIT)
        except (ConnectionRefusedError, ConnectionResetError):
            return True
        client.abort()
        return False

    await until_async(refused, "new connections to be refused", WAIT)
    return time.monotonic()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_finishes_every_started_answer_and_exits_0(
    workers: int,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    real_redis: RedisServer,
) -> None:
    shutdown_timeout = 10.0
    # One process runs the embedded store; two workers need a shared Redis.
    store = "memory://" if workers == 1 else real_redis.url
    gateway = await start_gateway(upstream.url, store, workers=workers,
                                  shutdown_timeout=shutdown_timeout)  # fmt: skip
    worker_pids = children(gateway.proc.pid)
    assert len(worker_pids) == (workers if workers > 1 else 0)
    clients = [Caller(gateway.port, i, keep_alive=i % 2 == 0) for i in range(10)]
    tasks = [asyncio.create_task(c.run()) for c in clients]

    def seen_tags() -> set[str]:
        return {s.raw_path.rsplit("=", 1)[1] for s in upstream.seen}

    def kept_alive_slow_at_upstream() -> int:
        """Kept-alive clients whose slow request the upstream holds and will hold for at
        least 0.8 s more (sent less than 0.7 s ago)."""
        tags = seen_tags()
        recent = time.monotonic() - (SLOW_DELAY - 0.8)
        return sum(
            1
            for c in clients
            if c.keep_alive
            and c.current is not None
            and c.current.kind == "slow"
            and c.current.sent_at > recent
            and c.current.tag in tags
        )

    # Signal while answers of every kind are in flight, two of them slow ones on kept-alive
    # connections (their heads are written after the signal: they must say close).
    await until(
        lambda: upstream.in_progress >= 6 and kept_alive_slow_at_upstream() >= 2,
        "six requests at the upstream",
        WAIT,
    )
    in_flight = upstream.in_progress
    in_flight_tags = seen_tags() - {a.tag for c in clients for a in c.answers if a.complete}
    sigterm_at = gateway.signal(signal.SIGTERM)
    refused_at = await asyncio.wait_for(probe_refused(gateway.port), WAIT)
    code, exited_at = await gateway.exited(shutdown_timeout + 3.0)
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)

    figure(f"workers={workers} requests in flight at the upstream at SIGTERM", in_flight)
    figure(f"workers={workers} seconds from SIGTERM to new connections refused",
           refused_at - sigterm_at)  # fmt: skip
    figure(f"workers={workers} seconds from SIGTERM to exit", exited_at - sigterm_at)

    assert code == 0, gateway.stderr
    assert_no_traceback(gateway)
    if worker_pids:  # the supervisor waited for its workers: none outlives it
        assert not [pid for pid in worker_pids if Path(f"/proc/{pid}").exists()]

    answers = [a for c in clients for a in c.answers]
    by_tag = {a.tag: a for a in answers}
    # Every answer is complete, or there is none at all (the request was never started:
    # its connection was refused, closed or reset before a byte of an answer).
    seen = seen_tags()
    unanswered = [a for a in answers if not a.complete]
    for answer in answers:
        if answer.complete:
            answer.check_complete()
        else:
            assert answer.received == 0, f"a partial answer: {answer}"
            assert answer.tag not in seen, f"the upstream saw it, the client got nothing: {answer}"
    # Every request in flight at the signal was among the complete ones.
    assert all(by_tag[t].complete for t in in_flight_tags)
    completed_after = [a for a in answers if a.complete and a.ended_at > sigterm_at]
    figure(f"workers={workers} answers completed after SIGTERM", len(completed_after))
    figure(f"workers={workers} requests never started (no answer byte)", len(unanswered))
    assert len(completed_after) >= in_flight
    # The listener closed first: refused while answers in flight were still being written.
    assert refused_at < max(by_tag[t].ended_at for t in in_flight_tags)

    # Kept-alive connections closed cleanly after their current answer; an answer whose
    # head was written well after the signal said so.
    ends = [end for c in clients for end in c.ends]
    assert all(how == "eof" for _, how in ends), ends
    late_heads = [
        a
        for a in answers
        if a.keep_alive and a.complete and a.head_at is not None and a.head_at > sigterm_at + 0.3
    ]
    assert len(late_heads) >= 2
    assert all(a.says_close for a in late_heads), late_heads
    # Every client ended refused: nothing listens any more.
    assert all(c.refused_at is not None for c in clients)


# ---------------------------------------------------------------- 2. the bound on the stop


@pytest.mark.timing
@pytest.mark.parametrize("workers", [1, 2])
async def test_shutdown_timeout_bounds_the_stop_and_cuts_what_is_still_in_flight(
    workers: int,
    upstream: CountingUpstream,
    start_gateway: StartGateway,
    real_redis: RedisServer,
) -> None:
    held = 10.0  # seconds the upstream holds both answers: far past the stop's bound
    upstream.behave(Slow(held, Reply(body=SLOW_BODY)), path="/held")
    upstream.behave(Stream((b"first", b"never sent"), delay=held), path="/stalled")
    store = "memory://" if workers == 1 else real_redis.url
    gateway = await start_gateway(upstream.url, store, workers=workers, shutdown_timeout=1.0)

    async def one(kind_path: str, got: Progress) -> Answer:
        answer = Answer("slow", f"{kind_path}?n={next(_tags)}", keep_alive=True)
        client = await RawClient.connect(gateway.port, timeout=WAIT)
        try:
            client.write(request_bytes(answer.path, keep_alive=True))
            answer.sent_at = time.monotonic()
            await read_into(client, answer, got)
        finally:
            client.abort()
        return answer

    # The held request has no head yet; the stalled one has its head and a first chunk out.
    stalled = Progress()
    held_task = asyncio.create_task(one("/held", Progress()))
    stalled_task = asyncio.create_task(one("/stalled", stalled))
    await until(lambda: upstream.in_progress == 2, "both requests at the upstream", WAIT)
    await until(lambda: stalled.body == b"first", "the stalled answer's first chunk to arrive")
    sigterm_at = gateway.signal(signal.SIGTERM)
    code, exited_at = await gateway.exited(1.0 + 4.0)
    held_answer, stalled_answer = await asyncio.wait_for(
        asyncio.gather(held_task, stalled_task), WAIT
    )
    stop = exited_at - sigterm_at
    figure(f"workers={workers} seconds from SIGTERM to exit (shutdown_timeout 1)", stop)
    figure(f"workers={workers} seconds from SIGTERM to the cut",
           max(held_answer.ended_at, stalled_answer.ended_at) - sigterm_at)  # fmt: skip

    assert code == 0, gateway.stderr
    assert_no_traceback(gateway)
    # The stop gave them the whole second, then cut them; the process left right after.
    assert 1.0 <= stop < 1.0 + 3.0
    for answer in (held_answer, stalled_answer):
        assert not answer.complete, answer
        assert answer.ended_at - sigterm_at >= 1.0 - 0.05, answer
    assert held_answer.received == 0
    assert stalled_answer.status == 200 and bytes(stalled_answer.body) == b"first"
    assert upstream.count(path="/held") == upstream.count(path="/stalled") == 1


# ---------------------------------------------------------------- 3. overload

FAST_BODY: Final = b"f" * 512
UPSTREAM_MAIN: Final = "from tests.test_operations import serve_upstream; serve_upstream()"


def serve_upstream() -> None:
    """The overload test's upstream process: the rig's CountingUpstream answering FAST_BODY
    at once.

    Not the `make_upstream` fixture: the upstream runs in a process of its own, so the load
    generator does not compete with it for one event loop. It prints its URL and runs until
    its stdin ends.
    """

    async def main() -> None:
        up = CountingUpstream(Reply(body=FAST_BODY))
        await up.start()
        print(up.url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
        await up.close()

    asyncio.run(main())


@pytest.fixture
async def upstream_process() -> AsyncIterator[str]:
    """A CountingUpstream in a process of its own; yields its URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", UPSTREAM_MAIN, cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        url = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), WAIT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def get(conn: RawClient, *, device: str = "ops-1") -> Answer:
    """One GET of the fast path on a kept-alive connection, read whole."""
    answer = Answer("fast", next_path("fast"), keep_alive=True, sent_at=time.monotonic())
    conn.write(request_bytes(answer.path, keep_alive=True, device=device))
    await read_into(conn, answer)
    return answer


async def sequential_median(port: int, n: int = 20) -> float:
    """Median seconds of `n` sequential GETs on one new kept-alive connection."""
    conn = await RawClient.connect(port, timeout=WAIT)
    took = []
    try:
        for _ in range(n):
            answer = await asyncio.wait_for(get(conn), WAIT)
            assert answer.complete and answer.status == 200 and bytes(answer.body) == FAST_BODY
            took.append(answer.ended_at - answer.sent_at)
    finally:
        conn.abort()
    return statistics.median(took)


async def closed_loop_rate(port: int, clients: int, duration: float) -> float:
    """Answers per second with `clients` kept-alive connections each asking in turn."""
    done = 0
    stop_at = time.monotonic() + duration

    async def client(i: int) -> None:
        nonlocal done
        conn = await RawClient.connect(port, timeout=WAIT)
        try:
            while time.monotonic() < stop_at:
                answer = await get(conn, device=f"ops-{i % 8}")
                assert answer.complete and answer.status == 200, answer
                done += 1
        finally:
            conn.abort()

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), WAIT)
    return done / (time.monotonic() - started)


class Pipe:
    """One connection of the open loop: requests written back to back (pipelined), answers
    counted by their status lines as they arrive (in order, so each one's start is known)."""

    STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")
    KEEP = 12  # bytes kept between reads: a status line split by a read is still found

    def __init__(self, load: OpenLoop, conn: RawClient) -> None:
        self.load = load
        self.reader, self.writer = conn.reader, conn.writer
        self.pending: deque[float] = deque()  # intended starts of requests not yet answered
        self.batch: list[bytes] = []
        self.closed = False
        self.task = asyncio.create_task(self._read())

    def flush(self) -> None:
        if self.batch and not self.closed:
            self.writer.write(b"".join(self.batch))
        self.batch = []

    def give_up(self) -> None:
        """The impatient client: cut the connection, its unanswered requests are lost."""
        self.load.given_up += len(self.pending)
        self.pending.clear()
        self.closed = True
        self.writer.transport.abort()

    async def _read(self) -> None:
        tail = b""
        try:
            while data := await self.reader.read(1 << 16):
                buf = tail + data
                now = time.monotonic()
                end = 0
                for match in self.STATUS.finditer(buf):
                    status = int(match.group(1))
                    self.load.statuses[status] = self.load.statuses.get(status, 0) + 1
                    if self.pending:
                        self.load.latencies.append(now - self.pending.popleft())
                    end = match.end()
                tail = buf[max(end, len(buf) - self.KEEP) :]
        except ConnectionError:
            pass
        if not self.closed:
            self.load.broken += 1
            self.give_up()


@dataclass
class OpenLoop:
    """Requests started at a fixed rate whatever the answers do (open loop), spread over
    `connections` kept-alive connections and pipelined there, so the generator costs far
    less per request than the gateway and the gateway, not the test, is what saturates.

    A connection whose oldest request has no answer after `timeout` is cut and replaced, as
    an impatient client does.
    """

    port: int
    rate: float
    duration: float
    timeout: float
    connections: int = 64
    statuses: dict[int, int] = field(default_factory=dict)
    given_up: int = 0  # requests on connections cut after `timeout` without their answer
    broken: int = 0  # connections the gateway closed or reset
    latencies: list[float] = field(default_factory=list)  # from the intended start
    max_lag: float = 0.0  # how late the generator itself wrote a request
    replaced: int = 0

    async def _connect(self) -> Pipe:
        return Pipe(self, await RawClient.connect(self.port, timeout=WAIT))

    async def run(self) -> None:
        requests = [request_bytes("/fast", keep_alive=True, device=f"ops-{i}") for i in range(64)]
        pipes = [await self._connect() for _ in range(self.connections)]
        start = time.monotonic()
        total = int(self.rate * self.duration)
        sent = 0
        while True:
            now = time.monotonic()
            for k, pipe in enumerate(pipes):
                if pipe.closed or (pipe.pending and now - pipe.pending[0] > self.timeout):
                    if not pipe.closed:
                        pipe.give_up()
                    if sent < total:
                        pipes[k] = await self._connect()
                        self.replaced += 1
            if sent >= total and not any(p.pending for p in pipes):
                break
            due = min(total, int((now - start) * self.rate) + 1)
            for i in range(sent, due):
                intended = start + i / self.rate
                self.max_lag = max(self.max_lag, now - intended)
                pipe = pipes[i % len(pipes)]
                pipe.pending.append(intended)
                pipe.batch.append(requests[i % len(requests)])
            sent = max(sent, due)
            for pipe in pipes:
                pipe.flush()
            await asyncio.sleep(0.005)  # the generator's tick: the open loop's pace
        for pipe in pipes:
            pipe.closed = True
            pipe.writer.transport.abort()
        await asyncio.wait_for(asyncio.gather(*(p.task for p in pipes)), WAIT)


@pytest.mark.timing
async def test_overload_at_twice_capacity_stays_up_bounded_and_recovers(
    upstream_process: str, start_gateway: StartGateway, real_redis: RedisServer
) -> None:
    gateway = await start_gateway(upstream_process, real_redis.url)
    await sequential_median(gateway.port)  # warm up: devices registered, pools open
    before = await sequential_median(gateway.port)
    capacity = await closed_loop_rate(gateway.port, clients=16, duration=1.5)
    rss_before = gateway.rss_bytes()

    load = OpenLoop(gateway.port, rate=2 * capacity, duration=3.0, timeout=1.0)
    rss_peak = rss_before

    async def sample_rss() -> None:
        nonlocal rss_peak
        while True:
            rss_peak = max(rss_peak, gateway.rss_bytes())
            await asyncio.sleep(0.1)  # the sampling interval of a measurement, not a wait

    sampler = asyncio.create_task(sample_rss())
    try:
        await asyncio.wait_for(load.run(), load.duration + WAIT)
    finally:
        sampler.cancel()
    load_ended = time.monotonic()
    assert gateway.proc.returncode is None, gateway.stderr

    # Back to normal within 5 s: sequential latency measured again until it is.
    threshold = 3 * before + 0.005
    deadline = load_ended + 5.0
    while True:
        try:
            after = await asyncio.wait_for(
                sequential_median(gateway.port), max(0.1, deadline - time.monotonic())
            )
        except TimeoutError:
            pytest.fail("20 sequential GETs were not answered within 5 s of the load's end")
        recovered = time.monotonic() - load_ended
        if after <= threshold or recovered > 5.0:
            break
        await asyncio.sleep(0.2)  # between two measurements (a bounded poll on the latency)
    rss_after = gateway.rss_bytes()

    answered = sum(load.statuses.values())
    figure("closed-loop capacity, 16 clients (req/s)", capacity)
    figure("open-loop offered (req/s)", load.rate)
    figure("open-loop answered (req/s over the 3 s)", answered / load.duration)
    figure("open-loop requests given up after 1 s", load.given_up)
    figure("open-loop connections replaced", load.replaced)
    figure("open-loop connections closed by the gateway", load.broken)
    figure("open-loop generator's worst lag (s)", load.max_lag)
    if load.latencies:
        latencies = sorted(load.latencies)
        figure("open-loop median latency from intended start (s)", statistics.median(latencies))
        figure("open-loop p99 latency from intended start (s)",
               latencies[int(len(latencies) * 0.99)])  # fmt: skip
    figure("sequential median before (ms)", before * 1000)
    figure("sequential median after (ms)", after * 1000)
    figure("seconds from load end to normal latency", recovered)
    figure("RSS before (MB)", rss_before / 1e6)
    figure("RSS growth at peak (MB)", (rss_peak - rss_before) / 1e6)
    figure("RSS growth after (MB)", (rss_after - rss_before) / 1e6)
    print(f"figure open-loop statuses: {load.statuses}")

    assert answered > 0
    # Under overload the gateway answers or sheds (503), never anything else.
    assert set(load.statuses) <= {200, 503}, load.statuses
    assert load.broken == 0  # it never dropped a connection it was serving
    assert rss_peak - rss_before < 150e6
    assert after <= threshold, f"median {after * 1000:.1f} ms > {threshold * 1000:.1f} ms"
    gateway.signal(signal.SIGTERM)
    code, _ = await gateway.exited(WAIT)
    assert code == 0, gateway.stderr
    assert_no_traceback(gateway)


# ---------------------------------------------------------------- the loop it runs on

LOOP_REFUSALS: Final = (
    (b"GET /" + b"t" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_refusals_keep_their_status_on_either_loop(
    start_gateway: StartGateway, upstream: CountingUpstream, loop: str
) -> None:
    # Without uvloop, `gateway run` once ran its loop inside `except ImportError`: every
    # refusal raised in a parser callback then carried that error and became a 400.
    gateway = await start_gateway(upstream.url, "memory://", loop=loop)
    for request, status in LOOP_REFUSALS:
        client = await RawClient.connect(gateway.port, timeout=WAIT)
        try:
            client.write(request)
            head = await client.read_until(b"\r\n\r\n")
        finally:
            client.abort()
        assert int(head.split(b" ", 2)[1]) == status, head
    assert upstream.arrived == 0
    assert_no_traceback(gateway)
