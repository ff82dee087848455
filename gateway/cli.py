"""The `gateway` command: argument parsing and dispatch only.

Each command's work lives in the module it names: gateway.run, gateway.devices and
gateway.loadtest; this module turns their failures into messages and exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from gateway.config import Settings, load_config
from gateway.errors import (
    AdminClientError,
    AdminTokenError,
    ConfigError,
    StoreError,
    WorkerFailed,
)
from gateway.loadtest import cli as loadtest_cli
from gateway.redis_topology import describe, parse_redis_url

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _config_path(arg: str | None, env: Mapping[str, str]) -> str | None:
    """--config, else $GATEWAY_CONFIG, else ./config.yaml when present, else built-in defaults."""
    if arg:
        return arg
    if env.get("GATEWAY_CONFIG"):
        return env["GATEWAY_CONFIG"]
    return "config.yaml" if Path("config.yaml").is_file() else None


async def _reindex(settings: Settings, out: TextIO, err: TextIO) -> int:
    """`gateway reindex`: every device of the store into the search indexes."""
    from gateway.store import open_store

    store = open_store(settings.redis)
    try:
        count = await store.reindex()
    except StoreError as exc:
        print(f"gateway: reindex failed: {exc}", file=err)
        return EXIT_FAILURE
    finally:
        await store.close()
    print(f"reindexed {count} devices", file=out)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="devicegate: a reverse proxy that enforces policy per device."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", help="config file (default: ./config.yaml if present)")
    run.add_argument(
        "--demo",
        action="store_true",
        help="also start a built-in echo upstream on loopback and print curl lines to try",
    )
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="data-plane processes sharing the public port (default: the number of CPUs; "
        "always 1 on the embedded memory:// store)",
    )

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", help="config file (default: ./config.yaml if present)")

    reindex = sub.add_parser(
        "reindex",
        help="put every device of the configured store in the search indexes (once, after "
        "upgrading from a release without them; idempotent)",
    )
    reindex.add_argument("--config", help="config file (default: ./config.yaml if present)")

    # Accepted before or after the action (`gateway devices --json list` and
    # `gateway devices list --json`); SUPPRESS keeps a later parser from resetting them.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--config", help="config file, for the admin address and token")
    common.add_argument("--admin-url", help="admin API base URL (default: from admin.listen)")
    common.add_argument("--token", help="admin token (default: $GATEWAY_ADMIN_TOKEN)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    devices = sub.add_parser(
        "devices", help="manage devices through a running admin API", parents=[common]
    )
    dsub = devices.add_subparsers(dest="action", required=True, metavar="ACTION")
    lst = dsub.add_parser("list", help="list devices, most recent activity first", parents=[common])
    lst.add_argument("--name", help="case-insensitive substring of the name or id")
    lst.add_argument("--blocked", choices=("all", "hide", "only"), default="all")
    lst.add_argument("--page", type=int, default=1)
    lst.add_argument("--amount", type=int, default=20)
    for action in ("show", "block", "unblock"):
        p = dsub.add_parser(action, help=f"{action} one device", parents=[common])
        p.add_argument("id")
    loadtest_cli.add_parser(sub)

    rename = dsub.add_parser(
        "rename", help="set a device's custom name ('' clears it)", parents=[common]
    )
    rename.add_argument("id")
    rename.add_argument("name")
    return parser


def _load(args: argparse.Namespace, env: Mapping[str, str], err: TextIO) -> Settings | None:
    try:
        return load_config(_config_path(getattr(args, "config", None), env), env)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=err)
        return None


def _run(settings: Settings, demo: bool, workers: int, out: TextIO) -> int:
    from gateway.run import run  # the data plane and the admin app, for this command only

    try:
        run(settings, demo=demo, workers=workers, out=out)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, WorkerFailed, AdminTokenError) as exc:
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _devices(
    args: argparse.Namespace, settings: Settings, env: Mapping[str, str], out: TextIO
) -> int:
    from gateway.devices import DevicesCommand, run  # the admin client, for this command only

    command = DevicesCommand(
        action=args.action,
        device_id=getattr(args, "id", None),
        name=getattr(args, "name", None),
        blocked=getattr(args, "blocked", "all"),
        page=getattr(args, "page", 1),
        amount=getattr(args, "amount", 20),
        as_json=getattr(args, "json", False),
        token=getattr(args, "token", None),
        admin_url=getattr(args, "admin_url", None),
    )
    run(command, settings, env, out)
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Entry point of the `gateway` console script; returns the exit code."""
    env = os.environ if env is None else env
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    if args.command == "loadtest":
        return loadtest_cli.run(args, env=env, out=out, err=err)  # needs no gateway config
    settings = _load(args, env, err)
    if settings is None:
        return EXIT_USAGE
    if args.command == "check-config":
        print(f"config ok: {_config_path(args.config, env) or '<defaults>'}", file=out)
        print(f"store: {describe(parse_redis_url(settings.redis.url))}", file=out)
        return EXIT_OK
    if args.command == "reindex":
        return asyncio.run(_reindex(settings, out, err))
    if args.command == "run":
        if args.log_level:
            settings = dataclasses.replace(
                settings, log=dataclasses.replace(settings.log, level=args.log_level)
            )
        workers = args.workers
        if workers < 1:
            print("gateway: --workers must be at least 1", file=err)
            return EXIT_USAGE
        if workers > 1 and settings.redis.url.startswith("memory:"):
            # The embedded store lives in one process: workers would not share devices.
            print("gateway: memory:// store: running 1 worker", file=err)
            workers = 1
        return _run(settings, args.demo, workers, out)
    try:
        return _devices(args, settings, env, out)
    except AdminClientError as exc:
        print(f"gateway: {exc}", file=err)
        return EXIT_FAILURE
