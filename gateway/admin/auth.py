"""Bearer-token authentication for the admin API (constant-time compare, brute-force limit).

A request carrying the right token always passes, even from an address locked out for
wrong tokens; a wrong or missing token from a locked address gets 429 + Retry-After.

Why letting the right token through a lockout is safe: the lockout cannot be what protects
the token. A check that admits the right token during a lockout answers every wrong guess
exactly as it would without one, so a guesser learns nothing from it either way; what makes
guessing hopeless is the token's length. A configured token has at least 16 visible ASCII
characters (94^16, about 3.7e31 candidates if they are random), a generated one 32 random
bytes. The lockout only throttles noise: misconfigured clients and guessing that could not
succeed anyway. So it must never deny the operator, who may share an address with the
noise (behind one proxy, everyone does).
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from gateway.admin.responses import error

_CHALLENGE = 'Bearer realm="devicegate"'

FAILURES_PER_WINDOW: Final = 10
WINDOW: Final = 60.0  # seconds
MAX_TRACKED: Final = 10_000  # addresses remembered; the oldest windows are dropped first


class FailureLimiter:
    """Wrong tokens per client address in a fixed window; past the limit, a locked address.

    An address that sent FAILURES_PER_WINDOW wrong tokens is locked for the rest of its
    window (the middleware then answers 429 to anything but the right token); other
    addresses are unaffected. Memory is bounded: at most MAX_TRACKED addresses, the oldest
    windows forgotten first.
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

    Wrong tokens are counted per client address (`limiter`); from an address over the limit,
    a wrong or missing token gets 429 (the right one still passes: see the module docstring).
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
        given = bearer_token(request)
        # surrogatepass: a header with undecodable bytes still compares (and fails) in
        # constant time instead of raising.
        if given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogatepass"), expected
        ):
            return await handler(request)
        address = request.remote or "unknown"
        # Asked before this guess is counted: the guess that reaches the limit gets 401.
        wait = limiter.retry_after(address)
        if given is not None:
            limiter.failed(address)  # missing tokens are not guesses
        if wait is not None:
            return error(429, "Too many failed admin logins", headers={"Retry-After": str(wait)})
        if given is None:
            return error(401, "Missing admin token", headers={hdrs.WWW_AUTHENTICATE: _CHALLENGE})
        challenge = f'{_CHALLENGE}, error="invalid_token"'
        return error(401, "Invalid admin token", headers={hdrs.WWW_AUTHENTICATE: challenge})

    return impl
