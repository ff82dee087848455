"""Admin authentication: the brute-force limit on wrong tokens per client address."""

from __future__ import annotations

from typing import Any

from gateway.admin import create_admin_app
from gateway.admin.auth import MAX_TRACKED, FailureLimiter
from gateway.store import Store

TOKEN = "admin-auth-test-token-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_refused_after_the_limit_until_its_window_passes() -> None:
    clock = Clock()
    limiter = FailureLimiter(limit=3, window=60, clock=clock)
    for _ in range(2):
        limiter.failed("198.51.100.1")
        assert limiter.retry_after("198.51.100.1") is None
    limiter.failed("198.51.100.1")
    assert limiter.retry_after("198.51.100.1") == 60
    assert limiter.retry_after("198.51.100.2") is None  # other addresses are unaffected
    clock.now += 59.5
    assert limiter.retry_after("198.51.100.1") == 1
    clock.now += 0.5
    assert limiter.retry_after("198.51.100.1") is None


def test_failures_in_an_old_window_do_not_add_up() -> None:
    clock = Clock()
    limiter = FailureLimiter(limit=3, window=60, clock=clock)
    limiter.failed("a")
    limiter.failed("a")
    clock.now += 61
    limiter.failed("a")
    assert limiter.retry_after("a") is None


def test_memory_is_bounded() -> None:
    limiter = FailureLimiter(limit=1)
    for i in range(MAX_TRACKED + 50):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._windows) == MAX_TRACKED
    assert limiter.retry_after("10.0.0.0") is None  # the oldest was forgotten
    last = MAX_TRACKED + 49
    assert limiter.retry_after(f"10.0.{last // 256}.{last % 256}") is not None


async def test_the_admin_api_answers_429_before_checking_the_token(aiohttp_client: Any) -> None:
    store = Store.memory()
    client = await aiohttp_client(create_admin_app(store, TOKEN))
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    for _ in range(10):
        assert (await client.get("/devices", headers=wrong)).status == 401
    refused = await client.get("/devices", headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert await refused.json() == {"status": False, "result": "Too many failed admin logins"}
    assert (await client.get("/healthz")).status == 200  # public routes stay open
    await store.close()


async def test_missing_tokens_are_not_counted_as_guesses(aiohttp_client: Any) -> None:
    store = Store.memory()
    client = await aiohttp_client(create_admin_app(store, TOKEN))
    for _ in range(20):
        assert (await client.get("/devices")).status == 401
    ok = await client.get("/devices", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status == 200
    await store.close()
