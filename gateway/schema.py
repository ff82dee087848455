"""The device schema (pure): each field of a device and how every layer spells it.

The one source of the six fields a request declares about its device: their order, the
name the model and the admin API give each, the header it comes in by default (config.yaml
`devices.headers`) and its short key (history entries name a field by it). The Redis record
keeps the six values in one field, `df` (FIELD_DECLARED), joined in this order: they have no
field of their own (a record of an older devicegate may still have one under the key). The
record's other field names are here too, so the record's whole layout is in one place.

Taken from here: `gateway.model.DEVICE_FIELDS`, the defaults of
`gateway.config.DeviceHeaders`, `gateway.store.keys` (DEVICE_FIELD_KEYS and FIELD_*), and
the Lua scripts, into which `gateway.store.scripts` renders the record field names when
they are loaded. The dataclasses that hold the fields (DeviceIdentity, Device,
DeviceHeaders) spell them out as typed attributes; tests/test_schema.py checks that they
agree with this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class DeviceField:
    """One field a request declares about its device."""

    name: str  # attribute of DeviceIdentity and Device, admin API key, history `field`
    header: str  # its identification header unless config.yaml names another
    # Its short key: history entries name the field by it (the value lives in the record's
    # `df`; a record of an older devicegate may also have a hash field of this name).
    key: str


# The header of the device id (not a record field: the id is in the record's key).
ID_HEADER: Final = "X-Device-Id"

APPLICATION: Final = DeviceField("application", "X-App-Name", "a")
APPLICATION_VERSION: Final = DeviceField("application_version", "X-App-Version", "av")
OS: Final = DeviceField("os", "X-OS-Name", "o")
OS_VERSION: Final = DeviceField("os_version", "X-OS-Version", "ov")
MANUFACTURER: Final = DeviceField("manufacturer", "X-Device-Manufacturer", "mf")
MODEL: Final = DeviceField("model", "X-Device-Model", "md")

# In this order everywhere: enforce.lua's ARGV, the record's `df`, the history.
DECLARED_FIELDS: Final[tuple[DeviceField, ...]] = (
    APPLICATION,
    APPLICATION_VERSION,
    OS,
    OS_VERSION,
    MANUFACTURER,
    MODEL,
)

# The record's other fields, kept short because every device pays for them in Redis memory.
FIELD_NAME: Final = "n"
FIELD_REQUESTS: Final = "rc"
FIELD_DENIED: Final = "dc"
FIELD_FIRST_SEEN: Final = "fs"
FIELD_LAST_ACTIVE: Final = "la"
FIELD_LAST_UPLOAD: Final = "lu"
FIELD_BLOCKED_AT: Final = "b"
FIELD_OVERRIDE_RATE: Final = "rr"  # milli-tokens per second
FIELD_OVERRIDE_BURST: Final = "rb"
FIELD_BUCKET: Final = "tb"  # the device's token bucket, read and written by enforce.lua only
# The six declared values, in DECLARED_FIELDS order, joined by the unit separator (an empty
# part: never declared): their only copy in the record. A device declaring the same costs
# enforce.lua one string compare.
FIELD_DECLARED: Final = "df"
