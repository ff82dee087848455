"""Faults of the Redis deployments the gateway runs on besides one server, under open-loop
load: a Redis Cluster (3 primaries, 3 replicas) whose busiest primary is SIGKILLed, a
Sentinel deployment (a primary, a replica, 3 sentinels) whose primary is SIGKILLed, and a
cluster where half of one primary's slots, with the active devices in them, move to another
primary and back (`redis-cli --cluster reshard`). What each must show is in docs/chaos.md.

The engines are the test suite's own (tests/rig/redis_cluster.py, redis_sentinel.py: every
node on a free loopback port, its files in a temporary directory, both removed by stop()).
The rig reports a failure by pytest.fail or assert; here that becomes the scenario's
BenchError. Each scenario stops its engine itself, also when it fails or is cancelled. An
engine is made on the loop's thread, before any load (its nodes die with the thread that
started them: PR_SET_PDEATHSIG); kills, waits and restarts under load run in the loop's
worker threads, which live until the loop is closed, after the engine is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import aiohttp
import redis
from chaos_env import Context, Gateway, lost, records
from chaos_load import ChaosRecorder, Probe, ProbeAnswer, first_enforced, ms, percentile
from chaos_report import Outcome
from chaos_stage import (
    BLOCK_LEAD,
    GatewayStage,
    common_checks,
    prepare_gateway,
    sleep_until,
    summarise_load,
)
from procs import BenchError, run_bounded, tree
from redis.crc import key_slot

from gateway.errors import AdminClientError
from gateway.loadtest.fleet import Fleet, build_fleet
from gateway.loadtest.results import ERROR_STATUS
from gateway.loadtest.runner import LoadRunner
from gateway.loadtest.spec import LoadSpec
from gateway.store.keys import KeySchema

if TYPE_CHECKING:
    from tests.rig.redis_cluster import RedisCluster
    from tests.rig.redis_sentinel import RedisSentinel

REPO = Path(__file__).resolve().parent.parent
KEYS = KeySchema()  # the generated config's key prefix: the default, "dg"
T = TypeVar("T")

PRE = 3.0  # seconds of load before the fault: devices register, the blocks are old enough
POST = 3.0  # seconds of load after the last step of the fault (the rejoin, the move back)
LOAD_TIMEOUT = 5.0  # seconds per load request
LOAD_HORIZON = 3600.0  # the load's schedule; the scenario stops it when it is done
RECOVERY_LIMIT = 2.0  # seconds from the promotion to enforcement
SNAPSHOT_LEAD = 0.5  # seconds before the kill: the late blocks, the records, the counters
LATE_BLOCKS = 5  # ids blocked just before the kill (on the primary that is killed)
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout, as the failover tests
LIMITED = 3  # devices with a tight bucket, hammered through the slot moves
LIMITED_RATE, LIMITED_BURST = 1.0, 2
REPLICATED = "Devicegate-Replicated"  # yes: the block reached a replica before the answer


# -- the test rig's engines ----------------------------------------------------------------


def _rig() -> tuple[type[RedisCluster], type[RedisSentinel]]:
    """The rig's engine classes (tests/ is not installed: the repository goes on sys.path)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        from tests.rig.redis_cluster import RedisCluster
        from tests.rig.redis_sentinel import RedisSentinel
    except ImportError as exc:
        raise BenchError(
            "the cluster and Sentinel scenarios start their engines with tests/rig, "
            f"which needs the test extra (pip install -e '.[test]'): {exc}"
        ) from exc
    return RedisCluster, RedisSentinel


@contextlib.contextmanager
def rig_errors(what: str) -> Iterator[None]:
    """The rig fails by pytest.fail (a BaseException) or assert: a BenchError here."""
    import pytest

    try:
        yield
    except (pytest.fail.Exception, AssertionError, redis.RedisError) as exc:
        raise BenchError(f"{what}: {type(exc).__name__}: {exc}") from None


def _guarded(what: str, call: Callable[[], T]) -> T:
    with rig_errors(what):
        return call()


async def in_thread(what: str, call: Callable[[], T]) -> T:
    """A blocking rig call (a kill, a wait, a restart) off the loop, the load running on."""
    return await asyncio.to_thread(_guarded, what, call)


def slot_of(device_id: str) -> int:
    """The hash slot of a device's keys (all of them share the shard's tag)."""
    return key_slot(KEYS.device(device_id).record.encode())


