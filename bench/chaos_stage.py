"""The set-up every chaos scenario shares: its own redis-server and gateway, a fleet with a
share of devices blocked through the admin API, the load's recorder and a probe; and the
checks every scenario makes at its end (blocked devices, client errors, the gateway's log).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from chaos_env import Context, Gateway, Redis, start_gateway, upstream_counts
from chaos_load import ChaosRecorder, Probe, Sample, median, ms, sample_outcomes
from chaos_report import Outcome

from gateway.loadtest.fleet import Fleet, build_fleet, choose_blocked
from gateway.loadtest.fleet_admin import block_all
from gateway.loadtest.results import ERROR_STATUS

BLOCK_LEAD = 2.0  # seconds between the blocks and the fault: the local copy has them by then
WARMUP = 0.5  # seconds of load left out of the baseline (connections still opening)


@dataclass
class Stage:
    """One scenario's redis-server, gateway, fleet, load recorder and probe."""

    ctx: Context
    name: str
    redis: Redis
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
    fleet = build_fleet(ctx.devices, seed)
    blocked = choose_blocked(len(fleet), ctx.blocked_share, seed)
    async with gateway.admin() as admin:
        await block_all(admin, [fleet[i].id for i in blocked])
    blocked_at = time.monotonic()
    probe = Probe(gateway.url, f"chaos-probe-{name}")
    return Stage(ctx, name, redis, gateway, fleet, blocked, blocked_at, ChaosRecorder(), probe)


async def sleep_until(when: float) -> None:
    """Sleep until time.monotonic() reaches `when`."""
    await asyncio.sleep(max(0.0, when - time.monotonic()))


def summarise_load(out: Outcome, stage: Stage, samples: Sequence[Sample]) -> None:
    """The table's request count and outcomes, and the generator's own lag."""
    out.requests = len(samples)
    out.statuses = sample_outcomes(samples)
    out.figures["offered rate (req/s)"] = stage.ctx.rate
    out.figures["generator max send lag (ms)"] = ms(stage.recorder.max_send_lag)


def common_checks(out: Outcome, stage: Stage, *, errors_allowed: bool = False) -> None:
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
