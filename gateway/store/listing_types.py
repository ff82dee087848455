"""What the admin list's modules share (pure): its filter, and the bounded admin round trip
they are given."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Literal, Protocol, TypeVar

T = TypeVar("T")
BlockedFilter = Literal["all", "hide", "only"]  # all devices, hide the blocked, only them


class AdminCall(Protocol):
    """One admin round trip, bounded in time; Redis failures come out as StoreUnavailable."""

    def __call__(self, call: Awaitable[T], /) -> Awaitable[T]: ...
