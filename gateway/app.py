"""The process's run loop: the data plane on the public port, the admin app on its own."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, TextIO

from aiohttp import web

from gateway.admin import create_admin_app
from gateway.admin.hosts import is_loopback
from gateway.blocked_ids import follow_blocked
from gateway.config import Settings
from gateway.dataplane import DataPlane, start_public
from gateway.errors import AdminTokenError
from gateway.metrics import Metrics
from gateway.state import admin_token_file, write_atomic
from gateway.store import DeviceStore, open_store
from gateway.store.blocked import BlockedSeed

log = logging.getLogger("gateway")


def admin_token(
    settings: Settings, *, env: Mapping[str, str] | None = None, stderr: TextIO | None = None
) -> str:
    """The configured admin token, or a random one for this run, which is never logged.

    A generated token is written, readable by this user only, to the state directory
    (`admin-token-<host>-<port>`, where `gateway devices` finds it); the log names the file.
    With no state directory, or the write failing, it is printed once to `stderr` if that is
    a terminal; otherwise AdminTokenError: a token nobody can read would lock everyone out.
    `env` (default os.environ) locates the state directory.
    """
    if settings.admin.token:
        return settings.admin.token
    token = secrets.token_urlsafe(32)
    listen = settings.admin.listen
    if not is_loopback(listen.host):
        log.warning(
            "the admin listener is bound to a non-loopback address with a generated token; "
            "set admin.token and keep the listener off untrusted networks",
            extra={"fields": {"admin": str(listen)}},
        )
    env = os.environ if env is None else env
    path = admin_token_file(settings.state.dir, listen.host, listen.port, env)
    problem = (
        "state.dir is false"
        if settings.state.dir is False
        else "no state directory: state.dir, XDG_STATE_HOME and HOME are unset"
    )
    if path is not None:
        try:
            write_atomic(path, token.encode() + b"\n")
        except OSError as exc:
            problem = f"cannot write {path}: {exc.strerror or exc}"
        else:
            log.warning(
                "no admin token configured; generated one, in a file readable by this user only",
                extra={"fields": {"admin_token_file": str(path)}},
            )
            return token
    stderr = stderr or sys.stderr
    if stderr.isatty():
        log.warning("no admin token configured; generated one, shown on the terminal only")
        # Straight to the terminal, never through logging: logs get shipped.
        print(
            f"gateway: generated admin token for this run (not saved: {problem}):\n  {token}",
            file=stderr,
            flush=True,
        )
        return token
    raise AdminTokenError(
        f"no admin token configured, and nowhere to keep a generated one ({problem}; "
        "stderr is not a terminal): set admin.token (or GATEWAY_ADMIN_TOKEN) or state.dir"
    )


@dataclass(frozen=True, slots=True)
class Running:
    """What a started gateway listens on, for callers that print or test it."""

    public_url: str
    admin_url: str
    admin_token: str


async def serve(
    settings: Settings,
    *,
    store: DeviceStore | None = None,
    on_ready: Callable[[Running], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
    admin: bool = True,
    reuse_port: bool = False,
    metrics: Metrics | None = None,
    blocked_seed: BlockedSeed | None = None,
    keep_snapshot: bool = True,
) -> None:
    """Run the listeners until SIGINT/SIGTERM (or `stop` is set), then shut down cleanly.

    `admin=False` runs the data plane alone (a worker process of `gateway run --workers`,
    whose supervisor serves the admin API). The blocked ids are known before the first
    request is served when they can be: from `blocked_seed` (a worker's supervisor), else
    from the snapshot file, which this process keeps unless `keep_snapshot` is false.
    """
    # Before anything opens: a refusal (AdminTokenError) leaves nothing to clean up.
    token = admin_token(settings) if admin else ""
    own_store = store is None
    store = store or open_store(settings.redis, history_size=settings.devices.history_size)
    metrics = metrics or Metrics()
    keeper = await follow_blocked(
        store, settings, metrics, seed=blocked_seed, keep_snapshot=keep_snapshot
    )
    plane = DataPlane(settings, store, metrics)
    admin_app = create_admin_app(
        store,
        token or "-",
        metrics,
        listen_host=settings.admin.listen.host,
        allowed_hosts=settings.admin.allowed_hosts,
        snapshot=keeper.writer,
    )
    admin_runner = web.AppRunner(admin_app, access_log=None)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    public: asyncio.Server | None = None
    thresholds = gc.get_threshold()
    try:
        listen = settings.server.listen
        public = await start_public(plane, listen.host, listen.port, reuse_port=reuse_port)
        admin_url = ""
        if admin:
            await admin_runner.setup()
            site = web.TCPSite(admin_runner, settings.admin.listen.host, settings.admin.listen.port)
            await site.start()
            admin_url = url_of(admin_runner.addresses[0])
        running = Running(
            public_url=url_of(public.sockets[0].getsockname()),
            admin_url=admin_url,
            admin_token=token,
        )
        log.info(
            "listening",
            extra={
                "fields": {
                    "public": running.public_url,
                    "admin": running.admin_url or None,
                    "upstream": settings.upstream.url,
                    "store": settings.redis.url.split("@")[-1],
                }
            },
        )
        settle_heap()
        await announce_and_wait(running, on_ready, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if public is not None:
            public.close()
        await plane.shutdown(settings.server.shutdown_timeout)
        if public is not None:
            await public.wait_closed()
        await admin_runner.cleanup()
        await keeper.close()
        if own_store:
            await store.close()
        gc.set_threshold(*thresholds)  # as before (several serve() share a test's process)


YOUNG_THRESHOLD: Final = 20_000  # net allocations between two young collections (700)


def settle_heap() -> None:
    """Take what start-up built out of the cyclic collector's sight, and run it less often.

    Modules, settings, the admin app and the clients live as long as the process. Frozen,
    they are no longer walked by every full collection, which otherwise grows with them
    and stalls the loop for milliseconds (bench: p99 at c64 halved, 14 -> 7 ms). Garbage
    from start-up is collected first, not frozen.

    A request's objects are freed by their reference counts, not by the collector, yet
    CPython's default (a young collection every 700 net allocations) ran it every 65 or so
    requests, each walking the requests in flight (docs/bench.md: 4% of a request's
    instructions). The young generation's threshold is raised to YOUNG_THRESHOLD; the few
    cycles that remain (a closed connection's objects) wait a little longer.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


async def announce_and_wait(
    running: Running,
    on_ready: Callable[[Running], Awaitable[None] | None] | None,
    stop: asyncio.Event,
) -> None:
    """Tell the caller what is listening, then wait for the stop signal."""
    if on_ready is not None:
        result = on_ready(running)
        if result is not None:
            await result
    await stop.wait()
    log.info("stopping")


def url_of(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A connectable http:// URL for a bound address (a wildcard bind means loopback)."""
    host, port = address[0], address[1]
    # A wildcard bind is reached on loopback from this machine.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