def ids_where(prefix: str, count: int, wanted: Callable[[str], bool]) -> list[str]:
    """`count` ids `<prefix>-<n>` for which `wanted(id)` holds (n counting from 0)."""
    found = []
    for n in range(100_000):
        candidate = f"{prefix}-{n}"
        if wanted(candidate):
            found.append(candidate)
            if len(found) == count:
                return found
    raise BenchError(f"no {count} ids {prefix}-<n> where wanted")


def slot_owners(cluster: RedisCluster) -> dict[int, int]:
    """slot -> port of the primary serving it, as every node agrees."""
    with rig_errors("reading the cluster's slots"):
        nodes = cluster.nodes
    return {slot: n.port for n in nodes if n.role == "primary" for slot in n.slots}


# -- load that the scenario stops ----------------------------------------------------------


class Load:
    """gateway.loadtest's engine, open loop at `rate`, from now until stop(): how long a
    failover or a reshard takes is not known beforehand."""

    def __init__(self, url: str, fleet: Fleet, recorder: ChaosRecorder, rate: float) -> None:
        spec = LoadSpec(
            target=url, rate=rate, duration=LOAD_HORIZON, timeout=LOAD_TIMEOUT, seed=fleet.seed
        )
        self.runner = LoadRunner(spec, fleet, recorder)
        self.task = asyncio.create_task(self.runner.run())

    async def stop(self) -> None:
        """Send nothing more, as at the end of a schedule; wait (bounded) for the answers."""
        self.runner._stop_sending()  # the runner's own end of schedule: in-flight ones finish
        await asyncio.wait_for(self.task, LOAD_TIMEOUT + 10)


# -- what both failover scenarios share ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Victim:
    """The primary a failover scenario kills, and the deployment's handles on it."""

    port: int
    holds: Callable[[str], bool]  # does this device id live on it
    kill: Callable[[], object]
    wait_failover: Callable[[], float]  # seconds from the kill to the promotion, all agreed
    rejoin: Callable[[], float]  # start it again; seconds until it is back as a replica
    devices: int  # fleet devices on it


