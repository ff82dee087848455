"""gateway.config: the shipped config.yaml, one bad file per failure, env overrides."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    ENV_OVERRIDES,
    BucketSettings,
    ConfigError,
    Listen,
    Settings,
    load_config,
    parse_config,
)

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
SHIPPED = HERE.parent / "config.yaml"

# file under tests/configs -> the message after "<path>: ". One file per failure.
BAD_CONFIGS: dict[str, str] = {
    "unknown_top_key.yaml": (
        "serverz: unknown key "
        "(allowed: server, admin, upstream, redis, devices, rate_limits, limits, log, state)"
    ),
    "unknown_nested_key.yaml": (
        "upstream.timeout_ms: unknown key "
        "(allowed: url, preserve_host, connect_timeout, timeout, max_connections, "
        "max_connections_per_client)"
    ),
    "unknown_header_key.yaml": (
        "devices.headers.serial: unknown key (allowed: id, application, application_version, "
        "os, os_version, manufacturer, model)"
    ),
    "not_a_mapping.yaml": "must be a mapping",
    "section_not_a_mapping.yaml": "redis: must be a mapping",
    "invalid_yaml.yaml": "line 4, column 1: invalid YAML: found unexpected end of stream",
    "duplicate_key.yaml": "line 6, column 1: invalid YAML: found duplicate key 'rate_limits'",
    "bad_listen.yaml": "server.listen: must be host:port, got '8080'",
    "listen_port_too_big.yaml": "server.listen: must be host:port, got '0.0.0.0:65536'",
    "listen_non_ascii_port.yaml": "server.listen: must be host:port, got '0.0.0.0:8²'",
    "listen_unbracketed_ipv6.yaml": (
        "admin.listen: must be host:port with an IPv6 host in brackets, got '::1:8081'"
    ),
    "bad_cidr.yaml": (
        "server.trusted_proxies[1]: is not an IP address or CIDR block: '10.0.0.300/8'"
    ),
    "trusted_proxies_not_a_list.yaml": "server.trusted_proxies: must be a list of CIDR blocks",
    "short_admin_token.yaml": "admin.token: must be at least 16 characters",
    "admin_token_with_space.yaml": (
        "admin.token: must be visible ASCII characters (no spaces or control characters)"
    ),
    "upstream_with_path.yaml": (
        "upstream.url: must be an origin only (scheme://host[:port]); "
        "the request path is kept as is"
    ),
    "upstream_bad_scheme.yaml": (
        "upstream.url: must be an http:// or https:// origin, got 'ftp://api.internal'"
    ),
    "upstream_unclosed_ipv6.yaml": (
        "upstream.url: must be an http:// or https:// origin, got 'http://[::1:9000'"
    ),
    "upstream_credentials.yaml": "upstream.url: must not contain credentials (user:password@)",
    "upstream_bad_port.yaml": "upstream.url: has an invalid port: 'http://api.internal:99999'",
    "empty_upstream_url.yaml": "upstream.url: must be a non-empty string",
    "connect_timeout_over_total.yaml": "upstream.connect_timeout: must not exceed upstream.timeout",
    "timeout_zero.yaml": "upstream.timeout: must be > 0 and <= 3600",
    "timeout_not_a_number.yaml": "upstream.timeout: must be a number of seconds",
    "bool_as_int.yaml": "upstream.max_connections: must be a whole number",
    "int_as_bool.yaml": "upstream.preserve_host: must be true or false",
    "bad_redis_scheme.yaml": (
        "redis.url: must start with memory://, redis://, rediss://, unix://, redis+cluster://, "
        "rediss+cluster://, redis+sentinel:// or rediss+sentinel://"
    ),
    "redis_url_without_slashes.yaml": (
        "redis.url: must start with memory://, redis://, rediss://, unix://, redis+cluster://, "
        "rediss+cluster://, redis+sentinel:// or rediss+sentinel://"
    ),
    "redis_bad_port.yaml": "redis.url: has an invalid host or port",
    "redis_cluster_no_nodes.yaml": "redis.url: names no node (host:port[,host:port...])",
    "redis_cluster_bad_port.yaml": "redis.url: has an invalid host or port",
    "redis_cluster_db.yaml": "redis.url: a cluster has only database 0: leave the path out",
    "redis_sentinel_no_service.yaml": (
        "redis.url: names no service: redis+sentinel://host:port[,...]/<service>"
    ),
    "redis_sentinel_bad_db.yaml": "redis.url: has an invalid database number",
    "write_replicas_bad.yaml": "redis.write_replicas: must be auto or a whole number 0-16",
    "write_replicas_too_many.yaml": "redis.write_replicas: must be auto or a whole number 0-16",
    "write_timeout_too_long.yaml": (
        "redis.write_timeout: must be <= 2 seconds (admin answers wait)"
    ),
    "redis_timeout_too_long.yaml": (
        "redis.timeout: must be <= 10 seconds (it bounds every request)"
    ),
    "bad_on_error.yaml": "redis.on_error: must be open or closed, got 'maybe'",
    "bad_key_prefix.yaml": "redis.key_prefix: must not contain braces, colons or white space",
    "duplicate_header_names.yaml": "devices.headers.application: repeats devices.headers.id",
    "bad_header_name.yaml": "devices.headers.id: is not a valid HTTP header name: 'X Device Id'",
    "empty_upload_methods.yaml": (
        "devices.data_upload_methods: must be a non-empty list of HTTP methods"
    ),
    "bad_upload_method.yaml": "devices.data_upload_methods[1]: is not an HTTP method: 'PO ST'",
    "history_size_too_big.yaml": "devices.history_size: must be between 0 and 10000",
    "device_rate_zero.yaml": "rate_limits.device.rate: must be > 0 and <= 1e+06",
    "anonymous_rate_too_small.yaml": (
        "rate_limits.anonymous.rate: must be at least 0.001 (one token per 1000 s)"
    ),
    "rate_not_a_number.yaml": "rate_limits.device.rate: must be a number of tokens per second",
    "burst_zero.yaml": "rate_limits.device.burst: must be between 1 and 1000000",
    "float_burst.yaml": "rate_limits.device.burst: must be a whole number",
    "negative_body_limit.yaml": "limits.max_body_bytes: must be between 0 and 1099511627776",
    "bad_log_level.yaml": "log.level: must be one of debug, info, warning, error",
    "per_client_over_pool.yaml": (
        "upstream.max_connections_per_client: must not exceed upstream.max_connections"
    ),
    "allowed_host_with_port.yaml": (
        "admin.allowed_hosts[1]: is not a host name or address: 'evil.example:80'"
    ),
    "allowed_hosts_not_a_list.yaml": "admin.allowed_hosts: must be a list of host names",
    "state_dir_true.yaml": "state.dir: must be a non-empty string",
    "negative_buffer_memory.yaml": ("limits.buffer_memory_bytes: must be between 0 and 1073741824"),
    "restore_blocks_not_a_bool.yaml": "redis.restore_blocks: must be true or false",
}


@pytest.mark.parametrize(("name", "message"), sorted(BAD_CONFIGS.items()), ids=sorted(BAD_CONFIGS))
def test_bad_config_is_rejected_with_its_exact_message(name: str, message: str) -> None:
    path = CONFIGS / name
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"{path}: {message}"
    assert caught.value.source == str(path)


def test_every_bad_config_file_is_in_the_table() -> None:
    # A file nobody asserts on proves nothing; a table entry without a file would error.
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(BAD_CONFIGS)


def test_redis_url_error_does_not_repeat_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "redis_bad_port.yaml", env={})
    assert "secret" in (CONFIGS / "redis_bad_port.yaml").read_text()
    assert "secret" not in str(caught.value)


# ---------------------------------------------------------------- the shipped config.yaml


def test_shipped_config_holds_exactly_the_defaults() -> None:
    assert load_config(SHIPPED, env={}) == Settings()


def _schema(value: Any) -> Any:
    """The key tree the YAML should have for a settings dataclass (leaves: None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, Listen | type):
        return {f.name: _schema(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return None


def _keys(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _keys(v) for k, v in raw.items()}
    return None


def test_shipped_config_spells_out_every_key() -> None:
    # Equal to the defaults is not enough: a key left out would load as its default too.
    raw = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert _keys(raw) == _schema(Settings())


def test_every_key_of_the_shipped_config_has_a_comment_above_it() -> None:
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    undocumented = [
        line
        for i, line in enumerate(lines)
        if line.strip() and not line.lstrip().startswith("#") and ":" in line
        if i == 0 or not lines[i - 1].lstrip().startswith("#")
    ]
    assert undocumented == []


def test_shipped_config_header_names_every_env_override() -> None:
    header = SHIPPED.read_text(encoding="utf-8").split("\n\n", 1)[0]
    for name in ENV_OVERRIDES:
        assert name in header


def test_shipped_config_leaves_the_admin_token_unset() -> None:
    raw = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert raw["admin"]["token"] is None


# ---------------------------------------------------------------- loading


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"{path}: file not found"


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, env={})  # a directory
    assert str(caught.value).startswith(f"{tmp_path}: cannot be read: ")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"log:\n  level: \xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}: cannot be read: ")


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "server:\n", "server: {listen: null}\n"],
    ids=["empty", "comment-only", "empty-section", "null-value"],
)
def test_absent_or_null_means_default(text: str) -> None:
    assert parse_config(text, "x.yaml", env={}) == Settings()


