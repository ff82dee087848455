"""One load run against one target, and the CPU and Redis work it caused."""

from __future__ import annotations

import signal
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from loadgen import Load
from procs import BenchError, Proc, cpu_seconds
from servers import RedisServer

# The calls that run a script: one of them per request is one Redis round trip.
SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")


@dataclass
class Target:
    """One thing the load is pointed at."""

    key: str
    label: str
    port: int
    proc: Proc
    redis: RedisServer | None = None  # measured beside it: the gateway's store

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Sample:
    """One load run against one target, with the CPU and Redis work it caused."""

    rps: float
    p50_us: float
    p99_us: float
    requests: int
    errors: int
    cpu_us_per_req: float
    upstream_cpu_us_per_req: float | None = None
    redis_cpu_us_per_req: float | None = None
    redis_commands_per_req: float | None = None
    redis_script_calls_per_req: float | None = None
    redis_by_command: dict[str, float] = field(default_factory=dict)


def all_alive(target: Target, upstream: Proc) -> None:
    """Fail loudly, with its log, when a process the target needs has exited."""
    for proc in (target.proc, upstream) + ((target.redis.proc,) if target.redis else ()):
        if not proc.alive():
            code = proc.popen.returncode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise BenchError(
                f"{proc.name} exited ({how}) during the run against {target.label}; "
                f"its log ({proc.log}):\n{proc.log_tail()}"
            )


def measure(target: Target, load: Load, connections: int, seconds: float, upstream: Proc) -> Sample:
    """One load run; CPU of the target's process tree (and Redis) around it."""
    cpu0 = cpu_seconds(target.proc.pid)
    up0 = cpu_seconds(upstream.pid)
    if target.redis:
        rcpu0, cmds0 = target.redis.cpu(), target.redis.commands()
    try:
        result = load.run(target.url, connections, seconds)
    finally:
        # A process that died explains a failed run better than the load tool's message.
        all_alive(target, upstream)
    cpu1 = cpu_seconds(target.proc.pid)
    up1 = cpu_seconds(upstream.pid)
    n = result.requests
    if n == 0:
        raise BenchError(f"{target.label}: no request completed in {seconds:g} s")
    sample = Sample(
        rps=result.rps,
        p50_us=result.p50_us,
        p99_us=result.p99_us,
        requests=n,
        errors=result.non_2xx + result.socket_errors,
        cpu_us_per_req=(cpu1 - cpu0) / n * 1e6,
        upstream_cpu_us_per_req=None if target.proc is upstream else (up1 - up0) / n * 1e6,
    )
    if target.redis:
        rcpu1, cmds1 = target.redis.cpu(), target.redis.commands()
        delta = {k: v - cmds0.get(k, 0) for k, v in cmds1.items() if v - cmds0.get(k, 0) > 0}
        sample.redis_cpu_us_per_req = (rcpu1 - rcpu0) / n * 1e6
        sample.redis_commands_per_req = sum(delta.values()) / n
        sample.redis_script_calls_per_req = sum(delta.get(c, 0) for c in SCRIPT_COMMANDS) / n
        sample.redis_by_command = {k: round(v / n, 4) for k, v in sorted(delta.items())}
    if sample.errors > n // 100:
        print(
            f"  warning: {target.label}: {sample.errors:,} of {n:,} requests were errors "
            f"or non-2xx; see its log {target.proc.log}",
            file=sys.stderr,
        )
    return sample


def medians(samples: list[Sample]) -> dict[str, Any]:
    """Each figure's median over the rounds, and the rounds themselves."""
    out: dict[str, Any] = {}
    for name in (
        "rps",
        "p50_us",
        "p99_us",
        "cpu_us_per_req",
        "upstream_cpu_us_per_req",
        "redis_cpu_us_per_req",
        "redis_commands_per_req",
        "redis_script_calls_per_req",
    ):
        values = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        out[name] = statistics.median(values) if values else None
    out["errors"] = sum(s.errors for s in samples)
    out["requests"] = sum(s.requests for s in samples)
    out["rps_min"] = min(s.rps for s in samples)
    out["rps_max"] = max(s.rps for s in samples)
    out["rounds"] = [asdict(s) for s in samples]
    return out
