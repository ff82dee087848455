"""When Redis lost the gateway's data: the losses one process saw, and the blocks it restores.

The blocked set (gateway.store.blocked) tells a loss by the epoch marker
(gateway.store.epoch) and hands it here. A marker gone is a loss this process is among the
first to see: it is reported once and, with `redis.restore_blocks`, every blocked id the
process knows is blocked again in bounded chunks (block.lua), a failed chunk being taken up
again at the next poll; then a new marker is claimed. Another marker means another process
saw the loss first: it is counted and the set follows Redis.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from redis.exceptions import RedisError

from gateway.errors import StoreError

# The blocked set's logger: these log lines are its own, as before they moved here.
log = logging.getLogger("gateway.store.blocked")

RESTORE_CHUNK: Final = 64  # ids blocked again per bounded call after a reset

# Blocks one chunk of ids again (block.lua, idempotent); bounded in time, raises StoreError.
Restore = Callable[[Sequence[str]], Awaitable[None]]

_RESTORE_ERRORS: Final = (RedisError, OSError, TimeoutError, StoreError)


@dataclass(frozen=True, slots=True)
class StoreReset:
    """One detected loss of the gateway's data in Redis, and how far restoring went."""

    at_ms: int
    expected: str
    found: str | None
    known: int  # blocked ids this process knew when it noticed
    restore: bool  # redis.restore_blocks: they are to be blocked again
    restored: int  # of them blocked again in Redis so far
    done: bool  # restoring finished (or was not asked for) and a new epoch is adopted


class ResetRecovery:
    """Counts the losses of the gateway's data this process saw; blocks its known ids again.

    `restore` is None when `redis.restore_blocks` is false; `changed` is called after every
    change of what `resets`, `restored` and `last` report.
    """

    def __init__(
        self,
        restore: Restore | None,
        *,
        clock: Callable[[], int],
        changed: Callable[[], None],
    ) -> None:
        self._restore = restore
        self._clock = clock
        self._changed = changed
        self.resets = 0
        self.restored = 0
        self.last: StoreReset | None = None
        self._pending: list[str] | None = None  # ids still to block again after a reset

    def replaced(self, expected: str, found: str | None, *, known: int) -> None:
        """Redis holds another epoch than `expected`: count the loss another process saw."""
        self.resets += 1
        self.last = StoreReset(self._clock(), expected, found, known, False, 0, True)
        log.warning(
            "Redis holds another dataset than this process remembers (lost and marked anew "
            "by another process, or a different Redis): following it",
            extra={"fields": {"epoch_expected": expected, "epoch_found": found}},
        )

    async def recover(
        self,
        expected: str,
        found: str | None,
        ids: Callable[[], frozenset[str]],
        claim_epoch: Callable[[], Awaitable[str | None]],
    ) -> str | None:
        """Redis lost the gateway's data: report it once, block the known ids again, move on.

        Returns the epoch Redis holds once `claim_epoch` has set a new one. A failed restore
        or claim is raised; the next call takes up the ids still to block, without reporting
        the loss again.

        Every process that follows the blocked ids notices the same loss and restores what it
        knows: block.lua is idempotent (an id blocked twice keeps the first blocked_at of
        this dataset), so the duplicates cost a little Redis time and nothing else.
        """
        if self._pending is None:
            known = sorted(ids())
            self.resets += 1
            restore = self._restore is not None
            self.last = StoreReset(self._clock(), expected, found, len(known), restore, 0, False)
            self._pending = known if restore else []
            log.error(
                "Redis lost the gateway's data (restarted without persistence, or flushed): "
                "%d blocked ids known here, %s",
                len(known),
                "blocking them again" if self._restore is not None
                else "not restored (redis.restore_blocks is false)",
                extra={"fields": {"epoch_expected": expected, "epoch_found": found,
                                  "blocked_known": len(known)}},
            )  # fmt: skip
            self._changed()
        try:
            while self._pending:
                assert self._restore is not None
                chunk = self._pending[:RESTORE_CHUNK]
                await self._restore(chunk)
                del self._pending[: len(chunk)]
                self._record_restored(len(chunk))
            epoch = await claim_epoch()
        except _RESTORE_ERRORS as exc:
            log.warning(
                "restoring the blocked ids after the Redis reset failed, %d left; retrying: %s",
                len(self._pending),
                exc,
            )
            raise
        reset = self.last
        assert reset is not None
        self._pending = None
        self.last = dataclasses.replace(reset, done=True)
        if self._restore is not None:
            log.warning(
                "blocked %d ids again after the Redis reset",
                reset.restored,
                extra={"fields": {"epoch": epoch}},
            )
        return epoch

    def _record_restored(self, count: int) -> None:
        reset = self.last
        assert reset is not None
        self.restored += count
        self.last = dataclasses.replace(reset, restored=reset.restored + count)
        self._changed()
