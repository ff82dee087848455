"""The admin API: device list, details, rename, block, rate-limit overrides, and the web page."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Literal, cast

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import MultiMapping

from gateway.admin.auth import auth_middleware
from gateway.admin.hosts import host_middleware
from gateway.admin.readiness import SnapshotState, checks, ready_text
from gateway.admin.responses import error, ok
from gateway.config import MAX_BURST, MAX_RATE
from gateway.envelope import JSON_CONTENT_TYPE, envelope
from gateway.errors import BadRequest, StoreUnavailable
from gateway.identity import device_id_problem
from gateway.metrics import Metrics, Renderable
from gateway.model import Bucket, Replication
from gateway.store.blocked import wall_ms
from gateway.store.contract import DeviceStore
from gateway.store.snapshot import SnapshotWriter

logger = logging.getLogger("gateway.admin")

# A Protocol is no class to pass as the key's type: it goes in as the type argument.
STORE_KEY: Final = web.AppKey[DeviceStore]("admin_store")
METRICS_KEY: Final = web.AppKey("admin_metrics", Renderable)
SNAPSHOT_KEY: Final = web.AppKey("admin_snapshot", SnapshotWriter)

MAX_BODY_BYTES: Final = 64 * 1024
MAX_NAME_CHARS: Final = 256
MAX_AMOUNT: Final = 1000
MAX_PAGE: Final = 1_000_000_000
MIN_RATE: Final = 0.001
REMOVED: Final = "Successfully Removed"
DEVICE_NOT_FOUND: Final = "Device not found"

_DIGITS = re.compile(r"[0-9]{1,10}")
_BLOCKED_VALUES: Final = ("all", "hide", "only")
_LIST_PARAMS: Final = ("name", "blocked", "page", "amount", "after", "match")
_MATCH_VALUES: Final = ("prefix", "contains")
NEXT_CURSOR_HEADER: Final = "X-Next-Cursor"
TRUNCATED_HEADER: Final = "X-Search-Truncated"
REPLICATED_HEADER: Final = "Devicegate-Replicated"
_READYZ_PARAMS: Final = ("verbose",)
_FLAGS: Final = {"0": False, "1": True, "false": False, "true": True}
_RETRY_AFTER: Final = {"Retry-After": "1"}
_PUBLIC_ROUTES: Final = ("healthz", "page", "asset")
_PAGE: Final = {"index.html": "text/html"}
_ASSETS: Final = {
    "app.js": "text/javascript",
    "paths.js": "text/javascript",
    "text.js": "text/javascript",
    "style.css": "text/css",
}
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_HTTP_REASONS: Final = {404: "Not found", 405: "Method not allowed"}


# ---- validation (pure) -------------------------------------------------------------------


def check_device_id(device_id: str, *, new: bool = False) -> str:
    """The id if it may name a device, else BadRequest.

    A route that addresses a record takes any 1 to 128 visible ASCII characters, so records
    kept before the data plane's stricter rule stay manageable; a route that may create state
    for an id never seen (`new`) applies the data plane's rule, as no device could use it.
    """
    if device_id_problem(device_id, stored=True) is not None:
        raise BadRequest("Invalid device id: must be 1 to 128 visible ASCII characters")
    problem = device_id_problem(device_id) if new else None
    if problem is not None:
        raise BadRequest(f"Invalid device id: {problem}")
    return device_id


def check_name(value: str, what: str) -> str:
    """The text if it fits a device name (<= 256 characters, no control characters)."""
    if len(value) > MAX_NAME_CHARS:
        raise BadRequest(f"{what}: must be at most {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise BadRequest(f"{what}: must not contain control characters")
    return value


def _int_param(raw: str, what: str, low: int, high: int) -> int:
    value = int(raw) if _DIGITS.fullmatch(raw) else 0
    if not low <= value <= high:
        raise BadRequest(f"{what}: must be an integer from {low} to {high}")
    return value


def _check_params(query: MultiMapping[str], allowed: tuple[str, ...]) -> None:
    for key in query:
        if key not in allowed:
            raise BadRequest(f"Unknown query parameter: {key}")
        if len(query.getall(key)) > 1:
            raise BadRequest(f"Repeated query parameter: {key}")


@dataclass(frozen=True, slots=True)
class ListQuery:
    """`GET /devices` parameters, checked."""

    name: str | None
    blocked: Literal["all", "hide", "only"]
    page: int
    amount: int
    after: str | None
    match: Literal["prefix", "contains"]


def parse_list_query(query: MultiMapping[str]) -> ListQuery:
    """`GET /devices` parameters; unknown or contradictory ones are refused."""
    _check_params(query, _LIST_PARAMS)
    name = check_name(query.get("name", ""), "name") or None
    blocked = query.get("blocked", "all")
    if blocked not in _BLOCKED_VALUES:
        raise BadRequest("blocked: must be one of all, hide, only")
    page = _int_param(query.get("page", "1"), "page", 1, MAX_PAGE)
    amount = _int_param(query.get("amount", "20"), "amount", 1, MAX_AMOUNT)
    match = query.get("match", "contains")
    if match not in _MATCH_VALUES:
        raise BadRequest("match: must be one of prefix, contains")
    if "match" in query and name is None:
        raise BadRequest("match: needs a name to look for")
    after = query.get("after") or None
    if after is not None and "page" in query:
        raise BadRequest("after: give either page or after, not both")
    return ListQuery(
        name,
        cast(Literal["all", "hide", "only"], blocked),
        page,
        amount,
        after,
        cast(Literal["prefix", "contains"], match),
    )


def parse_readyz_query(query: MultiMapping[str]) -> bool:
    """`GET /readyz` parameters -> verbose; unknown ones are refused."""
    _check_params(query, _READYZ_PARAMS)
    verbose = _FLAGS.get(query.get("verbose", "0"))
    if verbose is None:
        raise BadRequest("verbose: must be 0 or 1")
    return verbose


def parse_object(body: bytes, fields: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object holding exactly `fields`, else BadRequest naming the problem."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("Invalid JSON body") from None
    if not isinstance(data, dict):
        raise BadRequest("Body must be a JSON object")
    for key in data:
        if key not in fields:
            raise BadRequest(f"Unknown field: {key}")
    for key in fields:
        if key not in data:
            raise BadRequest(f"Missing field: {key}")
    return data


def parse_rename(body: bytes) -> str | None:
    """`{"name": ...}` -> the new custom name, None to clear it (null, empty or blank)."""
    name = parse_object(body, ("name",))["name"]
    if name is None:
        return None
    if not isinstance(name, str):
        raise BadRequest("name: must be a string or null")
    return check_name(name, "name").strip() or None


def parse_bucket(body: bytes) -> Bucket:
    """`{"rate": .., "burst": ..}` -> a Bucket within the configuration's bounds."""
    data = parse_object(body, ("rate", "burst"))
    rate, burst = data["rate"], data["burst"]
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise BadRequest("rate: must be a number")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BadRequest(f"rate: must be from {MIN_RATE:g} to {MAX_RATE:g} tokens per second")
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_BURST:
        raise BadRequest(f"burst: must be an integer from 1 to {MAX_BURST}")
    return Bucket(rate=float(rate), burst=burst)


