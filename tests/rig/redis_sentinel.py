"""A real Redis Sentinel deployment on loopback (a primary, a replica, 3 sentinels), with the
handles the failover tests need."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Final

from tests.rig.redis_nodes import RedisNode, binary, launch, wait_until
from tests.rig.waits import WAIT

FAILOVER_WAIT: Final = 20.0  # down-after, the ODOWN vote, an election (and one retry)
# Sentinel's own timers, shortened with SENTINEL DEBUG (Redis 7.0+): at the defaults a
# restarted old primary stays a stray empty master for ~11 s (INFO every 10 s, and 4 hello
# periods of 2 s before a sentinel reconfigures it) and sentinels meet each other slower.
SENTINEL_TIMERS: Final = ("info-period", "1000", "publish-period", "500")


class RedisSentinel:
    """A real primary + replica watched by 3 sentinels (quorum 2), all on loopback with no
    persistence, torn down by stop(). Every wait is a bounded poll that fails naming what
    it waited for."""

    def __init__(
        self,
        service: str = "devicegate",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        sentinels: int = 3,
    ) -> None:
        self.server = binary("redis-server", "redis-server")
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="devicegate-sentinel-"))
        self.data: list[RedisNode] = []
        self.sentinels: list[RedisNode] = []
        self._killed: RedisNode | None = None
        self._killed_at = 0.0
        try:
            for name in ("primary", "replica"):
                self.data.append(launch(self.server, self.dir, name, self._data_args))
            first, second = self.data
            second.client.execute_command("REPLICAOF", "127.0.0.1", first.port)
            # Sentinels read the replicas from the primary's INFO when they first connect:
            # started after the link is up they know it at once, not 10 s later.
            wait_until(self._link_problem, "the replica's first sync")
            for _ in range(sentinels):
                node = launch(self.server, self.dir, "sentinel", self._sentinel_args)
                self._shorten_timers(node)
                self.sentinels.append(node)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _data_args(self, port: int) -> list[str]:
        return [
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--repl-diskless-sync-delay", "0",  # 7.x waits 5 s before a diskless full sync
            "--dir", str(self.dir),
            "--loglevel", "warning",
            "--logfile", str(self.dir / f"data-{port}.log"),
        ]  # fmt: skip

    def _sentinel_args(self, port: int) -> list[str]:
        # Sentinel rewrites its config file as it learns (peers, replicas, epochs): each one
        # gets a writable file of its own. resolve-hostnames comes before monitor.
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            "loglevel warning\n"
            f"logfile {self.dir / f'sentinel-{port}.log'}\n"
            "sentinel resolve-hostnames no\n"
            "sentinel announce-hostnames no\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.data[0].port} 2\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        return [str(conf), "--sentinel"]

    @staticmethod
    def _shorten_timers(node: RedisNode) -> None:
        node.client.execute_command("SENTINEL", "DEBUG", *SENTINEL_TIMERS)

    # --- addresses -----------------------------------------------------------------------

    @property
    def sentinel_ports(self) -> list[int]:
        """The sentinels' ports."""
        return [node.port for node in self.sentinels]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every sentinel, as redis.sentinel.Sentinel takes them."""
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    @property
    def url(self) -> str:
        """The gateway's form: redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/<service>."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)
        return f"redis+sentinel://{hosts}/{self.service}"

    @property
    def data_ports(self) -> list[int]:
        """The two data nodes' ports (which one is the primary changes with failovers)."""
        return [node.port for node in self.data]

    # --- what the sentinels say ----------------------------------------------------------

    def _said(self, sentinel: RedisNode) -> int:
        _host, port = sentinel.client.execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
        )
        return int(port)

    def primary_port(self) -> int:
        """The primary's port, as the first live sentinel says."""
        return self._said(next(s for s in self.sentinels if s.alive))

    def _data_node(self, port: int) -> RedisNode:
        return next(node for node in self.data if node.port == port)

    def _state(self, sentinel: RedisNode, *what: str) -> list[dict[str, str]]:
        """SENTINEL MASTER (one map) or REPLICAS (a list of maps), as RESP3 maps."""
        reply = sentinel.client.execute_command("SENTINEL", *what, self.service)
        return [reply] if isinstance(reply, dict) else list(reply)

    def _link_problem(self) -> str | None:
        replica = self.data[1].client.info("replication")
        if replica.get("master_link_status") != "up" or replica.get("master_sync_in_progress"):
            return f"replica {self.data[1].port} is not in sync"
        return None

    def _problem(self) -> str | None:
        """Why the deployment is not whole and healthy (None when it is)."""
        for node in self.data + self.sentinels:
            if not node.alive:
                return f"{node.name} is down"
        said = {self._said(s) for s in self.sentinels}
        if len(said) != 1:
            return f"the sentinels name different primaries: {sorted(said)}"
        primary = self._data_node(said.pop())
        replica = next(node for node in self.data if node is not primary)
        if primary.client.execute_command("ROLE")[0] != "master":
            return f"{primary.name}, the sentinels' primary, is not a master"
        role = replica.client.execute_command("ROLE")
        if role[0] != "slave" or int(role[2]) != primary.port or role[3] != "connected":
            return f"{replica.name} is not a connected replica of {primary.port}: {role}"
        for sentinel in self.sentinels:
            (master,) = self._state(sentinel, "MASTER")
            flags, peers = master["flags"], master["num-other-sentinels"]
            if flags != "master" or peers != str(len(self.sentinels) - 1):
                return f"{sentinel.name}: flags {flags}, {peers} other sentinels"
            replicas = self._state(sentinel, "REPLICAS")
            ok = [r for r in replicas if r["flags"] == "slave" and r["master-link-status"] == "ok"]
            if [int(r["port"]) for r in ok] != [replica.port]:
                return f"{sentinel.name} does not see {replica.name} as a healthy replica"
        return None

    def wait_healthy(self, timeout: float = WAIT) -> float:
        """Wait until the replica is in sync, and every sentinel names the same primary,
        sees the replica healthy and knows the other sentinels."""
        return wait_until(self._problem, "a whole, healthy sentinel deployment", timeout)

    def ensure_healthy(self) -> None:
        """Thaw or restart any process a test left frozen or down, then wait until the
        deployment is whole."""
        for node in self.data + self.sentinels:
            if node.alive:
                node.thaw()
            else:
                node.restart()
                if node in self.sentinels:
                    self._shorten_timers(node)
        self.wait_healthy(timeout=FAILOVER_WAIT)

    # --- faults --------------------------------------------------------------------------

    def kill_primary(self) -> int:
        """SIGKILL the primary the sentinels name; returns its port."""
        node = self._data_node(self.primary_port())
        self._killed, self._killed_at = node, time.monotonic()
        node.kill()
        return node.port

    def wait_failover(self, timeout: float = FAILOVER_WAIT) -> float:
        """Wait until every sentinel names another primary, has finished the failover, and
        that primary answers ROLE master; returns seconds since the kill."""
        assert self._killed is not None, "wait_failover() without kill_primary()"
        old = self._killed.port

        def check() -> str | None:
            said = {self._said(s) for s in self.sentinels if s.alive}
            if len(said) != 1 or old in said:
                return f"the sentinels name {sorted(said)}"
            new = said.pop()
            for sentinel in self.sentinels:
                (master,) = self._state(sentinel, "MASTER")
                if master["flags"] != "master":
                    return f"{sentinel.name}: flags {master['flags']}"
            role = self._data_node(new).client.execute_command("ROLE")[0]
            return None if role == "master" else f"port {new} answers ROLE {role}"

        wait_until(check, f"the sentinels to replace primary {old}", timeout)
        return time.monotonic() - self._killed_at

    def restart_old_primary(self, timeout: float = FAILOVER_WAIT) -> float:
        """Start the killed primary again (empty, as a master): the sentinels turn it into a
        replica of the new primary. Waits until the deployment is whole; returns seconds."""
        assert self._killed is not None, "restart_old_primary() without kill_primary()"
        started = time.monotonic()
        self._killed.restart()
        self._killed = None
        self.wait_healthy(timeout)
        return time.monotonic() - started

    def process(self, port: int) -> RedisNode:
        """The process behind a port (freeze/thaw/kill it directly)."""
        return next(node for node in self.data + self.sentinels if node.port == port)

    # --- data and teardown ---------------------------------------------------------------

    def flush(self) -> None:
        """FLUSHALL and SCRIPT FLUSH on the primary, WAIT until the replica applied it,
        SCRIPT FLUSH on the replica (scripts do not replicate)."""
        primary = self._data_node(self.primary_port())
        primary.client.flushall()
        primary.client.script_flush()
        acked = primary.client.execute_command("WAIT", 1, int(WAIT * 1000))
        assert acked == 1, f"the replica did not ack the flush of {primary.port}"
        for node in self.data:
            if node is not primary and node.alive:
                node.client.script_flush()

    def stop(self) -> None:
        """Stop every process (bounded) and remove the directory."""
        for node in self.sentinels + self.data:
            node.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)
