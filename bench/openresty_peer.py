"""The openresty peer: what users of Kong or OpenResty would run instead of devicegate.

nginx with lua-nginx-module (Debian's libnginx-mod-http-lua) and the lua-resty-redis client
(Debian's lua-nginx-redis): `access_by_lua_block` runs bench/peer_lua/access.lua, which makes
one EVALSHA of bench/peer_lua/enforce_peer.lua per request (block check, token bucket,
activity upsert, as devicegate's enforce.lua does for a known device) on a pooled keep-alive
Redis connection, then answers 403 / 429 / 503 itself or proxies to the same keep-alive
upstream block as the nginx-proxy target. `worker_processes` is the gateway's N.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from procs import BenchError, Proc, Processes, run_bounded
from servers import GENEROUS, nginx_conf, start_nginx, version_of

PEER_LUA = Path(__file__).resolve().parent / "peer_lua"
KEY_PREFIX = "peer:"  # its keys in the redis-server the gateways use (theirs: "dg:", "scale:")
# Where Debian (and an OpenResty install) put the modules and the Redis client. bench/run
# looks in the same places to decide whether to install them.
MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/share/nginx/modules")
# ngx_devel_kit first: Debian's lua module is built against it.
MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
REDIS_CLIENTS = (
    "/usr/share/lua/5.1/nginx/redis.lua",  # Debian's lua-nginx-redis
    "/usr/share/lua/5.1/resty/redis.lua",
    "/usr/local/share/lua/5.1/resty/redis.lua",
    "/usr/local/openresty/lualib/resty/redis.lua",
)


@dataclass(frozen=True, slots=True)
class LuaNginx:
    """What the peer's config needs: the load_module lines and the Lua search path."""

    load_modules: str
    package_path: str
    module: Path  # ngx_http_lua_module.so
    client: Path  # the lua-resty-redis file

    def versions(self) -> dict[str, str | None]:
        """The lua module's package version (dpkg) and the Redis client's _VERSION."""
        module = None
        if shutil.which("dpkg-query"):
            module = version_of(["dpkg-query", "-S", str(self.module)])
            package = module.split(":")[0] if module else None
            if package:
                got = version_of(["dpkg-query", "-W", "-f", "${Version}\n", package])
                module = f"{package} {got}" if got else package
        found = re.search(r"_VERSION\s*=\s*'([^']+)'", self.client.read_text(errors="replace"))
        return {
            "lua_module": module or str(self.module),
            "redis_client": f"lua-resty-redis {found.group(1)}" if found else str(self.client),
        }


def find_lua_nginx(procs: Processes, nginx: str) -> LuaNginx | str:
    """The lua module and Redis client, checked by `nginx -t` on a config that loads them
    and requires access.lua; or why the peer cannot run."""
    lines = []
    lua_module = None
    for module in MODULES:
        found = [Path(d) / module for d in MODULE_DIRS if (Path(d) / module).exists()]
        if found:
            lines.append(f"load_module {found[0]};\n")
            lua_module = found[0]
    if lua_module is None or lua_module.name != MODULES[-1]:
        return "lua-nginx-module not installed (apt-get install libnginx-mod-http-lua)"
    clients = [Path(c) for c in REDIS_CLIENTS if Path(c).exists()]
    if not clients:
        return "lua-resty-redis not installed (apt-get install lua-nginx-redis)"
    root = clients[0].parent.parent  # the directory `nginx.redis` / `resty.redis` resolve in
    lua = LuaNginx("".join(lines), f"{PEER_LUA}/?.lua;{root}/?.lua;;", lua_module, clients[0])
    body = f"""\
    lua_package_path "{lua.package_path}";
    init_by_lua_block {{ require("access") }}"""
    argv = nginx_conf(procs, nginx, "openresty-probe", body, main=lua.load_modules)
    code, out = run_bounded([*argv, "-t"], 30)
    if code != 0:
        return "nginx -t refused the lua module or access.lua: " + " ".join(out.split())[-300:]
    return lua


def _lua_string(text: str) -> str:
    """A Lua string literal (JSON's escapes are Lua's for what is written here)."""
    return json.dumps(text)


PEER_BODY = """\
    lua_package_path "{package_path}";
    init_by_lua_block {{
        require("access").configure({{
            script = {script},
            host = "127.0.0.1",
            port = {redis_port},
            timeout_ms = 1000,
            prefix = {prefix},
            rate = {rate},
            burst = {burst},
            anonymous_rate = {anonymous_rate},
            anonymous_burst = {anonymous_burst},
            upload_methods = {{ POST = true }},
        }})
    }}
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            access_by_lua_block {{ require("access").access() }}
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def start_peer(
    procs: Processes,
    nginx: str,
    lua: LuaNginx,
    *,
    port: int,
    upstream_port: int,
    redis_port: int,
    workers: int,
    device_limit: Mapping[str, float] = GENEROUS,
) -> Proc:
    """The peer on `port`, ready when an (anonymous) request through it answers 200."""
    body = PEER_BODY.format(
        package_path=lua.package_path,
        script=_lua_string(str(PEER_LUA / "enforce_peer.lua")),
        redis_port=redis_port,
        prefix=_lua_string(KEY_PREFIX),
        rate=round(device_limit["rate"] * 1000),  # milli-tokens per second, as enforce.lua
        burst=round(device_limit["burst"]),
        anonymous_rate=round(GENEROUS["rate"] * 1000),
        anonymous_burst=round(GENEROUS["burst"]),
        upstream=upstream_port,
        port=port,
    )
    try:
        return start_nginx(
            procs, nginx, "openresty-peer", body, port, workers=workers, main=lua.load_modules
        )
    except BenchError as exc:
        raise BenchError(f"the openresty peer did not start: {exc}") from exc
