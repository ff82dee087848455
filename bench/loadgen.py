"""Load generators for the benchmark: wrk when installed, else `gateway loadtest`, else a
small closed-loop aiohttp client. All three send the same fleet of device headers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from procs import BenchError, run_bounded

HERE = Path(__file__).resolve().parent
FLEET_LUA = HERE / "fleet.lua"
PATH = "/api/v1/orders?status=open&page=1"
# The same fleet as fleet.lua, for the clients that are not wrk.
APPS = (
    ("FieldApp", "2.4.1"),
    ("Courier", "5.0.3"),
    ("Scanner Pro", "1.9.0"),
    ("MeterRead", "3.2.7"),
    ("FieldApp", "2.5.0"),
)
HARDWARE = (
    ("Android", "15", "Samsung", "Galaxy S24"),
    ("iOS", "18.1", "Apple", "iPhone 15"),
    ("Android", "13", "Zebra", "TC52"),
    ("Android", "14", "Google", "Pixel 8"),
    ("Android", "11", "Honeywell", "CT45"),
    ("iOS", "17.6", "Apple", "iPad (10th generation)"),
)
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
LOADTEST_SCHEMA = "devicegate-loadtest/1"
GRACE = 30.0  # seconds a load run may overrun its duration before it is killed


def fleet_headers(i: int, prefix: str) -> dict[str, str]:
    """The identification headers of device `i`, as fleet.lua sends them."""
    app, version = APPS[i % len(APPS)]
    os_name, os_version, maker, model = HARDWARE[i % len(HARDWARE)]
    return {
        "X-Device-Id": f"{prefix}{i:07d}",
        "X-App-Name": app,
        "X-App-Version": version,
        "X-OS-Name": os_name,
        "X-OS-Version": os_version,
        "X-Device-Manufacturer": maker,
        "X-Device-Model": model,
        "User-Agent": f"{app}/{version} ({os_name} {os_version}; {maker} {model})",
        "Accept": "application/json",
        "Authorization": f"Bearer tok_{(i * 2654435761) % 4294967296:016x}",
    }


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One load run against one target."""

    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    non_2xx: int
    socket_errors: int


