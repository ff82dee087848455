"""`gateway run`: the event loop and logging, the demo upstream, then one process or the
supervisor of `--workers` (gateway.app, gateway.workers)."""

from __future__ import annotations

import dataclasses
from typing import TextIO

from gateway import loops
from gateway.app import Running, admin_token, serve
from gateway.config import Settings
from gateway.demo import curl_lines, start_echo
from gateway.logs import setup_logging


def run(settings: Settings, *, demo: bool, workers: int, out: TextIO) -> None:
    """Run the gateway until it is stopped; with `demo`, the curl lines to try go to `out`.

    Raises ConfigError before anything starts (DEVICEGATE_LOOP names a loop not to be had),
    and OSError, WorkerFailed or AdminTokenError when the gateway cannot start.
    """
    factory = loops.loop_factory()
    setup_logging(settings.log.level)

    async def main() -> None:
        echo = None
        # Resolved once, before anything starts: a generated token is written (or refused)
        # once, and serve or supervise find it in the settings.
        token = admin_token(settings)
        current = dataclasses.replace(
            settings, admin=dataclasses.replace(settings.admin, token=token)
        )
        if demo:
            echo, origin = await start_echo()
            current = dataclasses.replace(
                current, upstream=dataclasses.replace(current.upstream, url=origin)
            )

        def ready(running: Running) -> None:
            if demo:
                print(
                    curl_lines(running.public_url, running.admin_url, running.admin_token),
                    file=out,
                    flush=True,
                )

        try:
            if workers > 1:
                from gateway.workers import supervise  # the supervisor's imports, only for it

                await supervise(current, workers, on_ready=ready)
            else:
                await serve(current, on_ready=ready)
        finally:
            if echo is not None:
                await echo.cleanup()

    loops.run(main(), factory)
