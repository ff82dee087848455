"""The set-up every chaos scenario shares: its own redis-server (or a Redis URL: a cluster,
a Sentinel service) and gateway, a fleet with a share of devices blocked through the admin
API, the load's recorder and a probe; and the checks every scenario makes at its end
(blocked devices, client errors, the gateway's log).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from chaos_env import Context, Gateway, Redis, start_gateway, upstream_counts
from chaos_load import ChaosRecorder, Probe, Sample, median, ms, sample_outcomes
from chaos_report import Outcome

from gateway.loadtest.fleet import Fleet, build_fleet, choose_blocked
from gateway.loadtest.fleet_admin import block_all
from gateway.loadtest.results import ERROR_STATUS, Recorder

BLOCK_LEAD = 2.0  # seconds between the blocks and the fault: the local copy has them by then
WARMUP = 0.5  # seconds of load left out of the baseline (connections still opening)


class PairedRecorder(ChaosRecorder):
    """ChaosRecorder whose samples carry each request's own send time.

    ChaosRecorder pairs a send with its end by the asyncio task: right while the loadtest
    engine ran a task per request. It now runs in callbacks, with no task (every send lands
    under one key), so a sample got the time of the latest send, or none (nan), and the
    scenarios' "sent during" windows, baselines and in-flight counts were wrong. Here a send
    and its end are paired by device and by the time the request was due, which the runner
    reports at both: `t - lag` at the send, `t - latency` at the answer (whole microseconds).
    An error reports no latency: it ends the device's oldest request in flight.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[int, list[tuple[float, float]]] = {}  # device -> [(due, sent)]

    def on_send(self, device: int, t: float, lag: float = 0.0) -> None:
        self._pending.setdefault(device, []).append((t - lag, time.monotonic()))
        Recorder.on_send(self, device, t, lag)

    def _sent_at(self, device: int, due: float | None) -> float:
        pending = self._pending.get(device)
        if not pending:
            return math.nan
        index = (
            0 if due is None else min(range(len(pending)), key=lambda i: abs(pending[i][0] - due))
        )
        sent = pending.pop(index)[1]
        if not pending:
            del self._pending[device]
        return sent

    def on_response(self, device: int, status: int, latency_us: int, t: float) -> None:
        sent = self._sent_at(device, t - latency_us / 1_000_000)
        self.samples.append(Sample(device, sent, time.monotonic(), status))
        Recorder.on_response(self, device, status, latency_us, t)

    def on_error(self, device: int, kind: str, t: float) -> None:
        sent = self._sent_at(device, None)
        self.samples.append(Sample(device, sent, time.monotonic(), ERROR_STATUS, kind))
        Recorder.on_error(self, device, kind, t)


@dataclass
class GatewayStage:
    """One scenario's gateway (on whatever Redis), fleet, load recorder and probe."""

    ctx: Context
    name: str
    gateway: Gateway
    fleet: Fleet
    blocked: list[int]
    blocked_at: float  # time.monotonic() when the last block was answered
    recorder: ChaosRecorder
    probe: Probe

    @property
    def blocked_ids(self) -> list[str]:
        return [self.fleet[i].id for i in self.blocked]

    def samples(self, since: float = 0.0, until: float = float("inf")) -> list[Sample]:
        """Load requests sent within [since, until)."""
        return [s for s in self.recorder.samples if since <= s.sent < until]

    def baseline(self, until: float, started: float) -> float:
        """Median seconds per answered request before `until` (after the warm-up)."""
        return median(
            [s.service for s in self.samples(started + WARMUP, until) if s.status != ERROR_STATUS]
        )


@dataclass
class Stage(GatewayStage):
    """A GatewayStage on a redis-server of its own (killed, frozen by the scenario)."""

    redis: Redis


