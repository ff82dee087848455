"""gateway.schema: the one list of device fields, and every layer that spells them agrees."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources

import pytest

from gateway import schema
from gateway.config import DeviceHeaders
from gateway.loadtest.fleet import HEADER_NAMES
from gateway.model import DEVICE_FIELDS, Device, DeviceIdentity
from gateway.store import keys
from gateway.store.scripts import NAMES as PLACEHOLDERS
from gateway.store.scripts import load_script, render

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


# ---------------------------------------------------------------- the Lua scripts

LUA = resources.files("gateway.store").joinpath("lua")
SCRIPTS = sorted(p.name for p in LUA.iterdir() if p.name.endswith(".lua"))


def _code(lua: str) -> str:
    """The script without its comments (none of the scripts has "--" inside a string)."""
    return "\n".join(line.split("--", 1)[0] for line in lua.splitlines())


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_rendered_script_has_no_placeholder_left(name: str) -> None:
    text = load_script(name)
    assert "{{" not in text and "}}" not in _code(text)


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_script_spells_a_record_field_name_itself(name: str) -> None:
    # Rendered with markers instead of the names, no name of the schema may be left in code.
    raw = LUA.joinpath(name).read_text(encoding="utf-8")
    code = _code(render(raw, {placeholder: "MARK" for placeholder in PLACEHOLDERS}))
    literals = set(re.findall(r"'([^']*)'", code)) | set(re.findall(r'"([^"]*)"', code))
    record = {f.key for f in schema.DECLARED_FIELDS} | {getattr(schema, n) for n in RECORD_FIELDS}
    assert literals & record == set()


def test_enforce_lua_compares_the_schema_s_fields_in_order() -> None:
    text = load_script("enforce.lua")
    table = re.search(r"local FIELDS = \{(.*)\}", text)
    assert table is not None
    assert tuple(re.findall(r"'([^']*)'", table.group(1))) == keys.DEVICE_FIELD_KEYS
    quoted = ", ".join(f"'{k}'" for k in keys.DEVICE_FIELD_KEYS)
    assert f"redis.call('HMGET', record, {quoted})" in text


def test_every_record_field_placeholder_renders_its_name() -> None:
    quoted = ", ".join(f"'{k}'" for k in keys.DEVICE_FIELD_KEYS)
    assert PLACEHOLDERS["DEVICE_FIELD_KEYS"] == quoted
    for name in RECORD_FIELDS:
        assert PLACEHOLDERS[name] == f"'{getattr(schema, name)}'"
    assert set(PLACEHOLDERS) == {"DEVICE_FIELD_KEYS", *RECORD_FIELDS}


def test_an_unknown_placeholder_is_an_error_at_load() -> None:
    with pytest.raises(ValueError, match=r"unknown placeholder \{\{FIELD_SERIAL\}\}"):
        render("redis.call('HGET', KEYS[1], {{FIELD_SERIAL}})")
