"""The validated configuration: frozen dataclasses, one per section of config.yaml.

Each section's dataclass is also its schema: the loader (`gateway.config.sections`) accepts
exactly its fields as keys, in its field order in messages, and takes unset keys from its
defaults. Plain values only, so a Settings pickles (the --workers supervisor sends it so).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from gateway import schema

MAX_RATE = 1_000_000.0
MAX_BURST = 1_000_000


@dataclass(frozen=True, slots=True)
class Listen:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The public (data plane) listener."""

    listen: Listen = Listen("0.0.0.0", 8080)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 30.0
    max_connections: int = 10_000
    shutdown_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin listener."""

    listen: Listen = Listen("127.0.0.1", 8081)
    token: str | None = None
    # Host header values accepted besides the listener's own loopback names (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """Where requests are forwarded and how long they may take (seconds)."""

    url: str = "http://127.0.0.1:9000"
    preserve_host: bool = False
    connect_timeout: float = 2.0
    timeout: float = 30.0
    max_connections: int = 1000
    # Connections one client address may hold at once; None: half of max_connections.
    max_connections_per_client: int | None = None

    @property
    def per_client_limit(self) -> int:
        """Upstream connections one client address may hold at once."""
        if self.max_connections_per_client is not None:
            return self.max_connections_per_client
        return max(1, self.max_connections // 2)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """The store."""

    url: str = "memory://"
    timeout: float = 0.1
    on_error: Literal["open", "closed"] = "open"
    key_prefix: str = "dg"
    # When Redis comes back without the gateway's data: block again the ids known blocked.
    restore_blocks: bool = True
    # Replicas a block, unblock or delete must reach before the admin API answers (WAIT);
    # None: 1 on a cluster or Sentinel, 0 on one server.
    write_replicas: int | None = None
    write_timeout: float = 0.5  # seconds the admin API waits for them, at most


@dataclass(frozen=True, slots=True)
class DeviceHeaders:
    """Names of the device identification headers (defaults: gateway.schema)."""

    id: str = schema.ID_HEADER
    application: str = schema.APPLICATION.header
    application_version: str = schema.APPLICATION_VERSION.header
    os: str = schema.OS.header
    os_version: str = schema.OS_VERSION.header
    manufacturer: str = schema.MANUFACTURER.header
    model: str = schema.MODEL.header


@dataclass(frozen=True, slots=True)
class BucketSettings:
    """A token bucket: `rate` tokens per second refill a bucket of `burst` tokens."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """Device identification and registration."""

    headers: DeviceHeaders = field(default_factory=DeviceHeaders)
    require_id: bool = False
    data_upload_methods: frozenset[str] = frozenset({"POST"})
    history_size: int = 50
    # Budget of new devices per client address (a token bucket): nobody fills Redis by
    # minting ids through the public port; generous enough for a carrier NAT.
    registration_limit: BucketSettings = BucketSettings(rate=1.0, burst=100)


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Default buckets for known devices and for anonymous clients (by IP)."""

    device: BucketSettings = BucketSettings(rate=10.0, burst=20)
    anonymous: BucketSettings = BucketSettings(rate=5.0, burst=10)


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Request limits and request-body buffering."""

    max_body_bytes: int = 10 * 1024 * 1024
    # Read a request body whole before an upstream connection is taken (as nginx does).
    request_buffering: bool = True
    # A buffered body past this many bytes moves from memory to a temporary file.
    buffer_memory_bytes: int = 1024 * 1024
    # Where those files go; None: the system's temporary directory.
    buffer_dir: str | None = None


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Logging."""

    level: str = "info"
    access: bool = True


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Files kept between runs (the blocked-ids snapshot, a generated admin token)."""

    # None: $XDG_STATE_HOME/devicegate, else ~/.local/state/devicegate; False: keep none.
    dir: str | Literal[False] | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole validated configuration."""

    server: ServerSettings = field(default_factory=ServerSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    devices: DeviceSettings = field(default_factory=DeviceSettings)
    rate_limits: RateLimitSettings = field(default_factory=RateLimitSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    log: LogSettings = field(default_factory=LogSettings)
    state: StateSettings = field(default_factory=StateSettings)
