"""What a Redis URL names (pure): one server, a Redis Cluster, or a Sentinel-watched primary.

    memory://                                           the embedded store (NativeStore)
    redis://[user:password@]host[:port][/db]            one server (rediss:// with TLS)
    unix://[user:password@]/path/redis.sock[?db=N]      one server on a Unix socket
    redis+cluster://[user:password@]host:port[,host:port...]
                                                        a Redis Cluster: the nodes listed
                                                        are seeds, the rest is discovered
                                                        (rediss+cluster:// with TLS)
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]
                                                        the primary the sentinels listed
                                                        watch under `service`; the
                                                        credentials are the data nodes'
                                                        (rediss+sentinel:// with TLS to
                                                        them); `?sentinel_password=` for
                                                        sentinels that require one

The parse happens once, when the config is read: a URL it refuses stops the gateway with a
message that leaves the URL out (it may carry a password).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

Kind = Literal["memory", "single", "cluster", "sentinel"]

DEFAULT_PORT: Final = 6379
DEFAULT_SENTINEL_PORT: Final = 26379
SCHEMES: Final = (
    "memory", "redis", "rediss", "unix",
    "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """One node's TCP address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RedisTopology:
    """What the gateway connects to, parsed from `redis.url`."""

    kind: Kind
    url: str  # as configured (scheme in lower case); redis-py reads a single server's
    seeds: tuple[NodeAddress, ...] = ()  # cluster seeds, or the sentinels
    service: str = ""  # sentinel: the name the sentinels watch the primary under
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0
    sentinel_password: str | None = None


def describe(topology: RedisTopology) -> str:
    """What the gateway will connect to, in words, without credentials (check-config)."""
    tls = " over TLS" if topology.tls else ""
    nodes = ", ".join(str(a) for a in topology.seeds)
    if topology.kind == "memory":
        return "embedded (memory://: one process, state lost on restart)"
    if topology.kind == "cluster":
        return f"Redis Cluster{tls}, discovered from {nodes}"
    if topology.kind == "sentinel":
        return (
            f"the primary the sentinels {nodes} name for {topology.service!r}{tls}, "
            f"db {topology.db}"
        )
    parts = urlsplit(topology.url)
    return f"one Redis server{tls}: {parts.netloc.rpartition('@')[2]}{parts.path}"


def parse_redis_url(text: str) -> RedisTopology:
    """The topology a URL names; ValueError (a message without the URL) when it is not one."""
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            "must start with memory://, redis://, rediss://, unix://, redis+cluster://, "
            "rediss+cluster://, redis+sentinel:// or rediss+sentinel://"
        )
    url = f"{scheme}://{rest}"
    if scheme == "memory":
        return RedisTopology("memory", url)
    if scheme == "unix":
        return RedisTopology("single", url)
    parts = urlsplit(url)
    tls = scheme.startswith("rediss")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    query = dict(parse_qsl(parts.query))
    if scheme in ("redis", "rediss"):
        _node(parts.netloc.rpartition("@")[2], DEFAULT_PORT)  # validates host and port
        return RedisTopology("single", url, tls=tls, username=username, password=password)
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise ValueError("names no node (host:port[,host:port...])")
    if scheme.endswith("+cluster"):
        if parts.path not in ("", "/", "/0"):
            raise ValueError("a cluster has only database 0: leave the path out")
        seeds = tuple(_node(h, DEFAULT_PORT) for h in hosts.split(","))
        return RedisTopology("cluster", url, seeds, tls=tls, username=username, password=password)
    service, _, db = parts.path.strip("/").partition("/")
    if not service:
        raise ValueError("names no service: redis+sentinel://host:port[,...]/<service>")
    try:
        number = int(db or query.get("db", "0"))
    except ValueError:
        raise ValueError("has an invalid database number") from None
    if number < 0:
        raise ValueError("has an invalid database number")
    return RedisTopology(
        "sentinel",
        url,
        tuple(_node(h, DEFAULT_SENTINEL_PORT) for h in hosts.split(",")),
        unquote(service),
        tls=tls,
        username=username,
        password=password,
        db=number,
        sentinel_password=query.get("sentinel_password"),
    )


def _node(text: str, default_port: int) -> NodeAddress:
    """host[:port] (an IPv6 host in brackets) as a NodeAddress."""
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid host or port") from None
    if not parts.hostname or port == 0 or parts.username is not None:
        raise ValueError("has an invalid host or port")
    return NodeAddress(parts.hostname, default_port if port is None else port)
