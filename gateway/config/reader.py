"""Reading the raw YAML mapping: the key path in every error, and the value converters.

A `Reader` knows the file (for messages); a `Section` is one mapping of the file with its
dotted path and its dataclass's defaults, and accepts exactly that dataclass's fields as
keys. A converter takes the raw value and its key path and returns the typed value or
raises `ConfigError` naming that path.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from gateway.config.settings import Listen
from gateway.errors import ConfigError
from gateway.redis_topology import parse_redis_url

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A DNS name, an IPv4 address or a bracketed IPv6 address, without a port.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")


def allowed_keys(defaults: Any) -> tuple[str, ...]:
    """The keys a section accepts: the fields of its dataclass, in their order."""
    return tuple(f.name for f in dataclasses.fields(defaults))


class Section:
    """One mapping of the file: its key path, its values, and the defaults of its dataclass."""

    __slots__ = ("data", "defaults", "path", "reader")

    def __init__(self, reader: Reader, path: str, data: dict[str, Any], defaults: Any) -> None:
        self.reader = reader
        self.path = path
        self.data = data
        self.defaults = defaults

    def key_path(self, key: str) -> str:
        """The dotted path of `key` in this section, as messages name it."""
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, convert: Callable[[Any, str], T]) -> T:
        """The converted value of `key`; absent or null: the default."""
        value = self.data.get(key)
        if value is None:
            return cast(T, getattr(self.defaults, key))
        return convert(value, self.key_path(key))

    def value(self, key: str) -> Any:
        """The raw value of `key`, the default when absent (a null stays None: the caller
        rejects it)."""
        return self.data.get(key, getattr(self.defaults, key))

    def section(self, key: str, defaults: Any = None) -> Section:
        """The nested mapping under `key`, with its own defaults (by default, this
        section's default value of `key`)."""
        if defaults is None:
            defaults = getattr(self.defaults, key)
        return self.reader.section(self.data.get(key), self.key_path(key), defaults)


class Reader:
    """Walks the raw mapping of one file, so errors can name the file and the key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(self.source, path, message)

    def section(self, raw: Any, path: str, defaults: Any) -> Section:
        """The mapping at `path` (null: empty); any key that is not a field of the
        dataclass of `defaults` is an error listing the allowed ones."""
        if raw is None:
            return Section(self, path, {}, defaults)
        if not isinstance(raw, dict):
            raise self.fail(path, "must be a mapping")
        allowed = allowed_keys(defaults)
        for key in raw:
            if not isinstance(key, str) or key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                raise self.fail(where, f"unknown key (allowed: {', '.join(allowed)})")
        return Section(self, path, cast(dict[str, Any], raw), defaults)

    # -- converters: (raw value, key path) -> typed value ------------------------------

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

    def upstream_url(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        try:
            parts = urlsplit(text)
        except ValueError:  # e.g. an unclosed IPv6 bracket: "http://[::1"
            raise self.fail(path, f"must be an http:// or https:// origin, got {text!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(path, f"must be an http:// or https:// origin, got {text!r}")
        # "@" rather than .username: "http://:secret@host" has an empty username but credentials.
        if "@" in parts.netloc:
            raise self.fail(path, "must not contain credentials (user:password@)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise self.fail(
                path,
                "must be an origin only (scheme://host[:port]); the request path is kept as is",
            )
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise self.fail(path, f"has an invalid port: {text!r}") from None
        return f"{parts.scheme}://{parts.netloc}"

    def redis_url(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        # Caught here rather than at the first request, when the store would connect. The
        # message leaves the URL out: it may carry a password.
        try:
            topology = parse_redis_url(text)
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None
        # The scheme in lower case, so the store can dispatch on it with a plain comparison.
        return topology.url

    def cidrs(self, value: Any, path: str) -> tuple[Network, ...]:
        if not isinstance(value, list):
            raise self.fail(path, "must be a list of CIDR blocks")
        nets = []
        for i, item in enumerate(value):
            try:
                nets.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                raise self.fail(
                    f"{path}[{i}]", f"is not an IP address or CIDR block: {item!r}"
                ) from None
        return tuple(nets)

    def header_name(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        if not _TOKEN.match(text):
            raise self.fail(path, f"is not a valid HTTP header name: {text!r}")
        return text

    def hosts(self, value: Any, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(path, "must be a list of host names")
        hosts = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not _HOST.match(item):
                raise self.fail(f"{path}[{i}]", f"is not a host name or address: {item!r}")
            hosts.append(item.lower())
        return tuple(hosts)

    def methods(self, value: Any, path: str) -> frozenset[str]:
        if not isinstance(value, list) or not value:
            raise self.fail(path, "must be a non-empty list of HTTP methods")
        out = set()
        for i, item in enumerate(value):
            if not isinstance(item, str) or not _TOKEN.match(item):
                raise self.fail(f"{path}[{i}]", f"is not an HTTP method: {item!r}")
            out.add(item.upper())
        return frozenset(out)
