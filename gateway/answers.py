"""Every answer the gateway makes itself on the public port: its status and its reason.

One catalogue (pure): the Enforcer's verdicts, the client connection's refusals and the
exchange's upstream failures all take their answer from here, and each goes out in the
`{"status": false, "result": reason}` envelope (gateway.dataplane.wire.envelope_answer).
Changing a reason here changes what clients read: the tests assert these texts.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class Answer(NamedTuple):
    """An answer of the gateway's own: the HTTP status and the envelope's `result`."""

    status: int
    reason: str


# -- verdicts (gateway.enforce)
BLOCKED: Final = Answer(403, "Access denied: device is blocked")
LIMITED: Final = Answer(429, "Too many requests")
UNREGISTERED: Final = Answer(429, "Too many new devices from this address")
STORE_UNAVAILABLE: Final = Answer(503, "Service temporarily unavailable")
ANONYMOUS: Final = Answer(401, "A device id is required")
METHOD: Final = Answer(405, "Method not allowed")  # CONNECT
BODY_TOO_LARGE: Final = Answer(413, "Request body too large")

# -- the request as the client connection reads it (gateway.dataplane.connection)
BAD_REQUEST: Final = Answer(400, "Bad request")  # llhttp's own words follow ": "
TARGET_TOO_LONG: Final = Answer(414, "Request target too long")
HEADER_TOO_LARGE: Final = Answer(431, "Request header too large")
TOO_MANY_HEADERS: Final = Answer(431, "Too many request headers")
VERSION: Final = Answer(505, "HTTP version not supported")
INVALID_TARGET: Final = Answer(400, "Invalid request target")
TRANSFER_CODING: Final = Answer(501, "Unsupported transfer coding")
DUPLICATE_HOST: Final = Answer(400, "Duplicate Host header")
UPGRADE_WITH_BODY: Final = Answer(400, "A request offering an upgrade cannot carry a body")
HEAD_TIMEOUT: Final = Answer(408, "Request head timeout")
HEAD_INCOMPLETE: Final = Answer(400, "Request head incomplete")
BODY_INCOMPLETE: Final = Answer(400, "Request body incomplete")
TOO_MANY_CONNECTIONS: Final = Answer(503, "Too many connections")

# -- the request on its way upstream (gateway.dataplane.exchange)
BODY_TIMEOUT: Final = Answer(408, "Request body timeout")
NO_BUFFER: Final = Answer(503, "Cannot buffer the request body")
CLIENT_BUSY: Final = Answer(429, "Too many concurrent requests from this address")
POOL_BUSY: Final = Answer(503, "Upstream connection limit reached")
UNREACHABLE: Final = Answer(502, "Upstream unreachable")
BAD_RESPONSE: Final = Answer(502, "Invalid upstream response")
TIMED_OUT: Final = Answer(504, "Upstream timed out")
INTERNAL: Final = Answer(500, "Internal error")
