"""One process's data plane: built from the settings, it hands out client connections and
keeps their deadlines.

It builds what the connections share (gateway.dataplane.connection.Connections) and what
their exchanges see (gateway.dataplane.forwarding.Forwarding): the Enforcer over the store,
the upstream pool, the limits. The loop and the wall clock are injected (by default the
running loop, found when the first connection comes, and `time.time`), so the protocols
can be driven without sockets or sleeping. One timer a second checks every connection's
deadlines, as nginx does, instead of a timer per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from gateway.config import Settings
from gateway.dataplane.connection import ClientConnection, Connections
from gateway.dataplane.forwarding import Forwarding
from gateway.dataplane.upstream import UpstreamPool
from gateway.enforce import Enforcement, Enforcer
from gateway.metrics import Metrics
from gateway.model import DEVICE_FIELDS
from gateway.store import DeviceStore

SWEEP_INTERVAL: Final = 1.0  # seconds between two checks of every connection's deadlines
SHUTDOWN_POLL: Final = 0.05  # seconds between two looks at the connections left at a stop


class DataPlane(Connections):
    """The public listener's shared state, its protocol factory and its deadlines."""

    def __init__(
        self,
        settings: Settings,
        store: DeviceStore,
        metrics: Metrics | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        metrics = metrics or Metrics()
        headers = settings.devices.headers
        names = [headers.id, *(getattr(headers, field) for field in DEVICE_FIELDS)]
        enforcer: Enforcement = Enforcer(settings, store, metrics)
        forwarding = Forwarding(
            enforcer,
            UpstreamPool(settings.upstream, loop=loop),
            settings.upstream,
            settings.limits,
            identity_names=frozenset(n.lower().encode() for n in names),
            loop=loop,
            wall_clock=wall_clock,
        )
        server = settings.server
        super().__init__(
            forwarding,
            metrics,
            # Lower-cased as the raw bytes compare and as the FieldValues key, made once.
            enforced_headers={n.lower().encode(): n.lower() for n in [*names, "X-Forwarded-For"]},
            trusted_proxies=server.trusted_proxies,
            header_timeout=server.header_timeout,
            keepalive_timeout=server.keepalive_timeout,
            body_timeout=server.body_timeout,
            max_connections=server.max_connections,
            access_log=settings.log.access,
        )
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def pool(self) -> UpstreamPool:
        """The upstream pool."""
        return self.forwarding.pool

    @property
    def enforcer(self) -> Enforcement:
        """What gives every request its verdict."""
        return self.forwarding.enforcer

    @enforcer.setter
    def enforcer(self, enforcer: Enforcement) -> None:
        self.forwarding.enforcer = enforcer

    def protocol(self) -> ClientConnection:
        """A protocol factory for `loop.create_server`."""
        if self._sweeper is None:
            self.bind(self.loop or asyncio.get_running_loop())
            self._sweep()
        return ClientConnection(self)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on `loop` (found once: Python 3.11's get_running_loop() calls getpid())."""
        self.forwarding.loop = loop
        self.forwarding.pool.loop = loop

    def date(self) -> bytes:
        """The HTTP Date header value, formatted once per second."""
        return self.forwarding.date()

    def _sweep(self) -> None:
        """Once a second: enforce the connection deadlines (keep-alive idle, request head,
        lingering close, request body silence)."""
        loop = self.loop or asyncio.get_running_loop()
        now = loop.time()
        idle_before = now - self.keepalive_timeout
        silent_before = now - self.body_timeout
        for conn in list(self.connections):
            if 0 < conn.idle_since < idle_before:
                conn.close_when_idle()
            elif 0 < conn.head_deadline < now:
                conn.head_timed_out()
            elif 0 < conn.linger_until < now:
                conn.abort()
            elif conn.awaiting_body and conn.last_read < silent_before:
                conn.body_timed_out()
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now; give busy ones up to `timeout`, then cut them."""
        self.stopping = True
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL)
        for conn in list(self.connections):
            conn.abort()
        self.pool.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
