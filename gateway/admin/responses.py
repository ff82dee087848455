"""The admin listener's aiohttp answers, in the `{status, result}` envelope."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.envelope import JSON_CONTENT_TYPE, envelope


def ok(result: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A success answer: `{"status": true, "result": ...}`."""
    return web.Response(
        body=envelope(True, result), status=status, content_type=JSON_CONTENT_TYPE, headers=headers
    )


def error(status: int, reason: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    """A failure answer: `{"status": false, "result": "<reason>"}`."""
    return web.Response(
        body=envelope(False, reason), status=status, content_type=JSON_CONTENT_TYPE, headers=headers
    )
