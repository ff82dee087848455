"""The reliability issue's longer fault scenarios against real processes (see docs/chaos.md).

    bench/chaos [--only NAME ...] [--seconds 10] [--rate 200] [--workers N]

Starts on 127.0.0.1, on free ports, and stops at the end (also on Ctrl-C, SIGTERM or an
error): a counting upstream, then per scenario its own Redis and gateway subprocess
(`python -m gateway run --config <generated>`). Redis is one redis-server, or for
cluster-failover and cluster-reshard a 3+3 Redis Cluster and for sentinel-failover a
primary, a replica and 3 sentinels (the test suite's engines, tests/rig: they need
redis-cli and the test extra, pip install -e '.[test]'). The load is gateway.loadtest's
engine, open loop at a fixed rate, from a simulated fleet with 5% of its devices blocked
through the admin API first. Each scenario checks its pass/fail rules; a table is printed at
the end and the JSON goes to bench/results/chaos-<time>.json. Every scenario runs by
default (3 to 4 minutes on 2 cores); exit status 1 when any scenario fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from chaos_engines import cluster_failover, cluster_reshard, sentinel_failover
from chaos_env import Context, start_upstream
from chaos_redis import redis_black_hole, redis_kill
from chaos_report import Outcome, render_checks, render_table
from chaos_stress import overload, sigterm_under_load
from peers import terminate_as_interrupt
from procs import BenchError, Processes, run_bounded

from gateway import loops
from gateway.errors import GatewayError

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
T = TypeVar("T")

Scenario = Callable[[Context], Awaitable[Outcome]]
SCENARIOS: dict[str, Scenario] = {
    "redis-kill-open": lambda ctx: redis_kill(ctx, "open"),
    "redis-kill-closed": lambda ctx: redis_kill(ctx, "closed"),
    "redis-black-hole": redis_black_hole,
    "overload": overload,
    "sigterm-under-load": sigterm_under_load,
    "cluster-failover": cluster_failover,
    "sentinel-failover": sentinel_failover,
    "cluster-reshard": cluster_reshard,
}


@dataclass(frozen=True, slots=True)
class Options:
    only: list[str]
    seconds: float
    rate: float
    workers: int
    devices: int
    output: Path | None
    keep_workdir: bool


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="outage / overload length; for the failovers, from the kill to the old "
        "primary's restart; for the reshard, how long the slots stay moved (default 10)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="open-loop requests per second of the fault scenarios (default 200)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="gateway worker processes (default: the CPUs, as `gateway run`)",
    )
    p.add_argument("--devices", type=int, default=200, help="simulated devices (default 200)")
    p.add_argument(
        "--output", type=Path, help="JSON file (default bench/results/chaos-<time>.json)"
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    a = p.parse_args(argv)
    if not 0 < a.seconds <= 600:
        p.error("--seconds must be > 0 and <= 600")
    if not 1 <= a.rate <= 100_000:
        p.error("--rate must be within 1..100000")
    if not 1 <= a.workers <= 64:
        p.error("--workers must be within 1..64")
    if not 20 <= a.devices <= 100_000:
        p.error("--devices must be within 20..100000")
    return Options(
        a.only or list(SCENARIOS), a.seconds, a.rate, a.workers, a.devices, a.output, a.keep_workdir
    )


def machine() -> dict[str, Any]:
    redis_version = run_bounded(["redis-server", "--version"], 10)[1].strip()
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0],
            "platform": platform.platform(), "redis": redis_version}  # fmt: skip


async def run_all(opts: Options, procs: Processes, results: dict[str, Any]) -> list[Outcome]:
    """Every chosen scenario in turn, each with its own Redis and gateway, stopped after it."""
    upstream_port = await asyncio.to_thread(start_upstream, procs)
    ctx = Context(procs, upstream_port, opts.seconds, opts.rate, opts.workers, opts.devices)
    outcomes: list[Outcome] = []
    for name in opts.only:
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        keep = len(procs.procs)
        began = time.monotonic()
        try:
            async with asyncio.timeout(3 * opts.seconds + 120):  # never a hung run
                outcome = await SCENARIOS[name](ctx)
        # Whatever stops one scenario is its failure; the next ones still run.
        except (BenchError, GatewayError, aiohttp.ClientError, OSError, TimeoutError,
                ValueError) as exc:  # fmt: skip
            outcome = Outcome(name, error=f"{type(exc).__name__}: {exc}")
        finally:
            for proc in procs.procs[keep:][::-1]:  # this scenario's gateway and Redis
                await asyncio.to_thread(procs.stop, proc)
        outcome.figures["scenario seconds"] = round(time.monotonic() - began, 1)
        outcomes.append(outcome)
        results["scenarios"].append(outcome.as_json())
        print(render_checks(outcome), flush=True)
    return outcomes


async def cancel_on_signals(work: Awaitable[T]) -> T:
    """`work`, cancelled by SIGTERM or SIGHUP through the loop, then KeyboardInterrupt.

    A Python signal handler raising KeyboardInterrupt (peers.terminate_as_interrupt) can
    land inside a transport callback, which uvloop logs and swallows: the run would go on.
    The loop's own handler cancels the run instead, so every finally block stops what it
    started; terminate_as_interrupt's handlers are back for the stop that follows.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await work
    except asyncio.CancelledError:
        if received:
            raise KeyboardInterrupt(received[0].name) from None
        raise
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


def run_blocking(opts: Options, procs: Processes, results: dict[str, Any]) -> list[Outcome]:
    """On uvloop when installed (the load generator needs every cycle), else asyncio's."""
    return loops.run(cancel_on_signals(run_all(opts, procs, results)))


def write_results(results: dict[str, Any], output: Path | None) -> Path:
    path = output or RESULTS / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if shutil.which("redis-server") is None:
        print("bench/chaos: redis-server is not installed", file=sys.stderr)
        return EXIT_FAILED
    workdir = Path(tempfile.mkdtemp(prefix="devicegate-chaos-"))
    procs = Processes(workdir)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": {
            "only": opts.only,
            "seconds": opts.seconds,
            "rate": opts.rate,
            "workers": opts.workers,
            "devices": opts.devices,
        },
        "machine": machine(),
        "scenarios": [],
    }
    outcomes: list[Outcome] = []
    code = EXIT_FAILED
    try:
        with terminate_as_interrupt():
            outcomes = run_blocking(opts, procs, results)
        code = 0 if outcomes and all(o.passed for o in outcomes) else EXIT_FAILED
    except BenchError as exc:
        results["error"] = str(exc)
        print(f"\nbench/chaos: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        results["error"] = "interrupted"
        print("\nbench/chaos: interrupted; stopping everything", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        procs.stop_all()
    results["passed"] = code == 0
    print(f"\n{render_table(outcomes)}" if outcomes else "\nno scenario ran")
    print(f"\nresults: {write_results(results, opts.output)}")
    procs.clean_up(keep=bool(code) or opts.keep_workdir)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
