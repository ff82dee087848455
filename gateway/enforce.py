"""The enforce middleware: identity -> declared body size -> store decision -> answer or pass on.

Order of checks: identity validation (400) -> declared body size (413) -> blocked (403, no
token taken) -> token bucket (429) -> forward. When the store cannot be asked, `on_error`
decides: `open` forwards without rate-limit headers (they are never invented), `closed`
answers 503 with Retry-After.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Literal

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from gateway import responses
from gateway.accesslog import REQUEST_INFO
from gateway.config import Settings
from gateway.errors import IdentityError, StoreUnavailable
from gateway.identity import IdentityReader, client_ip
from gateway.metrics import Metrics
from gateway.model import Outcome
from gateway.ratelimit import BucketPolicy, rate_limit_headers, retry_after_seconds
from gateway.store import Store

log = logging.getLogger(__name__)

RATE_LIMIT_HEADERS = web.RequestKey("devicegate.rate_limit_headers", dict[str, str])

BLOCKED_REASON = "Access denied: device is blocked"
LIMITED_REASON = "Too many requests"
UNAVAILABLE_REASON = "Service temporarily unavailable"
ANONYMOUS_REASON = "A device id is required"
CONNECT_REASON = "Method not allowed"
INTERNAL_REASON = "Internal error"
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class Enforcer:
    """Everything the middleware needs, built once at start from the settings."""

    __slots__ = ("_metrics", "_on_error", "_store", "identity", "max_body", "policy",
                 "require_id", "trusted", "upload_methods")  # fmt: skip

    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None) -> None:
        self._store = store
        self._metrics = metrics or Metrics()
        self._on_error: Literal["open", "closed"] = settings.redis.on_error
        self.identity = IdentityReader(settings.devices)
        self.policy = BucketPolicy(settings.rate_limits)
        self.max_body = settings.limits.max_body_bytes
        self.require_id = settings.devices.require_id
        self.trusted = settings.server.trusted_proxies
        self.upload_methods = settings.devices.data_upload_methods

    async def check(self, request: web.Request) -> web.StreamResponse | dict[str, str] | None:
        """An answer to send instead of forwarding, or the rate-limit headers to add (or None)."""
        info = request[REQUEST_INFO]
        if request.method == hdrs.METH_CONNECT:
            info.decision = "method"
            return responses.error(
                405,
                CONNECT_REASON,
                headers={"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"},
            )
        try:
            identity = self.identity.read(request.headers)
        except IdentityError as exc:
            info.decision = "invalid"
            return responses.error(400, str(exc))
        if identity is None and self.require_id:
            info.decision = "anonymous"
            return responses.error(401, ANONYMOUS_REASON)
        declared = request.content_length
        if declared is not None and declared > self.max_body:
            info.decision = "too_large"
            return responses.error(413, responses.REASON_BODY_TOO_LARGE)

        ip = ""
        if identity is None:
            ip = client_ip(
                request.remote, request.headers.getall(hdrs.X_FORWARDED_FOR, ()), self.trusted
            )
        else:
            info.device_id = identity.id
        try:
            decision = await self._store.enforce(
                identity,
                ip,
                self.policy.for_request(identity is not None),
                upload=request.method in self.upload_methods,
            )
        except StoreUnavailable as exc:
            self._metrics.store_failures += 1
            log.warning("store unavailable (on_error=%s): %s", self._on_error, exc)
            if self._on_error == "closed":
                info.decision = "store_down_closed"
                return responses.error(503, UNAVAILABLE_REASON, headers={"Retry-After": "1"})
            info.decision = "store_down_open"
            return None

        if decision.outcome is Outcome.BLOCKED:
            info.decision = "blocked"
            return responses.error(403, BLOCKED_REASON)
        headers = rate_limit_headers(decision)
        if decision.outcome is Outcome.LIMITED:
            info.decision = "limited"
            headers["Retry-After"] = str(retry_after_seconds(decision))
            return responses.error(429, LIMITED_REASON, headers=headers)
        info.decision = "allow"
        return headers


def enforce_middleware(*, enforcer: Enforcer) -> Middleware:
    """Answers blocked, limited and invalid requests itself; passes the rest on."""

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        verdict = await enforcer.check(request)
        if isinstance(verdict, web.StreamResponse):
            return verdict
        if verdict is not None:
            request[RATE_LIMIT_HEADERS] = verdict
        started = time.perf_counter()
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            # A bug must still answer in the envelope, never with a traceback page.
            log.exception("unexpected error while forwarding %s %s", request.method, request.path)
            return responses.error(500, INTERNAL_REASON)
        finally:
            request[REQUEST_INFO].upstream_s = time.perf_counter() - started

    return impl


def extra_headers(request: web.Request) -> Mapping[str, str] | None:
    """The rate-limit headers the middleware left for the proxied response, if any."""
    return request.get(RATE_LIMIT_HEADERS)
