"""A process's hold on the blocked ids: seeded before it serves, followed, kept, shown.

- seeded: a worker from its supervisor's handover; `gateway run` (one process) and the
  `--workers` supervisor from the snapshot file, when it is of this Redis and key prefix;
- followed: `Store.start(follow_blocked=True)` (gateway.store.blocked);
- kept: the process that owns the snapshot (the single process, or the supervisor; never a
  worker) writes it after every change (gateway.store.snapshot);
- shown: every change is copied into the process's block of counters (gateway.metrics).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from gateway.config import RedisSettings, Settings
from gateway.errors import SnapshotError
from gateway.metrics import Metrics
from gateway.state import state_dir
from gateway.store import BlockedIds, DeviceStore
from gateway.store.blocked import BlockedSeed, wall_ms
from gateway.store.snapshot import (
    Snapshot,
    SnapshotWriter,
    public_url,
    read_snapshot,
    snapshot_name,
)

log = logging.getLogger("gateway.blocked")


def snapshot_path(settings: Settings, env: Mapping[str, str]) -> Path | None:
    """Where this gateway keeps its snapshot; None without a state directory or on the
    embedded store (its data dies with the process anyway)."""
    if settings.redis.url.startswith("memory:"):
        return None
    directory = state_dir(settings.state.dir, env)
    if directory is None:
        return None
    return directory / snapshot_name(settings.redis.key_prefix, settings.redis.url)


def load_snapshot(path: Path, redis: RedisSettings, now_ms: int) -> Snapshot | None:
    """The snapshot at `path` if it can seed this process; an unusable one is logged, ignored."""
    try:
        snapshot = read_snapshot(path, url=redis.url, key_prefix=redis.key_prefix)
    except SnapshotError as exc:
        log.warning(
            "ignoring the blocked-ids snapshot %s: %s",
            path,
            exc,
            extra={"fields": {"snapshot": str(path)}},
        )
        return None
    if snapshot is None:
        log.info("no blocked-ids snapshot yet", extra={"fields": {"snapshot": str(path)}})
        return None
    age = max(0, now_ms - snapshot.written_ms) / 1000
    log.info(
        "blocked ids from the snapshot: %d ids, written %.1f s ago",
        len(snapshot.ids),
        age,
        extra={"fields": {"snapshot": str(path), "age_s": round(age, 3)}},
    )
    return snapshot


class BlockedKeeper:
    """Keeps the process's metrics and snapshot in step with its blocked set."""

    def __init__(
        self, blocked: BlockedIds, metrics: Metrics, writer: SnapshotWriter | None
    ) -> None:
        self.blocked = blocked
        self.metrics = metrics
        self.writer = writer

    def show(self) -> None:
        """Copy the current state into the metrics block."""
        status = self.blocked.status()
        self.metrics.show_blocked(
            status.source or "none", status.count, status.resets, status.restored
        )
        if self.writer is not None:
            self.metrics.show_snapshot(self.writer.written_ms, self.writer.failures)

    def changed(self) -> None:
        """The blocked set moved: show it, and write it down once it is known whole."""
        self.show()
        if self.writer is not None and self.blocked.known:
            self.writer.changed()

    async def close(self) -> None:
        """Let the last change reach the disk (bounded)."""
        if self.writer is not None:
            await self.writer.close()


async def follow_blocked(
    store: DeviceStore,
    settings: Settings,
    metrics: Metrics,
    *,
    seed: BlockedSeed | None = None,
    keep_snapshot: bool,
    env: Mapping[str, str] | None = None,
) -> BlockedKeeper:
    """Seed the store's blocked set (from `seed`, else the snapshot when `keep_snapshot`),
    start following Redis, and keep the snapshot (when `keep_snapshot`) and `metrics` in step."""
    blocked = store.blocked
    path = snapshot_path(settings, os.environ if env is None else env) if keep_snapshot else None
    loaded: Snapshot | None = None
    if seed is not None:
        blocked.seed(seed)
        log.info(
            "blocked ids from the supervisor: %d ids",
            len(seed.ids),
            extra={"fields": {"age_s": round(max(0, wall_ms() - seed.as_of_ms) / 1000, 3)}},
        )
    elif path is not None:
        loaded = await asyncio.to_thread(load_snapshot, path, settings.redis, wall_ms())
        if loaded is not None:
            blocked.seed(BlockedSeed(loaded.ids, loaded.epoch, "snapshot", loaded.written_ms))
    writer = None
    if path is not None:
        url, prefix = public_url(settings.redis.url), settings.redis.key_prefix

        def take() -> Snapshot | None:
            if not blocked.known:
                return None
            return Snapshot(wall_ms(), url, prefix, blocked.epoch, blocked.ids())

        writer = SnapshotWriter(path, take, on_disk=loaded)
    keeper = BlockedKeeper(blocked, metrics, writer)
    if writer is not None:
        writer.on_write = keeper.show
    blocked.watch(keeper.changed)
    keeper.show()
    await store.start(follow_blocked=True)
    return keeper
