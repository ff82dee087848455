"""Admin listing at scale: fills a private redis-server with N devices, times the list calls.

    .venv/bin/python bench/list_scale.py --devices 1000000

Starts its own redis-server on a free loopback port (nothing else is touched), registers the
devices through the real enforce script (pipelined), blocks 1 in 100 and renames 1 in 1000,
then times: page 1 / a deep page for blocked=all|hide|only, and a name search. Also prints
Redis memory per device. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import redis

from gateway.config import RedisSettings
from gateway.model import Bucket
from gateway.store import Store
from gateway.store.scripts import load_script

APPS = ("FieldApp", "Courier", "Scanner Pro", "MeterRead")
MODELS = (
    ("Samsung", "Galaxy S24"),
    ("Apple", "iPhone 15"),
    ("Zebra", "TC52"),
    ("Google", "Pixel 8"),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], int, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="devicegate-bench-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_timeout=1)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    return proc, port, workdir


def fill(port: int, store: Store, count: int) -> None:
    """Register `count` devices through the enforce script, pipelined in batches."""
    client = redis.Redis(port=port)
    script = client.register_script(load_script("enforce.lua"))
    bucket = Bucket(rate=10, burst=20)
    now = time.time_ns() // 1000 - count * 1000
    batch = 5000
    for start in range(0, count, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + batch, count)):
            device_id = f"device-{i:07d}"
            manufacturer, model = MODELS[i % len(MODELS)]
            script(
                keys=store.keys.enforce(device_id),
                args=[now + i * 1000, bucket.rate_milli, bucket.burst, "1", 50, device_id,
                      APPS[i % len(APPS)], f"{i % 5}.{i % 7}", "Android", "15", manufacturer,
                      model],
                client=pipe,
            )  # fmt: skip
        pipe.execute()
    client.close()


async def timed(label: str, call: Callable[[], Awaitable[Any]], rows: list[list[str]]) -> Any:
    started = time.perf_counter()
    result = await call()
    elapsed = time.perf_counter() - started
    devices, total = result
    rows.append([label, f"{elapsed * 1000:,.1f} ms", str(len(devices)), f"{total:,}"])
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=100_000)
    args = parser.parse_args()

    proc, port, workdir = start_redis()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        store = Store.from_settings(RedisSettings(url=url, timeout=5.0))
        base = redis.Redis(port=port).info("memory")["used_memory"]
        started = time.perf_counter()
        fill(port, store, args.devices)
        fill_s = time.perf_counter() - started
        used = redis.Redis(port=port).info("memory")["used_memory"] - base
        for i in range(0, args.devices, 100):
            await store.block(f"device-{i:07d}")
        for i in range(0, args.devices, 1000):
            await store.rename(f"device-{i:07d}", f"Warehouse scanner {i}")

        rows: list[list[str]] = []
        deep = max(1, args.devices // 2 // 20)
        calls: list[tuple[str, dict[str, Any]]] = [
            ("list blocked=all page=1", {}),
            ("list blocked=hide page=1", {"blocked": "hide"}),
            ("list blocked=only page=1", {"blocked": "only"}),
            ("list blocked=all page=50", {"page": 50}),
            ("list blocked=hide page=50", {"blocked": "hide", "page": 50}),
            (f"list blocked=all page={deep:,} (middle)", {"page": deep}),
            ("search name='warehouse'", {"name": "warehouse"}),
            ("search name='device-00012'", {"name": "device-00012"}),
            ("search name='warehouse' blocked=only", {"name": "warehouse", "blocked": "only"}),
        ]
        for label, kwargs in calls:
            await timed(label, partial(store.list_devices, **kwargs), rows)
        await store.close()

        print(f"devices: {args.devices:,} (filled in {fill_s:.1f} s through enforce.lua)")
        print(
            f"redis memory: {used / args.devices:,.0f} bytes per device (record + indexes + bucket)"
        )
        width = max(len(r[0]) for r in rows)
        print(f"{'call':<{width}}  {'time':>12}  {'rows':>5}  {'total':>10}")
        for label, elapsed, count, total in rows:
            print(f"{label:<{width}}  {elapsed:>12}  {count:>5}  {total:>10}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
