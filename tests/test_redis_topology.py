"""redis.url's forms, parsed once at start: one server, a cluster's seeds, a sentinel service."""

from __future__ import annotations

import pytest

from gateway.redis_topology import NodeAddress, RedisTopology, parse_redis_url

N = NodeAddress

ACCEPTED: dict[str, tuple[str, RedisTopology]] = {
    "memory": ("memory://", RedisTopology("memory", "memory://")),
    "single": ("redis://cache:6380/2", RedisTopology("single", "redis://cache:6380/2")),
    "scheme case": ("REDIS://cache", RedisTopology("single", "redis://cache")),
    "single tls": (
        "rediss://u:p%40ss@cache",
        RedisTopology("single", "rediss://u:p%40ss@cache", tls=True, username="u",
                      password="p@ss"),
    ),
    "unix": ("unix:///run/redis.sock", RedisTopology("single", "unix:///run/redis.sock")),
    "cluster": (
        "redis+cluster://10.0.0.1:7000,10.0.0.2:7001,node3",
        RedisTopology(
            "cluster", "redis+cluster://10.0.0.1:7000,10.0.0.2:7001,node3",
            (N("10.0.0.1", 7000), N("10.0.0.2", 7001), N("node3", 6379)),
        ),
    ),
    "cluster tls with password": (
        "rediss+cluster://:secret@a:7000",
        RedisTopology("cluster", "rediss+cluster://:secret@a:7000", (N("a", 7000),), tls=True,
                      password="secret"),
    ),
    "cluster ipv6": (
        "redis+cluster://[::1]:7000",
        RedisTopology("cluster", "redis+cluster://[::1]:7000", (N("::1", 7000),)),
    ),
    "sentinel": (
        "redis+sentinel://s1:26379,s2,s3:26380/mymaster/3?sentinel_password=x",
        RedisTopology(
            "sentinel", "redis+sentinel://s1:26379,s2,s3:26380/mymaster/3?sentinel_password=x",
            (N("s1", 26379), N("s2", 26379), N("s3", 26380)), "mymaster", db=3,
            sentinel_password="x",
        ),
    ),
    "sentinel tls": (
        "rediss+sentinel://u:pw@s1/primary",
        RedisTopology("sentinel", "rediss+sentinel://u:pw@s1/primary", (N("s1", 26379),),
                      "primary", tls=True, username="u", password="pw"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("text, expected", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_forms(text: str, expected: RedisTopology) -> None:
    assert parse_redis_url(text) == expected


REFUSED: dict[str, tuple[str, str]] = {
    "no scheme": ("localhost:6379", "must start with"),
    "unknown scheme": ("valkey://a", "must start with"),
    "bad port": ("redis://:secret@a:99999", "has an invalid host or port"),
    "port zero": ("redis+cluster://a:0", "has an invalid host or port"),
    "cluster empty": ("redis+cluster://", "names no node"),
    "cluster empty node": ("redis+cluster://a:1,,b:2", "has an invalid host or port"),
    "cluster db": ("redis+cluster://a:1/3", "a cluster has only database 0"),
    "sentinel no service": ("redis+sentinel://a:1", "names no service"),
    "sentinel bad db": ("redis+sentinel://a:1/svc/x", "has an invalid database number"),
}


@pytest.mark.parametrize("text, message", REFUSED.values(), ids=REFUSED.keys())
def test_refused_forms_say_why_without_the_url(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_redis_url(text)
    assert "secret" not in str(caught.value)


def test_node_address_prints_ipv6_in_brackets() -> None:
    assert str(N("::1", 7000)) == "[::1]:7000"
    assert str(N("a", 1)) == "a:1"