# ---- handlers ----------------------------------------------------------------------------


def _target(request: web.Request, *, new: bool = False) -> tuple[DeviceStore, str]:
    return request.app[STORE_KEY], check_device_id(request.match_info["id"], new=new)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Never touches the store."""
    return ok("ok")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store answers a ping; what else an operator must know is added, and
    `?verbose=1` shows every check."""
    verbose = parse_readyz_query(request.query)
    store = request.app[STORE_KEY]
    reachable = await store.ping()
    if not reachable and not verbose:
        return error(503, "Store unavailable", headers=_RETRY_AFTER)
    blocked = store.blocked.status()
    writer = request.app.get(SNAPSHOT_KEY)
    snapshot = None
    if writer is not None:
        snapshot = SnapshotState(
            str(writer.path), writer.written_ms, writer.failures, writer.last_error
        )
    if not verbose:
        return ok(ready_text(blocked, snapshot))
    result = checks(
        reachable=reachable,
        blocked=blocked,
        processes=request.app[METRICS_KEY].processes(),
        snapshot=snapshot,
        now_ms=wall_ms(),
    )
    if reachable:
        return ok(result)
    return web.Response(
        body=envelope(False, result),
        status=503,
        content_type=JSON_CONTENT_TYPE,
        headers=_RETRY_AFTER,
    )


