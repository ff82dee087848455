"""`gateway loadtest` against a real test gateway: public and admin listeners on loopback
ports, the embedded store, a tiny upstream that records which devices reached it.

`cli.run` starts its own event loop, so it runs in a worker thread (`asyncio.to_thread`)
while this test's loop serves the gateway. The token bucket runs on real time here (the
tool measures real time), so every run is short: 1.5 to 2 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.app import Running, serve
from gateway.config import parse_config
from gateway.loadtest import cli
from gateway.loadtest.fleet import build_fleet, choose_blocked
from gateway.model import Bucket
from gateway.store import Store
from tests.rig.loadtest_report import REPORT_KEYS
from tests.rig.upstream import CountingUpstream, MakeUpstream
from tests.rig.waits import until

pytestmark = pytest.mark.integration

TOKEN = "loadtest-admin-token-0123456789"
WAIT = 10.0  # seconds: the bound on starting and stopping a gateway


@dataclass
class RunningGateway:
    """A gateway in front of a recording upstream, with its admin API."""

    url: str
    admin_url: str
    upstream: CountingUpstream
    store: Store

    @property
    def upstream_url(self) -> str:
        return self.upstream.url

    @property
    def upstream_ids(self) -> list[str]:
        """The device id of every request the upstream saw ("" for none)."""
        return [seen.device_id or "" for seen in self.upstream.seen]


@pytest.fixture
async def gateway(
    make_upstream: MakeUpstream,
) -> AsyncIterator[Callable[[float, int], Awaitable[RunningGateway]]]:
    """A factory: gateway(rate, burst) serves a gateway whose device bucket is rate/burst.

    It runs `gateway.app.serve` (public and admin listeners on free loopback ports) on the
    embedded store, in front of an upstream that records each device id it saw.
    """
    stores: list[Store] = []
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(rate: float, burst: int) -> RunningGateway:
        upstream = await make_upstream()
        upstream_url = upstream.url
        settings = parse_config(
            "server: {listen: '127.0.0.1:0'}\n"
            f"admin: {{listen: '127.0.0.1:0', token: {TOKEN}}}\n"
            f"upstream: {{url: '{upstream_url}'}}\n"
            f"rate_limits: {{device: {{rate: {rate}, burst: {burst}}}}}\n"
            "log: {access: false}\n",
            "test",
        )
        store = Store.memory()
        stores.append(store)
        ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
        waiting: set[asyncio.Future[Any]] = {ready}
        stop = asyncio.Event()
        task = asyncio.create_task(
            serve(settings, store=store, on_ready=ready.set_result, stop=stop)
        )
        stops.append((stop, task))
        waiting.add(task)
        async with asyncio.timeout(WAIT):
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises why the gateway did not start
        return RunningGateway(
            url=ready.result().public_url,
            admin_url=ready.result().admin_url,
            upstream=upstream,
            store=store,
        )

    yield start
    for stop, task in stops:
        stop.set()
        async with asyncio.timeout(WAIT):
            await task
    for store in stores:
        await store.close()


class Terminal(io.StringIO):
    """Captured stdout that says it is a terminal, for the live progress line."""

    def isatty(self) -> bool:
        return True


async def loadtest(*argv: str, tty: bool = False) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gateway loadtest ARGV`, run through cli.run."""
    parser = argparse.ArgumentParser(prog="gateway")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["loadtest", *argv])
    out, err = (Terminal() if tty else io.StringIO()), io.StringIO()
    code = await asyncio.to_thread(cli.run, args, env={}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def admin(gw: RunningGateway) -> list[str]:
    return ["--admin-url", gw.admin_url, "--admin-token", TOKEN]


async def test_blocked_devices_are_blocked_first_and_never_get_a_2xx(
    gateway: Callable[[float, int], Awaitable[RunningGateway]], tmp_path: Path
) -> None:
    gw = await gateway(1000.0, 1000)
    report_path, plot_path = tmp_path / "report.json", tmp_path / "latency.png"
    code, out, err = await loadtest(
        "--target", f"{gw.url}/api/v1/readings", *admin(gw),
        "--devices", "10", "--rate", "60", "--duration", "1.5", "--seed", "4",
        "--blocked-share", "0.3", "--post-share", "0.2",
        "--report", str(report_path), "--plot", str(plot_path),
    )  # fmt: skip
    assert (code, err) == (0, ""), out
    report = orjson.loads(report_path.read_bytes())
    enf = report["enforcement"]
    fleet = build_fleet(10, seed=4)
    blocked = [fleet[i].id for i in choose_blocked(10, 0.3, seed=4)]
    assert enf["passed"] and enf["blocked_ids"] == blocked and enf["blocked_devices"] == 3
    assert enf["blocked_2xx"] == 0 and set(enf["blocked_answers"]) == {"403"}
    assert enf["blocked_answers"]["403"] == report["status"]["403"] > 0
    assert not set(blocked) & set(gw.upstream_ids)  # the upstream never saw a blocked device
    # No bucket given and none of its own: nothing to check the 429s against, and it says so.
    assert enf["checked_devices"] == 0 and enf["unknown_bucket_devices"] > 0
    assert "pass --bucket-rate/--bucket-burst" in out and "PASSED" in out
    # The run unblocks what it blocked.
    for device_id in blocked:
        device = await gw.store.get_device(device_id)
        assert device is not None and not device.blocked
    assert set(report) == REPORT_KEYS and report["mode"] == "open"
    assert report["requests"]["errors"] == 0 and len(report["timeline"]) >= 1
    assert plot_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


async def run_with_report(*argv: str, tmp_path: Path) -> tuple[int, str, dict[str, Any]]:
    """Run the tool with a JSON report and return (exit code, stdout, report)."""
    path = tmp_path / "report.json"
    code, out, err = await loadtest(*argv, "--report", str(path))
    assert err == "", err
    return code, out, orjson.loads(path.read_bytes())


async def test_a_small_bucket_gives_the_expected_429s_per_device(
    gateway: Callable[[float, int], Awaitable[RunningGateway]], tmp_path: Path
) -> None:
    gw = await gateway(2.0, 3)
    fleet = build_fleet(5, seed=2)
    await gw.store.set_rate_limit(fleet[0].id, Bucket(rate=1.0, burst=1))  # its own bucket
    code, out, report = await run_with_report(
        "--target", gw.url, *admin(gw), "--devices", "5", "--rate", "50", "--duration", "2",
        "--seed", "2", "--bucket-rate", "2", "--bucket-burst", "3",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert code == 0, out
    enf = report["enforcement"]
    assert enf["passed"] and enf["over_limit_devices"] == 0 and enf["checked_devices"] == 5
    assert "PASSED" in out
    devices = {d["id"]: d for d in enf["devices"]}
    assert devices[fleet[0].id]["bucket"] == {"rate": 1.0, "burst": 1}  # read from the admin API
    assert all(devices[d.id]["bucket"] == {"rate": 2.0, "burst": 3} for d in fleet[1:])
    for d in devices.values():
        assert d["allowed"] <= d["max_allowed"]
        assert d["allowed"] + d["limited"] == d["answered"] == d["sent"]
        # The gateway's bucket and the modelled one agree but for requests at the edges.
        assert abs(d["allowed"] - d["modeled_allowed"]) <= 2, d
    # 10 req/s per device on average against 2/s (3 burst): most requests are refused.
    assert 0.5 < enf["share_429"] < 0.9
    assert abs(enf["share_429"] - enf["modeled_share_429"]) < 0.1
    assert report["status"]["429"] == sum(d["limited"] for d in devices.values())


async def test_the_check_fails_when_a_device_gets_more_than_its_bucket(
    gateway: Callable[[float, int], Awaitable[RunningGateway]], tmp_path: Path
) -> None:
    gw = await gateway(1000.0, 1000)  # the gateway lets everything through ...
    code, out, report = await run_with_report(
        "--target", gw.url, "--devices", "3", "--rate", "60", "--duration", "1",
        "--bucket-rate", "2", "--bucket-burst", "3",  # ... but the bucket should be 2/s
        tmp_path=tmp_path,
    )  # fmt: skip
    enf = report["enforcement"]
    assert code == 1 and "FAILED" in out
    assert not enf["passed"] and enf["over_limit_devices"] >= 1 and enf["share_429"] == 0.0


async def test_the_check_fails_when_a_blocked_device_gets_a_2xx(
    gateway: Callable[[float, int], Awaitable[RunningGateway]], tmp_path: Path
) -> None:
    gw = await gateway(1000.0, 1000)
    # Blocked through the gateway's admin API, but the load bypasses the gateway.
    code, out, report = await run_with_report(
        "--target", gw.upstream_url, *admin(gw), "--devices", "4", "--rate", "40",
        "--duration", "1", "--blocked-share", "0.5",
        tmp_path=tmp_path,
    )  # fmt: skip
    enf = report["enforcement"]
    assert code == 1 and "FAILED" in out
    assert enf["blocked_2xx"] > 0 and enf["blocked_answers"] == {"200": enf["blocked_2xx"]}


async def test_a_wrong_admin_token_stops_the_run_before_any_load(
    gateway: Callable[[float, int], Awaitable[RunningGateway]],
) -> None:
    gw = await gateway(1000.0, 1000)
    code, out, err = await loadtest(
        "--target", gw.url, "--admin-url", gw.admin_url, "--admin-token", "not-the-token-0123",
        "--blocked-share", "0.5", "--duration", "1",
    )  # fmt: skip
    assert code == 1 and out == "" and gw.upstream_ids == []
    assert err.startswith("gateway loadtest: Admin API:") and "check the admin token" in err


async def test_closed_loop_with_live_progress_on_a_terminal(
    gateway: Callable[[float, int], Awaitable[RunningGateway]],
) -> None:
    gw = await gateway(1000.0, 1000)
    code, out, err = await loadtest(
        "--target", gw.url, "--devices", "20", "--concurrency", "4", "--duration", "1.5",
        tty=True,
    )  # fmt: skip
    assert (code, err) == (0, ""), out
    progress, _, table = out.rpartition("\n")[0].partition("\ntarget")
    assert progress.count("\r\x1b[2K") >= 2 and "req/s" in progress and "p99" in progress
    assert "closed loop at concurrency 4" in table and "latency (from sent)" in table


async def test_ctrl_c_unblocks_the_devices_the_run_blocked(
    gateway: Callable[[float, int], Awaitable[RunningGateway]],
) -> None:
    gw = await gateway(1000.0, 1000)
    code = (
        "import argparse, sys\n"
        "from gateway.loadtest import cli\n"
        "p = argparse.ArgumentParser(); cli.add_parser(p.add_subparsers())\n"
        "sys.exit(cli.run(p.parse_args(['loadtest', *sys.argv[1:]])))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "error", "-c", code,
        "--target", gw.url, *admin(gw), "--devices", "10", "--blocked-share", "0.5",
        "--rate", "50", "--duration", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    blocked = [d.id for d in build_fleet(10, seed=1) if d.index in choose_blocked(10, 0.5, 1)]
    try:
        # The load has started: the blocks are in place.
        await until(lambda: gw.upstream_ids, "the load to reach the upstream")
        device = await gw.store.get_device(blocked[0])
        assert device is not None and device.blocked
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 130 and err == b"gateway loadtest: interrupted\n", (out, err)
    for device_id in blocked:
        device = await gw.store.get_device(device_id)
        assert device is not None and not device.blocked
