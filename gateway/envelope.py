"""The `{status, result}` envelope (pure): every answer the gateway writes itself is one.

The bytes only: the data plane writes them with its own heads (gateway.dataplane.wire),
the admin listener in aiohttp responses (gateway.admin.responses).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

JSON_CONTENT_TYPE: Final = "application/json"

# Reasons more than one layer gives (the enforce middleware and the proxy).
REASON_BODY_TOO_LARGE: Final = "Request body too large"


def envelope(status: bool, result: Any) -> bytes:
    """Serialise the seed API's envelope."""
    return orjson.dumps({"status": status, "result": result})
