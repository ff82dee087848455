"""What every exchange of one process shares, and all it may see of the process.

Built once at start: the verdicts (the Enforcer), the upstream pool, the limits an exchange
applies, the loop it schedules on and the clock of the Date header. An exchange reaches
nothing else of the process (gateway.dataplane.exchange).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.utils import formatdate

from gateway.config import LimitSettings, UpstreamSettings
from gateway.dataplane.upstream import UpstreamPool
from gateway.enforce import Enforcement


class Forwarding:
    """The process-wide part of forwarding a request: shared, read-only but for the clock."""

    def __init__(
        self,
        enforcer: Enforcement,
        pool: UpstreamPool,
        upstream: UpstreamSettings,
        limits: LimitSettings,
        *,
        identity_names: frozenset[bytes],
        loop: asyncio.AbstractEventLoop | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.enforcer = enforcer
        self.pool = pool
        self.timeout = upstream.timeout
        self.preserve_host = upstream.preserve_host
        self.max_body = limits.max_body_bytes
        self.request_buffering = limits.request_buffering
        self.buffer_memory_bytes = limits.buffer_memory_bytes
        self.buffer_dir = limits.buffer_dir
        # Lower-cased names of the device headers: never hop-by-hop, no lookalikes upstream.
        self.identity_names = identity_names
        self.loop = loop  # bound when the first connection comes, unless injected
        self._wall_clock = wall_clock
        self._date = b""
        self._date_second = -1

    def date(self) -> bytes:
        """The HTTP Date header value, formatted once per second."""
        now = int(self._wall_clock())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date
