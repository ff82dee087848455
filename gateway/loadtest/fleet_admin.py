"""The fleet through the admin API: block devices before a run, read buckets, unblock after."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from gateway.admin_client import AdminClient
from gateway.errors import AdminClientError
from gateway.model import Bucket

CONCURRENCY = 16  # admin calls in flight at once: the admin API shares Redis with the load
T = TypeVar("T")


async def _each(ids: Iterable[str], call: Callable[[str], Awaitable[T]]) -> dict[str, T]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(device_id: str) -> tuple[str, T]:
        async with gate:
            return device_id, await call(device_id)

    # Every call ends (each is bounded by the client's timeout) before a failure is raised:
    # none may outlive the client that the caller closes next.
    results = await asyncio.gather(*(one(i) for i in ids), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return dict(r for r in results if not isinstance(r, BaseException))


async def block_all(client: AdminClient, ids: Iterable[str]) -> None:
    """Block every device in `ids` (unseen ids are blocked in advance)."""
    await _each(ids, client.block)


async def unblock_all(client: AdminClient, ids: Iterable[str]) -> None:
    """Unblock every device in `ids`."""
    await _each(ids, client.unblock)


def bucket_of(record: Mapping[str, Any]) -> Bucket | None:
    """A device record's own bucket (`rate_limit`), or None when it uses the default."""
    limit = record.get("rate_limit")
    if not isinstance(limit, Mapping):
        return None
    rate, burst = limit.get("rate"), limit.get("burst")
    if not isinstance(rate, int | float) or not isinstance(burst, int) or isinstance(burst, bool):
        raise AdminClientError(f"Admin API: unexpected rate_limit {limit!r}")
    return Bucket(rate=float(rate), burst=burst)


def _not_found(exc: AdminClientError) -> bool:
    # AdminClientError carries no status; its message always ends "(HTTP <status> on ...)".
    return "(HTTP 404 on " in str(exc)


async def own_buckets(client: AdminClient, ids: Iterable[str]) -> dict[str, Bucket | None]:
    """Each device's own bucket from `GET /devices/{id}`; None where it has none."""

    async def fetch(device_id: str) -> Bucket | None:
        try:
            return bucket_of(await client.get_device(device_id))
        except AdminClientError as exc:
            if _not_found(exc):  # the gateway never registered it (e.g. the load bypassed it)
                return None
            raise

    return await _each(ids, fetch)
