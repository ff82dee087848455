"""Device records as Redis holds them, read back into `Device` and `HistoryEntry` (pure).

A record is the hash `<p>:{dNNN}:dev:<id>` with the short field names of
`gateway.store.keys`; the admin scripts answer with the same hash as a flat
`[field, value, ...]` list. A history entry is one string, its parts joined by
`keys.SEPARATOR`.
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


def device_from_hash(device_id: str, h: dict[str, str]) -> Device:
    """A record from its hash (HGETALL), which holds at least the request count."""
    declared = dict(zip(DEVICE_FIELDS, (h.get(f) for f in K.DEVICE_FIELD_KEYS), strict=True))
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