async def list_devices(request: web.Request) -> web.Response:
    """One page of devices, most recent activity first: the total that match in
    `X-Total-Count` (not for a contains search), the next page's cursor in `X-Next-Cursor`,
    `X-Search-Truncated: yes` when a search by prefix looked at its most ids a shard."""
    q = parse_list_query(request.query)
    answer = await request.app[STORE_KEY].list_page(
        name=q.name, blocked=q.blocked, page=q.page, amount=q.amount, after=q.after, match=q.match
    )
    headers: dict[str, str] = {}
    if answer.total is not None:
        headers["X-Total-Count"] = str(answer.total)
    if answer.next_cursor is not None:
        headers[NEXT_CURSOR_HEADER] = answer.next_cursor
    if answer.truncated:
        headers[TRUNCATED_HEADER] = "yes"
    return ok([d.to_json() for d in answer.devices], headers=headers)


async def get_device(request: web.Request) -> web.Response:
    """One device record."""
    store, device_id = _target(request)
    device = await store.get_device(device_id)
    return ok(device.to_json()) if device else error(404, DEVICE_NOT_FOUND)


async def get_history(request: web.Request) -> web.Response:
    """A device's software and hardware changes, newest first."""
    store, device_id = _target(request)
    entries = await store.history(device_id)
    if entries is None:
        return error(404, DEVICE_NOT_FOUND)
    return ok([e.to_json() for e in entries])


async def rename(request: web.Request) -> web.Response:
    """Set or clear a device's custom name."""
    store, device_id = _target(request)
    device = await store.rename(device_id, parse_rename(await request.read()))
    return ok(device.to_json()) if device else error(404, DEVICE_NOT_FOUND)


def replicated(replication: Replication) -> dict[str, str]:
    """`Devicegate-Replicated: yes|no` when the write waited for replicas (redis.
    write_replicas): whether it reached them before this answer."""
    if replication.wanted == 0:
        return {}
    return {REPLICATED_HEADER: "yes" if replication.in_time else "no"}


async def block(request: web.Request) -> web.Response:
    """Block a device (creating the record for an id never seen)."""
    store, device_id = _target(request, new=True)
    device, replication = await store.block_acked(device_id)
    return ok(device.to_json(), headers=replicated(replication))


async def unblock(request: web.Request) -> web.Response:
    """Unblock a device."""
    store, device_id = _target(request)
    device, replication = await store.unblock_acked(device_id)
    if device is None:
        return error(404, DEVICE_NOT_FOUND)
    return ok(device.to_json(), headers=replicated(replication))


async def delete_device(request: web.Request) -> web.Response:
    """Remove a device record."""
    store, device_id = _target(request)
    removed, replication = await store.delete_acked(device_id)
    if not removed:
        return error(404, DEVICE_NOT_FOUND)
    return ok(REMOVED, headers=replicated(replication))


async def set_rate_limit(request: web.Request) -> web.Response:
    """Set a device's rate-limit override (also for an id never seen)."""
    store, device_id = _target(request, new=True)
    bucket = parse_bucket(await request.read())
    await store.set_rate_limit(device_id, bucket)
    return ok({"rate": bucket.rate, "burst": bucket.burst})


