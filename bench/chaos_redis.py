"""Redis faults under open-loop load: SIGKILL then a restart (on_error open and closed), and
a freeze (SIGSTOP) then a thaw. What each must show is in docs/chaos.md.
"""

from __future__ import annotations

import asyncio
import time

from chaos_env import REDIS_TIMEOUT, Context, lost, records, upstream_counts
from chaos_load import UNAVAILABLE, first_enforced, ms, percentile, start_load
from chaos_report import Outcome
from chaos_stage import BLOCK_LEAD, Stage, common_checks, prepare, sleep_until, summarise_load

from gateway.loadtest.results import ERROR_STATUS

PRE = 3.0  # seconds of load before the fault: devices register, the baseline is measured
POST = 4.0  # seconds of load after Redis is back
RECOVERY_LIMIT = 2.0  # seconds from Redis answering again to enforcement
LOAD_TIMEOUT = 5.0  # seconds per load request
MARGIN = 0.05  # the promise: a frozen Redis costs a request at most redis.timeout + 50 ms
HANG = 1.0  # seconds: any request slower than this in a freeze is a hang
SKIP_SHARE = 0.10  # at most this share of the freeze's requests may pay the timeout
SETTLE = 0.2  # seconds after a kill before every request must meet the outage


def _outage_load(ctx: Context, stage: Stage) -> asyncio.Task[float]:
    """The scenario's open-loop load: PRE seconds before the fault, the fault, POST after."""
    return start_load(
        stage.gateway.url,
        stage.fleet,
        stage.recorder,
        rate=ctx.rate,
        duration=PRE + ctx.seconds + POST,
        timeout=LOAD_TIMEOUT,
    )


async def _finish(stage: Stage, load: asyncio.Task[float], back: float) -> None:
    """Wait for the load, then let the probe run until it saw enforcement (bounded)."""
    bound = PRE + stage.ctx.seconds + POST + LOAD_TIMEOUT + 10
    await asyncio.wait_for(load, bound)
    deadline = back + RECOVERY_LIMIT + 1.0
    while first_enforced(stage.probe.answers, back) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await stage.probe.stop()


def _recovery(out: Outcome, stage: Stage, back: float, what: str) -> None:
    answers = stage.probe.answers
    recovered = first_enforced(answers, back)
    out.figures["seconds to enforcement after " + what] = (
        None if recovered is None else round(recovered, 3)
    )
    out.check(
        f"enforcement back within {RECOVERY_LIMIT:g} s of {what}",
        recovered is not None and recovered < RECOVERY_LIMIT,
        "never" if recovered is None else f"{recovered:.3f} s",
    )
    if recovered is not None:
        after = [a for a in answers if a.sent > back + recovered]
        late = [a for a in after if not a.enforced]
        out.check(
            "enforcement stays on once back (probe)", not late, f"{len(late)}/{len(after)} not"
        )


async def redis_kill(ctx: Context, on_error: str) -> Outcome:
    """SIGKILL Redis under load for ctx.seconds, start it again on its append-only file."""
    name = f"redis-kill-{on_error}"
    out = Outcome(name)
    stage = await prepare(
        ctx, name, seed=11 if on_error == "open" else 12, persist=True, on_error=on_error
    )
    load = _outage_load(ctx, stage)
    started = time.monotonic()
    stage.probe.start()
    kill_at = max(started + PRE, stage.blocked_at + BLOCK_LEAD)
    await sleep_until(kill_at - 0.3)
    async with stage.gateway.admin() as admin:
        before = await records(admin)
    await asyncio.to_thread(stage.redis.kill)
    killed = time.monotonic()
    await sleep_until(killed + ctx.seconds)
    restarting = time.monotonic()
    await asyncio.to_thread(stage.redis.start)
    up = time.monotonic()
    await _finish(stage, load, up)
    async with stage.gateway.admin() as admin:
        after = await records(admin)

    samples = stage.recorder.samples
    summarise_load(out, stage, samples)
    baseline = stage.baseline(killed, started)
    out.max_added_ms = ms(max(s.service for s in samples) - baseline)
    gone = lost(before, after)
    out.lost_records = len(gone)
    outage = [a for a in stage.probe.answers if a.sent >= killed + SETTLE and a.done <= restarting]
    out.figures.update(
        {
            "blocked seconds before the kill": round(killed - stage.blocked_at, 2),
            "load requests sent during the outage": len(stage.samples(killed, restarting)),
            "redis restart (s)": round(up - restarting, 3),
            "records before / after": f"{len(before)} / {len(after)}",
            "baseline per request (ms)": ms(baseline),
        }
    )
    out.check(
        "the outage was seen: no probe answer in it was enforced",
        len(outage) > 0 and not any(a.enforced for a in outage),
        f"{len(outage)} probe answers",
    )
    probe_5xx = sum(a.status >= 500 for a in stage.probe.answers)
    load_5xx = sum(s.status >= 500 for s in samples)
    if on_error == "open":
        out.check(
            "0 gateway-made 5xx (load and probe)",
            load_5xx + probe_5xx == 0,
            f"{load_5xx} + {probe_5xx}",
        )
    else:
        other = {s.status for s in samples if s.status >= 500 and s.status != 503}
        out.check("every 5xx is a 503", not other, f"other 5xx: {sorted(other)}")
        good = [a for a in outage if a.status == 503 and a.body == UNAVAILABLE and a.retry_after]
        out.check(
            "outage answers: 503 envelope with Retry-After (probe)",
            len(good) == len(outage),
            f"{len(good)}/{len(outage)}",
        )
        _closed_upstream_check(out, stage)
    out.check(
        "no device record registered before the kill is lost",
        len(before) > 0 and not gone,
        f"{len(gone)} of {len(before)} lost {gone[:3]}",
    )
    _recovery(out, stage, up, "the restart")
    common_checks(out, stage)
    return out