async def prepare_gateway(
    ctx: Context,
    name: str,
    *,
    seed: int,
    redis_url: str,
    on_error: str = "open",
    probe_id: str | None = None,
) -> GatewayStage:
    """Start a gateway for `name` on `redis_url` (a cluster, a Sentinel service), block a
    share of the fleet, make the probe (device `probe_id`, default chaos-probe-<name>)."""
    gateway = await asyncio.to_thread(
        start_gateway,
        ctx.procs,
        f"{name}-gateway",
        upstream_port=ctx.upstream_port,
        redis_url=redis_url,
        on_error=on_error,
        workers=ctx.workers,
    )
    return await _stage(ctx, name, gateway, seed, probe_id)


async def _stage(
    ctx: Context, name: str, gateway: Gateway, seed: int, probe_id: str | None
) -> GatewayStage:
    fleet = build_fleet(ctx.devices, seed)
    blocked = choose_blocked(len(fleet), ctx.blocked_share, seed)
    async with gateway.admin() as admin:
        await block_all(admin, [fleet[i].id for i in blocked])
    blocked_at = time.monotonic()
    probe = Probe(gateway.url, probe_id or f"chaos-probe-{name}")
    return GatewayStage(ctx, name, gateway, fleet, blocked, blocked_at, PairedRecorder(), probe)


async def prepare(
    ctx: Context, name: str, *, seed: int, persist: bool = False, on_error: str = "open"
) -> Stage:
    """Start Redis and a gateway for `name`, block a share of the fleet, make the probe."""
    redis = await asyncio.to_thread(Redis, ctx.procs, f"{name}-redis", persist)
    gateway = await asyncio.to_thread(
        start_gateway,
        ctx.procs,
        f"{name}-gateway",
        upstream_port=ctx.upstream_port,
        redis_port=redis.port,
        on_error=on_error,
        workers=ctx.workers,
    )
    base = await _stage(ctx, name, gateway, seed, None)
    return Stage(
        base.ctx,
        base.name,
        base.gateway,
        base.fleet,
        base.blocked,
        base.blocked_at,
        base.recorder,
        base.probe,
        redis,
    )


async def sleep_until(when: float) -> None:
    """Sleep until time.monotonic() reaches `when`."""
    await asyncio.sleep(max(0.0, when - time.monotonic()))


def summarise_load(out: Outcome, stage: GatewayStage, samples: Sequence[Sample]) -> None:
    """The table's request count and outcomes, and the generator's own lag."""
    out.requests = len(samples)
    out.statuses = sample_outcomes(samples)
    out.figures["offered rate (req/s)"] = stage.ctx.rate
    out.figures["generator max send lag (ms)"] = ms(stage.recorder.max_send_lag)


def common_checks(out: Outcome, stage: GatewayStage, *, errors_allowed: bool = False) -> None:
    """Blocked devices, client errors, the gateway's log: what every scenario promises."""
    samples = stage.recorder.samples
    blocked = set(stage.blocked)
    # Under overload a request may time out in the client's queue: only answers count there.
    mine = [
        s
        for s in samples
        if s.device in blocked and not (errors_allowed and s.status == ERROR_STATUS)
    ]
    denied = sum(s.status == 403 for s in mine)
    out.check(
        f"blocked devices (blocked >= {BLOCK_LEAD:g} s before the fault) get 403 on 100%",
        len(mine) > 0 and denied == len(mine),
        f"{denied}/{len(mine)} answers 403 ({sample_outcomes(mine)}) over {len(blocked)} devices",
    )
    counts = upstream_counts(stage.ctx.upstream_port)
    reached = sum(counts.get(device_id, 0) for device_id in stage.blocked_ids)
    out.check("blocked devices: 0 requests reach the upstream", reached == 0, f"{reached}")
    if not errors_allowed:
        failed = sum(s.status == ERROR_STATUS for s in samples)
        out.check("no request of the load fails without an answer", failed == 0, f"{failed}")
    problems = stage.gateway.log_problems()
    out.check(
        "no traceback or error record in the gateway's log",
        not problems,
        f"{len(problems)} lines" + (f", first: {problems[0][:300]}" if problems else ""),
    )
