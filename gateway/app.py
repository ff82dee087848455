"""Application factories and the process's run loop."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.accesslog import access_log_middleware
from gateway.admin import create_admin_app
from gateway.config import Settings
from gateway.enforce import Enforcer, enforce_middleware, extra_headers
from gateway.metrics import Metrics
from gateway.proxy import Forwarder, forwarder_ctx
from gateway.store import Store

log = logging.getLogger("gateway")

KEEPALIVE_TIMEOUT = 75.0  # seconds; aiohttp's default of 3630 s holds idle sockets for an hour
SHUTDOWN_TIMEOUT = 30.0


def handler_args() -> dict[str, object]:
    """Server settings for the public listener: never decompress, bounded keep-alive."""
    return {"auto_decompress": False, "keepalive_timeout": KEEPALIVE_TIMEOUT}


def create_app(settings: Settings, store: Store, metrics: Metrics | None = None) -> web.Application:
    """The public (data plane) application. The caller owns the store's lifecycle."""
    forwarder = Forwarder(settings.upstream, settings.limits)
    metrics = metrics or Metrics()
    app = web.Application(
        middlewares=[
            access_log_middleware(enabled=settings.log.access, metrics=metrics),
            enforce_middleware(enforcer=Enforcer(settings, store, metrics)),
        ],
        client_max_size=settings.limits.max_body_bytes,
        handler_args=handler_args(),
    )

    async def forward(request: web.Request) -> web.StreamResponse:
        return await forwarder.forward(request, extra_headers(request))

    app.router.add_route("*", "/{tail:.*}", forward)
    app.cleanup_ctx.append(forwarder_ctx(forwarder))
    return app


def admin_token(settings: Settings) -> str:
    """The configured admin token, or a random one logged once."""
    if settings.admin.token:
        return settings.admin.token
    token = secrets.token_urlsafe(32)
    log.warning(
        "no admin token configured; generated one for this run",
        extra={"fields": {"admin_token": token}},
    )
    return token


@dataclass(frozen=True, slots=True)
class Running:
    """What a started gateway listens on, for callers that print or test it."""

    public_url: str
    admin_url: str
    admin_token: str


async def serve(
    settings: Settings,
    *,
    store: Store | None = None,
    on_ready: Callable[[Running], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run both listeners until SIGINT/SIGTERM (or `stop` is set), then shut down cleanly."""
    own_store = store is None
    store = store or Store.from_settings(settings.redis, history_size=settings.devices.history_size)
    await store.start()
    token = admin_token(settings)
    metrics = Metrics()
    public = web.AppRunner(
        create_app(settings, store, metrics), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    admin = web.AppRunner(create_admin_app(store, token, metrics), access_log=None)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await public.setup()
        await admin.setup()
        public_site = web.TCPSite(
            public, settings.server.listen.host, settings.server.listen.port, backlog=1024
        )
        admin_site = web.TCPSite(admin, settings.admin.listen.host, settings.admin.listen.port)
        await public_site.start()
        await admin_site.start()
        running = Running(
            public_url=_url(public),
            admin_url=_url(admin),
            admin_token=token,
        )
        log.info(
            "listening",
            extra={
                "fields": {
                    "public": running.public_url,
                    "admin": running.admin_url,
                    "upstream": settings.upstream.url,
                    "store": settings.redis.url.split("@")[-1],
                }
            },
        )
        if on_ready is not None:
            result = on_ready(running)
            if result is not None:
                await result
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await public.cleanup()
        await admin.cleanup()
        if own_store:
            await store.close()


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    # A wildcard bind is reached on loopback from this machine.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
