"""The `gateway loadtest` sub-command: its options, their validation, and the entry point."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from yarl import URL

if TYPE_CHECKING:
    from gateway.loadtest.command import Options

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's convention for a command stopped by SIGINT
DEFAULT_RATE = 100.0
EXTRA_HINT = "install the loadtest extra: pip install 'devicegate[loadtest]'"


class UsageError(ValueError):
    """An invalid option value; the message names the option."""


def add_parser(subparsers: Any) -> None:
    """Add the `loadtest` sub-command to an argparse sub-parsers action."""
    p = subparsers.add_parser(
        "loadtest",
        help="load a gateway (or any HTTP service) with a simulated device fleet",
        description="Send a simulated device fleet's traffic to TARGET and report "
        "throughput, latency percentiles, status codes and (with the admin API) enforcement.",
    )
    p.add_argument("--target", required=True, help="URL every request goes to")
    p.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--rate", type=float, help=f"open loop: requests/s for the fleet (default {DEFAULT_RATE:g})"
    )
    load.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    p.add_argument("--connections", type=int, help="connection pool size (default: from load)")
    p.add_argument("--post-share", type=float, default=0.0, help="share of POSTs, 0..1")
    p.add_argument("--post-bytes", type=int, default=256, help="POST body size (default 256)")
    p.add_argument("--seed", type=int, default=1, help="fleet and choice seed (default 1)")
    p.add_argument("--blocked-share", type=float, default=0.0, help="share of devices to block")
    p.add_argument("--admin-url", help="gateway admin API, for blocking and the buckets")
    p.add_argument("--admin-token", help="admin bearer token (default $GATEWAY_ADMIN_TOKEN)")
    p.add_argument("--bucket-rate", type=float, help="default bucket: tokens per second")
    p.add_argument("--bucket-burst", type=int, help="default bucket: burst size")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--plot", help="write a latency-over-time PNG here")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")


def _http_url(value: str, option: str) -> str:
    try:
        url = URL(value)
    except (TypeError, ValueError):
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(f"{option} must be an http:// or https:// URL with a host, not {value!r}")
    return value


def _within(value: float, option: str, low: float, high: float, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise UsageError(f"{option} must be {bound} and <= {high:g}, not {value:g}")


def _out_path(value: str | None, option: str) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.parent.is_dir():
        raise UsageError(f"{option}: directory {str(path.parent)!r} does not exist")
    return path


def options_from(args: argparse.Namespace, env: Mapping[str, str], tty: bool) -> Options:
    """Validate parsed arguments into Options; raises UsageError naming the bad option."""
    from gateway.loadtest.command import Options
    from gateway.loadtest.spec import LoadSpec
    from gateway.model import Bucket

    target = _http_url(args.target, "--target")
    _within(args.devices, "--devices", 1, 1_000_000)
    if args.concurrency is not None:
        _within(args.concurrency, "--concurrency", 1, 10_000)
    rate = args.rate if args.rate is not None or args.concurrency is not None else DEFAULT_RATE
    if rate is not None:
        _within(rate, "--rate", 0, 1_000_000, low_open=True)
    _within(args.duration, "--duration", 0, 86_400, low_open=True)
    _within(args.timeout, "--timeout", 0, 3_600, low_open=True)
    if args.connections is not None:
        _within(args.connections, "--connections", 1, 10_000)
    _within(args.post_share, "--post-share", 0, 1)
    _within(args.post_bytes, "--post-bytes", 0, 10 * 1024 * 1024)
    _within(args.blocked_share, "--blocked-share", 0, 1)
    admin_url = _http_url(args.admin_url, "--admin-url") if args.admin_url else None
    token = args.admin_token or env.get("GATEWAY_ADMIN_TOKEN")
    if admin_url and not token:
        raise UsageError("--admin-url needs --admin-token (or $GATEWAY_ADMIN_TOKEN)")
    if args.blocked_share > 0 and not admin_url:
        raise UsageError("--blocked-share needs --admin-url and --admin-token to block devices")
    bucket = None
    if (args.bucket_rate is None) != (args.bucket_burst is None):
        raise UsageError("--bucket-rate and --bucket-burst go together")
    if args.bucket_rate is not None:
        _within(args.bucket_rate, "--bucket-rate", 0, 1_000_000, low_open=True)
        _within(args.bucket_burst, "--bucket-burst", 1, 1_000_000)
        bucket = Bucket(rate=args.bucket_rate, burst=args.bucket_burst)
    return Options(
        spec=LoadSpec(
            target=target,
            rate=rate,
            concurrency=args.concurrency,
            duration=args.duration,
            timeout=args.timeout,
            post_share=args.post_share,
            post_bytes=args.post_bytes,
            seed=args.seed,
            connections=args.connections,
        ),
        devices=args.devices,
        blocked_share=args.blocked_share,
        admin_url=admin_url,
        admin_token=token,
        bucket=bucket,
        report=_out_path(args.report, "--report"),
        plot=_out_path(args.plot, "--plot"),
        progress=tty and not args.no_progress,
    )


def run(
    args: argparse.Namespace,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run `gateway loadtest` with parsed arguments; returns the exit code."""
    env = os.environ if env is None else env
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        from gateway.loadtest.command import run_blocking
        from gateway.loadtest.plot import plot_available
    except ImportError as exc:
        print(f"gateway loadtest: {exc.name or exc} is missing: {EXTRA_HINT}", file=err)
        return EXIT_USAGE
    try:
        options = options_from(args, env, tty=out.isatty())
        if options.plot is not None and not plot_available():
            raise UsageError(f"--plot needs matplotlib: {EXTRA_HINT}")
    except UsageError as exc:
        print(f"gateway loadtest: {exc}", file=err)
        return EXIT_USAGE
    try:
        return run_blocking(options, out, err)
    except KeyboardInterrupt:  # the load stopped and the devices blocked for it unblocked
        print("gateway loadtest: interrupted", file=err)
        return EXIT_INTERRUPTED
