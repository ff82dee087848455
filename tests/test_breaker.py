"""The store's circuit breaker (pure, with an injected clock)."""

from __future__ import annotations

import pytest

from gateway.store.breaker import CircuitBreaker
from tests.rig.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """The rig's fake clock at 100 s, where whole milliseconds stay exact in float seconds
    (the tests step to the cooldown's very edge)."""
    return FakeClock(start_us=100_000_000)


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(threshold=3, cooldown=0.5, clock=clock.seconds)


def test_closed_lets_everything_through(breaker: CircuitBreaker) -> None:
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(10))


def test_opens_after_threshold_failures_in_a_row(breaker: CircuitBreaker) -> None:
    breaker.failure()
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open"
    assert not breaker.allow()


def test_a_success_resets_the_count(breaker: CircuitBreaker) -> None:
    breaker.failure()
    breaker.failure()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"


def test_half_open_lets_exactly_one_probe_through(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        breaker.failure()
    clock.advance(490)
    assert not breaker.allow()
    clock.advance(10)
    assert breaker.state == "half-open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # everyone else still skips Redis
    breaker.success()
    assert breaker.state == "closed"
    assert breaker.allow()


def test_a_failed_probe_opens_again_for_a_full_cooldown(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        breaker.failure()
    clock.advance(500)
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open"
    clock.advance(490)
    assert not breaker.allow()
    clock.advance(10)
    assert breaker.allow()


def test_an_abandoned_probe_frees_the_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(3):
        breaker.failure()
    clock.advance(500)
    assert breaker.allow()
    breaker.abandon()  # the probe's caller was cancelled
    assert breaker.allow()  # another probe may go at once