async def delete_rate_limit(request: web.Request) -> web.Response:
    """Remove a device's rate-limit override."""
    store, device_id = _target(request)
    if await store.delete_rate_limit(device_id):
        return ok(REMOVED)
    return error(404, "Rate limit override not found")


# ---- the web page ------------------------------------------------------------------------


def _load_assets(kinds: dict[str, str]) -> dict[str, tuple[bytes, str]]:
    folder = resources.files("gateway.admin") / "static"
    return {name: ((folder / name).read_bytes(), kind) for name, kind in kinds.items()}


def _asset_handler(assets: dict[str, tuple[bytes, str]], fixed: str | None) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        asset = assets.get(fixed or request.match_info["name"])
        if asset is None:
            return error(404, _HTTP_REASONS[404])
        body, content_type = asset
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers=_PAGE_HEADERS
        )

    return serve


# ---- errors and the app ------------------------------------------------------------------


def error_middleware() -> Middleware:
    """Turn every failure into the envelope: 400, 404/405/413, 503 store down, 500 otherwise."""

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as exc:
            return error(400, str(exc))
        except StoreUnavailable:
            return error(503, "Store unavailable", headers=_RETRY_AFTER)
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"Request body too large: at most {MAX_BODY_BYTES} bytes")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            allow = {"Allow": exc.headers[hdrs.ALLOW]} if hdrs.ALLOW in exc.headers else None
            return error(exc.status, _HTTP_REASONS.get(exc.status, exc.reason), headers=allow)
        except Exception:
            logger.exception("admin API: unexpected error on %s %s", request.method, request.path)
            return error(500, "Internal error")

    return impl


async def metrics_text(request: web.Request) -> web.Response:
    """GET /metrics: the public listener's counters in Prometheus text format."""
    return web.Response(
        text=request.app[METRICS_KEY].render(),
        content_type="text/plain",
        headers={"Cache-Control": "no-store"},
    )


def create_admin_app(
    store: DeviceStore,
    token: str,
    metrics: Renderable | None = None,
    *,
    listen_host: str = "127.0.0.1",
    allowed_hosts: Collection[str] = (),
    snapshot: SnapshotWriter | None = None,
) -> web.Application:
    """The admin application: every route but /healthz and the page needs the bearer token.

    `listen_host` (where the listener is bound) and `allowed_hosts` (`admin.allowed_hosts`)
    decide which Host headers it answers, on every route (gateway.admin.hosts). `snapshot`,
    the blocked-ids snapshot this process writes, is reported by /readyz.
    """
    app = web.Application(
        middlewares=[
            # First: a request for another site's name is refused before anything else.
            host_middleware(listen_host=listen_host, allowed_hosts=allowed_hosts),
            error_middleware(),
            auth_middleware(token=token, public=_PUBLIC_ROUTES),
        ],
        client_max_size=MAX_BODY_BYTES,  # request.read() raises 413 past it, chunked or not
    )
    app[STORE_KEY] = store
    app[METRICS_KEY] = metrics or Metrics()
    if snapshot is not None:
        app[SNAPSHOT_KEY] = snapshot
    device = "/devices/{id:[^/]+}"  # `/` inside an id travels as %2F; aiohttp decodes it here
    r = app.router
    r.add_get("/", _asset_handler(_load_assets(_PAGE), "index.html"), name="page")
    r.add_get("/static/{name}", _asset_handler(_load_assets(_ASSETS), None), name="asset")
    r.add_get("/healthz", healthz, name="healthz")
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_text)
    r.add_get("/devices", list_devices)
    r.add_get(device, get_device)
    r.add_put(device, rename)
    r.add_delete(device, delete_device)
    r.add_get(f"{device}/history", get_history)
    r.add_post(f"{device}/block", block)
    r.add_post(f"{device}/unblock", unblock)
    r.add_put(f"{device}/rate_limit", set_rate_limit)
    r.add_delete(f"{device}/rate_limit", delete_rate_limit)
    return app
