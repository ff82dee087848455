"""Bounded waits: every wait in the suite polls a condition or awaits a step under a bound,
and fails by name past it (never a fixed sleep, never a silent hang until pytest-timeout).

until        a condition, polled every 10 ms on the running loop
until_async  a condition that must be awaited (a request, a query)
until_sync   a condition, outside a loop (a thread, a subprocess check)
settle       a value polled until it is good enough: the caller asserts on the last one
bounded      one step (a teardown, a shutdown) under a bound
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import pytest

WAIT: Final = 10.0  # bounds every wait for a server, a process or a response
POLL: Final = 0.01  # seconds between two looks at a condition

T = TypeVar("T")
What = str | Callable[[], str]  # what is waited for; a callable is asked only on a failure


def _failed(what: What) -> str:
    return f"timed out waiting for {what() if callable(what) else what}"


async def until(condition: Callable[[], object], what: What, timeout: float = WAIT) -> float:
    """Wait (polling every 10 ms) for `condition`; returns the seconds it took. Past
    `timeout` seconds the test fails, naming `what` it waited for."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, _failed(what)
        await asyncio.sleep(POLL)
    return time.monotonic() - started


async def until_async(
    condition: Callable[[], Awaitable[object]],
    what: What,
    timeout: float = WAIT,
    every: float = POLL,
) -> float:
    """`until` for a condition that must be awaited (a request, a query), asked every
    `every` seconds; returns the seconds it took."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < timeout, _failed(what)
        await asyncio.sleep(every)
    return time.monotonic() - started


def until_sync(condition: Callable[[], object], what: What, timeout: float = WAIT) -> float:
    """`until` for code outside a loop (a thread, a subprocess check)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, _failed(what)
        time.sleep(POLL)
    return time.monotonic() - started


async def settle(
    read: Callable[[], T], good: Callable[[T], bool], timeout: float = WAIT, every: float = POLL
) -> T:
    """Read a value every `every` seconds until `good(value)`, or `timeout` seconds pass;
    returns the last value read, for the caller to assert on (with what it knows of a
    failure: the open fds, a log)."""
    deadline = time.monotonic() + timeout
    while not good(value := read()) and time.monotonic() < deadline:
        await asyncio.sleep(every)
    return value


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