def test_no_path_gives_the_defaults() -> None:
    assert load_config(None, env={}) == Settings()


def test_values_are_converted_to_their_types(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        """
server:
  listen: "[::1]:8443"
  trusted_proxies: ["10.0.0.0/8", "fd00::1"]
upstream:
  url: "HTTPS://API.example:8443/"
  timeout: 5
redis:
  url: "REDIS://localhost:6379/2"
devices:
  data_upload_methods: [post, PUT]
rate_limits:
  device: {rate: 2}
log:
  level: DEBUG
""",
        encoding="utf-8",
    )
    s = load_config(path, env={})
    assert s.server.listen == Listen("::1", 8443)
    assert str(s.server.listen) == "[::1]:8443"
    assert s.server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::1/128"),
    )
    # The origin keeps no trailing slash: the request's raw path is appended as is.
    assert s.upstream.url == "https://API.example:8443"
    assert s.upstream.timeout == 5.0 and isinstance(s.upstream.timeout, float)
    assert s.redis.url == "redis://localhost:6379/2"
    assert s.devices.data_upload_methods == frozenset({"POST", "PUT"})
    # A bucket given in part keeps the default for the rest.
    assert s.rate_limits.device == BucketSettings(rate=2.0, burst=20)
    assert s.log.level == "debug"


