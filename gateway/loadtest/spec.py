"""What a load test sends, how fast and for how long (pure), and the pool size that follows."""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_CONNECTIONS = 16
MAX_CONNECTIONS = 1024


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to send, how fast and for how long."""

    target: str
    rate: float | None = None  # open loop: requests per second for the whole fleet
    concurrency: int | None = None  # closed loop: requests in flight
    duration: float = 10.0
    timeout: float = 10.0
    post_share: float = 0.0
    post_bytes: int = 256
    seed: int = 1
    connections: int | None = None  # None: sized from the load

    @property
    def open_loop(self) -> bool:
        """True for a fixed arrival rate, False for a fixed concurrency."""
        return self.concurrency is None


def connection_limit(spec: LoadSpec) -> int:
    """The connection pool's size: C in closed loop; in open loop enough for rate * timeout."""
    if spec.connections is not None:
        return spec.connections
    if spec.concurrency is not None:
        return spec.concurrency
    wanted = math.ceil((spec.rate or 0) * spec.timeout)
    return min(MAX_CONNECTIONS, max(MIN_CONNECTIONS, wanted))
