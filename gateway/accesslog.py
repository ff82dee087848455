"""The access log: one JSON line per request, written after the answer is sent."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.logs import ACCESS_LOGGER
from gateway.metrics import Metrics


class RequestInfo:
    """What the layers learn about one request, for its log line."""

    __slots__ = ("decision", "device_id", "start", "upstream_s")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.device_id: str | None = None
        self.decision = "-"
        self.upstream_s: float | None = None


REQUEST_INFO = web.RequestKey("devicegate.request_info", RequestInfo)


def access_log_middleware(*, enabled: bool = True, metrics: Metrics | None = None) -> Middleware:
    """Outermost middleware: starts the request's info; counts and logs it once it is done."""
    metrics = metrics or Metrics()
    logger = logging.getLogger(ACCESS_LOGGER)

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        info = RequestInfo()
        request[REQUEST_INFO] = info
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away before the answer was complete
            raise
        finally:
            metrics.observe(info.decision, status)
            if enabled and logger.isEnabledFor(logging.INFO):
                logger.info(
                    "request",
                    extra={
                        "fields": {
                            "device_id": info.device_id,
                            "method": request.method,
                            "path": request.raw_path,
                            "status": status,
                            "decision": info.decision,
                            "upstream_ms": (
                                None
                                if info.upstream_s is None
                                else round(info.upstream_s * 1000, 3)
                            ),
                            "total_ms": round((time.perf_counter() - info.start) * 1000, 3),
                            "remote": request.remote,
                        }
                    },
                )

    return impl
