"""The admin API and its web page, served on their own listener. This module only
re-exports, lazily (PEP 562), so that importing one of its modules imports no other.

routes.py     the aiohttp app: device routes, the page, /healthz, /readyz, /metrics
auth.py       bearer-token authentication (constant-time compare, brute-force limit)
hosts.py      which Host headers the listener answers (a defence against DNS rebinding)
readiness.py  what /readyz says (no I/O)
responses.py  the aiohttp answers in the `{status, result}` envelope
static/       the web page
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.admin.routes import STORE_KEY, create_admin_app

__all__ = ["STORE_KEY", "create_admin_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gateway.admin import routes

        value = getattr(routes, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