def _closed_upstream_check(out: Outcome, stage: Stage) -> None:
    """Every request the upstream saw got a 2xx: none the gateway refused reached it."""
    counts = upstream_counts(stage.ctx.upstream_port)
    ids = {stage.fleet[i].id for i in range(len(stage.fleet))}
    ids.add(stage.probe.headers["X-Device-Id"])
    seen = sum(counts.get(i, 0) for i in ids)
    ok = sum(200 <= s.status < 300 for s in stage.recorder.samples)
    ok += sum(200 <= a.status < 300 for a in stage.probe.answers)
    refused = sum(s.status == 503 for s in stage.recorder.samples)
    out.check(
        "0 of the 503s reach the upstream (upstream count == 2xx answers)",
        seen == ok and refused > 0,
        f"upstream saw {seen}, clients got {ok} 2xx and {refused} 503",
    )


async def redis_black_hole(ctx: Context) -> Outcome:
    """SIGSTOP Redis under load for ctx.seconds (it accepts, never answers), then SIGCONT."""
    name = "redis-black-hole"
    out = Outcome(name)
    stage = await prepare(ctx, name, seed=13)
    load = _outage_load(ctx, stage)
    started = time.monotonic()
    stage.probe.start()
    await sleep_until(max(started + PRE, stage.blocked_at + BLOCK_LEAD))
    stage.redis.freeze()
    frozen = time.monotonic()
    try:
        await sleep_until(frozen + ctx.seconds)
    finally:
        stage.redis.thaw()
    thawed = time.monotonic()
    await _finish(stage, load, thawed)

    samples = stage.recorder.samples
    summarise_load(out, stage, samples)
    baseline = stage.baseline(frozen, started)
    held = [s for s in stage.samples(frozen, thawed) if s.status != ERROR_STATUS]
    added = [s.service - baseline for s in held]
    p99, worst = percentile(added, 99), max(added, default=float("nan"))
    out.max_added_ms = ms(worst)
    paid = sum(s.service > REDIS_TIMEOUT / 2 for s in held)
    out.figures.update(
        {
            "requests answered during the freeze": len(held),
            "baseline per request (ms)": ms(baseline),
            "added latency in the freeze p50 / p99 / max (ms)": (
                f"{ms(percentile(added, 50))} / {ms(p99)} / {ms(worst)}"
            ),
            "requests that paid the timeout": paid,
        }
    )
    limit = REDIS_TIMEOUT + MARGIN
    out.check(
        f"p99 added latency in the freeze <= redis.timeout + {MARGIN * 1000:g} ms",
        len(held) > 0 and p99 <= limit,
        f"{ms(p99)} ms (limit {ms(limit)})",
    )
    out.check(
        f"max added latency in the freeze <= {HANG:g} s (no hang)", worst <= HANG, f"{ms(worst)} ms"
    )
    out.check(
        f"the breaker skips Redis: <= {SKIP_SHARE:.0%} of requests pay the timeout",
        len(held) > 0 and paid <= SKIP_SHARE * len(held),
        f"{paid}/{len(held)}",
    )
    fivexx = sum(s.status >= 500 for s in samples)
    out.check("0 gateway-made 5xx (on_error: open)", fivexx == 0, f"{fivexx}")
    _recovery(out, stage, thawed, "the thaw")
    common_checks(out, stage)
    return out
