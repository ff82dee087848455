"""Bearer-token authentication for the admin API (constant-time compare)."""

from __future__ import annotations

import hmac
from collections.abc import Collection

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from gateway.responses import error

_CHALLENGE = 'Bearer realm="devicegate"'


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


def auth_middleware(*, token: str, public: Collection[str]) -> Middleware:
    """Answer 401 unless the request carries the admin token; routes named in `public` are open."""
    if not token:
        raise ValueError("the admin token must not be empty")
    expected = token.encode("utf-8")
    public_names = frozenset(public)

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Decided by the matched resource, not by the path text: no path trick can reach
        # a protected route through a public prefix. Unmatched requests (404/405) need auth.
        resource = request.match_info.route.resource
        if resource is not None and resource.name in public_names:
            return await handler(request)
        given = bearer_token(request)
        if given is None:
            return error(401, "Missing admin token", headers={hdrs.WWW_AUTHENTICATE: _CHALLENGE})
        # surrogatepass: a header with undecodable bytes still compares (and fails) in
        # constant time instead of raising.
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected):
            challenge = f'{_CHALLENGE}, error="invalid_token"'
            return error(401, "Invalid admin token", headers={hdrs.WWW_AUTHENTICATE: challenge})
        return await handler(request)

    return impl
