"""Bearer-token authentication for the admin API (constant-time compare, brute-force limit)."""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from gateway.responses import error

_CHALLENGE = 'Bearer realm="devicegate"'

FAILURES_PER_WINDOW: Final = 10
WINDOW: Final = 60.0  # seconds
MAX_TRACKED: Final = 10_000  # addresses remembered; the oldest windows are dropped first


class FailureLimiter:
    """Wrong tokens per client address in a fixed window; past the limit, refuse outright.

    An address that sent FAILURES_PER_WINDOW wrong tokens gets 429 for the rest of its
    window, before its token is even looked at; other addresses are unaffected. Memory is
    bounded: at most MAX_TRACKED addresses, the oldest windows forgotten first.
    """

    def __init__(
        self,
        *,
        limit: int = FAILURES_PER_WINDOW,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def retry_after(self, address: str) -> int | None:
        """Seconds until the address may try again, or None when it may now."""
        entry = self._windows.get(address)
        if entry is None:
            return None
        started, count = entry
        left = started + self.window - self._clock()
        if left <= 0:
            del self._windows[address]
            return None
        return max(1, math.ceil(left)) if count >= self.limit else None

    def failed(self, address: str) -> None:
        """Count one wrong token from the address."""
        now = self._clock()
        started, count = self._windows.pop(address, (now, 0))
        if now - started >= self.window:
            started, count = now, 0
        self._windows[address] = (started, count + 1)
        while len(self._windows) > MAX_TRACKED:
            self._windows.popitem(last=False)


def bearer_token(request: web.Request) -> str | None:
    """The token of the request's single `Authorization: Bearer <token>` header, or None."""
    values = request.headers.getall(hdrs.AUTHORIZATION, [])
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def auth_middleware(
    *, token: str, public: Collection[str], limiter: FailureLimiter | None = None
) -> Middleware:
    """Answer 401 unless the request carries the admin token; routes named in `public` are open.

    Wrong tokens are counted per client address (`limiter`); an address over the limit gets
    429 before its token is checked.
    """
    if not token:
        raise ValueError("the admin token must not be empty")
    expected = token.encode("utf-8")
    public_names = frozenset(public)
    limiter = limiter or FailureLimiter()

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Decided by the matched resource, not by the path text: no path trick can reach
        # a protected route through a public prefix. Unmatched requests (404/405) need auth.
        resource = request.match_info.route.resource
        if resource is not None and resource.name in public_names:
            return await handler(request)
        address = request.remote or "unknown"
        wait = limiter.retry_after(address)
        if wait is not None:
            return error(429, "Too many failed admin logins", headers={"Retry-After": str(wait)})
        given = bearer_token(request)
        if given is None:
            return error(401, "Missing admin token", headers={hdrs.WWW_AUTHENTICATE: _CHALLENGE})
        # surrogatepass: a header with undecodable bytes still compares (and fails) in
        # constant time instead of raising.
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected):
            limiter.failed(address)
            challenge = f'{_CHALLENGE}, error="invalid_token"'
            return error(401, "Invalid admin token", headers={hdrs.WWW_AUTHENTICATE: challenge})
        return await handler(request)

    return impl
