"""The `{status, result}` envelope: every answer the gateway writes itself goes through here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

JSON_CONTENT_TYPE = "application/json"

# Reasons more than one layer gives (the enforce middleware and the proxy).
REASON_BODY_TOO_LARGE = "Request body too large"


def envelope(status: bool, result: Any) -> bytes:
    """Serialise the seed API's envelope."""
    return orjson.dumps({"status": status, "result": result})


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