def test_new_keys_convert_and_derive() -> None:
    s = parse_config(
        "admin: {allowed_hosts: [Admin.Internal, 10.1.2.3, '[fd00::1]']}\n"
        "upstream: {max_connections: 9}\n"
        "limits: {request_buffering: false, buffer_memory_bytes: 0, buffer_dir: /tmp/b}\n"
        "redis: {restore_blocks: false}\n"
        "state: {dir: false}\n",
        "x.yaml",
        env={},
    )
    assert s.admin.allowed_hosts == ("admin.internal", "10.1.2.3", "[fd00::1]")
    # Unset, an address may hold half the pool (at least one connection).
    assert s.upstream.max_connections_per_client is None
    assert s.upstream.per_client_limit == 4
    tiny = parse_config("upstream: {max_connections: 1}", "x", env={})
    assert tiny.upstream.per_client_limit == 1
    explicit = parse_config("upstream: {max_connections_per_client: 7}", "x", env={})
    assert explicit.upstream.per_client_limit == 7
    assert s.limits.request_buffering is False
    assert s.limits.buffer_memory_bytes == 0 and s.limits.buffer_dir == "/tmp/b"
    assert s.redis.restore_blocks is False
    assert s.state.dir is False


def test_yaml_merge_keys_may_override_merged_values() -> None:
    # The duplicate-key check must not reject the one legitimate way to repeat a key.
    text = """
rate_limits:
  device: &base {rate: 1, burst: 2}
  anonymous:
    <<: *base
    burst: 3
"""
    s = parse_config(text, "x.yaml", env={})
    assert s.rate_limits.anonymous == BucketSettings(rate=1.0, burst=3)


def test_duplicate_nested_key_is_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("upstream:\n  timeout: 5\n  timeout: 50\n", "x.yaml", env={})
    assert (
        str(caught.value) == "x.yaml: line 3, column 3: invalid YAML: found duplicate key 'timeout'"
    )


def test_yaml_cannot_build_python_objects() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("log: !!python/object/apply:os.system [echo]\n", "x.yaml", env={})
    assert "invalid YAML" in str(caught.value)


# ---------------------------------------------------------------- environment overrides

ENV_CASES = [
    (
        "GATEWAY_UPSTREAM_URL",
        "http://api.internal:9100",
        "upstream",
        "url",
        "http://api.internal:9100",
    ),
    ("GATEWAY_REDIS_URL", "redis://redis:6379/1", "redis", "url", "redis://redis:6379/1"),
    ("GATEWAY_LISTEN", "127.0.0.1:18080", "server", "listen", Listen("127.0.0.1", 18080)),
    ("GATEWAY_ADMIN_LISTEN", "[::1]:18081", "admin", "listen", Listen("::1", 18081)),
    ("GATEWAY_ADMIN_TOKEN", "0123456789abcdef-token", "admin", "token", "0123456789abcdef-token"),
    ("GATEWAY_STATE_DIR", "/var/lib/devicegate", "state", "dir", "/var/lib/devicegate"),
]


def test_env_cases_cover_every_override() -> None:
    assert sorted(case[0] for case in ENV_CASES) == sorted(ENV_OVERRIDES)


