"""The fallback upstream when nginx is not installed: answers 200 to everything, fast.

    .venv/bin/python bench/upstream.py --port 9000

aiohttp's low-level server (no router, no middlewares) on uvloop when installed, one
process, loopback only. Stopped by SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web, web_server

from gateway import loops

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

BODY = b'{"ok":true}\n'


async def handle(request: web.BaseRequest) -> web.Response:
    """Read the body (a real API would) and answer a small JSON document."""
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


async def serve(port: int, handler: Handler = handle) -> None:
    """Serve `handler` on 127.0.0.1:port until SIGTERM or SIGINT."""
    server = web_server.Server(handler, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(handler: Handler = handle, description: str | None = __doc__) -> None:
    """`--port N`: serve `handler` there, on uvloop when installed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    loops.run(serve(port, handler))


if __name__ == "__main__":
    main()
