"""Which Host headers the admin listener answers: a defence against DNS rebinding.

A web page on another site can make a browser resolve its own name to 127.0.0.1 and then
call the admin listener as "same origin". The browser still sends that site's name in Host,
so a listener bound to loopback answers only Host `localhost`, a loopback address literal
or a name in `admin.allowed_hosts` (each with or without a port), and 403 to anything else.
Bound elsewhere, it checks `admin.allowed_hosts` when the list is not empty and accepts any
Host when it is. A request without Host (HTTP/1.0) passes: a browser always sends one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from gateway.admin.responses import error

HOST_NOT_ALLOWED = "Host not allowed"


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (with or without brackets); False for
    anything else, the wildcard addresses and other names included."""
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str | None:
    """A Host header's host, lower-cased, its port dropped (IPv6 keeps its brackets); None
    when the value is not `host[:port]`."""
    value = value.lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[: end + 1], value[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        return host
    host, sep, port = value.partition(":")
    if not host or (sep and not _is_port(port)):  # a second ":" fails the port
        return None
    return host


def _is_port(text: str) -> bool:
    return 1 <= len(text) <= 5 and text.isascii() and text.isdigit()


def host_allowed(host: str | None, *, listen_host: str, allowed_hosts: Collection[str]) -> bool:
    """Whether the admin listener bound to `listen_host` answers a request with this Host
    header value (None: no Host header); `allowed_hosts` are lower-cased, without ports."""
    if host is None:
        return True
    loopback = is_loopback(listen_host)
    if not loopback and not allowed_hosts:
        return True
    name = host_name(host)
    if name is None:
        return False
    return name in allowed_hosts or (loopback and _is_loopback_literal(name))


def _is_loopback_literal(name: str) -> bool:
    """`localhost`, 127.x.y.z, or a bracketed IPv6 loopback, as a Host names them."""
    if name == "localhost":
        return True
    try:
        if name.startswith("[") and name.endswith("]"):
            return ipaddress.IPv6Address(name[1:-1]).is_loopback
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def host_middleware(*, listen_host: str, allowed_hosts: Collection[str]) -> Middleware:
    """Answer 403 to a request whose Host the listener must not answer (see the module)."""
    allowed = frozenset(allowed_hosts)

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        values = request.headers.getall(hdrs.HOST, [])
        # Two Host headers: which one a proxy or the browser meant is anyone's guess.
        if len(values) > 1 or not host_allowed(
            values[0] if values else None, listen_host=listen_host, allowed_hosts=allowed
        ):
            return error(403, HOST_NOT_ALLOWED)
        return await handler(request)

    return impl
