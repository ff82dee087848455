"""Configuration: frozen dataclasses, loaded once from YAML plus environment overrides.

`load_config(path, env)` validates everything and rejects unknown keys; every error is a
`ConfigError` naming the file and the dotted key path, e.g.
`config.yaml: rate_limits.device.rate: must be > 0`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

# Re-exported: callers of load_config catch the error from the same module.
from gateway.errors import ConfigError as ConfigError

T = TypeVar("T")

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+\Z")
# A DNS name, an IPv4 address or a bracketed IPv6 address, without a port.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")
_LOG_LEVELS = ("debug", "info", "warning", "error")
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


@dataclass(frozen=True, slots=True)
class DeviceHeaders:
    """Names of the device identification headers."""

    id: str = "X-Device-Id"
    application: str = "X-App-Name"
    application_version: str = "X-App-Version"
    os: str = "X-OS-Name"
    os_version: str = "X-OS-Version"
    manufacturer: str = "X-Device-Manufacturer"
    model: str = "X-Device-Model"


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


ENV_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "GATEWAY_UPSTREAM_URL": ("upstream", "url"),
    "GATEWAY_REDIS_URL": ("redis", "url"),
    "GATEWAY_LISTEN": ("server", "listen"),
    "GATEWAY_ADMIN_LISTEN": ("admin", "listen"),
    "GATEWAY_ADMIN_TOKEN": ("admin", "token"),
    "GATEWAY_STATE_DIR": ("state", "dir"),
}


class _Reader:
    """Walks the raw mapping with the current key path, so errors can name it."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(self.source, path, message)

    def section(self, raw: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(path, "must be a mapping")
        for key in raw:
            if not isinstance(key, str) or key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                raise self.fail(where, f"unknown key (allowed: {', '.join(allowed)})")
        return cast(dict[str, Any], raw)

    def get(
        self,
        raw: dict[str, Any],
        path: str,
        key: str,
        default: T,
        convert: Callable[[Any, str], T],
    ) -> T:
        if key not in raw or raw[key] is None:
            return default
        return convert(raw[key], f"{path}.{key}" if path else key)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, "must be true or false")
        return value

    def integer(self, lo: int, hi: int) -> Callable[[Any, str], int]:
        def convert(value: Any, path: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(path, "must be a whole number")
            if not lo <= value <= hi:
                raise self.fail(path, f"must be between {lo} and {hi}")
            return value

        return convert

    def seconds(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, "must be a number of seconds")
        if not 0 < value <= 3600:
            raise self.fail(path, "must be > 0 and <= 3600")
        return float(value)

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, "must be a non-empty string")
        return value

    def listen(self, value: Any, path: str) -> Listen:
        text = self.string(value, path)
        host, sep, port = text.rpartition(":")
        # isascii: str.isdigit() also accepts digits such as "²" that int() then rejects.
        if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise self.fail(path, f"must be host:port, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host or "[" in host or "]" in host:
            # "::1:8080" is ambiguous ("::1" port 8080 or ":" port 1): demand the brackets.
            raise self.fail(path, f"must be host:port with an IPv6 host in brackets, got {text!r}")
        if not host:
            raise self.fail(path, f"must be host:port, got {text!r}")
        return Listen(host, int(port))


def _upstream_url(reader: _Reader, value: Any, path: str) -> str:
    text = reader.string(value, path)
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unclosed IPv6 bracket: "http://[::1"
        raise reader.fail(path, f"must be an http:// or https:// origin, got {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.fail(path, f"must be an http:// or https:// origin, got {text!r}")
    # "@" rather than .username: "http://:secret@host" has an empty username but credentials.
    if "@" in parts.netloc:
        raise reader.fail(path, "must not contain credentials (user:password@)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise reader.fail(
            path, "must be an origin only (scheme://host[:port]); the request path is kept as is"
        )
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise reader.fail(path, f"has an invalid port: {text!r}") from None
    return f"{parts.scheme}://{parts.netloc}"


def _redis_url(reader: _Reader, value: Any, path: str) -> str:
    text = reader.string(value, path)
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("memory", "redis", "rediss", "unix"):
        raise reader.fail(path, "must start with memory://, redis://, rediss:// or unix://")
    if scheme in ("redis", "rediss"):
        # Caught here rather than at the first request, when redis-py would parse it. The
        # message leaves the URL out: it may carry a password.
        try:
            port = urlsplit(text).port
        except ValueError:
            raise reader.fail(path, "has an invalid host or port") from None
        if port == 0:
            raise reader.fail(path, "has an invalid host or port")
    # The scheme in lower case, so the store can dispatch on it with a plain comparison.
    return f"{scheme}://{rest}"


def _bucket(reader: _Reader, raw: Any, path: str, default: BucketSettings) -> BucketSettings:
    data = reader.section(raw, path, ("rate", "burst"))
    rate = data.get("rate", default.rate)
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise reader.fail(f"{path}.rate", "must be a number of tokens per second")
    if not 0 < rate <= MAX_RATE:
        raise reader.fail(f"{path}.rate", f"must be > 0 and <= {MAX_RATE:g}")
    if rate * 1000 < 1:
        raise reader.fail(f"{path}.rate", "must be at least 0.001 (one token per 1000 s)")
    burst = reader.integer(1, MAX_BURST)(data.get("burst", default.burst), f"{path}.burst")
    return BucketSettings(rate=float(rate), burst=burst)


def _cidrs(
    reader: _Reader, value: Any, path: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise reader.fail(path, "must be a list of CIDR blocks")
    nets = []
    for i, item in enumerate(value):
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise reader.fail(
                f"{path}[{i}]", f"is not an IP address or CIDR block: {item!r}"
            ) from None
    return tuple(nets)


def _header_name(reader: _Reader, value: Any, path: str) -> str:
    text = reader.string(value, path)
    if not _TOKEN.match(text):
        raise reader.fail(path, f"is not a valid HTTP header name: {text!r}")
    return text


def _hosts(reader: _Reader, value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise reader.fail(path, "must be a list of host names")
    hosts = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _HOST.match(item):
            raise reader.fail(f"{path}[{i}]", f"is not a host name or address: {item!r}")
        hosts.append(item.lower())
    return tuple(hosts)


def _methods(reader: _Reader, value: Any, path: str) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise reader.fail(path, "must be a non-empty list of HTTP methods")
    out = set()
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _TOKEN.match(item):
            raise reader.fail(f"{path}[{i}]", f"is not an HTTP method: {item!r}")
        out.add(item.upper())
    return frozenset(out)


def _build(reader: _Reader, raw: Any) -> Settings:
    top = reader.section(
        raw,
        "",
        (
            "server",
            "admin",
            "upstream",
            "redis",
            "devices",
            "rate_limits",
            "limits",
            "log",
            "state",
        ),
    )
    d = Settings()

    s = reader.section(
        top.get("server"),
        "server",
        (
            "listen",
            "trusted_proxies",
            "header_timeout",
            "keepalive_timeout",
            "body_timeout",
            "max_connections",
            "shutdown_timeout",
        ),
    )
    server = ServerSettings(
        listen=reader.get(s, "server", "listen", d.server.listen, reader.listen),
        trusted_proxies=reader.get(
            s,
            "server",
            "trusted_proxies",
            d.server.trusted_proxies,
            lambda v, p: _cidrs(reader, v, p),
        ),
        header_timeout=reader.get(
            s, "server", "header_timeout", d.server.header_timeout, reader.seconds
        ),
        keepalive_timeout=reader.get(
            s, "server", "keepalive_timeout", d.server.keepalive_timeout, reader.seconds
        ),
        body_timeout=reader.get(s, "server", "body_timeout", d.server.body_timeout, reader.seconds),
        max_connections=reader.get(
            s, "server", "max_connections", d.server.max_connections, reader.integer(1, 1_000_000)
        ),
        shutdown_timeout=reader.get(
            s, "server", "shutdown_timeout", d.server.shutdown_timeout, reader.seconds
        ),
    )

    a = reader.section(top.get("admin"), "admin", ("listen", "token", "allowed_hosts"))
    token = a.get("token")
    if token is not None:
        token = reader.string(token, "admin.token")
        if len(token) < 16:
            raise reader.fail("admin.token", "must be at least 16 characters")
        if not _VISIBLE_ASCII.match(token):
            # HTTP trims white space around header values and aiohttp decodes other bytes
            # loosely: such a token could never be presented and compared byte for byte.
            raise reader.fail(
                "admin.token", "must be visible ASCII characters (no spaces or control characters)"
            )
    admin = AdminSettings(
        listen=reader.get(a, "admin", "listen", d.admin.listen, reader.listen),
        token=token,
        allowed_hosts=reader.get(
            a, "admin", "allowed_hosts", d.admin.allowed_hosts, lambda v, p: _hosts(reader, v, p)
        ),
    )

    u = reader.section(
        top.get("upstream"),
        "upstream",
        (
            "url",
            "preserve_host",
            "connect_timeout",
            "timeout",
            "max_connections",
            "max_connections_per_client",
        ),
    )
    du = d.upstream
    upstream = UpstreamSettings(
        url=reader.get(u, "upstream", "url", du.url, lambda v, p: _upstream_url(reader, v, p)),
        preserve_host=reader.get(u, "upstream", "preserve_host", du.preserve_host, reader.boolean),
        connect_timeout=reader.get(
            u, "upstream", "connect_timeout", du.connect_timeout, reader.seconds
        ),
        timeout=reader.get(u, "upstream", "timeout", du.timeout, reader.seconds),
        max_connections=reader.get(
            u, "upstream", "max_connections", du.max_connections, reader.integer(1, 100_000)
        ),
        max_connections_per_client=reader.get(
            u,
            "upstream",
            "max_connections_per_client",
            du.max_connections_per_client,
            reader.integer(1, 100_000),
        ),
    )
    if (
        upstream.max_connections_per_client is not None
        and upstream.max_connections_per_client > upstream.max_connections
    ):
        raise reader.fail(
            "upstream.max_connections_per_client", "must not exceed upstream.max_connections"
        )
    if upstream.connect_timeout > upstream.timeout:
        raise reader.fail("upstream.connect_timeout", "must not exceed upstream.timeout")

    r = reader.section(
        top.get("redis"), "redis", ("url", "timeout", "on_error", "key_prefix", "restore_blocks")
    )
    on_error = r.get("on_error", d.redis.on_error)
    if on_error not in ("open", "closed"):
        raise reader.fail("redis.on_error", f"must be open or closed, got {on_error!r}")
    prefix = reader.get(r, "redis", "key_prefix", d.redis.key_prefix, reader.string)
    if any(c in prefix for c in "{}: \t\r\n"):
        raise reader.fail("redis.key_prefix", "must not contain braces, colons or white space")
    redis_timeout = reader.get(r, "redis", "timeout", d.redis.timeout, reader.seconds)
    if redis_timeout > 10:
        raise reader.fail("redis.timeout", "must be <= 10 seconds (it bounds every request)")
    redis = RedisSettings(
        url=reader.get(r, "redis", "url", d.redis.url, lambda v, p: _redis_url(reader, v, p)),
        timeout=redis_timeout,
        on_error=cast(Literal["open", "closed"], on_error),
        key_prefix=prefix,
        restore_blocks=reader.get(
            r, "redis", "restore_blocks", d.redis.restore_blocks, reader.boolean
        ),
    )

    v = reader.section(
        top.get("devices"),
        "devices",
        ("headers", "require_id", "data_upload_methods", "history_size", "registration_limit"),
    )
    h = reader.section(v.get("headers"), "devices.headers", DeviceHeaders.__slots__)
    dh = DeviceHeaders()
    names = {
        key: reader.get(
            h, "devices.headers", key, getattr(dh, key), lambda x, p: _header_name(reader, x, p)
        )
        for key in DeviceHeaders.__slots__
    }
    seen: dict[str, str] = {}
    for key, name in names.items():
        if name.lower() in seen:
            other = seen[name.lower()]
            raise reader.fail(f"devices.headers.{key}", f"repeats devices.headers.{other}")
        seen[name.lower()] = key
    dd = d.devices
    devices = DeviceSettings(
        headers=DeviceHeaders(**names),
        require_id=reader.get(v, "devices", "require_id", dd.require_id, reader.boolean),
        data_upload_methods=reader.get(
            v,
            "devices",
            "data_upload_methods",
            dd.data_upload_methods,
            lambda x, p: _methods(reader, x, p),
        ),
        history_size=reader.get(
            v, "devices", "history_size", dd.history_size, reader.integer(0, 10_000)
        ),
        registration_limit=_bucket(
            reader,
            v.get("registration_limit"),
            "devices.registration_limit",
            dd.registration_limit,
        ),
    )

    rl = reader.section(top.get("rate_limits"), "rate_limits", ("device", "anonymous"))
    rate_limits = RateLimitSettings(
        device=_bucket(reader, rl.get("device"), "rate_limits.device", d.rate_limits.device),
        anonymous=_bucket(
            reader, rl.get("anonymous"), "rate_limits.anonymous", d.rate_limits.anonymous
        ),
    )

    lim = reader.section(
        top.get("limits"),
        "limits",
        ("max_body_bytes", "request_buffering", "buffer_memory_bytes", "buffer_dir"),
    )
    dl = d.limits
    limits = LimitSettings(
        max_body_bytes=reader.get(
            lim, "limits", "max_body_bytes", dl.max_body_bytes, reader.integer(0, 1 << 40)
        ),
        request_buffering=reader.get(
            lim, "limits", "request_buffering", dl.request_buffering, reader.boolean
        ),
        buffer_memory_bytes=reader.get(
            lim,
            "limits",
            "buffer_memory_bytes",
            dl.buffer_memory_bytes,
            reader.integer(0, 1 << 30),
        ),
        buffer_dir=reader.get(lim, "limits", "buffer_dir", dl.buffer_dir, reader.string),
    )

    lg = reader.section(top.get("log"), "log", ("level", "access"))
    level = reader.get(lg, "log", "level", d.log.level, reader.string).lower()
    if level not in _LOG_LEVELS:
        raise reader.fail("log.level", f"must be one of {', '.join(_LOG_LEVELS)}")
    access = reader.get(lg, "log", "access", d.log.access, reader.boolean)
    log = LogSettings(level=level, access=access)

    st = reader.section(top.get("state"), "state", ("dir",))
    state_dir: str | Literal[False] | None = st.get("dir")
    if state_dir is not None and state_dir is not False:
        state_dir = reader.string(state_dir, "state.dir")
    state = StateSettings(dir=state_dir)

    return Settings(
        server=server,
        admin=admin,
        upstream=upstream,
        redis=redis,
        devices=devices,
        rate_limits=rate_limits,
        limits=limits,
        log=log,
        state=state,
    )


def _apply_env(raw: Any, env: Mapping[str, str]) -> Any:
    if not any(name in env for name in ENV_OVERRIDES):
        return raw
    if raw is not None and not isinstance(raw, dict):
        return raw  # the type error is reported by _build
    merged: dict[str, Any] = dict(raw or {})
    for name, (section, key) in ENV_OVERRIDES.items():
        if name in env:
            current = merged.get(section)
            if current is not None and not isinstance(current, dict):
                continue  # the type error is reported by _build
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
        return _build(_Reader(source), _apply_env(raw, env))
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
