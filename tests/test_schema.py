"""gateway.schema: the one list of device fields, and every layer that spells them agrees."""

from __future__ import annotations

import dataclasses

from gateway import schema
from gateway.config import DeviceHeaders
from gateway.loadtest.fleet import HEADER_NAMES
from gateway.model import DEVICE_FIELDS, Device, DeviceIdentity
from gateway.store import keys

NAMES = tuple(f.name for f in schema.DECLARED_FIELDS)


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def test_the_model_names_the_declared_fields_in_order() -> None:
    assert DEVICE_FIELDS == NAMES
    assert _field_names(DeviceIdentity) == ("id", *NAMES)
    # Device: the id and the custom name, then the declared fields, then what the store counts.
    device = _field_names(Device)
    assert device[: 2 + len(NAMES)] == ("id", "name", *NAMES)


def test_fields_returns_the_declared_values_in_schema_order() -> None:
    values = {name: f"value-{i}" for i, name in enumerate(NAMES)}
    identity = DeviceIdentity("dev-1", **values)
    assert identity.fields() == tuple(values[name] for name in NAMES)


def test_the_default_header_names_are_the_schema_s() -> None:
    assert _field_names(DeviceHeaders) == ("id", *NAMES)
    defaults = DeviceHeaders()
    assert defaults.id == schema.ID_HEADER
    assert tuple(getattr(defaults, f.name) for f in schema.DECLARED_FIELDS) == tuple(
        f.header for f in schema.DECLARED_FIELDS
    )
    assert dict(HEADER_NAMES) == dataclasses.asdict(defaults)


RECORD_FIELDS = sorted(name for name in vars(schema) if name.startswith("FIELD_"))


def test_the_record_keys_are_the_schema_s_and_all_distinct() -> None:
    assert keys.DEVICE_FIELD_KEYS == tuple(f.key for f in schema.DECLARED_FIELDS)
    # keys re-exports every other record field name of the schema, unchanged.
    assert sorted(n for n in keys.__all__ if n.startswith("FIELD_")) == RECORD_FIELDS
    assert all(getattr(keys, n) == getattr(schema, n) for n in RECORD_FIELDS)
    every = [*keys.DEVICE_FIELD_KEYS, *(getattr(schema, n) for n in RECORD_FIELDS)]
    assert len(set(every)) == len(every)


def test_header_names_are_distinct_case_insensitively() -> None:
    headers = [schema.ID_HEADER, *(f.header for f in schema.DECLARED_FIELDS)]
    assert len({h.lower() for h in headers}) == len(headers)
