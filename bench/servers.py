"""The servers the benchmark runs: nginx instances, redis-server and gateways.

Each one gets a generated config in the run's work directory, its own free loopback port,
and a bounded readiness check that fails loudly with the server's log.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml
from procs import (
    BenchError,
    Proc,
    Processes,
    cpu_seconds,
    free_port,
    http_status,
    run_bounded,
    tree,
    wait_until,
)

START_TIMEOUT = 20.0  # seconds for any server to answer after it is started
# Nothing is 429 during the throughput runs.
GENEROUS: Mapping[str, float] = {"rate": 1_000_000, "burst": 1_000_000}


def which(name: str) -> str | None:
    """A binary on PATH or in the sbin directories a non-root PATH lacks."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def version_of(argv: list[str]) -> str | None:
    """The first line a `--version`-style command prints (nginx and wrk print to stderr)."""
    try:
        _, out = run_bounded(argv, 10)
    except BenchError:
        return None
    line = out.strip().splitlines()[0] if out.strip() else ""
    return line or None


NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes {workers};
{main}pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{body}
}}
"""
UPSTREAM_BODY = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{{"ok":true}}\\n';
        }}
    }}"""
PROXY_BODY = """\
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def nginx_conf(
    procs: Processes, nginx: str, name: str, body: str, *, workers: int = 1, main: str = ""
) -> list[str]:
    """Write an nginx config of its own (pid and logs in the work directory); its argv.

    `main` holds extra main-context directives (load_module lines), one per line.
    """
    conf = procs.workdir / f"{name}.conf"
    text = NGINX_MAIN.format(dir=procs.workdir, name=name, body=body, workers=workers, main=main)
    conf.write_text(text)
    argv = [nginx, "-p", str(procs.workdir), "-c", str(conf)]
    version = version_of([nginx, "-v"])
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version or "")
    if found and tuple(int(g) for g in found.groups()) >= (1, 19, 5):
        argv[1:1] = ["-e", str(procs.workdir / f"{name}.error.log")]  # not the system's log
    return argv


def start_nginx(
    procs: Processes,
    nginx: str,
    name: str,
    body: str,
    port: int,
    *,
    workers: int = 1,
    main: str = "",
) -> Proc:
    """An nginx instance of its own, ready when it answers 200 with all its workers up."""
    proc = procs.start(name, nginx_conf(procs, nginx, name, body, workers=workers, main=main))
    url = f"http://127.0.0.1:{port}/"
    wait_until(proc, f"{url} answering 200", lambda: http_status(url) == 200, START_TIMEOUT)
    wait_until(
        proc,
        f"{workers} worker processes",
        lambda: len(tree(proc.pid)) > workers,  # the master and its workers
        START_TIMEOUT,
    )
    return proc


def start_upstream(procs: Processes, nginx: str | None) -> tuple[Proc, int, str]:
    """nginx `return 200` when nginx is given, else bench/upstream.py."""
    port = free_port()
    if nginx:
        proc = start_nginx(procs, nginx, "upstream", UPSTREAM_BODY.format(port=port), port)
        return proc, port, "nginx return 200"
    script = Path(__file__).resolve().parent / "upstream.py"
    proc = procs.start("upstream", [sys.executable, str(script), "--port", str(port)])
    url = f"http://127.0.0.1:{port}/"
    wait_until(proc, f"{url} answering 200", lambda: http_status(url) == 200, START_TIMEOUT)
    return proc, port, "aiohttp low-level server"


class RedisServer:
    """The benchmark's own redis-server: no persistence, loopback only."""

    def __init__(self, procs: Processes, binary: str) -> None:
        self.port = free_port()
        self.proc = procs.start(
            "redis",
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(procs.workdir)],
        )  # fmt: skip
        self.client = redis.Redis(port=self.port, socket_timeout=10, decode_responses=True)
        wait_until(self.proc, f"redis PING on port {self.port}", self._ping, START_TIMEOUT)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def commands(self) -> dict[str, int]:
        """Calls per command so far, INFO itself left out (we send it)."""
        stats = self.client.info("commandstats")
        calls = {}
        for key, value in stats.items():
            name = key.removeprefix("cmdstat_")
            if name != "info" and isinstance(value, dict):
                calls[name] = int(value["calls"])
        return calls

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def keys(self) -> int:
        return int(self.client.dbsize())


@dataclass(frozen=True, slots=True)
class Gateway:
    """A started gateway and how to reach it."""

    proc: Proc
    port: int
    admin_port: int
    token: str
    workers: int


def gateway_env() -> dict[str, str]:
    """This environment minus GATEWAY_*: the generated config must be what runs."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


def start_gateway(
    procs: Processes,
    binary: Path,
    name: str,
    *,
    upstream_port: int,
    store_url: str,
    workers: int | None,
    key_prefix: str = "dg",
    device_limit: Mapping[str, float] = GENEROUS,
) -> Gateway:
    """`gateway run --config <generated> [--workers N]`, ready when /healthz and a request are."""
    port, admin_port = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    config: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": token},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        # A bench run must not pass requests unenforced: a slow store shows as 503s.
        "redis": {"url": store_url, "timeout": 1.0, "on_error": "closed", "key_prefix": key_prefix},
        "rate_limits": {"device": dict(device_limit), "anonymous": dict(GENEROUS)},
        # Every simulated device comes from one loopback address: lift its new-device budget.
        "devices": {"registration_limit": dict(GENEROUS)},
        "log": {"access": False, "level": "warning"},
    }
    path = procs.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, out = run_bounded([str(binary), "check-config", "--config", str(path)], 60, gateway_env())
    if code != 0:
        raise BenchError(f"{name}: the generated config is refused:\n{out}")
    argv = [str(binary), "run", "--config", str(path)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    proc = procs.start(name, argv, env=gateway_env())
    health = f"http://127.0.0.1:{admin_port}/healthz"
    wait_until(proc, f"{health} answering 200", lambda: http_status(health) == 200, START_TIMEOUT)
    public = f"http://127.0.0.1:{port}/"
    # Anonymous, so no device is registered by the check; 200 means upstream and store work.
    wait_until(proc, f"{public} answering 200", lambda: http_status(public) == 200, START_TIMEOUT)
    if workers and workers > 1:
        wait_until(
            proc,
            f"{workers} worker processes",
            lambda: len(tree(proc.pid)) >= workers,
            START_TIMEOUT,
            interval=0.2,
        )
        # devicegate's supervisor opens the admin port once every worker said ready; the
        # pause covers a gateway that does not, so no worker misses the first connections.
        time.sleep(1.0)
    return Gateway(proc, port, admin_port, token, workers or 1)


def gateway_has_workers(binary: Path) -> bool:
    """Whether this gateway's `run` takes --workers yet."""
    code, out = run_bounded([str(binary), "run", "--help"], 60, gateway_env())
    return code == 0 and "--workers" in out


def device_total(gateway: Gateway) -> int:
    """Devices the gateway's store knows, from the admin API's X-Total-Count."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway.admin_port}/devices?amount=1",
        headers={"Authorization": f"Bearer {gateway.token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.headers["X-Total-Count"])
