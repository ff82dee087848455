"""The chaos scenarios' upstream: answers 200 and counts what reached it, per device.

    .venv/bin/python bench/chaos_upstream.py --port 9000

Every request is counted under its `X-Device-Id` ("" when it has none), so a scenario can
prove that a blocked device's requests, or the requests the gateway answered itself, never
got here. `GET /__chaos/counts` returns the counts as JSON (and is not counted). A path
starting `/slow/<ms>/` is answered after <ms> milliseconds, so that requests are in flight
when a scenario strikes. aiohttp's low-level server, one process, loopback only; stopped by
SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import upstream
from aiohttp import web

BODY = b'{"ok":true}\n'
COUNTS_PATH = "/__chaos/counts"
MAX_DELAY_MS = 10_000

counts: Counter[str] = Counter()


def delay_of(path: str) -> float:
    """Seconds to wait before answering: <ms> of a `/slow/<ms>/...` path, else 0."""
    parts = path.split("/", 3)
    if len(parts) >= 3 and parts[1] == "slow" and parts[2].isdigit():
        return min(int(parts[2]), MAX_DELAY_MS) / 1000
    return 0.0


async def handle(request: web.BaseRequest) -> web.Response:
    """Count the request under its device id, then answer a small JSON document."""
    if request.path == COUNTS_PATH:
        return web.Response(body=orjson.dumps(counts), content_type="application/json")
    counts[request.headers.get("X-Device-Id", "")] += 1
    await request.read()
    delay = delay_of(request.path)
    if delay:
        await asyncio.sleep(delay)
    return web.Response(body=BODY, content_type="application/json")


if __name__ == "__main__":
    upstream.main(handle, __doc__)
