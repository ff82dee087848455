"""Configuration: frozen dataclasses, loaded once from YAML plus environment overrides.

`load_config(path, env)` validates everything and rejects unknown keys; every error is a
`ConfigError` naming the file and the dotted key path, e.g.
`config.yaml: rate_limits.device.rate: must be > 0`.

    settings.py   the frozen dataclasses, one per section: their fields are the keys a
                  section accepts, their defaults the values of keys left out
    loader.py     YAML (duplicate keys refused), the GATEWAY_* overrides, load/parse
    sections.py   the raw mapping -> Settings, one function per section
    reader.py     the key path in every error, and the value converters

This module only re-exports.
"""

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
