"""Load faults: open-loop overload at twice the measured capacity, and SIGTERM under load.
What each must show is in docs/chaos.md.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from chaos_env import Context, stop_gracefully
from chaos_load import (
    ChaosRecorder,
    ProbeAnswer,
    median,
    ms,
    percentile,
    sample_outcomes,
    start_load,
)
from chaos_report import Outcome
from chaos_stage import Stage, common_checks, prepare, summarise_load

from gateway.loadtest.results import ERROR_STATUS

CAPACITY_SECONDS = 3.0  # closed-loop run that measures what the gateway answers per second
CAPACITY_CONCURRENCY = 64
OVERLOAD_FACTOR = 2.0
OVERLOAD_TIMEOUT = 2.0  # seconds per request: a request queued longer is dropped, so the
# load really stops soon after its schedule ends
RECOVERY_LIMIT = 5.0  # seconds after the load stops for latency to be normal again
RECOVERED_RUN = 5  # consecutive normal probe answers that mean "back to normal"
RSS_GROWTH_LIMIT = 128 * 1024 * 1024  # bytes the gateway may grow by under overload
MB = 1024 * 1024
SLOW_MS = 200  # the upstream's delay in the SIGTERM scenario: requests are in flight
SHUTDOWN_GRACE = 10.0  # server.shutdown_timeout of the scenario's gateway (its default)


async def _idle_latency(stage: Stage) -> list[float]:
    """Seconds per probe request on an idle gateway, 20 in a row."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        answers = [await stage.probe.ask(session) for _ in range(20)]
    return [a.took for a in answers if a.status == 200]


async def _watch_rss(stage: Stage, peak: list[int]) -> None:
    """Keep the largest RSS of the gateway's processes in peak[0], every 100 ms."""
    while True:
        peak[0] = max(peak[0], await asyncio.to_thread(stage.gateway.rss))
        await asyncio.sleep(0.1)


async def _until_normal(stage: Stage, normal: float) -> tuple[float | None, list[ProbeAnswer]]:
    """Probe from now until RECOVERED_RUN answers in a row take <= `normal` seconds;
    returns the seconds until the first of them was sent (None past RECOVERY_LIMIT + 1 s)."""
    start = time.monotonic()
    answers: list[ProbeAnswer] = []
    run = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() - start < RECOVERY_LIMIT + 1.0:
            answer = await stage.probe.ask(session)
            answers.append(answer)
            run = run + 1 if answer.status == 200 and answer.took <= normal else 0
            if run == RECOVERED_RUN:
                return answers[-RECOVERED_RUN].sent - start, answers
            await asyncio.sleep(0.05)
    return None, answers


