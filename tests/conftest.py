"""Shared fixtures and helpers: a fake clock, a real redis-server on a free port (and its
INFO commandstats), stores on both, a listener that never accepts, the child processes of a
pid, and a bounded wait."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis

from gateway import loops
from gateway.config import RedisSettings
from gateway.store import Store


def pytest_configure(config: pytest.Config) -> None:
    """State files (blocked-ids snapshots, generated admin tokens) of every gateway the
    tests start, in-process or not, go to a directory of this session's, never to $HOME."""
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="devicegate-state-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get("XDG_STATE_HOME", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def state_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test's gateways (in-process, or children that inherit the environment) keep
    their state files in a directory of the test's own: a blocked-ids snapshot left by an
    earlier test on the same redis-server would seed the next one's gateway."""
    path = Path(tempfile.mkdtemp(prefix="devicegate-state-"))
    monkeypatch.setenv("XDG_STATE_HOME", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# 2026-11-03T23:24:19.787Z, the seed document's timestamp.
EPOCH_US = 1_793_748_259_787_000


class FakeClock:
    """An injectable clock in microseconds; tests move it with .advance(ms), never sleep."""

    def __init__(self, start_us: int = EPOCH_US) -> None:
        self.now_us = start_us

    def __call__(self) -> int:
        return self.now_us

    def advance(self, ms: float) -> None:
        """Move time forward by `ms` milliseconds (fractions allowed)."""
        self.now_us += round(ms * 1000)

    @property
    def now_ms(self) -> int:
        """The current time in epoch milliseconds."""
        return self.now_us // 1000


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> float:
    """Wait (polling every 10 ms) for `condition`; returns the seconds it took. Past
    `timeout` seconds the test fails, naming `what` it waited for."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid` (a supervisor's workers)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


class RedisServer:
    """A real redis-server process on a free loopback port, with no persistence."""

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="devicegate-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start the server on its port (empty: it keeps nothing on disk) and wait for it."""
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--logfile", os.path.join(self.dir, "redis.log"),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        password = None
        if "--requirepass" in self.extra_args:
            password = self.extra_args[self.extra_args.index("--requirepass") + 1]
        client = redis.Redis(
            port=self.port, password=password, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        self.stop()
                        pytest.fail("redis-server did not start within 10 s")
                    time.sleep(0.02)
        finally:
            client.close()

    def restart(self) -> None:
        """Stop and start again on the same port, empty."""
        self.kill()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: the socket still accepts, nothing answers (a black hole)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after freeze()."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def flush(self) -> None:
        """Empty the server and its script cache."""
        with redis.Redis(port=self.port, socket_timeout=2) as client:
            client.flushall()
            client.script_flush()

    def kill(self) -> None:
        """Stop the process (its directory stays for a restart)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def command_stats(server: RedisServer) -> dict[str, dict[str, int]]:
    """INFO commandstats as {command: {calls, failed_calls, ...}}."""
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        info = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): {k: int(v) for k, v in stats.items() if k != "usec_per_call"}
        for name, stats in info.items()
    }


def reset_stats(server: RedisServer) -> None:
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        client.config_resetstat()


def calls(stats: dict[str, dict[str, int]], command: str, what: str = "calls") -> int:
    return stats.get(command, {}).get(what, 0)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole session."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def real_redis(redis_server: RedisServer) -> RedisServer:
    """The real redis-server, emptied for this test."""
    redis_server.flush()
    return redis_server


@pytest.fixture
def clock() -> FakeClock:
    """A fresh fake clock."""
    return FakeClock()


@pytest.fixture(params=["fake", "real"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    """A Store on fakeredis and on a real redis-server, with the fake clock."""
    if request.param == "fake":
        s = Store.memory(clock=clock)
    else:
        server: RedisServer = request.getfixturevalue("real_redis")
        s = Store.from_settings(
            RedisSettings(url=server.url, timeout=2.0, key_prefix=f"t{uuid.uuid4().hex[:6]}"),
            clock=clock,
        )
    await s.start()
    yield s
    await s.close()


TESTS_DIR = Path(__file__).parent


@pytest.fixture
def unaccepting_listener() -> Iterator[str]:
    """A loopback listener whose accept queue is full, so new SYNs are dropped (Linux).

    Skips when the kernel completes connects anyway: then there is no way to provoke a
    connect timeout on loopback, and a refused connect is covered by its own test.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(address)
    except TimeoutError:
        pass
    else:
        pytest.skip("the kernel accepted a connect beyond the listen backlog")
    finally:
        probe.close()
    try:
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the loop the gateway itself would pick (DEVICEGATE_LOOP:
    auto, uvloop or asyncio), so CI can run the suite on both loops."""
    factory = loops.loop_factory()
    return {loops.loop_name(factory): factory}
