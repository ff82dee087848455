"""The event loop a process runs on: uvloop when installed, unless DEVICEGATE_LOOP says not.

`DEVICEGATE_LOOP=asyncio` forces asyncio's own loop, `uvloop` requires uvloop, `auto` (the
default) takes uvloop when it can be imported. The choice is made before the loop runs:
nothing runs inside an `except ImportError`, whose exception would otherwise become the
`__context__` of every exception raised on that loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, TypeVar

from gateway.errors import ConfigError

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]

ENV: Final = "DEVICEGATE_LOOP"
CHOICES: Final = ("auto", "uvloop", "asyncio")


def loop_factory(env: Mapping[str, str] | None = None) -> LoopFactory:
    """The factory of the loop `DEVICEGATE_LOOP` asks for; ConfigError for a bad value."""
    choice = (os.environ if env is None else env).get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError("environment", ENV, f"must be one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return asyncio.new_event_loop
    factory = _uvloop_factory()
    if factory is None:
        if choice == "uvloop":
            raise ConfigError("environment", ENV, "uvloop is not installed (pip install uvloop)")
        return asyncio.new_event_loop
    return factory


def _uvloop_factory() -> LoopFactory | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name(factory: LoopFactory) -> str:
    """ "uvloop" or "asyncio", for logs and reports."""
    return "asyncio" if factory is asyncio.new_event_loop else "uvloop"


def run(coro: Coroutine[Any, Any, T], factory: LoopFactory | None = None) -> T:
    """Run `coro` to completion on a new loop made by `factory` (default: as configured)."""
    with asyncio.Runner(loop_factory=factory or loop_factory()) as runner:
        return runner.run(coro)
