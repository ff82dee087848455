"""The Lua scripts as Redis runs them (pure): the record's field names rendered in.

A script under `lua/` writes each record field name as a placeholder, `{{FIELD_REQUESTS}}`
(any FIELD_ constant of gateway.schema), and the declared fields' keys, in order, as
`{{DEVICE_FIELD_KEYS}}`. `load_script(name)` reads the file (importlib.resources) and
replaces each placeholder by Lua string literals, once, when the store registers the
script: the names cost a call nothing (they are not sent in ARGV), and the text Redis
hashes is the same in every process. An unknown placeholder is an error at load rather
than a script that reads a field nobody writes. A line `--#include <file>.lua` is replaced by
that file of `lua/` (the index helpers several scripts share, enforce.lua's body), includes
of includes too, before the rendering.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from typing import Final

from gateway import schema

__all__ = ["CROSS_SLOT", "NAMES", "load_script", "render"]

_PLACEHOLDER: Final = re.compile(r"\{\{([A-Z_]+)\}\}")
_NAME: Final = re.compile(r"[a-z]+")
_INCLUDE: Final = re.compile(r"^--#include ([a-z_]+\.lua)$", re.MULTILINE)
# Lets a script read the keys of several slots of one cluster node (Redis 7): the listing's
# per-node call. Only where the store is a cluster: elsewhere nothing needs it. Redis still
# holds the keys a call declares to one slot, so this variant takes none: ARGV[1] is the
# number of keys, then the keys, then the script's own arguments, and the prologue gives
# the script's body its usual KEYS and ARGV as locals.
CROSS_SLOT: Final = """#!lua flags=allow-cross-slot-keys
local KEYS, ARGV = (function(argv)
  local n, keys, args = tonumber(argv[1]), {}, {}
  for i = 1, n do keys[i] = argv[1 + i] end
  for i = n + 2, #argv do args[#args + 1] = argv[i] end
  return keys, args
end)(ARGV)
"""


def _lua(name: str) -> str:
    """A record field name as a Lua string literal."""
    if not _NAME.fullmatch(name):  # nothing to escape, by construction
        raise ValueError(f"record field name {name!r} is not a short lower-case word")
    return f"'{name}'"


def _names() -> dict[str, str]:
    names = {"DEVICE_FIELD_KEYS": ", ".join(_lua(f.key) for f in schema.DECLARED_FIELDS)}
    for constant, value in vars(schema).items():
        if constant.startswith("FIELD_") and isinstance(value, str):
            names[constant] = _lua(value)
    return names


# Placeholder -> the Lua text that replaces it.
NAMES: Final[Mapping[str, str]] = _names()


def render(text: str, names: Mapping[str, str] = NAMES) -> str:
    """`text` with every `{{NAME}}` replaced by `names[NAME]`; ValueError on an unknown one."""

    def replace(match: re.Match[str]) -> str:
        try:
            return names[match.group(1)]
        except KeyError:
            raise ValueError(f"unknown placeholder {match.group(0)}") from None

    return _PLACEHOLDER.sub(replace, text)


def _read(name: str) -> str:
    return resources.files("gateway.store").joinpath("lua", name).read_text(encoding="utf-8")


def _expand(text: str, within: tuple[str, ...]) -> str:
    """`text` with its `--#include` lines replaced, includes of includes too (a file that
    includes itself, however indirectly, is an error)."""

    def include(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in within:
            raise ValueError(f"{within[0]}: {' -> '.join((*within, name))} includes itself")
        return _expand(_read(name), (*within, name)).rstrip("\n")

    return _INCLUDE.sub(include, text)


def load_script(name: str, *, cross_slot: bool = False) -> str:
    """The script `lua/<name>` as Redis runs it; `cross_slot` flags it to read the keys of
    several slots of one cluster node."""
    text = _expand(_read(name), (name,))
    try:
        rendered = render(text)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return CROSS_SLOT + rendered if cross_slot else rendered
