"""The key schema: distinct keys per id, and one Redis Cluster slot per script call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gateway.model import Bucket, DeviceIdentity
from gateway.store import Store
from gateway.store.keys import SHARDS, KeySchema, shard_of

HOSTILE_IDS = [
    "a",
    "a:",
    "a:b",
    "{a}",
    "a}",
    "}a{",
    "{",
    "}",
    "*",
    "x{y}z",
    "{}",
    "dev:1",
    "~" * 128,
]


def crc16(data: bytes) -> int:
    """CRC16-XMODEM, the checksum Redis Cluster uses for key slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """The cluster slot of a key, honouring the first non-empty {hash tag}."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % 16384


def test_crc16_matches_the_cluster_spec_vector() -> None:
    # The reference value from the Redis Cluster specification.
    assert crc16(b"123456789") == 0x31C3


@pytest.mark.parametrize("device_id", HOSTILE_IDS)
def test_all_keys_of_a_device_share_one_slot(device_id: str) -> None:
    schema = KeySchema("dg")
    keys = schema.device(device_id)
    # The hot path's own builder makes the same keys as the full schema, in the script's order.
    assert schema.enforce(device_id) == (keys.record, keys.history, keys.active, keys.blocked)
    slots = {key_slot(k) for k in (*schema.enforce(device_id), keys.names)}
    assert len(slots) == 1


def test_distinct_ids_get_distinct_keys() -> None:
    schema = KeySchema("dg")
    records = {schema.device(i).record for i in HOSTILE_IDS}
    assert len(records) == len(HOSTILE_IDS)


def test_shards_spread_and_are_stable() -> None:
    counts = [0] * SHARDS
    for i in range(20_000):
        counts[shard_of(f"device-{i}")] += 1
    assert min(counts) > 0
    assert shard_of("device-1") == shard_of("device-1")


class _Recorder:
    """Wraps a client's evalsha to record the keys of every script call."""

    def __init__(self, client: Any) -> None:
        self.calls: list[list[str]] = []
        self._evalsha = client.evalsha
        client.evalsha = self

    async def __call__(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        self.calls.append([str(k) for k in keys_and_args[:numkeys]])
        return await self._evalsha(sha, numkeys, *keys_and_args)

    def all(self) -> Iterator[list[str]]:
        return iter(self.calls)


async def test_every_script_call_touches_one_slot() -> None:
    store = Store.memory()
    hot = _Recorder(store._hot)
    admin = _Recorder(store._admin)
    bucket = Bucket(rate=5, burst=5)
    for device_id in HOSTILE_IDS:
        await store.enforce(DeviceIdentity(device_id, application="x"), "", bucket, upload=True)
        await store.block(device_id)
        await store.rename(device_id, "name")
        await store.unblock(device_id)
        await store.delete(device_id)
    await store.enforce(None, "2001:db8::1", bucket, upload=False)
    calls = [*hot.all(), *admin.all()]
    # At least one call per operation (a script's first call may be retried after NOSCRIPT).
    assert len(calls) >= 5 * len(HOSTILE_IDS) + 1
    for keys in calls:
        assert len({key_slot(k) for k in keys}) == 1, keys
    await store.close()
