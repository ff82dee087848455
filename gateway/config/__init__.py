"""Configuration: frozen dataclasses, loaded once from YAML plus environment overrides.

`load_config(path, env)` validates everything and rejects unknown keys; every error is a
`ConfigError` naming the file and the dotted key path, e.g.
`config.yaml: rate_limits.device.rate: must be > 0`.

    settings.py   the frozen dataclasses, one per section: their fields are the keys a
                  section accepts, their defaults the values of keys left out
    loader.py     YAML (duplicate keys refused), the GATEWAY_* overrides, load/parse
    sections.py   the raw mapping -> Settings, one function per section
    reader.py     the key path in every error, and the value converters

This module only re-exports, lazily (PEP 562), as every package face of the gateway does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from gateway.config.loader import ENV_OVERRIDES, load_config, parse_config
    from gateway.config.settings import (
        MAX_BURST,
        MAX_RATE,
        AdminSettings,
        BucketSettings,
        DeviceHeaders,
        DeviceSettings,
        LimitSettings,
        Listen,
        LogSettings,
        RateLimitSettings,
        RedisSettings,
        ServerSettings,
        Settings,
        StateSettings,
        UpstreamSettings,
    )

    # Re-exported: callers of load_config catch the error from the same module.
    from gateway.errors import ConfigError

_WHERE: Final = {
    "MAX_BURST": "gateway.config.settings",
    "MAX_RATE": "gateway.config.settings",
    "AdminSettings": "gateway.config.settings",
    "BucketSettings": "gateway.config.settings",
    "DeviceHeaders": "gateway.config.settings",
    "DeviceSettings": "gateway.config.settings",
    "LimitSettings": "gateway.config.settings",
    "Listen": "gateway.config.settings",
    "LogSettings": "gateway.config.settings",
    "RateLimitSettings": "gateway.config.settings",
    "RedisSettings": "gateway.config.settings",
    "ServerSettings": "gateway.config.settings",
    "Settings": "gateway.config.settings",
    "StateSettings": "gateway.config.settings",
    "UpstreamSettings": "gateway.config.settings",
    "ENV_OVERRIDES": "gateway.config.loader",
    "load_config": "gateway.config.loader",
    "parse_config": "gateway.config.loader",
    "ConfigError": "gateway.errors",
}

__all__ = [
    "ENV_OVERRIDES",
    "MAX_BURST",
    "MAX_RATE",
    "AdminSettings",
    "BucketSettings",
    "ConfigError",
    "DeviceHeaders",
    "DeviceSettings",
    "LimitSettings",
    "Listen",
    "LogSettings",
    "RateLimitSettings",
    "RedisSettings",
    "ServerSettings",
    "Settings",
    "StateSettings",
    "UpstreamSettings",
    "load_config",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
