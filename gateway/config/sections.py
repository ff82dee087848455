"""The raw mapping -> Settings, one function per section of config.yaml.

Each function reads its section's keys in a fixed order (the first bad value is the one
reported) and checks what involves more than one key. The allowed keys and the defaults
come from the section's dataclass (`gateway.config.settings`).
"""

from __future__ import annotations

import re
from typing import Any, Literal, cast

from gateway.config.reader import Reader, Section, allowed_keys
from gateway.config.settings import (
    MAX_BURST,
    MAX_RATE,
    AdminSettings,
    BucketSettings,
    DeviceHeaders,
    DeviceSettings,
    LimitSettings,
    LogSettings,
    RateLimitSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    StateSettings,
    UpstreamSettings,
)

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+\Z")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def build(reader: Reader, raw: Any) -> Settings:
    """The whole configuration from the file's top-level mapping (null: the defaults)."""
    top = reader.section(raw, "", Settings())
    return Settings(
        server=_server(top.section("server")),
        admin=_admin(top.section("admin")),
        upstream=_upstream(top.section("upstream")),
        redis=_redis(top.section("redis")),
        devices=_devices(top.section("devices")),
        rate_limits=_rate_limits(top.section("rate_limits")),
        limits=_limits(top.section("limits")),
        log=_log(top.section("log")),
        state=_state(top.section("state")),
    )


def _server(s: Section) -> ServerSettings:
    r = s.reader
    return ServerSettings(
        listen=s.get("listen", r.listen),
        trusted_proxies=s.get("trusted_proxies", r.cidrs),
        header_timeout=s.get("header_timeout", r.seconds),
        keepalive_timeout=s.get("keepalive_timeout", r.seconds),
        body_timeout=s.get("body_timeout", r.seconds),
        max_connections=s.get("max_connections", r.integer(1, 1_000_000)),
        shutdown_timeout=s.get("shutdown_timeout", r.seconds),
    )


def _admin(s: Section) -> AdminSettings:
    r = s.reader
    token = s.data.get("token")
    if token is not None:
        token = r.string(token, s.key_path("token"))
        if len(token) < 16:
            raise r.fail(s.key_path("token"), "must be at least 16 characters")
        if not _VISIBLE_ASCII.match(token):
            # HTTP trims white space around header values and aiohttp decodes other bytes
            # loosely: such a token could never be presented and compared byte for byte.
            raise r.fail(
                s.key_path("token"),
                "must be visible ASCII characters (no spaces or control characters)",
            )
    return AdminSettings(
        listen=s.get("listen", r.listen),
        token=token,
        allowed_hosts=s.get("allowed_hosts", r.hosts),
    )


def _upstream(s: Section) -> UpstreamSettings:
    r = s.reader
    upstream = UpstreamSettings(
        url=s.get("url", r.upstream_url),
        preserve_host=s.get("preserve_host", r.boolean),
        connect_timeout=s.get("connect_timeout", r.seconds),
        timeout=s.get("timeout", r.seconds),
        max_connections=s.get("max_connections", r.integer(1, 100_000)),
        max_connections_per_client=s.get("max_connections_per_client", r.integer(1, 100_000)),
    )
    per_client = upstream.max_connections_per_client
    if per_client is not None and per_client > upstream.max_connections:
        raise r.fail(
            s.key_path("max_connections_per_client"),
            f"must not exceed {s.key_path('max_connections')}",
        )
    if upstream.connect_timeout > upstream.timeout:
        raise r.fail(s.key_path("connect_timeout"), f"must not exceed {s.key_path('timeout')}")
    return upstream


def _redis(s: Section) -> RedisSettings:
    r = s.reader
    on_error = s.value("on_error")
    if on_error not in ("open", "closed"):
        raise r.fail(s.key_path("on_error"), f"must be open or closed, got {on_error!r}")
    prefix = s.get("key_prefix", r.string)
    if any(c in prefix for c in "{}: \t\r\n"):
        raise r.fail(s.key_path("key_prefix"), "must not contain braces, colons or white space")
    timeout = s.get("timeout", r.seconds)
    if timeout > 10:
        raise r.fail(s.key_path("timeout"), "must be <= 10 seconds (it bounds every request)")
    replicas = s.value("write_replicas")
    if replicas == "auto":
        replicas = None
    elif replicas is not None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= 16:
            raise r.fail(s.key_path("write_replicas"), "must be auto or a whole number 0-16")
    write_timeout = s.get("write_timeout", r.seconds)
    if write_timeout > 2:
        raise r.fail(s.key_path("write_timeout"), "must be <= 2 seconds (admin answers wait)")
    return RedisSettings(
        url=s.get("url", r.redis_url),
        timeout=timeout,
        on_error=cast(Literal["open", "closed"], on_error),
        key_prefix=prefix,
        restore_blocks=s.get("restore_blocks", r.boolean),
        write_replicas=replicas,
        write_timeout=write_timeout,
    )


def _devices(s: Section) -> DeviceSettings:
    r = s.reader
    headers = _headers(s.section("headers"))
    return DeviceSettings(
        headers=headers,
        require_id=s.get("require_id", r.boolean),
        data_upload_methods=s.get("data_upload_methods", r.methods),
        history_size=s.get("history_size", r.integer(0, 10_000)),
        registration_limit=_bucket(s.section("registration_limit")),
    )


def _headers(s: Section) -> DeviceHeaders:
    names = {key: s.get(key, s.reader.header_name) for key in allowed_keys(s.defaults)}
    # Header names are case-insensitive: two fields read from one header would be one field.
    seen: dict[str, str] = {}
    for key, name in names.items():
        if name.lower() in seen:
            raise s.reader.fail(s.key_path(key), f"repeats {s.key_path(seen[name.lower()])}")
        seen[name.lower()] = key
    return DeviceHeaders(**names)


def _bucket(s: Section) -> BucketSettings:
    r = s.reader
    rate = s.value("rate")
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise r.fail(s.key_path("rate"), "must be a number of tokens per second")
    if not 0 < rate <= MAX_RATE:
        raise r.fail(s.key_path("rate"), f"must be > 0 and <= {MAX_RATE:g}")
    if rate * 1000 < 1:
        raise r.fail(s.key_path("rate"), "must be at least 0.001 (one token per 1000 s)")
    burst = r.integer(1, MAX_BURST)(s.value("burst"), s.key_path("burst"))
    return BucketSettings(rate=float(rate), burst=burst)


def _rate_limits(s: Section) -> RateLimitSettings:
    return RateLimitSettings(
        device=_bucket(s.section("device")),
        anonymous=_bucket(s.section("anonymous")),
    )


def _limits(s: Section) -> LimitSettings:
    r = s.reader
    return LimitSettings(
        max_body_bytes=s.get("max_body_bytes", r.integer(0, 1 << 40)),
        request_buffering=s.get("request_buffering", r.boolean),
        buffer_memory_bytes=s.get("buffer_memory_bytes", r.integer(0, 1 << 30)),
        buffer_dir=s.get("buffer_dir", r.string),
    )


def _log(s: Section) -> LogSettings:
    r = s.reader
    level = s.get("level", r.string).lower()
    if level not in _LOG_LEVELS:
        raise r.fail(s.key_path("level"), f"must be one of {', '.join(_LOG_LEVELS)}")
    return LogSettings(level=level, access=s.get("access", r.boolean))


def _state(s: Section) -> StateSettings:
    state_dir: str | Literal[False] | None = s.data.get("dir")
    if state_dir is not None and state_dir is not False:
        state_dir = s.reader.string(state_dir, s.key_path("dir"))
    return StateSettings(dir=state_dir)