@pytest.mark.parametrize(
    ("var", "value", "section", "key", "expected"), ENV_CASES, ids=[c[0] for c in ENV_CASES]
)
def test_env_overrides_the_file(
    tmp_path: Path, var: str, value: str, section: str, key: str, expected: object
) -> None:
    path = tmp_path / "config.yaml"
    # The file sets every overridable key, so only the environment can explain the result.
    path.write_text(
        """
server: {listen: "0.0.0.0:1111"}
admin: {listen: "127.0.0.1:2222", token: "file-token-file-token"}
upstream: {url: "http://from-file:3333"}
redis: {url: "redis://from-file:4444/0"}
""",
        encoding="utf-8",
    )
    from_file = load_config(path, env={})
    assert getattr(getattr(from_file, section), key) != expected
    overridden = load_config(path, env={var: value})
    assert getattr(getattr(overridden, section), key) == expected
    # Nothing else moves.
    rest = dataclasses.replace(
        overridden,
        **{
            section: dataclasses.replace(
                getattr(overridden, section), **{key: getattr(getattr(from_file, section), key)}
            )
        },
    )
    assert rest == from_file


@pytest.mark.parametrize(
    ("var", "value", "section", "key", "expected"), ENV_CASES, ids=[c[0] for c in ENV_CASES]
)
def test_env_applies_without_a_file(
    var: str, value: str, section: str, key: str, expected: object
) -> None:
    assert getattr(getattr(load_config(None, env={var: value}), section), key) == expected


BAD_ENV = [
    (
        "GATEWAY_UPSTREAM_URL",
        "api.internal:9000",
        "upstream.url: must be an http:// or https:// origin, got 'api.internal:9000'",
    ),
    (
        "GATEWAY_REDIS_URL",
        "localhost:6379",
        "redis.url: must start with memory://, redis://, rediss://, unix://, redis+cluster://, "
        "rediss+cluster://, redis+sentinel:// or rediss+sentinel://",
    ),
    ("GATEWAY_LISTEN", "8080", "server.listen: must be host:port, got '8080'"),
    ("GATEWAY_ADMIN_LISTEN", "localhost", "admin.listen: must be host:port, got 'localhost'"),
    ("GATEWAY_ADMIN_TOKEN", "short", "admin.token: must be at least 16 characters"),
    ("GATEWAY_ADMIN_TOKEN", "", "admin.token: must be a non-empty string"),
]


@pytest.mark.parametrize(
    ("var", "value", "message"),
    BAD_ENV,
    ids=[f"{var}={value!r}" for var, value, _ in BAD_ENV],
)
def test_bad_env_value_names_key_path_and_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(SHIPPED, env={var: value})
    assert str(caught.value) == f"{SHIPPED}: {message} (from {var})"


def test_file_error_is_not_blamed_on_an_unrelated_env_variable() -> None:
    path = CONFIGS / "bad_listen.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"GATEWAY_ADMIN_LISTEN": "127.0.0.1:9"})
    assert str(caught.value) == f"{path}: server.listen: must be host:port, got '8080'"


def test_env_cannot_hide_a_section_of_the_wrong_type() -> None:
    path = CONFIGS / "section_not_a_mapping.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"GATEWAY_REDIS_URL": "memory://"})
    assert str(caught.value) == f"{path}: redis: must be a mapping"


def test_unrelated_env_variables_are_ignored() -> None:
    assert load_config(SHIPPED, env={"GATEWAY_UNKNOWN": "x", "PATH": "/bin"}) == Settings()


# ---------------------------------------------------------------- keys from the dataclasses


def _sections(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every mapping of the file, by dotted path, with the dataclass instance it becomes."""
    found = [(path, value)]
    for f in dataclasses.fields(value):
        child = getattr(value, f.name)
        if dataclasses.is_dataclass(child) and not isinstance(child, Listen | type):
            found += _sections(child, f"{path}.{f.name}" if path else f.name)
    return found


SECTIONS = _sections(Settings())


@pytest.mark.parametrize(("path", "defaults"), SECTIONS, ids=[p or "<top>" for p, _ in SECTIONS])
def test_every_section_accepts_exactly_the_fields_of_its_dataclass(
    path: str, defaults: Any
) -> None:
    raw: dict[str, Any] = {"serial": 1}
    for key in reversed(path.split(".") if path else []):
        raw = {key: raw}
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(raw), "x.yaml", env={})
    allowed = ", ".join(f.name for f in dataclasses.fields(defaults))
    where = f"{path}.serial" if path else "serial"
    assert str(caught.value) == f"x.yaml: {where}: unknown key (allowed: {allowed})"


def test_write_replicas_auto_or_a_number() -> None:
    assert parse_config("", "x", env={}).redis.write_replicas is None  # auto by default
    assert parse_config("redis: {write_replicas: auto}", "x", env={}).redis.write_replicas is None
    explicit = parse_config("redis: {write_replicas: 2, write_timeout: 1.5}", "x", env={})
    assert (explicit.redis.write_replicas, explicit.redis.write_timeout) == (2, 1.5)
