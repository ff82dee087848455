#!/usr/bin/env python3
"""What one request costs Redis, in instructions: enforce.lua a call, or a tick's batch.

Starts a redis-server under `valgrind --tool=callgrind` on a free loopback port, registers
`--devices` devices through the data plane's store client (gateway.store.clients), then
counts redis-server's instructions while `--callers` concurrent callers send `--requests`
enforce calls over known devices: once with each request its own EVALSHA of enforce.lua,
once with each event-loop tick's calls as one EVALSHA of enforce_batch.lua (what the
gateway does). Instructions, not seconds: the count is the same on a busy machine.

    .venv/bin/python bench/redis_cost.py            # about a minute
    .venv/bin/python bench/redis_cost.py --help

Everything on 127.0.0.1; the server is stopped at the end, also on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gateway.model import Bucket, DeviceIdentity  # noqa: E402
from gateway.redis_topology import parse_redis_url  # noqa: E402
from gateway.store.clients import script_caller  # noqa: E402
from gateway.store.enforce_script import EnforceScript  # noqa: E402
from gateway.store.keys import KeySchema  # noqa: E402
from gateway.store.scripts import load_script  # noqa: E402

START_TIMEOUT: Final = 60.0  # seconds for redis-server to answer under valgrind
CALL_TIMEOUT: Final = 30.0  # seconds per call: valgrind slows Redis about 50 times
BUCKET: Final = Bucket(rate=1_000_000, burst=1_000_000)  # nothing is limited


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def totals(path: Path) -> int:
    """The instructions a callgrind dump counted."""
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


async def drive(url: str, batched: bool, devices: int, callers: int, requests: int) -> None:
    """`requests` enforce calls over `devices` known devices from `callers` callers."""
    caller = script_caller(
        parse_redis_url(url),
        load_script("enforce.lua"),
        timeout=CALL_TIMEOUT,
        batch=load_script("enforce_batch.lua") if batched else None,
    )

    async def fallback(keys: object, args: object) -> object:
        raise AssertionError("the pipeline serves every call")

    script = EnforceScript(
        KeySchema("dg"), None, pipeline=caller, fallback=fallback, history_size=50, clock=None
    )
    fleet = [DeviceIdentity(f"dev-{i:07d}", "FieldApp", "2.4.1", "Android") for i in range(devices)]
    rng = random.Random(1)
    left = requests

    async def one_caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await script.enforce(rng.choice(fleet), "198.51.100.7", BUCKET, upload=False)

    try:
        await asyncio.gather(*(one_caller() for _ in range(callers)))
    finally:
        await caller.close()


def measure(args: argparse.Namespace, batched: bool) -> float:
    """Instructions per request of one redis-server, one mode."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory(prefix="devicegate-redis-cost-") as tmp:
        out = Path(tmp) / "cg.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        command += ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", tmp]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("redis-server did not start under valgrind") from None
                    time.sleep(0.2)
            # Every device registered, so the measured calls are a known device's.
            asyncio.run(drive(url, batched, args.devices, args.callers, 2 * args.devices))
            control("-z", str(server.pid))
            asyncio.run(drive(url, batched, args.devices, args.callers, args.requests))
            control("-d", str(server.pid))
            dumps = sorted(Path(tmp).glob("cg.out.*"), key=lambda p: p.stat().st_mtime)
            return totals(dumps[-1]) / int(args.requests)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=1000, help="known devices (1000)")
    p.add_argument("--callers", type=int, default=64, help="concurrent callers (64)")
    p.add_argument("--requests", type=int, default=5000, help="measured calls (5000)")
    args = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            print(f"redis_cost: {tool} not found", file=sys.stderr)
            return 1
    print(f"redis-server instructions per request, {args.requests:,} calls, "
          f"{args.callers} callers, {args.devices:,} known devices")  # fmt: skip
    alone = measure(args, batched=False)
    print(f"  enforce.lua, one EVALSHA a request        {alone:10,.0f}")
    batched = measure(args, batched=True)
    print(f"  enforce_batch.lua, one EVALSHA a tick     {batched:10,.0f}   {batched / alone:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
