"""What a chaos scenario runs against: a counting upstream, a redis-server that keeps its data
across a SIGKILL, and a gateway subprocess with a generated config (on that redis-server or on
any Redis URL: a cluster, a Sentinel service); all on loopback.

Processes start through bench/procs.py (own process group, bounded waits, stopped at the
end); the gateway's admin API is reached with gateway.admin_client.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml
from procs import (
    STOP_TIMEOUT,
    BenchError,
    Proc,
    Processes,
    free_port,
    http_status,
    rss_bytes,
    run_bounded,
    tree,
    wait_until,
)
from servers import gateway_env

from gateway.admin_client import AdminClient

START_TIMEOUT = 20.0  # seconds for a server to answer after it is started
REDIS_TIMEOUT = 0.1  # redis.timeout under test: the gateway's default
HERE = Path(__file__).resolve().parent
# Every write reaches the append-only file (the OS's cache) before Redis replies, so a
# SIGKILL of the process loses nothing and "no record lost" is about the gateway. Not
# `appendfsync always`: an fsync on a busy disk can outlast the 100 ms budget of a call.
AOF = ("--appendonly", "yes", "--appendfsync", "no")


def start_upstream(procs: Processes) -> int:
    """bench/chaos_upstream.py on a free port; returns the port."""
    port = free_port()
    script = HERE / "chaos_upstream.py"
    proc = procs.start("upstream", [sys.executable, str(script), "--port", str(port)])
    url = f"http://127.0.0.1:{port}/"
    wait_until(proc, f"{url} answering 200", lambda: http_status(url) == 200, START_TIMEOUT)
    return port


def upstream_counts(port: int) -> dict[str, int]:
    """Requests the upstream saw so far, per X-Device-Id."""
    url = f"http://127.0.0.1:{port}/__chaos/counts"
    with urllib.request.urlopen(url, timeout=5) as response:
        counts: dict[str, int] = json.loads(response.read())
    return counts


class Redis:
    """A redis-server of one scenario, on a fixed port and directory, so it can be killed
    and started again with its data (append-only file)."""

    def __init__(self, procs: Processes, name: str, persist: bool) -> None:
        self.procs = procs
        self.name = name
        self.port = free_port()
        self.dir = procs.workdir / name
        self.dir.mkdir()
        self.args = list(AOF) if persist else ["--save", "", "--appendonly", "no"]
        self.starts = 0
        self.proc = self.start()

    def start(self) -> Proc:
        """Start (again) on the same port and directory; returns once PING answers."""
        binary = os.environ.get("REDIS_SERVER", "redis-server")
        self.starts += 1
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), *self.args]  # fmt: skip
        self.proc = self.procs.start(f"{self.name}-{self.starts}", argv)
        wait_until(self.proc, f"redis PING on port {self.port}", self.ping, START_TIMEOUT, 0.01)
        return self.proc

    def ping(self) -> bool:
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save (a crash, an OOM kill)."""
        self.proc.popen.kill()
        self.proc.popen.wait(timeout=STOP_TIMEOUT)
        self.procs.stop(self.proc)  # forget it; the group is gone already

    def freeze(self) -> None:
        """SIGSTOP: the socket still accepts, nothing answers (a black hole)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after freeze()."""
        os.kill(self.proc.pid, signal.SIGCONT)


SERIOUS = ("error", "critical")
DECISION_LINE = re.compile(r'devicegate_requests_total\{decision="([^"]+)"\} (\d+)')


def _level(line: str) -> str:
    """The `level` of one JSON log line ("" for a line that is not one)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return ""
    return str(entry.get("level", "")) if isinstance(entry, dict) else ""


@dataclass(frozen=True, slots=True)
class Gateway:
    """A started gateway subprocess and how to reach it."""

    proc: Proc
    url: str
    admin_url: str
    token: str
    workers: int

    def admin(self) -> AdminClient:
        return AdminClient(self.admin_url, self.token, timeout=10.0)

    def rss(self) -> int:
        """RSS of the gateway and its workers, in bytes."""
        return sum(rss_bytes(pid) or 0 for pid in tree(self.proc.pid))

    def decisions(self) -> dict[str, int]:
        """The public listener's requests by decision, all workers added up (admin /metrics):
        `store_down_open` counts the requests let through unenforced by on_error open."""
        request = urllib.request.Request(
            f"{self.admin_url}/metrics", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
        found: dict[str, int] = {}
        for line in text.splitlines():
            match = DECISION_LINE.fullmatch(line)
            if match:
                found[match[1]] = int(match[2])
        return found

    def log_problems(self) -> list[str]:
        """Lines of the gateway's log that carry a traceback or an error-level record."""
        try:
            lines = self.proc.log.read_text(errors="replace").splitlines()
        except OSError:
            return ["(no log)"]
        return [line for line in lines if "Traceback" in line or _level(line) in SERIOUS]


