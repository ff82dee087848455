"""`gateway run --workers N`: a supervisor with the admin listener and N data-plane processes.

Each worker binds the public port with SO_REUSEPORT (the kernel spreads connections), runs
its own store connections and upstream pool, and counts into its block of a shared mapped
file that the supervisor's /metrics adds up. Workers get their settings from the supervisor
over a pipe (so CLI overrides and the demo upstream apply to them too), with the blocked ids
the supervisor knows at that moment (so a worker started while Redis cannot answer still
refuses blocked devices), and say "ready" on stdout. The supervisor follows the blocked ids
itself and is the one process that keeps their snapshot file. A worker that dies is started
again; one that dies at the first start (a port in use, say) stops the whole run.
SIGTERM/SIGINT stops the workers gracefully, then the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from aiohttp import web

from gateway.admin import create_admin_app
from gateway.app import (
    Running,
    admin_token,
    announce_and_wait,
    serve,
    url_of,
)
from gateway.blocked_ids import follow_blocked
from gateway.config import Settings
from gateway.errors import WorkerFailed
from gateway.metrics import Metrics, SharedCounters, render
from gateway.store import open_store
from gateway.store.blocked import BlockedSeed

log = logging.getLogger("gateway")

READY: Final = b"ready\n"
START_TIMEOUT: Final = 15.0
RESTART_DELAY: Final = 1.0


class SupervisedMetrics:
    """What the supervisor's /metrics shows: every worker's block and its own."""

    def __init__(self, counters: SharedCounters, own: Metrics) -> None:
        self._counters = counters
        self._own = own

    def processes(self) -> list[tuple[str, Metrics]]:
        """The workers' counters, then the supervisor's."""
        return [*self._counters.processes(), ("supervisor", self._own)]

    def render(self) -> str:
        """Every process's counters in the Prometheus text format."""
        named = self.processes()
        return render([m for _, m in named], [n for n, _ in named])


class _Worker:
    """One worker process and what the supervisor knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None


async def _spawn(worker: _Worker, payload: bytes) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.workers",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    worker.proc = proc
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(payload)
    await proc.stdin.drain()
    proc.stdin.close()
    try:
        async with asyncio.timeout(START_TIMEOUT):
            line = await proc.stdout.readline()
    except TimeoutError:
        line = b""
    if line != READY:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise WorkerFailed(f"worker {worker.index} did not start (exit code {proc.returncode})")


async def supervise(
    settings: Settings,
    workers: int,
    *,
    on_ready: Callable[[Running], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run N data-plane workers and the admin listener until stopped."""
    directory = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    counters_path = directory / f"devicegate-{os.getpid()}.metrics"
    counters = SharedCounters(counters_path, workers, create=True)
    store = open_store(settings.redis, history_size=settings.devices.history_size)
    own = Metrics()
    keeper = await follow_blocked(store, settings, own, keep_snapshot=True)
    token = admin_token(settings)
    admin = web.AppRunner(
        create_admin_app(
            store,
            token,
            SupervisedMetrics(counters, own),
            listen_host=settings.admin.listen.host,
            allowed_hosts=settings.admin.allowed_hosts,
            snapshot=keeper.writer,
        ),
        access_log=None,
    )
    stop = stop or asyncio.Event()
    stopping = False
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pool = [_Worker(i) for i in range(workers)]

    def payload(index: int) -> bytes:
        # Built at each start: a worker begins with what the supervisor knows right now.
        return pickle.dumps(
            (settings, index, workers, str(counters_path), store.blocked.handover())
        )

    async def keep_alive(worker: _Worker) -> None:
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if stopping:
                return
            log.error("worker %d exited with %s; starting it again", worker.index, code)
            await asyncio.sleep(RESTART_DELAY)
            try:
                await _spawn(worker, payload(worker.index))
            except WorkerFailed as exc:
                log.error("%s", exc)

    watchers: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(_spawn(w, payload(w.index)) for w in pool))
        watchers = [asyncio.create_task(keep_alive(w)) for w in pool]
        await admin.setup()
        site = web.TCPSite(admin, settings.admin.listen.host, settings.admin.listen.port)
        await site.start()
        listen = settings.server.listen
        running = Running(
            public_url=url_of((listen.host, listen.port)),
            admin_url=url_of(admin.addresses[0]),
            admin_token=token,
        )
        log.info(
            "listening",
            extra={"fields": {"public": running.public_url, "admin": running.admin_url,
                              "workers": workers, "upstream": settings.upstream.url}},
        )  # fmt: skip
        await announce_and_wait(running, on_ready, stop)
    finally:
        stopping = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await _stop_workers(pool, settings.server.shutdown_timeout)
        for task in watchers:
            task.cancel()
        await admin.cleanup()
        await keeper.close()
        await store.close()
        counters.close()
        counters_path.unlink(missing_ok=True)


async def _stop_workers(pool: list[_Worker], shutdown_timeout: float) -> None:
    running = [w.proc for w in pool if w.proc is not None and w.proc.returncode is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(shutdown_timeout + 5):
            await asyncio.gather(*(p.wait() for p in running))
    except TimeoutError:
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.gather(*(p.wait() for p in running))


async def _worker(
    settings: Settings, index: int, workers: int, counters_path: str, seed: BlockedSeed | None
) -> None:
    counters = SharedCounters(Path(counters_path), workers, create=False)

    def ready(_running: Running) -> None:
        sys.stdout.buffer.write(READY)
        sys.stdout.buffer.flush()

    try:
        await serve(
            settings,
            admin=False,
            reuse_port=True,
            metrics=counters.block(index),
            on_ready=ready,
            blocked_seed=seed,
            keep_snapshot=False,  # the supervisor's file: one writer
        )
    finally:
        counters.close()


def worker_main() -> int:
    """Entry point of a worker process: settings arrive pickled on stdin from the supervisor."""
    from gateway import loops
    from gateway.logs import setup_logging

    settings, index, workers, counters_path, seed = pickle.loads(sys.stdin.buffer.read())
    setup_logging(settings.log.level)
    try:
        loops.run(_worker(settings, index, workers, counters_path, seed))
    except OSError as exc:
        log.error("worker %d cannot start: %s", index, exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
