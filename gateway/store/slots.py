"""Redis Cluster's key -> slot function (pure): CRC16 (XMODEM) of the key's hash tag, mod 16384.

The gateway's keys all carry one of a few hundred tags (`{d042}`, `{a017}`: gateway.store.keys),
so a key's slot is a dict lookup of its tag after the first computation.
"""

from __future__ import annotations

from typing import Final

SLOTS: Final = 16384


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_TABLE: Final = _table()
_cache: dict[str, int] = {}


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), as Redis Cluster computes it."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: str) -> str:
    """The part of the key Redis hashes: the first non-empty `{...}`, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str) -> int:
    """The cluster slot of a key (its tag's slot is computed once and remembered)."""
    tag = hash_tag(key)
    slot = _cache.get(tag)
    if slot is None:
        slot = crc16(tag.encode()) % SLOTS
        if len(_cache) < 4096:  # the gateway's tags are few; an id used as a tag is not kept
            _cache[tag] = slot
    return slot
