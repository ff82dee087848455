"""The loadtest command's flow: block devices, send the load, check enforcement, report."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from gateway import loops
from gateway.admin_client import AdminClient
from gateway.errors import AdminClientError
from gateway.loadtest.clock import precise_loop
from gateway.loadtest.enforcement import EnforcementResult, check
from gateway.loadtest.fleet import Fleet, build_fleet, choose_blocked
from gateway.loadtest.fleet_admin import block_all, own_buckets, unblock_all
from gateway.loadtest.progress import Progress
from gateway.loadtest.report import build_report, render_table, write_json
from gateway.loadtest.results import Recorder
from gateway.loadtest.runner import LoadRunner
from gateway.loadtest.spec import LoadSpec
from gateway.model import Bucket

EXIT_OK = 0
EXIT_FAILED = 1  # the check failed, nothing was answered, the admin API or a write failed


@dataclass(frozen=True, slots=True)
class Options:
    """A validated loadtest invocation."""

    spec: LoadSpec
    devices: int
    blocked_share: float = 0.0
    admin_url: str | None = None
    admin_token: str | None = None
    bucket: Bucket | None = None  # the default bucket, for devices without their own
    report: Path | None = None
    plot: Path | None = None
    progress: bool = False

    @property
    def checks_enforcement(self) -> bool:
        """True when the run ends with the enforcement check."""
        return self.admin_url is not None or self.bucket is not None


async def _buckets(
    options: Options, admin: AdminClient | None, fleet: Fleet, candidates: list[int]
) -> dict[int, Bucket | None]:
    """Each checked device's bucket: its own from the admin API, else the given default."""
    own: dict[str, Bucket | None] = {}
    if admin is not None:
        own = await own_buckets(admin, [fleet[i].id for i in candidates])
    return {i: own.get(fleet[i].id) or options.bucket for i in candidates}


async def execute(options: Options, out: TextIO, err: TextIO) -> int:
    """Run the whole command; returns the exit code."""
    started_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    fleet = build_fleet(options.devices, options.spec.seed)
    blocked = choose_blocked(len(fleet), options.blocked_share, options.spec.seed)
    blocked_ids = [fleet[i].id for i in blocked]
    recorder = Recorder(keep_send_times=options.checks_enforcement)
    admin = (
        AdminClient(options.admin_url, options.admin_token or "")
        if options.admin_url is not None
        else None
    )
    enforcement: EnforcementResult | None = None
    blocked_now: list[str] = []
    elapsed = 0.0
    try:
        if admin is not None and blocked_ids:
            blocked_now = blocked_ids
            await block_all(admin, blocked_ids)
        progress = Progress(out) if options.progress else None
        elapsed = await LoadRunner(options.spec, fleet, recorder).run(progress)
        if progress is not None:
            progress.finish()
        if options.checks_enforcement:
            blocked_set = set(blocked)
            tally = recorder.devices
            candidates = [
                i for i in sorted(tally.statuses) if i not in blocked_set and tally.answered(i)
            ]
            buckets = await _buckets(options, admin, fleet, candidates)
            enforcement = check(fleet, recorder.devices, blocked, buckets)
    except AdminClientError as exc:
        print(f"gateway loadtest: {exc}", file=err)
        return EXIT_FAILED
    finally:
        await _release(admin, blocked_now, err)
    report = build_report(
        options.spec, len(fleet), recorder, elapsed, started_at, enforcement=enforcement
    )
    print(render_table(report), file=out)
    try:
        _write_outputs(options, report)
    except OSError as exc:
        print(f"gateway loadtest: cannot write {exc.filename or 'the output'}: {exc}", file=err)
        return EXIT_FAILED
    if enforcement is not None and not enforcement.passed:
        return EXIT_FAILED
    return EXIT_OK if recorder.completed else EXIT_FAILED


async def _release(admin: AdminClient | None, blocked_ids: list[str], err: TextIO) -> None:
    """Unblock what this run blocked, and close the admin client."""
    if admin is None:
        return
    try:
        if blocked_ids:
            await unblock_all(admin, blocked_ids)
    except AdminClientError as exc:
        print(f"gateway loadtest: could not unblock the run's devices: {exc}", file=err)
    finally:
        await admin.close()


def _write_outputs(options: Options, report: dict[str, Any]) -> None:
    if options.report is not None:
        write_json(report, options.report)
    if options.plot is not None:
        from gateway.loadtest.plot import write_plot

        write_plot(report, options.plot)


def run_blocking(options: Options, out: TextIO, err: TextIO) -> int:
    """Run the command: open loop on the loop with precise timers, closed loop on uvloop.

    Closed loop wants throughput, and uvloop gives it; open loop wants each send on time,
    and uvloop's timers tick in whole milliseconds (see `clock`).
    """
    if options.spec.open_loop:
        return loops.run(execute(options, out, err), precise_loop)
    return loops.run(execute(options, out, err))
