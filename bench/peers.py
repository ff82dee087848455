"""devicegate beside its peers, in one run (see docs/bench.md).

    bench/run [--quick] [--rounds 3] [--duration 10] [--devices-max 1000000] ...

Starts on 127.0.0.1, all on free ports and all stopped at the end (also on Ctrl-C or an
error): a fast upstream (nginx `return 200`, else a small aiohttp app), redis-server, and
the targets: the upstream alone, nginx as a keep-alive reverse proxy, the openresty peer
(nginx + lua-nginx-module, one Redis script per request, N workers), the gateway on Redis
with 1 and N workers, the gateway on memory://. The same load hits each target for the
same time, interleaved over rounds; medians are printed with CPU per request, Redis cost
per request and the throughput ratios. Then a fresh gateway registers 100,000 and
1,000,000 devices, and its RSS and Redis's memory per device are read.
Prints a table; writes bench/results/peers-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bare_proxy import command, compile_proxy
from loadgen import (
    FLEET_LUA,
    GRACE,
    Load,
    LoadResult,
    closed_loop,
    fleet_env,
    open_loop,
    wrk_errors,
)
from measure import Sample, Target, measure, medians
from openresty_peer import KEY_PREFIX, find_lua_nginx, start_peer
from procs import (
    BenchError,
    Proc,
    Processes,
    free_port,
    http_status,
    rss_bytes,
    tree,
    wait_until,
)
from report import report
from servers import (
    PROXY_BODY,
    START_TIMEOUT,
    Gateway,
    RedisServer,
    device_total,
    gateway_has_workers,
    start_gateway,
    start_nginx,
    start_upstream,
    version_of,
    which,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SCALE_STEPS = (100_000, 1_000_000)
PEER = "openresty-peer"  # its target key
BARE = ("bare-proxy", "bare-proxy-redis")  # bench/bare_proxy.py, without and with Redis
MIN_REGISTER_RATE = 500  # devices/s assumed at worst when bounding a registration step


# ---- settings -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """What to run, after --quick and the defaults are applied."""

    rounds: int
    duration: int  # whole seconds: wrk takes no fractions
    latency_duration: int
    open_duration: int
    warmup: int
    connections: int
    devices: int
    workers: int
    devices_max: int
    load: str
    upstream: str
    output: Path | None
    keep_workdir: bool


def parse_args(argv: list[str] | None = None) -> Options:
    """Command-line options; --quick changes the defaults, explicit values still win."""
    p = argparse.ArgumentParser(
        prog="bench/run", description="Measure devicegate beside nginx, in one run."
    )
    p.add_argument(
        "--quick", action="store_true", help="short runs, 1 round, up to 100,000 devices"
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--duration", type=int, help="seconds per c64 run (default 10; --quick 3)")
    p.add_argument("--latency-duration", type=int, help="seconds per c1 run (default 5; --quick 2)")
    p.add_argument(
        "--open-duration",
        type=int,
        help="seconds per open-loop run at half a gateway's rate (default 10; --quick 3; 0: none)",
    )
    p.add_argument(
        "--warmup", type=int, help="seconds of warm-up per target (default 2; --quick 1)"
    )
    p.add_argument("--connections", type=int, default=64, help="connections of the load (64)")
    p.add_argument("--devices", type=int, default=1000, help="device ids the load rotates over")
    p.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)), help="N (default: CPUs)"
    )
    p.add_argument(
        "--devices-max",
        type=int,
        help="largest registration step: 100000 and/or 1000000, or another count; 0 skips "
        "the step (default 1000000; --quick 100000)",
    )
    p.add_argument(
        "--load",
        choices=("auto", "wrk", "loadtest", "builtin"),
        default="auto",
        help="load generator (auto: wrk, else gateway loadtest, else built in)",
    )
    p.add_argument(
        "--upstream",
        choices=("auto", "nginx", "aiohttp"),
        default="auto",
        help="upstream server (auto: nginx when installed)",
    )
    p.add_argument(
        "--output", type=Path, help="JSON file (default bench/results/peers-<time>.json)"
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    a = p.parse_args(argv)

    def pick(value: Any, normal: Any, quick: Any) -> Any:
        return value if value is not None else quick if a.quick else normal

    opts = Options(
        rounds=pick(a.rounds, 3, 1),
        duration=pick(a.duration, 10, 3),
        latency_duration=pick(a.latency_duration, 5, 2),
        open_duration=pick(a.open_duration, 10, 3),
        warmup=pick(a.warmup, 2, 1),
        connections=a.connections,
        devices=a.devices,
        workers=a.workers,
        devices_max=pick(a.devices_max, 1_000_000, 100_000),
        load=a.load,
        upstream=a.upstream,
        output=a.output,
        keep_workdir=a.keep_workdir,
    )
    if opts.rounds < 1 or opts.duration < 1 or opts.latency_duration < 1:
        p.error("--rounds, --duration and --latency-duration must be >= 1")
    if opts.warmup < 0 or opts.open_duration < 0:
        p.error("--warmup and --open-duration must be >= 0")
    if opts.connections < 1 or opts.devices < 1 or opts.workers < 1 or opts.devices_max < 0:
        p.error("--connections, --devices and --workers must be >= 1, --devices-max >= 0")
    return opts


def scale_steps(devices_max: int) -> list[int]:
    """The registration steps: 100,000 and 1,000,000 up to the maximum, else the maximum."""
    steps = [s for s in SCALE_STEPS if s <= devices_max]
    return steps or ([devices_max] if devices_max > 0 else [])


# ---- machine ----


def gateway_build() -> str:
    """How the gateway under test is built (bench/run runs it from this interpreter's venv):
    its data plane compiled with mypyc, or plain Python."""
    spec = importlib.util.find_spec("gateway.dataplane.exchange")
    origin = (spec.origin or "") if spec else ""
    return "compiled (mypyc)" if origin.endswith(".so") else "plain Python"


def machine_info(nginx: str | None, wrk: str | None, redis_server: str | None) -> dict[str, Any]:
    """What the figures depend on: CPUs, versions, the commit measured."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    packages = {}
    for name in ("aiohttp", "redis", "hiredis", "uvloop", "orjson", "devicegate"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    commit = version_of(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = version_of(["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway"])
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model.group(1).strip() if model else None,
        "mem_total_mb": int(mem.group(1)) // 1024 if mem else None,
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}"
        f" ({os.path.realpath(sys.executable)})",
        "nginx": version_of([nginx, "-v"]) if nginx else None,
        "wrk": version_of([wrk, "-v"]) if wrk else None,
        "redis": version_of([redis_server, "--version"]) if redis_server else None,
        "packages": packages,
        "gateway_build": gateway_build(),
        "commit": f"{commit}{' (gateway/ modified)' if dirty else ''}" if commit else None,
        "loadavg_at_start": os.getloadavg(),
    }


# ---- registering devices ------------------------------------------------------------------


def register(
    procs: Processes, load: Load, gateway: Gateway, first: int, count: int, total_before: int
) -> dict[str, Any]:
    """Send ids fleet-<first> .. fleet-<first+count-1> once each through the gateway."""
    url = f"http://127.0.0.1:{gateway.port}"
    cap = count / MIN_REGISTER_RATE + 60
    target_total = total_before + count
    started = time.monotonic()
    errors: int | None = None
    if load.wrk:
        argv = [load.wrk, "-t1", "-c64", f"-d{cap:.0f}s", "-s", str(FLEET_LUA), url]
        proc = procs.start("register-wrk", argv, env=fleet_env("register", count, "fleet-", first))
        while proc.alive() and time.monotonic() - started < cap + GRACE:
            if device_total(gateway) >= target_total:
                break
            time.sleep(1.0)
        if proc.alive():
            proc.popen.send_signal(signal.SIGINT)  # wrk prints its summary on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
        procs.stop(proc)
        errors = wrk_errors(proc.log.read_text(errors="replace"))
    else:
        result = _run_async_register(url, first, count, cap)
        errors = result.non_2xx + result.socket_errors
    seconds = time.monotonic() - started
    registered = device_total(gateway) - total_before
    return {"registered": registered, "seconds": seconds, "errors": errors}


def _run_async_register(url: str, first: int, count: int, cap: float) -> LoadResult:
    return asyncio.run(closed_loop(url, 64, cap, 0, "fleet-", first, stop_after=count))


def rss_of(proc: Proc) -> dict[str, int]:
    """VmRSS of every process of a target: the leader first, then its descendants."""
    out = {}
    for pid in tree(proc.pid):
        rss = rss_bytes(pid)
        if rss is not None:
            out[str(pid)] = rss
    return out


def scale(
    procs: Processes,
    load: Load,
    binary: Path,
    upstream_port: int,
    store: RedisServer,
    workers: int | None,
    steps: list[int],
    results: dict[str, Any],
) -> None:
    """A fresh gateway registers the devices; its RSS and Redis's memory after each step.

    Fills results["scale"] step by step, so a failure keeps the steps already measured.
    """
    # rate 0.001/s: a device's bucket stays (not full) for 1000 s, so Redis memory per
    # device counts record + indexes + bucket, the worst case the issue asks about.
    gateway = start_gateway(
        procs,
        binary,
        "gateway-scale",
        upstream_port=upstream_port,
        store_url=store.url,
        workers=workers,
        key_prefix="scale",
        device_limit={"rate": 0.001, "burst": 1000},
    )
    base_total = device_total(gateway)
    base_memory, base_keys = store.used_memory(), store.keys()
    rows: list[dict[str, Any]] = [
        {"devices": 0, "rss_bytes": rss_of(gateway.proc), "redis_used_memory": base_memory}
    ]
    results["scale"] = {"workers": gateway.workers, "steps": rows}
    print(f"\nregistering devices through a fresh gateway ({gateway.workers} worker(s), Redis)")
    done = 0
    for step in steps:
        print(f"  {done:,} -> {step:,} devices ...", flush=True)
        got = register(procs, load, gateway, done, step - done, base_total + done)
        time.sleep(1.0)
        total = device_total(gateway) - base_total
        memory, keys = store.used_memory(), store.keys()
        row = {
            "devices": step,
            "registered": total,
            "complete": total >= step,
            "seconds": round(got["seconds"], 1),
            "devices_per_s": round(got["registered"] / got["seconds"]) if got["seconds"] else None,
            "errors": got["errors"],
            "rss_bytes": rss_of(gateway.proc),
            "redis_used_memory": memory,
            "redis_bytes_per_device": (memory - base_memory) / total if total else None,
            "redis_keys_per_device": (keys - base_keys) / total if total else None,
        }
        rows.append(row)
        if not row["complete"]:
            print(
                f"  warning: only {total:,} of {step:,} devices registered within "
                f"{got['seconds']:.0f} s; stopping the registration here",
                file=sys.stderr,
            )
            break
        done = step
    procs.stop(gateway.proc)


def start_bare(
    procs: Processes, name: str, argv: list[str], port: int, timeout: float = START_TIMEOUT
) -> Proc:
    """A bare proxy (bench/bare_proxy.py), ready when it answers 200 on `port`."""
    proc = procs.start(name, argv)
    url = f"http://127.0.0.1:{port}/"
    wait_until(proc, f"{url} answering 200", lambda: http_status(url) == 200, timeout)
    return proc


# ---- open loop ----


def open_loop_pass(
    opts: Options, binary: Path, targets: list[Target], figures: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Each gateway at half the rate it reached at c64, and the upstream alone at the same
    rate, from `gateway loadtest --rate` (latency from when each request was due)."""
    by_key = {t.key: t for t in targets}
    runs: dict[str, Any] = {}
    for key in ("gateway-1w", "gateway-Nw"):
        if key not in by_key:
            continue
        rate = figures[key]["load"]["rps"] / 2
        row: dict[str, Any] = {"rate": rate}
        for side, target in (("upstream", by_key["upstream"]), ("gateway", by_key[key])):
            print(f"  open loop: {target.label} at {rate:,.0f} req/s", flush=True)
            try:
                got = open_loop(binary, target.url, rate, opts.open_duration, opts.devices)
            except BenchError as exc:
                row[side] = {"error": " ".join(str(exc).split())[:160]}
                continue
            row[side] = asdict(got)
            time.sleep(0.5)
        runs[key] = row
    return runs


# ---- the run ----


def run(opts: Options, procs: Processes, results: dict[str, Any]) -> None:
    """Start everything, measure, print; `results` fills as figures arrive."""
    binary = Path(sys.executable).parent / "gateway"
    if not binary.exists():
        raise BenchError(f"{binary} not found: run bench/run, which installs the venv")
    nginx = which("nginx")
    if opts.upstream == "nginx" and not nginx:
        raise BenchError("--upstream nginx: nginx is not installed (apt-get install nginx-light)")
    if opts.upstream == "aiohttp":
        nginx = None
    redis_server = which("redis-server")
    load = Load.choose(opts.load, binary, opts.devices)
    workers_flag = gateway_has_workers(binary)
    notes: list[str] = results["notes"]
    results["machine"] = machine_info(which("nginx"), which("wrk"), redis_server)
    results["settings"] = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "load_tool": load.tool,
        "gateway_workers_flag": workers_flag,
    }

    if not nginx:
        notes.append(
            "no nginx (not installed, or --upstream aiohttp): the upstream is "
            "bench/upstream.py and there is no nginx-proxy target"
        )
    if not redis_server:
        notes.append("redis-server not installed: only the memory:// gateway is measured")
    if not workers_flag:
        notes.append("`gateway run` has no --workers yet: the N-worker target is skipped")
    elif opts.workers == 1:
        notes.append("1 usable CPU (or --workers 1): the N-worker target is skipped")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    print("starting servers ...", flush=True)
    upstream, upstream_port, upstream_kind = start_upstream(procs, nginx)
    targets = [Target("upstream", f"upstream alone ({upstream_kind})", upstream_port, upstream)]
    if nginx:
        port = free_port()
        proxy = start_nginx(
            procs, nginx, "nginx-proxy", PROXY_BODY.format(port=port, upstream=upstream_port), port
        )
        targets.append(Target("nginx-proxy", "nginx reverse proxy (keep-alive)", port, proxy))
    store = RedisServer(procs, redis_server) if redis_server else None
    if nginx and store:
        # The peer users of Kong and OpenResty would pick: same N workers, same Redis.
        lua = find_lua_nginx(procs, nginx)
        if isinstance(lua, str):
            notes.append(f"the openresty-peer target is skipped: {lua}")
            print(f"note: {notes[-1]}", file=sys.stderr)
        else:
            results["machine"]["openresty_peer"] = lua.versions()
            results["settings"]["openresty_peer"] = {
                "workers": opts.workers,
                "redis": "the gateways' redis-server",
                "key_prefix": KEY_PREFIX,
            }
            port = free_port()
            peer = start_peer(
                procs,
                nginx,
                lua,
                port=port,
                upstream_port=upstream_port,
                redis_port=store.port,
                workers=opts.workers,
            )
            label = f"openresty peer, Redis, {opts.workers} worker{'s' if opts.workers > 1 else ''}"
            targets.append(Target(PEER, label, port, peer, store))
    elif nginx:
        notes.append("no redis-server: the openresty-peer target is skipped")
    # The floor under the gateway: the same protocols and parser, no enforcement; and the
    # same with one pipelined EVALSHA a request (bench/breakdown.py splits the difference).
    bare_argv, build = compile_proxy(procs.workdir / "bare-proxy", sys.executable)
    results["machine"]["bare_proxy_build"] = build
    for key, label, redis_url in (
        (BARE[0], "bare proxy, 1 worker", None),
        (BARE[1], "bare proxy + 1 EVALSHA, 1 worker", store.url if store else None),
    ):
        if key == BARE[1] and not store:
            continue
        port = free_port()
        bare = start_bare(procs, key, command(bare_argv, port, upstream_port, redis_url), port)
        targets.append(Target(key, label, port, bare, store if redis_url else None))
    one = 1 if workers_flag else None
    if store:
        g = start_gateway(
            procs,
            binary,
            "gateway-1w",
            upstream_port=upstream_port,
            store_url=store.url,
            workers=one,
        )
        targets.append(Target("gateway-1w", "gateway, Redis, 1 worker", g.port, g.proc, store))
        if workers_flag and opts.workers > 1:
            g = start_gateway(
                procs,
                binary,
                "gateway-Nw",
                upstream_port=upstream_port,
                store_url=store.url,
                workers=opts.workers,
            )
            label = f"gateway, Redis, {opts.workers} workers"
            targets.append(Target("gateway-Nw", label, g.port, g.proc, store))
    g = start_gateway(
        procs, binary, "gateway-memory", upstream_port=upstream_port, store_url="memory://",
        workers=one,
    )  # fmt: skip
    targets.append(Target("gateway-memory", "gateway, memory://, 1 worker", g.port, g.proc))

    print(
        f"load: {load.tool}, {opts.connections} connections (and 1 for latency), "
        f"{opts.devices:,} device ids, {opts.duration:g} s per run "
        f"({opts.latency_duration:g} s at c1), {opts.rounds} interleaved round(s)",
        flush=True,
    )
    for t in targets:
        if opts.warmup:
            load.run(t.url, opts.connections, opts.warmup)  # pools, caches, the 1,000 devices
    c64: dict[str, list[Sample]] = {t.key: [] for t in targets}
    c1: dict[str, list[Sample]] = {t.key: [] for t in targets}
    for r in range(opts.rounds):
        for t in targets:
            print(f"  round {r + 1}/{opts.rounds}: {t.label}, c{opts.connections}", flush=True)
            c64[t.key].append(measure(t, load, opts.connections, opts.duration, upstream))
            time.sleep(0.5)
        for t in targets:
            print(f"  round {r + 1}/{opts.rounds}: {t.label}, c1", flush=True)
            c1[t.key].append(measure(t, load, 1, opts.latency_duration, upstream))
            time.sleep(0.5)

    figures: dict[str, dict[str, Any]] = {
        t.key: {"label": t.label, "load": medians(c64[t.key]), "latency_c1": medians(c1[t.key])}
        for t in targets
    }
    results["targets"] = figures
    results["ratios"] = ratios_of(figures)
    base = figures["upstream"]
    added = {
        key: {
            "p50_us": f["latency_c1"]["p50_us"] - base["latency_c1"]["p50_us"],
            "p99_us": f["latency_c1"]["p99_us"] - base["latency_c1"]["p99_us"],
        }
        for key, f in figures.items()
        if key != "upstream"
    }
    results["latency_added_c1"] = added

    if opts.open_duration:
        results["open_loop"] = open_loop_pass(opts, binary, targets, figures)

    steps = scale_steps(opts.devices_max)
    if store and steps:
        # The throughput targets on Redis are done: stop them so they hold no memory meanwhile.
        for t in targets:
            if t.key.startswith("gateway") or t.key in (PEER, *BARE):
                procs.stop(t.proc)
        workers = (opts.workers if opts.workers > 1 else 1) if workers_flag else None
        scale(procs, load, binary, upstream_port, store, workers, steps, results)
    elif steps:
        notes.append("no redis-server: device registration (RSS, Redis memory) skipped")


def ratios_of(figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """req/s of the peer, the bare proxies and each gateway over nginx's, the upstream's and
    (gateways) the peer's; and CPU per request over the peer's."""
    base = figures["upstream"]["load"]
    proxy = figures.get("nginx-proxy", {}).get("load")
    peer = figures.get(PEER, {}).get("load")
    ratios: dict[str, dict[str, float | None]] = {}
    for key in (PEER, *BARE, "gateway-1w", "gateway-Nw", "gateway-memory"):
        if key not in figures:
            continue
        m = figures[key]["load"]
        row: dict[str, float | None] = {
            "vs_nginx_proxy": m["rps"] / proxy["rps"] if proxy else None,
            "vs_upstream_alone": m["rps"] / base["rps"],
        }
        if key.startswith("gateway"):
            row["vs_openresty_peer"] = m["rps"] / peer["rps"] if peer else None
            row["cpu_per_req_vs_openresty_peer"] = (
                m["cpu_us_per_req"] / peer["cpu_us_per_req"]
                if peer and peer["cpu_us_per_req"]
                else None
            )
        ratios[key] = row
    return ratios


def write_results(results: dict[str, Any], output: Path | None) -> Path:
    path = output or RESULTS / f"peers-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the finally blocks stop every child."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="devicegate-bench-"))
    workdir.chmod(0o755)  # nginx workers drop to `nobody` when started as root
    procs = Processes(workdir)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": []}
    code = 1
    try:
        with terminate_as_interrupt():
            run(opts, procs, results)
        code = 0
    except BenchError as exc:
        results["error"] = str(exc)
        print(f"\nbench: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        results["error"] = "interrupted"
        print("\nbench: interrupted; stopping everything", file=sys.stderr)
        code = 130
    finally:
        procs.stop_all()
    if "targets" in results:
        print(f"\n{report(results)}")
        print(f"\nresults: {write_results(results, opts.output)}")
    procs.clean_up(keep=bool(code) or opts.keep_workdir)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