def start_gateway(
    procs: Processes,
    name: str,
    *,
    upstream_port: int,
    redis_port: int | None = None,
    redis_url: str | None = None,
    on_error: str,
    workers: int,
    shutdown_timeout: float = 10.0,
) -> Gateway:
    """`python -m gateway run --config <generated> --workers N`; ready when /healthz and an
    anonymous request through it answer 200. Redis is one redis-server on `redis_port`, or
    any URL the gateway takes (`redis_url`: redis+cluster://..., redis+sentinel://...)."""
    if (redis_port is None) == (redis_url is None):
        raise ValueError("start_gateway: give redis_port or redis_url, not both or neither")
    url = redis_url or f"redis://127.0.0.1:{redis_port}/0"
    port, admin_port = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    lots = {"rate": 100_000, "burst": 100_000}  # nothing is 429: the outcomes are the faults'
    config: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}", "shutdown_timeout": shutdown_timeout},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": token},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "redis": {
            "url": url,
            "timeout": REDIS_TIMEOUT,
            "on_error": on_error,
        },
        "rate_limits": {"device": lots, "anonymous": lots},
        # Every simulated device comes from one loopback address: lift its new-device budget.
        "devices": {"registration_limit": lots},
        "log": {"access": False, "level": "warning"},
    }
    path = procs.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    gateway = [sys.executable, "-m", "gateway"]
    code, out = run_bounded([*gateway, "check-config", "--config", str(path)], 60, gateway_env())
    if code != 0:
        raise BenchError(f"{name}: the generated config is refused:\n{out}")
    argv = [*gateway, "run", "--config", str(path), "--workers", str(workers)]
    proc = procs.start(name, argv, env=gateway_env())
    health = f"http://127.0.0.1:{admin_port}/healthz"
    wait_until(proc, f"{health} answering 200", lambda: http_status(health) == 200, START_TIMEOUT)
    public = f"http://127.0.0.1:{port}"
    ok = lambda: http_status(public + "/") == 200  # noqa: E731
    wait_until(proc, f"{public}/ answering 200", ok, START_TIMEOUT)
    return Gateway(proc, public, f"http://127.0.0.1:{admin_port}", token, workers)


def stop_gracefully(proc: Proc, timeout: float) -> int | None:
    """SIGTERM the gateway and wait for its exit code (None when it outlived `timeout`)."""
    proc.popen.send_signal(signal.SIGTERM)
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


async def records(admin: AdminClient) -> dict[str, tuple[str, int]]:
    """Every device record through the admin API: id -> (first_seen, request_count)."""
    found: dict[str, tuple[str, int]] = {}
    page = 1
    while True:
        devices, total = await admin.list_devices(page=page, amount=1000)
        for device in devices:
            found[device["id"]] = (str(device["first_seen"]), int(device["request_count"]))
        if len(devices) < 1000 or len(found) >= total:
            return found
        page += 1


def lost(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]) -> list[str]:
    """Ids recorded before that are gone after, or whose record went back in time."""
    gone = []
    for device_id, (first_seen, count) in before.items():
        now = after.get(device_id)
        if now is None or now[0] != first_seen or now[1] < count:
            gone.append(device_id)
    return gone


@dataclass(frozen=True, slots=True)
class Context:
    """What every scenario shares: the processes, the upstream and the run's options."""

    procs: Processes
    upstream_port: int
    seconds: float  # outage or overload length
    rate: float  # open-loop requests per second of the fault scenarios
    workers: int  # gateway worker processes
    devices: int = 200  # simulated fleet size
    blocked_share: float = 0.05  # of the fleet, blocked before the load
