"""The epoch marker: how a process tells that Redis lost the gateway's data (pure).

`<prefix>:epoch` holds a random token, set once (`SET NX`) by the first process that finds
none. It lives exactly as long as the gateway's data in Redis: a Redis restarted without
persistence, or flushed, has none, and every process that remembers a token (from its own
polls, its snapshot or its supervisor) notices that it is gone. Data kept by a gateway that
predates the marker is adopted, not mistaken for a loss: a process that remembers no token
never concludes anything was lost.

A token gone is a loss this process is among the first to see: it restores the blocks it
knows. ANOTHER token means the loss (or a move to another dataset) was seen and marked
before: whoever set it restored, and what this process remembers may be old (a snapshot
of days ago, written before operators unblocked devices), so it follows Redis instead.
"""

from __future__ import annotations

import secrets
from enum import Enum


class EpochCheck(Enum):
    """What one poll's read of the marker means for the process that read it."""

    FIRST = "first"  # no token remembered, none in Redis: create one (SET NX), adopt it
    ADOPT = "adopt"  # no token remembered, one in Redis: take it
    AGREE = "agree"  # the token remembered is the one in Redis
    LOST = "lost"  # a token remembered, none in Redis: the data was just lost
    REPLACED = "replaced"  # a token remembered, another in Redis: lost and marked before


def check_epoch(expected: str | None, read: str | None) -> EpochCheck:
    """Compare the token this process remembers with the one Redis holds."""
    if expected is None:
        return EpochCheck.FIRST if read is None else EpochCheck.ADOPT
    if read is None:
        return EpochCheck.LOST
    return EpochCheck.AGREE if read == expected else EpochCheck.REPLACED


def new_epoch() -> str:
    """A fresh token (64 random bits, hex): two datasets never share one."""
    return secrets.token_hex(8)