async def overload(ctx: Context) -> Outcome:
    """Open loop at twice the capacity measured just before, for ctx.seconds."""
    out = Outcome("overload")
    stage = await prepare(ctx, "overload", seed=14)
    idle = await _idle_latency(stage)
    capacity_run = ChaosRecorder()
    elapsed = await asyncio.wait_for(
        start_load(
            stage.gateway.url,
            stage.fleet,
            capacity_run,
            concurrency=CAPACITY_CONCURRENCY,
            duration=CAPACITY_SECONDS,
        ),
        CAPACITY_SECONDS + 15,
    )
    capacity = capacity_run.completed / elapsed
    rate = OVERLOAD_FACTOR * capacity
    rss_before = stage.gateway.rss()
    peak = [rss_before]
    watcher = asyncio.create_task(_watch_rss(stage, peak))
    try:
        started = time.monotonic()
        load = start_load(
            stage.gateway.url,
            stage.fleet,
            stage.recorder,
            rate=rate,
            duration=ctx.seconds,
            timeout=OVERLOAD_TIMEOUT,
        )
        # A generator that cannot keep up falls behind its schedule and would go on sending
        # long after it: the load is stopped when every request due in the schedule had its
        # time-out, whatever is still queued in the client.
        done, _ = await asyncio.wait({load}, timeout=ctx.seconds + OVERLOAD_TIMEOUT + 0.5)
        if not done:
            load.cancel()
            await asyncio.wait({load}, timeout=10)
        stopped = time.monotonic()
        normal = max(2 * percentile(idle, 90), percentile(idle, 90) + 0.02)
        recovered, answers = await _until_normal(stage, normal)
    finally:
        watcher.cancel()
    rss_after = stage.gateway.rss()

    samples = stage.recorder.samples
    summarise_load(out, stage, samples)
    answered = [s.service for s in samples if s.status != ERROR_STATUS]
    out.max_added_ms = ms(max(answered, default=float("nan")) - median(idle))
    sent_rate = stage.recorder.sent / (stopped - started)
    out.figures.update(
        {
            "capacity, closed loop c=64 (req/s)": round(capacity),
            "offered rate (req/s)": round(rate),
            "sent (req/s, the generator's own limit shows here)": round(sent_rate),
            "scheduled / sent / cut off at the stop": (
                f"{round(rate * ctx.seconds)} / {stage.recorder.sent} "
                f"/ {stage.recorder.sent - len(samples)}"
            ),
            "answered p50 / p99 (ms)": (
                f"{ms(percentile(answered, 50))} / {ms(percentile(answered, 99))}"
            ),
            "idle p50 / p90 (ms)": f"{ms(median(idle))} / {ms(percentile(idle, 90))}",
            "normal means (ms)": ms(normal),
            "load drained (s after the schedule)": round(stopped - started - ctx.seconds, 2),
            "RSS before / peak / after (MB)": (
                f"{rss_before / MB:.1f} / {peak[0] / MB:.1f} / {rss_after / MB:.1f}"
            ),
            "probe answers until normal": len(answers),
        }
    )
    out.check(
        "the gateway stays up",
        stage.gateway.proc.alive(),
        "alive" if stage.gateway.proc.alive() else f"exit {stage.gateway.proc.popen.returncode}",
    )
    growth = peak[0] - rss_before
    out.check(
        f"RSS growth under overload <= {RSS_GROWTH_LIMIT // MB} MB",
        growth <= RSS_GROWTH_LIMIT,
        f"{growth / MB:.1f} MB",
    )
    out.check(
        f"latency normal again within {RECOVERY_LIMIT:g} s after the load stops",
        recovered is not None and recovered <= RECOVERY_LIMIT,
        "never" if recovered is None else f"{recovered:.2f} s",
    )
    common_checks(out, stage, errors_allowed=True)
    return out


async def sigterm_under_load(ctx: Context) -> Outcome:
    """SIGTERM the gateway halfway through the load (the upstream takes 200 ms a request)."""
    out = Outcome("sigterm-under-load")
    stage = await prepare(ctx, "sigterm-under-load", seed=15)
    load = start_load(
        f"{stage.gateway.url}/slow/{SLOW_MS}/x",
        stage.fleet,
        stage.recorder,
        rate=ctx.rate,
        duration=ctx.seconds,
        timeout=SHUTDOWN_GRACE,
    )
    started = time.monotonic()
    await asyncio.sleep(max(2.0, ctx.seconds / 2))
    signalled = time.monotonic()
    code = await asyncio.to_thread(stop_gracefully, stage.gateway.proc, SHUTDOWN_GRACE + 10)
    exited = time.monotonic()
    await asyncio.wait_for(load, ctx.seconds + SHUTDOWN_GRACE + 10)

    samples = stage.recorder.samples
    summarise_load(out, stage, samples)
    before = [s for s in samples if s.sent < signalled]
    in_flight = [s for s in before if s.done > signalled]
    failed = [s for s in before if s.status == ERROR_STATUS]
    after = [s for s in samples if s.sent >= signalled]
    answered = [s.service for s in before if s.status != ERROR_STATUS]
    out.max_added_ms = ms(max(answered, default=float("nan")) - SLOW_MS / 1000)
    out.figures.update(
        {
            "signal after (s of load)": round(signalled - started, 2),
            "exit after the signal (s)": round(exited - signalled, 3),
            "requests in flight at the signal": len(in_flight),
            "outcomes of requests sent before the signal": sample_outcomes(before),
            "outcomes of requests sent after the signal": sample_outcomes(after),
        }
    )
    out.check("exit code 0", code == 0, f"{code}")
    out.check("requests were in flight at the signal", len(in_flight) > 0, f"{len(in_flight)}")
    out.check(
        "no request sent before the signal fails without an answer",
        not failed,
        f"{len(failed)}: {sample_outcomes(failed)}",
    )
    bad = [s for s in before if s.status not in (200, 403)]
    out.check(
        "every request sent before the signal gets 200 (403 if blocked)",
        not bad,
        f"{len(bad)}: {sample_outcomes(bad)}",
    )
    common_checks(out, stage, errors_allowed=True)
    return out
