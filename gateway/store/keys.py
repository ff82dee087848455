"""The Redis key schema (pure): one function builds every key.

Every key one script call touches shares one hash tag, so the schema is ready for Redis
Cluster. Devices are spread over SHARDS fixed shards by a hash of their id; a shard's tag
is `{d042}` and it holds the per-device keys and that shard's indexes. Anonymous buckets
are tagged by a hash of the client IP (`{a017}`). Ids may contain `{`, `}`, `:` or `*`:
they only ever come after the tag, and only the first `{...}` of a key is its tag.

    <p>:{dNNN}:dev:<id>     hash    the device record (short field names: gateway.schema),
                                    with the rate-limit override in `rr`/`rb` when set and
                                    the token bucket "<milli-tokens>:<us>" in `tb` and
                                    the six declared values, joined, in `df` only
    <p>:{dNNN}:hist:<id>    list    change history, newest first, capped
    <p>:{dNNN}:active       zset    id -> last activity (ms): last request, or blocked_at if none
    <p>:{dNNN}:blocked      zset    blocked ids -> last activity (ms), same score as in active
    <p>:{dNNN}:names        hash    id -> custom name (renamed devices only), for the name search
    <p>:{dNNN}:nw           zset    "<word>\0<id>" for every word of a custom name (scores 0):
                                    the search by the start of a word (lua/name_words.lua)
    <p>:{dNNN}:ix           zset    heads of the id index's chunks (scores 0)
    <p>:{dNNN}:ix:<head>    zset    a chunk of at most 120 lower-cased ids, from <head> on (scores
                                    0): the search by the start of an id (lua/id_index.lua)
    <p>:{dNNN}:bver         string  version of the shard's blocked index, bumped by every change
    <p>:blocked             channel "b <id>" / "u <id>" on every block / unblock
    <p>:{dNNN}:bev          channel the same, on a cluster: the shard's own (SPUBLISH)
    <p>:epoch               string  a random token set once per Redis dataset: gone or changed,
                                    Redis lost the gateway's data (gateway.store.epoch)
    <p>:{aNNN}:ip:<ip>      string  token bucket of an anonymous client address
    <p>:{aNNN}:reg:<ip>     string  budget of new devices of a client address
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

from gateway.schema import (
    DECLARED_FIELDS,
    FIELD_BLOCKED_AT,
    FIELD_BUCKET,
    FIELD_DECLARED,
    FIELD_DENIED,
    FIELD_FIRST_SEEN,
    FIELD_LAST_ACTIVE,
    FIELD_LAST_UPLOAD,
    FIELD_NAME,
    FIELD_OVERRIDE_BURST,
    FIELD_OVERRIDE_RATE,
    FIELD_REQUESTS,
)

# The record's field names come from gateway.schema; re-exported, the store reads them here.
__all__ = [
    "DEVICE_FIELD_KEYS",
    "FIELD_BLOCKED_AT",
    "FIELD_BUCKET",
    "FIELD_DECLARED",
    "FIELD_DENIED",
    "FIELD_FIRST_SEEN",
    "FIELD_LAST_ACTIVE",
    "FIELD_LAST_UPLOAD",
    "FIELD_NAME",
    "FIELD_OVERRIDE_BURST",
    "FIELD_OVERRIDE_RATE",
    "FIELD_REQUESTS",
    "SHARDS",
    "DeviceKeys",
    "KeySchema",
    "ShardKeys",
    "shard_of",
]

SHARDS = 256

# Declared device fields, in gateway.model.DEVICE_FIELDS order.
DEVICE_FIELD_KEYS: tuple[str, ...] = tuple(f.key for f in DECLARED_FIELDS)
# Joins the parts of a history entry and the declared fields in `df` (enforce.lua splits and
# joins by it too): identity values never contain controls.
SEPARATOR: Final = "\x1f"  # Final: inlined where compiled (enforce_script.py, per request)


def shard_of(device_id: str) -> int:
    """The fixed shard of a device id (stable across processes and versions)."""
    return zlib.crc32(device_id.encode()) % SHARDS


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """Every key of one device, all under its shard's hash tag."""

    record: str
    history: str
    active: str
    blocked: str
    names: str
    blocked_version: str


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The indexes of one shard."""

    active: str
    blocked: str
    names: str
    blocked_version: str


class KeySchema:
    """Builds keys under one prefix; shard tags are computed once."""

    __slots__ = ("_anon_tags", "_dev_tags", "prefix")

    def __init__(self, prefix: str = "dg") -> None:
        self.prefix = prefix
        self._dev_tags = tuple(f"{prefix}:{{d{i:03d}}}:" for i in range(SHARDS))
        self._anon_tags = tuple(f"{prefix}:{{a{i:03d}}}:" for i in range(SHARDS))

    def device(self, device_id: str) -> DeviceKeys:
        """All keys of one device."""
        tag = self._dev_tags[shard_of(device_id)]
        return DeviceKeys(
            record=f"{tag}dev:{device_id}",
            history=f"{tag}hist:{device_id}",
            active=f"{tag}active",
            blocked=f"{tag}blocked",
            names=f"{tag}names",
            blocked_version=f"{tag}bver",
        )

    def enforce(self, device_id: str) -> tuple[str, str, str, str]:
        """KEYS of enforce.lua for one device, in order: record, history, active, blocked
        (the hot path builds only these, not the whole DeviceKeys)."""
        tag = self._dev_tags[shard_of(device_id)]
        return (f"{tag}dev:{device_id}", f"{tag}hist:{device_id}", f"{tag}active",
                f"{tag}blocked")  # fmt: skip

    def shard(self, shard: int) -> ShardKeys:
        """The index keys of one shard."""
        tag = self._dev_tags[shard]
        return ShardKeys(
            active=f"{tag}active",
            blocked=f"{tag}blocked",
            names=f"{tag}names",
            blocked_version=f"{tag}bver",
        )

    @property
    def epoch(self) -> str:
        """The epoch marker: a random token that lives as long as the gateway's data in Redis."""
        return f"{self.prefix}:epoch"

    def shard_channel(self, shard: int) -> str:
        """A shard's own channel of block events (a cluster's sharded pub/sub)."""
        return f"{self._dev_tags[shard]}bev"

    def device_channel(self, device_id: str, *, sharded: bool) -> str:
        """The channel a device's block events go to: its shard's, or the one channel."""
        if sharded:
            return self.shard_channel(shard_of(device_id))
        return self.blocked_channel

    @property
    def blocked_channel(self) -> str:
        """The pub/sub channel of block / unblock events."""
        return f"{self.prefix}:blocked"

    def anonymous_bucket(self, client_ip: str) -> str:
        """The token bucket of an anonymous client address."""
        return f"{self._anon_tags[zlib.crc32(client_ip.encode()) % SHARDS]}ip:{client_ip}"

    def registration_bucket(self, client_ip: str) -> str:
        """The budget of new devices of a client address (under the address's own tag)."""
        return f"{self._anon_tags[zlib.crc32(client_ip.encode()) % SHARDS]}reg:{client_ip}"
