"""Processes for the benchmark: started in their own process group, always stopped, measured.

Every child runs in a new session (so a Ctrl-C on the terminal reaches only the benchmark,
which then stops its children in order), every wait is bounded, and CPU time and memory are
read from /proc for a process and all its descendants.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT = 10.0  # seconds a process gets to exit after SIGTERM before SIGKILL


class BenchError(Exception):
    """A benchmark step failed: the message says which and why."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One started child (the leader of its own process group) and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """SIGTERM the leader, wait (bounded), then SIGKILL whatever is left of the group."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        # Workers outlive a killed leader; the group id is the leader's pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=STOP_TIMEOUT)


@dataclass
class Processes:
    """Every process the benchmark started; `stop_all` stops them newest first."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            try:
                popen = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise BenchError(f"{name}: cannot start {argv[0]}: {exc}") from exc
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every process; a second Ctrl-C meanwhile must not skip any of them."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while self.procs:
                self.procs.pop().stop()
        finally:
            signal.signal(signal.SIGINT, previous)

    def clean_up(self, *, keep: bool) -> None:
        """Remove the workdir (configs and logs), or say where it is kept."""
        if keep:
            print(f"configs and logs kept in {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def wait_until(
    proc: Proc, what: str, ready: Callable[[], bool], timeout: float, interval: float = 0.05
) -> None:
    """Poll `ready` until it is true; fail loudly if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited (code {proc.popen.returncode}) before {what}; "
                f"its log ({proc.log}):\n{proc.log_tail()}"
            )
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name}: {what} did not happen within {timeout:.0f} s; "
                f"its log ({proc.log}):\n{proc.log_tail()}"
            )
        time.sleep(interval)


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The status of a GET on a loopback URL (any HTTP answer counts, errors raise OSError)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# ---- /proc accounting ---------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is field 3, `state`)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """The pid and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(root: int) -> float:
    """utime+stime of a process tree, plus what its reaped children had used."""
    ticks = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        if pid == root:
            ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def rss_bytes(pid: int) -> int | None:
    """VmRSS of one process, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_bounded(
    argv: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run a command to completion in its own process group; kill the group on time-out."""
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        out, _ = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from exc
    finally:
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=STOP_TIMEOUT)
    return popen.returncode, out.decode(errors="replace")