def _us(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def _wrk_error_counts(text: str) -> tuple[int, int]:
    """(non-2xx answers, socket errors) from a wrk summary."""
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return (
        int(non_2xx.group(1)) if non_2xx else 0,
        sum(int(g) for g in sock.groups()) if sock else 0,
    )


def parse_wrk(text: str) -> LoadResult:
    """Requests, req/s, p50, p99 and errors from `wrk --latency` output."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    if not (done and rps and p50 and p99):
        raise BenchError(f"cannot read wrk's output:\n{text}")
    non_2xx, socket_errors = _wrk_error_counts(text)
    return LoadResult(
        requests=int(done.group(1)),
        seconds=_us(done.group(2), done.group(3)) / 1e6,
        rps=float(rps.group(1)),
        p50_us=_us(*p50.groups()),
        p99_us=_us(*p99.groups()),
        non_2xx=non_2xx,
        socket_errors=socket_errors,
    )


def wrk_errors(text: str) -> int | None:
    """Non-2xx answers plus socket errors from any wrk summary; None when there is none."""
    if not re.search(r"\d+ requests in", text):
        return None
    return sum(_wrk_error_counts(text))


def fleet_env(mode: str, count: int, prefix: str, first: int = 0) -> dict[str, str]:
    """The environment fleet.lua reads its settings from."""
    env = dict(os.environ)
    env.update(FLEET_MODE=mode, FLEET_COUNT=str(count), FLEET_PREFIX=prefix, FLEET_FIRST=str(first))
    return env


class Load:
    """Runs the same closed-loop load on any URL with whichever tool is available."""

    def __init__(self, tool: str, wrk: str | None, gateway: Path, devices: int) -> None:
        self.tool = tool  # "wrk", "loadtest" or "builtin"
        self.wrk = wrk
        self.gateway = gateway
        self.devices = devices

    @classmethod
    def choose(cls, wanted: str, gateway: Path, devices: int) -> Load:
        """`auto`: wrk if installed, else `gateway loadtest` if it exists, else built in."""
        wrk = shutil.which("wrk")
        if wanted in ("auto", "wrk") and wrk:
            return cls("wrk", wrk, gateway, devices)
        if wanted == "wrk":
            raise BenchError("--load wrk: wrk is not installed (apt-get install wrk)")
        if wanted in ("auto", "loadtest") and _has_loadtest(gateway):
            return cls("loadtest", None, gateway, devices)
        if wanted == "loadtest":
            raise BenchError(f"--load loadtest: `{gateway} loadtest --help` fails")
        return cls("builtin", None, gateway, devices)

    def run(self, url: str, connections: int, seconds: float) -> LoadResult:
        """`connections` closed-loop connections for `seconds`, rotating over the fleet."""
        if self.tool == "wrk":
            assert self.wrk is not None
            argv = [self.wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
            argv += ["-s", str(FLEET_LUA), url]
            code, out = run_bounded(
                argv, seconds + GRACE, env=fleet_env("rotate", self.devices, "dev-")
            )
            if code != 0:
                raise BenchError(f"wrk exited with {code}:\n{out}")
            return parse_wrk(out)
        if self.tool == "loadtest":
            return self._loadtest(url, connections, seconds)
        return asyncio.run(closed_loop(url, connections, seconds, self.devices, "dev-"))

    def _loadtest(self, url: str, connections: int, seconds: float) -> LoadResult:
        with tempfile.TemporaryDirectory(prefix="devicegate-loadtest-") as tmp:
            report = Path(tmp) / "report.json"
            argv = [str(self.gateway), "loadtest", "--target", url + PATH]
            argv += ["--devices", str(self.devices), "--concurrency", str(connections)]
            argv += ["--duration", f"{seconds:g}", "--report", str(report), "--no-progress"]
            code, out = run_bounded(argv, seconds + GRACE)
            if code != 0 or not report.is_file():
                raise BenchError(f"gateway loadtest exited with {code}:\n{out}")
            return parse_loadtest(json.loads(report.read_text()))


@dataclass(frozen=True)
class OpenLoopResult:
    """An open-loop run: latencies counted from when each request was due."""

    rate: float
    rps: float
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float
    late_share: float  # requests the generator itself sent more than 1 ms late
    non_2xx: int
    errors: int


def open_loop(gateway: Path, url: str, rate: float, seconds: float, devices: int) -> OpenLoopResult:
    """`gateway loadtest --rate`: a fixed arrival rate, so a slow answer cannot slow the load
    (no coordinated omission)."""
    with tempfile.TemporaryDirectory(prefix="devicegate-openloop-") as tmp:
        report_path = Path(tmp) / "report.json"
        argv = [str(gateway), "loadtest", "--target", url + PATH, "--devices", str(devices)]
        argv += ["--rate", f"{rate:.0f}", "--duration", f"{seconds:g}", "--timeout", "5"]
        argv += ["--report", str(report_path), "--no-progress"]
        code, out = run_bounded(argv, seconds + GRACE)
        if code != 0 or not report_path.is_file():
            raise BenchError(f"gateway loadtest exited with {code}:\n{out}")
        report = json.loads(report_path.read_text())
    if not isinstance(report, dict) or report.get("schema") != LOADTEST_SCHEMA:
        raise BenchError(f"gateway loadtest's report is not {LOADTEST_SCHEMA}")
    requests, latency = report["requests"], report["latency_us"]
    sent = max(int(requests["sent"]), 1)
    return OpenLoopResult(
        rate=rate,
        rps=float(requests["per_second"]),
        p50_us=float(latency["p50"]),
        p99_us=float(latency["p99"]),
        p999_us=float(latency["p99_9"]),
        max_us=float(latency["max"]),
        late_share=int(report["generator"]["late_sends"]) / sent,
        non_2xx=sum(n for c, n in report["status"].items() if not 200 <= int(c) < 300),
        errors=int(requests["errors"]),
    )


def _has_loadtest(gateway: Path) -> bool:
    try:
        code, _ = run_bounded([str(gateway), "loadtest", "--help"], 30)
    except BenchError:
        return False
    return code == 0


def parse_loadtest(report: Any) -> LoadResult:
    """The figures this benchmark needs from a `gateway loadtest --report` file."""
    if not isinstance(report, dict) or report.get("schema") != LOADTEST_SCHEMA:
        raise BenchError(f"gateway loadtest's report is not {LOADTEST_SCHEMA}")
    requests, latency = report["requests"], report["latency_us"]
    statuses = {int(code): int(n) for code, n in report["status"].items()}
    return LoadResult(
        requests=int(requests["answered"]),
        seconds=float(report["elapsed_s"]),
        rps=float(requests["per_second"]),
        p50_us=float(latency["p50"]),
        p99_us=float(latency["p99"]),
        non_2xx=sum(n for code, n in statuses.items() if not 200 <= code < 300),
        socket_errors=int(requests["errors"]),
    )


def _percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    rank = max(0, min(len(sorted_ns) - 1, round(q * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[rank] / 1e3


async def closed_loop(
    url: str,
    connections: int,
    seconds: float,
    devices: int,
    prefix: str,
    first: int = 0,
    stop_after: int | None = None,
) -> LoadResult:
    """The fallback client: `connections` loops, each one request at a time.

    Rotates over `devices` ids; with `stop_after`, sends ids first..first+stop_after-1 once
    each and stops early (registration), still bounded by `seconds`.
    """
    headers = [fleet_headers(first + i, prefix) for i in range(devices)] if not stop_after else []
    latencies: list[int] = []
    statuses: dict[int, int] = {}
    errors = 0
    turn = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal turn, errors
        while time.perf_counter() < deadline:
            if stop_after is not None:
                if turn >= stop_after:
                    return
                h = fleet_headers(first + turn, prefix)
            else:
                h = headers[turn % devices]
            turn += 1
            sent = time.perf_counter_ns()
            try:
                async with session.get(url + PATH, headers=h) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                continue
            latencies.append(time.perf_counter_ns() - sent)

    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.wait_for(
            asyncio.gather(*(one(session) for _ in range(connections))), seconds + GRACE
        )
    elapsed = time.perf_counter() - started
    latencies.sort()
    done = len(latencies)
    return LoadResult(
        requests=done,
        seconds=elapsed,
        rps=done / elapsed if elapsed else 0.0,
        p50_us=_percentile(latencies, 0.50),
        p99_us=_percentile(latencies, 0.99),
        non_2xx=sum(n for status, n in statuses.items() if not 200 <= status < 300),
        socket_errors=errors,
    )
