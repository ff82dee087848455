"""Admin authentication: the limit on wrong tokens per client address, which never locks
out the right token."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from gateway.admin import create_admin_app
from gateway.admin.auth import MAX_TRACKED, FailureLimiter, auth_middleware
from gateway.store import Store
from tests.rig.clock import FakeClock

TOKEN = "admin-auth-test-token-0123456789"


def test_an_address_is_refused_after_the_limit_until_its_window_passes() -> None:
    clock = FakeClock(start_us=1_000_000_000)  # 1000 s: whole milliseconds stay exact
    limiter = FailureLimiter(limit=3, window=60, clock=clock.seconds)
    for _ in range(2):
        limiter.failed("198.51.100.1")
        assert limiter.retry_after("198.51.100.1") is None
    limiter.failed("198.51.100.1")
    assert limiter.retry_after("198.51.100.1") == 60
    assert limiter.retry_after("198.51.100.2") is None  # other addresses are unaffected
    clock.advance(59_500)
    assert limiter.retry_after("198.51.100.1") == 1
    clock.advance(500)
    assert limiter.retry_after("198.51.100.1") is None


def test_failures_in_an_old_window_do_not_add_up() -> None:
    clock = FakeClock(start_us=1_000_000_000)  # 1000 s: whole milliseconds stay exact
    limiter = FailureLimiter(limit=3, window=60, clock=clock.seconds)
    limiter.failed("a")
    limiter.failed("a")
    clock.advance(61_000)
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


# While an address is locked: the Authorization header sent -> the status it gets.
LOCKED_CASES = {
    "right-token": ({"Authorization": f"Bearer {TOKEN}"}, 200),
    "right-token-other-scheme-case": ({"Authorization": f"bearer {TOKEN}"}, 200),
    "wrong-token": ({"Authorization": "Bearer not-the-token-at-all"}, 429),
    "token-prefix": ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 429),
    "missing-token": ({}, 429),
    "other-scheme": ({"Authorization": f"Basic {TOKEN}"}, 429),
}


@pytest.mark.parametrize(("headers", "status"), LOCKED_CASES.values(), ids=LOCKED_CASES.keys())
async def test_a_locked_address_still_lets_the_right_token_through(
    aiohttp_client: Any, headers: dict[str, str], status: int
) -> None:
    store = Store.memory()
    client = await aiohttp_client(create_admin_app(store, TOKEN))
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    for _ in range(10):
        assert (await client.get("/devices", headers=wrong)).status == 401
    resp = await client.get("/devices", headers=headers)
    assert resp.status == status
    if status == 429:
        assert int(resp.headers["Retry-After"]) >= 1
        assert await resp.json() == {"status": False, "result": "Too many failed admin logins"}
    else:
        assert "Retry-After" not in resp.headers
    assert (await client.get("/healthz")).status == 200  # public routes stay open
    await store.close()


class CountingLimiter(FailureLimiter):
    """A FailureLimiter that records each failure it is told of."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(limit=3, window=60, clock=clock.seconds)
        self.failures = 0

    def failed(self, address: str) -> None:
        self.failures += 1
        super().failed(address)


async def test_wrong_tokens_from_a_locked_address_are_counted_and_the_lock_ends(
    aiohttp_client: Any,
) -> None:
    clock = FakeClock(start_us=1_000_000_000)  # 1000 s: whole milliseconds stay exact
    limiter = CountingLimiter(clock)

    async def devices(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[auth_middleware(token=TOKEN, public=(), limiter=limiter)])
    app.router.add_get("/devices", devices)
    client = await aiohttp_client(app)
    wrong = {"Authorization": "Bearer wrong"}
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert [(await client.get("/devices", headers=wrong)).status for _ in range(4)] == [
        401, 401, 401, 429,
    ]  # fmt: skip
    assert limiter.failures == 4  # the one refused with 429 too
    assert (await client.get("/devices")).status == 429
    assert limiter.failures == 4  # a missing token is not a guess
    resp = await client.get("/devices", headers=right)
    assert (resp.status, await resp.text()) == (200, "ok")
    assert limiter.failures == 4
    clock.advance(60_000)  # the window passes
    assert (await client.get("/devices", headers=wrong)).status == 401


async def test_missing_tokens_are_not_counted_as_guesses(aiohttp_client: Any) -> None:
    store = Store.memory()
    client = await aiohttp_client(create_admin_app(store, TOKEN))
    for _ in range(20):
        assert (await client.get("/devices")).status == 401
    ok = await client.get("/devices", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status == 200
    await store.close()
