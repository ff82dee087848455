"""Loading: the YAML file, the environment overrides, and the errors that name either.

`load_config(path, env)` reads the file, `parse_config(text, source, env)` parses YAML text
(refusing duplicate keys), applies the `GATEWAY_*` overrides and validates the result
(`gateway.config.sections`); an error caused by an override says which variable set it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway.config.reader import Reader
from gateway.config.sections import build
from gateway.config.settings import Settings
from gateway.errors import ConfigError

ENV_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "GATEWAY_UPSTREAM_URL": ("upstream", "url"),
    "GATEWAY_REDIS_URL": ("redis", "url"),
    "GATEWAY_LISTEN": ("server", "listen"),
    "GATEWAY_ADMIN_LISTEN": ("admin", "listen"),
    "GATEWAY_ADMIN_TOKEN": ("admin", "token"),
    "GATEWAY_STATE_DIR": ("state", "dir"),
}


def _apply_env(raw: Any, env: Mapping[str, str]) -> Any:
    if not any(name in env for name in ENV_OVERRIDES):
        return raw
    if raw is not None and not isinstance(raw, dict):
        return raw  # the type error is reported by build
    merged: dict[str, Any] = dict(raw or {})
    for name, (section, key) in ENV_OVERRIDES.items():
        if name in env:
            current = merged.get(section)
            if current is not None and not isinstance(current, dict):
                continue  # the type error is reported by build
            sect = dict(current or {})
            sect[key] = env[name]
            merged[section] = sect
    return merged


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would silently keep the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys from "<<: *anchor" may legitimately be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_config(text: str, source: str, env: Mapping[str, str] | None = None) -> Settings:
    """Parse YAML text (from `source`, used in messages), apply env overrides, validate."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, "", f"{where}invalid YAML: {problem}") from None
    env = env or {}
    try:
        return build(Reader(source), _apply_env(raw, env))
    except ConfigError as exc:
        # The file may be fine and the environment wrong: say which variable set the value.
        for name, key_path in ENV_OVERRIDES.items():
            if name in env and exc.path == ".".join(key_path):
                raise ConfigError(exc.source, exc.path, f"{exc.message} (from {name})") from None
        raise


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Load and validate the config file at `path` (None: built-in defaults) plus env overrides."""
    if path is None:
        return parse_config("", "<defaults>", env)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "", f"cannot be read: {exc}") from None
    return parse_config(text, str(p), env)