async def block_acked(gateway: Gateway, ids: Sequence[str]) -> dict[str, str]:
    """Block each id through the admin API; id -> its Devicegate-Replicated answer."""
    headers = {"Authorization": f"Bearer {gateway.token}"}
    replicated: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for device_id in ids:
            path = f"/devices/{urllib.parse.quote(device_id, safe='')}/block"
            async with session.post(gateway.admin_url + path, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise BenchError(f"blocking {device_id}: HTTP {resp.status}")
                replicated[device_id] = resp.headers.get(REPLICATED, "")
    return replicated


async def not_blocked(gateway: Gateway, ids: Sequence[str]) -> list[str]:
    """The ids whose record is gone or no longer blocked."""
    found = []
    async with gateway.admin() as admin:
        for device_id in ids:
            try:
                record = await admin.get_device(device_id)
            except AdminClientError:
                found.append(device_id)
                continue
            if record.get("blocked") is not True:
                found.append(device_id)
    return found


def unenforced(before: dict[str, int], after: dict[str, int]) -> int:
    """Requests on_error open let through without Redis between two /metrics reads."""
    return after.get("store_down_open", 0) - before.get("store_down_open", 0)


def fivexx_check(out: Outcome, stage: GatewayStage, probes: Sequence[Probe] = ()) -> None:
    load = sum(s.status >= 500 for s in stage.recorder.samples)
    probed = sum(a.status >= 500 for p in (stage.probe, *probes) for a in p.answers)
    out.check(
        "0 gateway-made 5xx, on_error open (load and probes)",
        load + probed == 0,
        f"{load} + {probed}",
    )


def processes_check(out: Outcome, stage: GatewayStage, pids: set[int]) -> None:
    now = set(tree(stage.gateway.proc.pid)) if stage.gateway.proc.alive() else set()
    gone = sorted(pids - now)
    out.check(
        "no gateway process exited (the supervisor and every worker of the start)",
        stage.gateway.proc.alive() and not gone,
        f"{len(pids) - len(gone)}/{len(pids)} still running" + (f", gone: {gone}" if gone else ""),
    )


async def stop_all(load: Load, probes: Sequence[Probe]) -> None:
    """Stop the load (its requests in flight answered), then the probes."""
    try:
        await load.stop()
    finally:
        for probe in probes:
            await probe.stop()


async def wait_enforced(probe: Probe, since: float, limit: float) -> None:
    """Let the probe run until it saw an enforced answer sent after `since` (bounded)."""
    deadline = since + limit + 1.0
    while first_enforced(probe.answers, since) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


SETTLE_AFTER_REJOIN = 1.0  # seconds after the old primary is back before enforcement is judged


def recovery_checks(
    out: Outcome, answers: Sequence[ProbeAnswer], promoted: float, restarted: float, back: float
) -> None:
    """Enforcement (the probe's rate-limit headers) within RECOVERY_LIMIT of the promotion,
    on from then until the old primary's restart, and on again once it is back as a replica
    (the full sync it asks of the new primary is reported, not judged)."""
    resumed = first_enforced(answers, promoted)
    out.figures["seconds to enforcement after the promotion"] = (
        None if resumed is None else round(resumed, 3)
    )
    out.check(
        f"enforcement back within {RECOVERY_LIMIT:g} s of the promotion (probe on the failed "
        "primary's data)",
        resumed is not None and resumed < RECOVERY_LIMIT,
        "never" if resumed is None else f"{resumed:.3f} s",
    )
    if resumed is None:
        return
    steady = [a for a in answers if promoted + resumed < a.sent < restarted]
    out.check(
        "enforcement stays on from then until the old primary's restart (probe)",
        all(a.enforced for a in steady),
        f"{sum(not a.enforced for a in steady)}/{len(steady)} not",
    )
    rejoin = [a for a in answers if restarted <= a.sent < back + SETTLE_AFTER_REJOIN]
    lapses = [a for a in rejoin if not a.enforced]
    when = ", ".join(f"{a.sent - restarted:+.2f}" for a in lapses[:8])
    out.figures["probe answers not enforced during the rejoin (s after the restart)"] = (
        f"{len(lapses)} of {len(rejoin)}" + (f" ({when})" if lapses else "")
    )
    settled = [a for a in answers if a.sent >= back + SETTLE_AFTER_REJOIN]
    out.check(
        f"enforced {SETTLE_AFTER_REJOIN:g} s after the old primary is back as a replica (probe)",
        len(settled) > 0 and all(a.enforced for a in settled),
        f"{sum(not a.enforced for a in settled)}/{len(settled)} not",
    )


async def failover(ctx: Context, name: str, seed: int, url: str, victim: Victim) -> Outcome:
    """The failover scenario on a started deployment: load, the primary SIGKILLed, the
    promotion, ctx.seconds after the kill the old primary started again, load on."""
    out = Outcome(name)
    probe_id = ids_where(f"chaos-probe-{name}", 1, victim.holds)[0]
    stage = await prepare_gateway(ctx, name, seed=seed, redis_url=url, probe_id=probe_id)
    pids = set(tree(stage.gateway.proc.pid))
    late = ids_where(f"chaos-late-{name}", LATE_BLOCKS, victim.holds)
    load = Load(stage.gateway.url, stage.fleet, stage.recorder, ctx.rate)
    started = time.monotonic()
    stage.probe.start()
    try:
        kill_at = max(started + PRE, stage.blocked_at + BLOCK_LEAD)
        await sleep_until(kill_at - SNAPSHOT_LEAD)
        replicated = await block_acked(stage.gateway, late)
        async with stage.gateway.admin() as admin:
            before = await records(admin)
        counted = await asyncio.to_thread(stage.gateway.decisions)
        await sleep_until(kill_at)
        killed = time.monotonic()
        await in_thread("killing the primary", victim.kill)
        took = await in_thread("waiting for the failover", victim.wait_failover)
        promoted = time.monotonic()
        await sleep_until(killed + ctx.seconds)
        restarted = time.monotonic()
        rejoin = await in_thread("restarting the old primary", victim.rejoin)
        await sleep_until(time.monotonic() + POST)
        await wait_enforced(stage.probe, promoted, RECOVERY_LIMIT)
    finally:
        await stop_all(load, [stage.probe])
    async with stage.gateway.admin() as admin:
        after = await records(admin)
    counted_after = await asyncio.to_thread(stage.gateway.decisions)
    acked = [i for i in late if replicated[i] == "yes"]
    dropped = await not_blocked(stage.gateway, [*stage.blocked_ids, *acked])

    samples = stage.recorder.samples
    summarise_load(out, stage, samples)
    out.max_added_ms = ms(max(s.service for s in samples) - stage.baseline(killed, started))
    gone = lost(before, after)
    out.lost_records = len(gone)
    answers = stage.probe.answers
    outage = [a for a in answers if killed <= a.sent < promoted]
    out.figures.update(
        {
            "fleet devices on the killed primary": f"{victim.devices} of {len(stage.fleet)}",
            "failover (s, kill to promotion seen by every node)": round(took, 2),
            "old primary back as a replica (s after its restart)": round(rejoin, 2),
            "restart after the kill (s)": round(restarted - killed, 2),
            "requests not enforced (on_error open), kill to end": unenforced(
                counted, counted_after
            ),
            "probe answers not enforced, kill to promotion": (
                f"{sum(not a.enforced for a in outage)} of {len(outage)}"
            ),
            "load requests sent, kill to promotion": len(stage.samples(killed, promoted)),
            "late blocks acknowledged by a replica": f"{len(acked)} of {len(late)}",
            "records before / after": f"{len(before)} / {len(after)}",
        }
    )
    out.check(
        "the kill was seen: requests went unenforced (on_error open)",
        unenforced(counted, counted_after) > 0,
        unenforced(counted, counted_after),
    )
    fivexx_check(out, stage)
    processes_check(out, stage, pids)
    recovery_checks(out, answers, promoted, restarted, restarted + rejoin)
    out.check(
        "no device record registered before the kill is lost",
        len(before) > 0 and not gone,
        f"{len(gone)} of {len(before)} lost {gone[:3]}",
    )
    out.check(
        "no acknowledged block lost (the fleet's and the late ones the replica acked)",
        len(acked) > 0 and not dropped,
        f"{len(dropped)} of {len(stage.blocked_ids) + len(acked)} no longer blocked {dropped[:3]}",
    )
    common_checks(out, stage)
    return out


# -- the scenarios ---------------------------------------------------------------------------


async def cluster_failover(ctx: Context) -> Outcome:
    """A 3+3 cluster; SIGKILL the primary serving the most fleet devices, under load."""
    name, seed = "cluster-failover", 16
    cluster_class, _ = _rig()
    with rig_errors("starting the cluster"):
        cluster = cluster_class(primaries=3, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS)
    try:
        owners = slot_owners(cluster)
        fleet = build_fleet(ctx.devices, seed)  # the fleet prepare_gateway makes
        per_primary = Counter(owners[slot_of(device.id)] for device in fleet)
        port, devices = per_primary.most_common(1)[0]
        victim = Victim(
            port=port,
            holds=lambda device_id: owners[slot_of(device_id)] == port,
            kill=lambda: cluster.kill_primary(port),
            wait_failover=lambda: cluster.wait_failover(port),
            rejoin=lambda: cluster.restart(port),
            devices=devices,
        )
        return await failover(ctx, name, seed, cluster.url, victim)
    finally:
        cluster.stop()


async def sentinel_failover(ctx: Context) -> Outcome:
    """A primary, a replica, 3 sentinels; SIGKILL the primary under load."""
    name, seed = "sentinel-failover", 17
    _, sentinel_class = _rig()
    with rig_errors("starting the Sentinel deployment"):
        sentinel = sentinel_class()
    try:
        with rig_errors("asking the sentinels for the primary"):
            port = sentinel.primary_port()
        victim = Victim(
            port=port,
            holds=lambda device_id: True,
            kill=sentinel.kill_primary,
            wait_failover=sentinel.wait_failover,
            rejoin=sentinel.restart_old_primary,
            devices=ctx.devices,
        )
        return await failover(ctx, name, seed, sentinel.url, victim)
    finally:
        sentinel.stop()


def reshard(cluster: RedisCluster, count: int, from_port: int, to_port: int) -> float:
    """`redis-cli --cluster reshard` of `count` slots (redis-cli takes the source's lowest)
    with their keys, bounded; returns the seconds until every node agrees on the move."""
    started = time.monotonic()
    view = cluster.agreed_view()
    source = view[from_port].slots
    argv = [cluster.cli, "--cluster", "reshard", f"127.0.0.1:{from_port}",
            "--cluster-from", view[from_port].node_id, "--cluster-to", view[to_port].node_id,
            "--cluster-slots", str(count), "--cluster-yes"]  # fmt: skip
    code, output = run_bounded(argv, 120)
    if code != 0 or "[ERR]" in output:
        raise BenchError(f"redis-cli --cluster reshard: exit {code}: {output[-600:]}")
    moved = source - cluster.agreed_view()[from_port].slots
    if len(moved) != count:
        raise BenchError(f"redis-cli --cluster reshard moved {len(moved)} slots, not {count}")
    return time.monotonic() - started


def excess_after_empty(answers: Sequence[ProbeAnswer], rate: float) -> float | None:
    """Once a 429 said the bucket was empty (< 1 token), the enforced 200s that follow can
    only be paid by the refill: after k of them, k < 1 + rate x (seconds since that 429).
    Returns the largest k - rate x seconds seen (client times bracket the server's, so the
    seconds are never too few); a reset to full shows as >= 1. None: no 429 came."""
    first = next((i for i, a in enumerate(answers) if a.status == 429 and a.enforced), None)
    if first is None:
        return None
    since = answers[first].sent
    worst = -math.inf
    allowed = 0
    for answer in answers[first + 1 :]:
        if answer.status == 200 and answer.enforced:
            allowed += 1
            worst = max(worst, allowed - rate * (answer.done - since))
    return worst


def bucket_checks(out: Outcome, probes: Sequence[Probe]) -> None:
    """Hammered devices with a tight bucket: never more enforced 200s than the bucket holds,
    over the run and from its first 429 on. A bucket reset to full by a move shows there."""
    over_run: list[str] = []
    over_empty: list[str] = []
    shown_run: list[str] = []
    shown_empty: list[str] = []
    for probe in probes:
        device, answers = probe.headers["X-Device-Id"], probe.answers
        passed = sum(a.status == 200 and a.enforced for a in answers)
        elapsed = answers[-1].done - answers[0].sent if answers else 0.0
        bound = LIMITED_BURST + LIMITED_RATE * elapsed + 1
        shown_run.append(f"{passed}/{bound:.1f}")
        if not answers or passed > bound:
            over_run.append(device)
        excess = excess_after_empty(answers, LIMITED_RATE)
        shown_empty.append("no 429" if excess is None else f"{excess:.2f}")
        if excess is None or excess >= 1:
            over_empty.append(device)
    rule = f"each of {len(probes)} devices at {LIMITED_RATE:g}/s burst {LIMITED_BURST}, hammered"
    out.check(
        f"no bucket reset, over the run: {rule}, got <= burst + rate x elapsed + 1 enforced 200s",
        not over_run,
        f"allowed/bound {' '.join(shown_run)}" + (f"; over: {over_run}" if over_run else ""),
    )
    out.check(
        "no bucket reset, once empty: after the first 429, enforced 200s < 1 + rate x elapsed",
        not over_empty,
        f"largest 200s - rate x elapsed {' '.join(shown_empty)}"
        + (f"; over: {over_empty}" if over_empty else ""),
    )
    answers = [a for p in probes for a in p.answers]
    out.figures["hammered devices: answers (200 / 429 / 200 unenforced)"] = (
        f"{sum(a.status == 200 and a.enforced for a in answers)} / "
        f"{sum(a.status == 429 for a in answers)} / "
        f"{sum(a.status == 200 and not a.enforced for a in answers)}"
    )


@dataclass(frozen=True, slots=True)
class Move:
    """The slots the reshard scenario moves: the source's lowest `count`, there and back."""

    source: int  # port of the primary they start on
    target: int  # port of the primary they go to
    count: int
    slots: frozenset[int]

    def holds(self, device_id: str) -> bool:
        """Does this device live in the moving slots."""
        return slot_of(device_id) in self.slots


def plan_move(cluster: RedisCluster) -> Move:
    """Half of the slots of the primary that serves slot 0, to one whose slots all lie
    above them: the target's lowest slots, the ones redis-cli moves back, are then exactly
    those it received."""
    with rig_errors("reading the cluster's slots"):
        primaries = [n for n in cluster.nodes if n.role == "primary"]
    source = min(primaries, key=lambda n: min(n.slots))
    target = next(n for n in primaries if min(n.slots) > max(source.slots))
    count = len(source.slots) // 2
    return Move(source.port, target.port, count, frozenset(sorted(source.slots)[:count]))


async def cluster_reshard(ctx: Context) -> Outcome:
    """A 3+3 cluster; half of one primary's slots, with the active devices in them, move to
    another primary under load, stay there ctx.seconds, and move back."""
    name, seed = "cluster-reshard", 18
    cluster_class, _ = _rig()
    with rig_errors("starting the cluster"):
        cluster = cluster_class(primaries=3, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS)
    try:
        move = plan_move(cluster)
        probe_id = ids_where(f"chaos-probe-{name}", 1, move.holds)[0]
        stage = await prepare_gateway(
            ctx, name, seed=seed, redis_url=cluster.url, probe_id=probe_id
        )
        limited = ids_where(f"chaos-limited-{name}", LIMITED, move.holds)
        async with stage.gateway.admin() as admin:
            for device_id in limited:
                await admin.set_rate_limit(device_id, LIMITED_RATE, LIMITED_BURST)
        hammers = [Probe(stage.gateway.url, device_id) for device_id in limited]
        return await reshard_under_load(ctx, Outcome(name), stage, cluster, move, hammers)
    finally:
        cluster.stop()


async def reshard_under_load(
    ctx: Context,
    out: Outcome,
    stage: GatewayStage,
    cluster: RedisCluster,
    move: Move,
    hammers: list[Probe],
) -> Outcome:
    """Load, the move there, ctx.seconds, the move back, POST seconds of load; the checks."""
    pids = set(tree(stage.gateway.proc.pid))
    probes = [stage.probe, *hammers]
    load = Load(stage.gateway.url, stage.fleet, stage.recorder, ctx.rate)
    started = time.monotonic()
    for probe in probes:
        probe.start()
    try:
        move_at = max(started + PRE, stage.blocked_at + BLOCK_LEAD)
        await sleep_until(move_at - SNAPSHOT_LEAD)
        async with stage.gateway.admin() as admin:
            before = await records(admin)
        counted = await asyncio.to_thread(stage.gateway.decisions)
        await sleep_until(move_at)
        there = time.monotonic()
        there_took = await in_thread(
            "moving the slots", lambda: reshard(cluster, move.count, move.source, move.target)
        )
        await sleep_until(time.monotonic() + ctx.seconds)
        back = time.monotonic()
        back_took = await in_thread(
            "moving them back", lambda: reshard(cluster, move.count, move.target, move.source)
        )
        await sleep_until(back + back_took + POST)
    finally:
        await stop_all(load, probes)
    async with stage.gateway.admin() as admin:
        after = await records(admin)
    counted_after = await asyncio.to_thread(stage.gateway.decisions)

    samples = stage.recorder.samples
    summarise_load(out, stage, samples)
    baseline = stage.baseline(there, started)
    out.max_added_ms = ms(max(s.service for s in samples) - baseline)
    gone = lost(before, after)
    out.lost_records = len(gone)
    moving = [(there, there + there_took), (back, back + back_took)]
    added = [
        s.service - baseline for w in moving for s in stage.samples(*w) if s.status != ERROR_STATUS
    ]
    probed = [a for a in stage.probe.answers if any(s <= a.sent < e for s, e in moving)]
    movers = sum(move.holds(device.id) for device in stage.fleet)
    out.figures.update(
        {
            "slots moved, each way": f"{move.count} of {move.source}'s, to {move.target}",
            "fleet devices in them": f"{movers} of {len(stage.fleet)}",
            "blocked devices in them": sum(move.holds(i) for i in stage.blocked_ids),
            "move there / back (s, redis-cli until every node agrees)": (
                f"{there_took:.2f} / {back_took:.2f}"
            ),
            "load requests sent during the moves": sum(len(stage.samples(s, e)) for s, e in moving),
            "requests not enforced (on_error open), first move to end": unenforced(
                counted, counted_after
            ),
            "added latency during the moves p50 / p99 / max (ms)": (
                f"{ms(percentile(added, 50))} / {ms(percentile(added, 99))} "
                f"/ {ms(max(added, default=math.nan))}"
            ),
            "probe answers not enforced during the moves": (
                f"{sum(not a.enforced for a in probed)} of {len(probed)}"
            ),
            "records before / after": f"{len(before)} / {len(after)}",
        }
    )
    fivexx_check(out, stage, hammers)
    processes_check(out, stage, pids)
    out.check(
        "no device record registered before the moves is lost",
        len(before) > 0 and not gone,
        f"{len(gone)} of {len(before)} lost {gone[:3]}",
    )
    bucket_checks(out, hammers)
    settled = [a for a in stage.probe.answers if a.sent >= back + back_took + RECOVERY_LIMIT]
    out.check(
        f"enforced again {RECOVERY_LIMIT:g} s after the move back (probe)",
        len(settled) > 0 and all(a.enforced for a in settled),
        f"{sum(not a.enforced for a in settled)}/{len(settled)} not",
    )
    common_checks(out, stage)
    return out
