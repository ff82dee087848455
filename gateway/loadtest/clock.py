"""An event loop whose timers fire within tens of microseconds, for open-loop sends.

Open loop charges a late send to the target as latency, and every stock loop sleeps in
whole milliseconds: epoll_wait takes its timeout in ms (asyncio rounds it up), and
uvloop's clock and timers tick in ms. So a send due in 0.3 ms left 0.5 to 1 ms late,
which is most of a gateway's latency. Here the loop sleeps in select() on the epoll
descriptor itself, which takes microseconds, and then collects the events without
waiting: two system calls per wake-up instead of one, and no busy waiting. On Linux the
thread's timer slack (the 50 us a sleep may be stretched to batch wake-ups) is also cut to
1 ns. Measured at 7,500 timers per second: 0.5 / 1.1 ms late (p50 / p99) on epoll or
uvloop, 0.08 / 0.15 ms here, 0.03 / 0.09 ms with the slack cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import select
import selectors
import sys

# select() handles descriptors below FD_SETSIZE; the epoll one is opened with the loop.
_FD_SETSIZE = 1024
_PR_SET_TIMERSLACK = 29  # <linux/prctl.h>


class PreciseEpollSelector(selectors.EpollSelector):
    """EpollSelector that waits with microsecond resolution."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0 and self.fileno() < _FD_SETSIZE:
            select.select([self.fileno()], [], [], timeout)  # wakes on the first event too
            timeout = 0
        return super().select(timeout)


def cut_timer_slack() -> bool:
    """Let this thread's sleeps end on time (Linux); False where that cannot be asked."""
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        return int(ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)) == 0
    return False


def precise_loop() -> asyncio.AbstractEventLoop:
    """asyncio's own loop (not uvloop: its timers tick in ms) on the precise selector."""
    cut_timer_slack()
    return asyncio.SelectorEventLoop(PreciseEpollSelector())
