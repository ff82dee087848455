"""What the multi-process Redis engines (redis_cluster.py, redis_sentinel.py) are built of:
engine ports on loopback, one redis-server process that can be SIGKILLed and restarted on
its port and files, and a bounded poll that fails naming what it waited for and what it
saw last."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import pytest
import redis

from tests.rig.waits import WAIT

BUS_OFFSET: Final = 10000  # a cluster node's bus listens on its port + 10000
# Picked from below Linux's ephemeral range (32768-60999), bus ports included: the kernel
# never hands these out as the source port of an outgoing connection, so the port of a
# node killed for a test is still free when the node restarts on it.
ENGINE_PORTS: Final = range(10000, 32768 - BUS_OFFSET)
ENGINE_POLL: Final = 0.02  # seconds between two looks at an engine's state
_handed_out: set[int] = set()  # this process's picks, ports and bus ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def engine_port(bus: bool = False) -> int:
    """A free loopback port from ENGINE_PORTS; with `bus`, port + 10000 is free too."""
    for _ in range(200):
        # Random, not sequential: pytest sessions of other checkouts pick from the same range.
        port = random.choice(ENGINE_PORTS)
        wanted = (port, port + BUS_OFFSET) if bus else (port,)
        if not _handed_out.intersection(wanted) and all(map(_bindable, wanted)):
            _handed_out.update(wanted)
            return port
    pytest.fail(f"no free loopback port{' pair' if bus else ''} in {ENGINE_PORTS} in 200 tries")


def wait_until(check: Callable[[], str | None], what: str, timeout: float = WAIT) -> float:
    """Poll `check` (None: done; a string: what is not there yet) until it is done; returns
    the seconds it took. A Redis error counts as not yet. Past `timeout` seconds the test
    fails naming `what` and the last thing `check` said."""
    started = time.monotonic()
    while True:
        try:
            reason = check()
        except redis.RedisError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        if reason is None:
            return elapsed
        if elapsed > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last seen: {reason}")
        time.sleep(ENGINE_POLL)


def binary(name: str, package: str) -> str:
    """The path of a Redis program, or the test fails naming the Debian package."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install {package})")
    return path


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process is killed outright
    # (SIGKILL, OOM) its redis-servers go with it instead of lingering on their ports.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class NodeExited(Exception):
    """A redis-server exited before it answered (its port taken, a bad argument)."""


class RedisNode:
    """One redis-server process on a fixed loopback port, its files in the engine's
    directory: started, SIGKILLed, restarted on the same port and files, frozen, stopped."""

    def __init__(self, server: str, port: int, dir: Path, name: str, args: Sequence[str]) -> None:
        self.server = server
        self.port = port
        self.dir = dir
        self.name = name
        self.args = list(args)
        self.output = dir / f"{name}.out"  # what it writes before its logfile is open
        self.log = dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # decode_responses: the rig reads states, roles and ids; keys never pass through it.
        # RESP3 pinned (redis-py 8 asks for it by default, older ones do not): SENTINEL
        # MASTER then answers a map whatever redis-py's version.
        self.client = redis.Redis(
            port=port,
            socket_timeout=1,
            socket_connect_timeout=1,
            decode_responses=True,
            protocol=3,
        )

    @property
    def alive(self) -> bool:
        """The process is running (it may be frozen)."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = WAIT) -> None:
        """Start the process and wait until it answers PING; NodeExited when it exits first."""
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [self.server, *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        started = time.monotonic()
        while True:
            try:
                if self.client.ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None:
                raise NodeExited(f"{self.name} on port {self.port} exited: {self.tail()}")
            if time.monotonic() - started > timeout:
                pytest.fail(f"{self.name} on port {self.port} did not answer within {timeout} s")
            time.sleep(ENGINE_POLL)

    def restart(self) -> None:
        """Start again on the same port and files after kill(); the test fails if it cannot."""
        try:
            self.start()
        except NodeExited as exc:
            pytest.fail(f"restarting: {exc}")

    def tail(self, lines: int = 8) -> str:
        """The last lines the process wrote (its output, then its logfile)."""
        text = []
        for path in (self.output, self.log):
            if path.exists():
                text += path.read_text(errors="replace").splitlines()[-lines:]
        return " | ".join(text) or "(no output)"

    def kill(self) -> None:
        """SIGKILL: a crash, nothing written, clients' connections cut."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self._reap()

    def freeze(self) -> None:
        """SIGSTOP: the socket still accepts, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after freeze()."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def terminate(self) -> None:
        """Stop the process (SIGTERM, SIGKILL past 5 s) and close the rig's client."""
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            self.proc.terminate()
            self._reap()
        self.client.close()

    def _reap(self) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def launch(
    server: str, dir: Path, name: str, make_args: Callable[[int], Sequence[str]], bus: bool = False
) -> RedisNode:
    """A started RedisNode on a fresh engine port. Another program can take the port between
    the pick and the bind: then the node starts again on another one (3 tries)."""
    for attempt in range(3):
        port = engine_port(bus=bus)
        node = RedisNode(server, port, dir, f"{name}-{port}", make_args(port))
        try:
            node.start()
            return node
        except NodeExited as exc:
            node.terminate()
            if "in use" not in str(exc) or attempt == 2:
                pytest.fail(str(exc))
    raise AssertionError("unreachable")


def info_fields(text: str) -> dict[str, str]:
    """`key:value` lines (CLUSTER INFO, raw INFO sections) as a dict."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields
