"""Bounded waits: every wait in the suite polls a condition or awaits a step under a bound,
and fails by name past it (never a fixed sleep, never a silent hang until pytest-timeout)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

import pytest

WAIT: Final = 10.0  # bounds every wait for a server, a process or a response
POLL: Final = 0.01  # seconds between two looks at a condition


async def until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> float:
    """Wait (polling every 10 ms) for `condition`; returns the seconds it took. Past
    `timeout` seconds the test fails, naming `what` it waited for."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(POLL)
    return time.monotonic() - started


def until_sync(condition: Callable[[], object], what: str, timeout: float = WAIT) -> float:
    """`until` for code outside a loop (a thread, a subprocess check)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(POLL)
    return time.monotonic() - started


async def bounded(step: Awaitable[None], what: str, timeout: float = WAIT) -> None:
    """A step (a teardown, a shutdown) bounded by `timeout`; past it, the tasks still running
    are printed and the step fails by name."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                other.print_stack()
        task.cancel()
        pytest.fail(f"{what} did not finish within {timeout} s")
    task.result()
