"""A real redis-server on a free loopback port, and its INFO commandstats."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence

import pytest
import redis

from tests.rig.system import free_port
from tests.rig.waits import until_sync


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
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited at start ({proc.returncode})")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            until_sync(answers, "redis-server to start", 10.0)
        except BaseException:
            self.stop()
            raise
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
    """CONFIG RESETSTAT: the next command_stats counts from zero."""
    with redis.Redis(port=server.port, socket_timeout=2) as client:
        client.config_resetstat()


def calls(stats: dict[str, dict[str, int]], command: str, what: str = "calls") -> int:
    """One counter of one command in a command_stats result (0 when never called)."""
    return stats.get(command, {}).get(what, 0)
