"""A real Redis Cluster on loopback (3 primaries, 3 replicas), made by `redis-cli --cluster
create`, with the handles the failover and slot-migration tests need."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import pytest
import redis
from redis.crc import key_slot

from tests.rig.redis_nodes import RedisNode, binary, info_fields, launch, wait_until
from tests.rig.waits import WAIT

SLOTS: Final = 16384
FAILOVER_WAIT: Final = 20.0  # node timeout, the FAIL vote, a replica's election (and a retry)
_BAD_FLAGS: Final = frozenset({"fail", "fail?", "handshake", "noaddr"})


@dataclass(frozen=True)
class ClusterNode:
    """One node as the cluster sees it (one line of CLUSTER NODES)."""

    port: int
    node_id: str
    role: Literal["primary", "replica"]
    primary_id: str | None  # whom a replica follows
    slots: frozenset[int]
    healthy: bool  # connected, no fail / fail? / handshake flag
    open_slots: bool  # a slot of its is MIGRATING or IMPORTING (shown on its own line)


def parse_cluster_nodes(text: str) -> dict[int, ClusterNode]:
    """CLUSTER NODES as {port: ClusterNode}."""
    nodes = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        node_id, address, flags, primary, _, _, _, link, *slot_fields = line.split()
        port = int(address.split("@")[0].rpartition(":")[2])
        flag_set = set(flags.split(","))
        slots: set[int] = set()
        open_slots = False
        for field in slot_fields:
            if field.startswith("["):  # [slot->-id] migrating, [slot-<-id] importing
                open_slots = True
                continue
            first, _, last = field.partition("-")
            slots.update(range(int(first), int(last or first) + 1))
        nodes[port] = ClusterNode(
            port=port,
            node_id=node_id,
            role="primary" if "master" in flag_set else "replica",
            primary_id=None if primary == "-" else primary,
            slots=frozenset(slots),
            healthy=link == "connected" and not flag_set & _BAD_FLAGS,
            open_slots=open_slots,
        )
    return nodes


def _fingerprint(view: dict[int, ClusterNode]) -> set[tuple[object, ...]]:
    """What two nodes' views must share to agree (each node's own line says more)."""
    return {(n.port, n.node_id, n.role, n.primary_id, n.slots, n.healthy) for n in view.values()}


class RedisCluster:
    """A real Redis Cluster on loopback: `primaries` x (1 + `replicas`) redis-server
    processes (cluster-enabled, no persistence), created by redis-cli and torn down by
    stop(). Every wait is a bounded poll that fails naming what it waited for."""

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.server = binary("redis-server", "redis-server")
        self.cli = binary("redis-cli", "redis-tools")
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="devicegate-cluster-"))
        self.processes: dict[int, RedisNode] = {}
        self._killed_at: dict[int, float] = {}
        self._kill_view: dict[int, dict[int, ClusterNode]] = {}
        try:
            for _ in range(primaries * (1 + replicas)):
                node = launch(self.server, self.dir, "node", self._node_args, bus=True)
                self.processes[node.port] = node
            self._run_cli(
                "create",
                *(f"127.0.0.1:{port}" for port in self.processes),
                "--cluster-replicas", str(replicas),
            )  # fmt: skip
            self.wait_healthy(timeout=2 * WAIT)
        except BaseException:
            self.stop()
            raise

    def _node_args(self, port: int) -> list[str]:
        return [
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--save", "",
            "--appendonly", "no",
            # 7.x waits 5 s by default before a diskless full sync; every (re)joining replica
            # would sit out those 5 s before its link is up.
            "--repl-diskless-sync-delay", "0",
            "--dir", str(self.dir),
            "--loglevel", "warning",
            "--logfile", str(self.dir / f"node-{port}.log"),
        ]  # fmt: skip

    # --- addresses -----------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """Every node's port, in creation order (the first `primaries` began as primaries)."""
        return list(self.processes)

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """(host, port) of the nodes a client starts from: the first `primaries` nodes."""
        return [("127.0.0.1", port) for port in self.ports[: self.primaries]]

    @property
    def url(self) -> str:
        """The gateway's form: redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3."""
        return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self.seeds)

    # --- what the cluster says -----------------------------------------------------------

    def view(self, port: int) -> dict[int, ClusterNode]:
        """CLUSTER NODES as one node sees it."""
        return parse_cluster_nodes(self.processes[port].client.execute_command("CLUSTER", "NODES"))

    def _live(self) -> list[RedisNode]:
        return [node for node in self.processes.values() if node.alive]

    def _agreed_view(self) -> tuple[dict[int, ClusterNode] | None, str]:
        """The view every live node holds, or None and the first difference."""
        views = {node.port: self.view(node.port) for node in self._live()}
        first_port, first = next(iter(views.items()))
        for port, other in views.items():
            if _fingerprint(other) != _fingerprint(first):
                return None, f"nodes {first_port} and {port} disagree about the cluster"
            if any(n.open_slots for n in other.values()):
                return None, f"node {port} has a slot MIGRATING or IMPORTING"
        return first, ""

    def agreed_view(self) -> dict[int, ClusterNode]:
        """The cluster as every live node sees it (waits, bounded, until they agree)."""
        agreed: list[dict[int, ClusterNode]] = []

        def check() -> str | None:
            view, why = self._agreed_view()
            if view is None:
                return why
            agreed.append(view)
            return None

        wait_until(check, "the live nodes to agree about the cluster")
        return agreed[-1]

    @property
    def nodes(self) -> list[ClusterNode]:
        """Every node (dead ones as the live ones see them), primaries first."""
        view = self.agreed_view()
        return sorted(view.values(), key=lambda n: (n.role != "primary", self.ports.index(n.port)))

    def node(self, port: int) -> ClusterNode:
        """One node, as every live node agrees."""
        return self.agreed_view()[port]

    def replicas_of(self, port: int) -> list[ClusterNode]:
        """The replicas following a primary."""
        view = self.agreed_view()
        return [n for n in view.values() if n.primary_id == view[port].node_id]

    @staticmethod
    def slot_for_key(key: str | bytes) -> int:
        """The hash slot of a key (hash tags honoured)."""
        return key_slot(key.encode() if isinstance(key, str) else key)

    def primary_for_slot(self, slot: int) -> int:
        """The port of the primary serving a slot, as every live node agrees."""
        owners = [n.port for n in self.agreed_view().values() if slot in n.slots]
        assert len(owners) == 1, f"slot {slot} is served by {owners}"
        return owners[0]

    def primary_for_key(self, key: str | bytes) -> int:
        """The port of the primary serving a key."""
        return self.primary_for_slot(self.slot_for_key(key))

    def _problem(self) -> str | None:
        """Why the cluster is not whole and healthy (None when it is)."""
        for node in self.processes.values():
            if not node.alive:
                return f"node {node.port} is down"
            info = info_fields(node.client.execute_command("CLUSTER", "INFO"))
            state, slots_ok = info.get("cluster_state"), info.get("cluster_slots_ok")
            if state != "ok" or slots_ok != str(SLOTS):
                return f"node {node.port}: cluster_state {state}, {slots_ok} slots ok"
        view, why = self._agreed_view()
        if view is None:
            return why
        if not all(n.healthy for n in view.values()) or len(view) != len(self.processes):
            return f"not every node is known and connected: {sorted(view)}"
        primaries = {n.node_id: n for n in view.values() if n.role == "primary" and n.slots}
        if len(primaries) != self.primaries:
            return f"{len(primaries)} primaries serve slots, not {self.primaries}"
        for primary in primaries.values():
            followers = [n for n in view.values() if n.primary_id == primary.node_id]
            if len(followers) != self.replicas:
                return f"primary {primary.port} has {len(followers)} replicas"
            for replica in followers:
                repl = self.processes[replica.port].client.info("replication")
                if repl.get("master_link_status") != "up" or repl.get("master_sync_in_progress"):
                    return f"replica {replica.port} is not in sync with {primary.port}"
        return None

    def wait_healthy(self, timeout: float = WAIT) -> float:
        """Wait until every node is up, agrees, the slots are all served, and each primary
        has its replicas in sync (a replica that never synced would not be promoted)."""
        return wait_until(self._problem, "a whole, healthy cluster", timeout)

    def ensure_healthy(self) -> None:
        """Thaw or restart any node a test left frozen or down, close any slot it left
        half-migrated (`redis-cli --cluster fix`), then wait until the cluster is whole."""
        for node in self.processes.values():
            if node.alive:
                node.thaw()
            else:
                node.restart()
        views = [self.view(node.port) for node in self.processes.values()]
        if any(n.open_slots for view in views for n in view.values()):
            self._run_cli("fix", f"127.0.0.1:{self.ports[0]}")
        self.wait_healthy(timeout=FAILOVER_WAIT)

    # --- faults --------------------------------------------------------------------------

    def process(self, port: int) -> RedisNode:
        """The process behind a port (freeze/thaw it directly)."""
        return self.processes[port]

    def kill(self, port: int) -> None:
        """SIGKILL one node."""
        self._kill_view[port] = self.agreed_view()
        self._killed_at[port] = time.monotonic()
        self.processes[port].kill()

    def kill_primary(self, port: int) -> None:
        """SIGKILL a primary (the test fails if the node is not one)."""
        role = self.agreed_view()[port].role
        assert role == "primary", f"node {port} is a {role}, not a primary"
        self.kill(port)

    def wait_failover(self, old_port: int, timeout: float = FAILOVER_WAIT) -> float:
        """Wait until a replica of the killed primary serves its slots, in every live node's
        view, and every live node says cluster_state:ok; returns seconds since the kill."""
        before = self._kill_view[old_port]
        old = before[old_port]
        heirs = {n.node_id for n in before.values() if n.primary_id == old.node_id}

        def check() -> str | None:
            view, why = self._agreed_view()
            if view is None:
                return why
            new = [n for n in view.values() if n.node_id in heirs and n.role == "primary"]
            if not new or new[0].slots != old.slots:
                return f"no replica of {old_port} serves its slots yet"
            for node in self._live():
                info = info_fields(node.client.execute_command("CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return f"node {node.port}: cluster_state {info.get('cluster_state')}"
            return None

        wait_until(check, f"a replica of {old_port} to take over its slots", timeout)
        return time.monotonic() - self._killed_at[old_port]

    def restart(self, port: int, timeout: float = WAIT) -> float:
        """Start a killed node again on its port and config file (same node id): it rejoins,
        as a replica if it was failed over. Waits until every live node sees it connected,
        its replication link (if a replica) is up and cluster_state is ok everywhere."""
        node = self.processes[port]
        started = time.monotonic()
        node.restart()

        def check() -> str | None:
            view, why = self._agreed_view()
            if view is None:
                return why
            if not view[port].healthy:
                return f"node {port} is not seen connected"
            if view[port].role == "replica":
                if node.client.info("replication").get("master_link_status") != "up":
                    return f"replica {port} is not in sync"
            for live in self._live():
                info = info_fields(live.client.execute_command("CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return f"node {live.port}: cluster_state {info.get('cluster_state')}"
            return None

        wait_until(check, f"node {port} to rejoin the cluster", timeout)
        return time.monotonic() - started

    # --- slots ---------------------------------------------------------------------------

    def reshard(self, count: int, from_port: int, to_port: int) -> frozenset[int]:
        """Move `count` slots (redis-cli picks them: the source's lowest) with their keys
        by `redis-cli --cluster reshard`; returns the slots moved once every node agrees."""
        view = self.agreed_view()
        self._run_cli(
            "reshard", f"127.0.0.1:{from_port}",
            "--cluster-from", view[from_port].node_id,
            "--cluster-to", view[to_port].node_id,
            "--cluster-slots", str(count),
        )  # fmt: skip
        moved = view[from_port].slots - self._wait_moved(view[from_port].slots, from_port)
        assert len(moved) == count, f"redis-cli moved {len(moved)} slots, not {count}"
        return moved

    def move_slots(self, slots: Iterable[int], to_port: int) -> None:
        """Move these exact slots with their keys to a primary, the way redis-cli does it
        slot by slot (IMPORTING, MIGRATING, MIGRATE, SETSLOT NODE): redis-cli itself cannot
        be told which slots. Returns once every node agrees."""
        slots = sorted(set(slots))
        for slot in slots:
            from_port = self.begin_migration(slot, to_port)
            if from_port != to_port:
                self.migrate_keys(slot, from_port, to_port)
                self.finish_migration(slot, from_port, to_port)

        def check() -> str | None:
            view, why = self._agreed_view()
            if view is None:
                return why
            missing = set(slots) - view[to_port].slots
            return f"slots {sorted(missing)[:5]} not yet on {to_port}" if missing else None

        wait_until(check, f"every node to see slots {slots[:5]} on {to_port}")

    def begin_migration(self, slot: int, to_port: int) -> int:
        """Mark a slot IMPORTING on the target and MIGRATING on its owner (clients then get
        ASK for keys already moved); returns the owner's port."""
        view = self.agreed_view()
        from_port = next(n.port for n in view.values() if slot in n.slots)
        if from_port != to_port:
            target, source = self.processes[to_port].client, self.processes[from_port].client
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", view[from_port].node_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", view[to_port].node_id)
        return from_port

    def migrate_keys(
        self, slot: int, from_port: int, to_port: int, keys: Sequence[str | bytes] = ()
    ) -> int:
        """MIGRATE these keys (default: every key) of a MIGRATING slot to the target;
        returns how many moved. Moving some leaves the slot half-migrated: ASK answers."""
        moved = 0
        with redis.Redis(port=from_port, socket_timeout=WAIT) as source:  # keys stay bytes
            batch = list(keys) or source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            while batch:
                source.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *batch)
                moved += len(batch)
                batch = (
                    [] if keys else source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                )
        return moved

    def finish_migration(self, slot: int, from_port: int, to_port: int) -> None:
        """SETSLOT NODE on the target, the source, then every other live primary."""
        target_id = self.view(to_port)[to_port].node_id
        order = [to_port, from_port]
        order += [n.port for n in self._live() if n.port not in order and self._is_primary(n)]
        for port in order:
            self.processes[port].client.execute_command(
                "CLUSTER", "SETSLOT", slot, "NODE", target_id
            )

    def _is_primary(self, node: RedisNode) -> bool:
        return bool(node.client.execute_command("ROLE")[0] == "master")

    def _wait_moved(self, before: frozenset[int], from_port: int) -> frozenset[int]:
        left: list[frozenset[int]] = []

        def check() -> str | None:
            view, why = self._agreed_view()
            if view is None:
                return why
            left.append(view[from_port].slots)
            return None if view[from_port].slots != before else f"{from_port} still has its slots"

        wait_until(check, f"every node to agree on the slots moved off {from_port}")
        return left[-1]

    def _run_cli(self, command: str, *args: str) -> None:
        """`redis-cli --cluster <command> ... --cluster-yes`, bounded; fails with its output."""
        argv = [self.cli, "--cluster", command, *args, "--cluster-yes"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=3 * WAIT)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"redis-cli --cluster {command} did not finish within {exc.timeout} s")
        if done.returncode != 0 or "[ERR]" in done.stdout:
            tail = (done.stdout + done.stderr).strip().splitlines()[-10:]
            pytest.fail(f"redis-cli --cluster {command} failed: " + " | ".join(tail))

    # --- data and teardown ---------------------------------------------------------------

    def flush(self) -> None:
        """FLUSHALL and SCRIPT FLUSH on every live primary, then WAIT until its replicas
        have applied it; SCRIPT FLUSH on the replicas too (scripts do not replicate)."""
        for node in self._live():
            if self._is_primary(node):
                node.client.flushall()
                node.client.script_flush()
                replicas = int(node.client.info("replication")["connected_slaves"])
                acked = node.client.execute_command("WAIT", replicas, int(WAIT * 1000))
                assert acked == replicas, f"{acked} of {replicas} replicas of {node.port} acked"
            else:
                node.client.script_flush()

    def stop(self) -> None:
        """Stop every node (bounded) and remove the directory."""
        for node in self.processes.values():
            node.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)
