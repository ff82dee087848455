"""Device records as Redis holds them, read back into `Device` and `HistoryEntry` (pure).

A record is the hash `<p>:{dNNN}:dev:<id>` with the short field names of
`gateway.store.keys`; the admin scripts answer with the same hash as a flat
`[field, value, ...]` list. The six declared values are the parts of its `df`, joined by
`keys.SEPARATOR` (an empty part: never declared); a record of an older devicegate may also
hold each in a field of its own (`a`, `av`, ...), which counts where `df` has no value. A
history entry is one string, its parts joined by `keys.SEPARATOR`.
"""

from __future__ import annotations

from typing import Any, Final, cast

from gateway.model import DEVICE_FIELDS, Bucket, Device, HistoryEntry
from gateway.store import keys as K

_FIELD_BY_KEY: Final = dict(zip(K.DEVICE_FIELD_KEYS, DEVICE_FIELDS, strict=True))


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def device_from_flat(device_id: str, flat: list[str] | None) -> Device | None:
    """A record from a script's flat HGETALL reply (None: no record)."""
    if not flat:
        return None
    return device_from_hash(device_id, dict(zip(flat[::2], flat[1::2], strict=True)))


def _declared(h: dict[str, str]) -> list[str | None]:
    """The six declared values of a record, in DEVICE_FIELDS order (None: never declared):
    the parts of `df`, and where a part is empty (or there is no `df`) the field of its own
    that a record of an older devicegate may have."""
    joined = h.get(K.FIELD_DECLARED)
    parts = joined.split(K.SEPARATOR) if joined else []
    if len(parts) != len(K.DEVICE_FIELD_KEYS):
        parts = [""] * len(K.DEVICE_FIELD_KEYS)
    return [part or h.get(key) for part, key in zip(parts, K.DEVICE_FIELD_KEYS, strict=True)]


def device_from_hash(device_id: str, h: dict[str, str]) -> Device:
    """A record from its hash (HGETALL), which holds at least the request count."""
    declared = dict(zip(DEVICE_FIELDS, _declared(h), strict=True))
    rate, burst = h.get(K.FIELD_OVERRIDE_RATE), h.get(K.FIELD_OVERRIDE_BURST)
    return Device(
        id=device_id,
        name=h.get(K.FIELD_NAME),
        first_seen=_int(h.get(K.FIELD_FIRST_SEEN)),
        last_active=_int(h.get(K.FIELD_LAST_ACTIVE)),
        last_data_upload=_int(h.get(K.FIELD_LAST_UPLOAD)),
        blocked=K.FIELD_BLOCKED_AT in h,
        blocked_at=_int(h.get(K.FIELD_BLOCKED_AT)),
        request_count=int(h.get(K.FIELD_REQUESTS, 0)),
        denied_count=int(h.get(K.FIELD_DENIED, 0)),
        rate_limit=(
            Bucket(rate=int(rate) / 1000, burst=int(burst))
            if rate is not None and burst is not None
            else None
        ),
        **cast(dict[str, Any], declared),
    )


def history_entry(raw: str) -> HistoryEntry:
    """One history entry: "<at ms><SEP><field key><SEP><old><SEP><new>"."""
    at, field, old, new = raw.split(K.SEPARATOR)
    return HistoryEntry(at=int(at), field=_FIELD_BY_KEY.get(field, field), old=old, new=new)
