"""What an exchange tells its client connection when it ends (compiled: one per request)."""

from __future__ import annotations


class ExchangeReport:
    """What an exchange tells its connection when it ends: the fields of its access-log
    line, and whether the connection may serve another request after it."""

    def __init__(
        self,
        exchange: object,
        method: bytes,
        target: bytes,
        *,
        status: int,
        decision: str,
        device_id: str | None,
        started: float,
        upstream_started: float | None,
        keep_alive: bool,
        body_done: bool,
        stalled: bool,
    ) -> None:
        self.exchange = exchange  # which one ended (the connection holds it in its queue)
        self.method = method
        self.target = target
        self.status = status  # 0: no answer was sent; 499: the client left first
        self.decision = decision
        self.device_id = device_id
        self.started = started  # perf_counter() when its head was read
        self.upstream_started = upstream_started  # perf_counter() when it went upstream
        self.keep_alive = keep_alive  # the connection may serve another request
        self.body_done = body_done  # the request body was read to its end
        self.stalled = stalled  # the body will never be read to its end: close at once
