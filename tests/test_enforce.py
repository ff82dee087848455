"""The Enforcer on fakeredis: order of checks, every verdict, on_error in both modes."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
from multidict import CIMultiDict

from gateway.config import Settings, parse_config
from gateway.enforce import FORWARD, Enforcer, Verdict
from gateway.errors import StoreUnavailable
from gateway.metrics import Metrics
from gateway.model import Bucket, EnforceReply, ReplyCode
from gateway.store import Store
from tests.rig.clock import FakeClock

CONFIG = """
rate_limits:
  device: {rate: 1, burst: 2}
  anonymous: {rate: 1, burst: 1}
limits:
  max_body_bytes: 100
"""


@pytest.fixture
def settings() -> Settings:
    return parse_config(CONFIG, "test")


@pytest.fixture
async def store(clock: FakeClock) -> AsyncIterator[Store]:
    s = Store.memory(clock=clock)
    yield s
    await s.close()


@pytest.fixture
def enforcer(settings: Settings, store: Store) -> Enforcer:
    return Enforcer(settings, store)


async def check(
    enforcer: Enforcer,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    method: str = "GET",
    peer: str = "127.0.0.1",
    content_length: int | None = None,
) -> Verdict:
    return await enforcer.check(method, CIMultiDict(headers or {}), peer, content_length)


DEVICE = {"X-Device-Id": "d1"}


async def test_allowed_request_is_forwarded_with_rate_limit_headers(enforcer: Enforcer) -> None:
    verdict = await check(enforcer, DEVICE)
    assert verdict.status == FORWARD
    assert (verdict.decision, verdict.device_id) == ("allow", "d1")
    assert verdict.headers is not None
    assert verdict.headers["RateLimit"] == '"device";r=1;t=1'
    assert verdict.headers["RateLimit-Policy"] == '"device";q=2;w=2'


async def test_invalid_identity_is_400_naming_the_header_and_writes_nothing(
    enforcer: Enforcer, store: Store
) -> None:
    verdict = await check(enforcer, {"X-Device-Id": "x" * 129})
    assert verdict.status == 400
    assert "X-Device-Id" in verdict.reason
    assert verdict.decision == "invalid"
    assert await store.list_devices() == ([], 0)


async def test_duplicate_device_ids_are_400(enforcer: Enforcer) -> None:
    verdict = await check(enforcer, [("X-Device-Id", "a"), ("X-Device-Id", "b")])
    assert verdict.status == 400


async def test_validation_comes_before_the_body_size(enforcer: Enforcer) -> None:
    verdict = await check(enforcer, {"X-Device-Id": ""}, method="POST", content_length=500)
    assert verdict.status == 400


async def test_declared_body_over_limit_is_413_before_the_store(
    enforcer: Enforcer, store: Store
) -> None:
    verdict = await check(enforcer, DEVICE, method="POST", content_length=101)
    assert (verdict.status, verdict.reason) == (413, "Request body too large")
    assert await store.get_device("d1") is None
    assert (await check(enforcer, DEVICE, method="POST", content_length=100)).status == FORWARD


async def test_blocked_is_403_before_the_bucket(enforcer: Enforcer, store: Store) -> None:
    await store.block("d1")
    for _ in range(4):
        verdict = await check(enforcer, DEVICE)
        assert (verdict.status, verdict.reason) == (403, "Access denied: device is blocked")
        assert verdict.headers is None
    await store.unblock("d1")
    statuses = [(await check(enforcer, DEVICE)).status for _ in range(3)]
    assert statuses == [FORWARD, FORWARD, 429]


async def test_limited_is_429_with_retry_after_and_headers(
    enforcer: Enforcer, clock: FakeClock
) -> None:
    for _ in range(2):
        await check(enforcer, DEVICE)
    verdict = await check(enforcer, DEVICE)
    assert (verdict.status, verdict.reason, verdict.decision) == (
        429,
        "Too many requests",
        "limited",
    )
    assert verdict.headers is not None
    assert verdict.headers["Retry-After"] == "1"
    assert verdict.headers["RateLimit"] == '"device";r=0;t=1'
    assert verdict.headers["X-RateLimit-Remaining"] == "0"
    clock.advance(1000)
    assert (await check(enforcer, DEVICE)).status == FORWARD


async def test_uploads_stamp_last_data_upload(enforcer: Enforcer, store: Store) -> None:
    await check(enforcer, DEVICE, method="GET")
    device = await store.get_device("d1")
    assert device is not None and device.last_data_upload is None
    await check(enforcer, DEVICE, method="POST", content_length=3)
    device = await store.get_device("d1")
    assert device is not None and device.last_data_upload is not None


async def test_anonymous_requests_use_the_anonymous_bucket_by_peer(enforcer: Enforcer) -> None:
    first = await check(enforcer)
    assert first.headers is not None
    assert first.headers["RateLimit-Policy"] == '"anonymous";q=1;w=1'
    # An untrusted client cannot pick its own key with X-Forwarded-For.
    second = await check(enforcer, {"X-Forwarded-For": "192.0.2.77"})
    assert second.status == 429
    other_peer = await check(enforcer, peer="127.0.0.2")
    assert other_peer.status == FORWARD


async def test_require_id_answers_401_to_anonymous(settings: Settings, store: Store) -> None:
    strict = dataclasses.replace(
        settings, devices=dataclasses.replace(settings.devices, require_id=True)
    )
    enforcer = Enforcer(strict, store)
    verdict = await check(enforcer)
    assert (verdict.status, verdict.reason) == (401, "A device id is required")
    assert (await check(enforcer, DEVICE)).status == FORWARD


async def test_connect_is_405(enforcer: Enforcer) -> None:
    verdict = await check(enforcer, DEVICE, method="CONNECT")
    assert verdict.status == 405
    assert verdict.headers is not None and "GET" in verdict.headers["Allow"]


class LocalBlocked:
    """Stands in for a BlockedSet: the ids this process holds, and whether it knows them."""

    def __init__(self, ids: frozenset[str], known: bool) -> None:
        self.ids = ids
        self.known = known
        self.suspected = 0

    def __contains__(self, device_id: str) -> bool:
        return device_id in self.ids

    def suspect_reset(self) -> None:
        self.suspected += 1


class DownStore:
    """A store whose Redis is gone; "stolen" is the one id seen blocked."""

    def __init__(self, known: bool) -> None:
        self.blocked = LocalBlocked(frozenset({"stolen"}), known)

    async def enforce(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("Redis failed: connection refused")


STOLEN = {"X-Device-Id": "stolen"}
NOBODY: dict[str, str] = {}
STORE_DOWN: dict[str, tuple[Literal["open", "closed"], bool, dict[str, str], int, str]] = {
    "open, ids known": ("open", True, DEVICE, FORWARD, "store_down_open"),
    "closed, ids known": ("closed", True, DEVICE, 503, "store_down_closed"),
    "open, a known blocked id": ("open", True, STOLEN, 403, "blocked"),
    "closed, a known blocked id": ("closed", True, STOLEN, 403, "blocked"),
    # Started while Redis was unreachable, told by nobody: any device could be a blocked one.
    "open, ids unknown": ("open", False, DEVICE, 503, "store_down_unknown"),
    "closed, ids unknown": ("closed", False, DEVICE, 503, "store_down_unknown"),
    "open, ids unknown, an id already seen blocked": ("open", False, STOLEN, 403, "blocked"),
    # No device id: no block could apply, so on_error decides as ever.
    "open, ids unknown, anonymous": ("open", False, NOBODY, FORWARD, "store_down_open"),
    "closed, ids unknown, anonymous": ("closed", False, NOBODY, 503, "store_down_closed"),
}


@pytest.mark.parametrize(
    ("on_error", "known", "headers", "status", "decision"),
    STORE_DOWN.values(),
    ids=STORE_DOWN.keys(),
)
async def test_store_down(
    settings: Settings,
    on_error: Literal["open", "closed"],
    known: bool,
    headers: dict[str, str],
    status: int,
    decision: str,
) -> None:
    mode = dataclasses.replace(
        settings, redis=dataclasses.replace(settings.redis, on_error=on_error)
    )
    metrics = Metrics()
    enforcer = Enforcer(mode, DownStore(known), metrics)  # type: ignore[arg-type]
    verdict = await check(enforcer, headers)
    assert (verdict.status, verdict.decision) == (status, decision)
    assert metrics.store_failures == 1
    if status == 503:
        assert verdict.reason == "Service temporarily unavailable"
        assert verdict.headers == {"Retry-After": "1"}
    elif status == 403:
        assert verdict.reason == "Access denied: device is blocked"
    else:
        # Rate-limit headers are left out rather than invented when Redis could not be asked.
        assert verdict.headers is None


class AnsweringStore:
    """A store whose Redis allows every request, saying whether it made a new record."""

    def __init__(self, new_device: bool) -> None:
        self.blocked = LocalBlocked(frozenset({"stolen"}), True)
        self.new_device = new_device

    async def enforce(self, *args: Any, **kwargs: Any) -> EnforceReply:
        bucket = Bucket(rate=1, burst=2)
        return EnforceReply(ReplyCode.ALLOW, 1, 0, 0, bucket, "device", self.new_device)


REDIS_ANSWERS: dict[str, tuple[bool, dict[str, str], int, int]] = {
    # A blocked id always has a record: a new one means Redis lost the gateway's data.
    "a new record for an id blocked here": (True, STOLEN, 403, 1),
    "a new record for another id": (True, DEVICE, FORWARD, 0),
    # Redis keeps the record and says allow: an unblock this process has not heard of yet.
    "a known record for an id blocked here": (False, STOLEN, FORWARD, 0),
}


@pytest.mark.parametrize(
    ("new_device", "headers", "status", "suspected"),
    REDIS_ANSWERS.values(),
    ids=REDIS_ANSWERS.keys(),
)
async def test_redis_decides_unless_it_forgot_a_blocked_device(
    settings: Settings, new_device: bool, headers: dict[str, str], status: int, suspected: int
) -> None:
    store = AnsweringStore(new_device)
    verdict = await check(Enforcer(settings, store), headers)  # type: ignore[arg-type]
    assert verdict.status == status
    assert verdict.decision == ("blocked" if status == 403 else "allow")
    assert store.blocked.suspected == suspected  # the loss is looked for at once


async def test_new_devices_beyond_the_address_budget_are_429(store: Store) -> None:
    settings = parse_config("devices: {registration_limit: {rate: 0.001, burst: 2}}", "test")
    enforcer = Enforcer(settings, store)
    for device_id in ("a", "b"):
        assert (await check(enforcer, {"X-Device-Id": device_id})).status == FORWARD
    refused = await check(enforcer, {"X-Device-Id": "c"})
    assert (refused.status, refused.reason, refused.decision) == (
        429,
        "Too many new devices from this address",
        "unregistered",
    )
    assert refused.headers is not None
    assert refused.headers["RateLimit-Policy"].startswith('"registration";q=2;')
    assert int(refused.headers["Retry-After"]) >= 1
    assert await store.get_device("c") is None
    assert (await check(enforcer, {"X-Device-Id": "a"})).status == FORWARD  # known: free
