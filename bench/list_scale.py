"""Admin listing at scale: N devices on one Redis and on a Redis Cluster, the list timed.

    .venv/bin/python bench/list_scale.py --devices 10000000 --engines single,cluster

For each engine in turn (the first is stopped before the next starts): starts it on free
loopback ports (one redis-server; or 3 primaries + 3 replicas by tests/rig/redis_cluster.py),
registers the devices through the real enforce.lua (raw pipelines of EVALSHA from
--fill-workers processes, each device sent to the node owning its slot), blocks 1 in 100
and renames 1 in 1,000 (block.lua / rename.lua, pipelined the same way), then reads Redis
memory per device and times the admin list through `Store.list_page`: page 1, keyset
pages (`after=`) deep in the list, an offset page, searches by prefix (ids, name words)
and by substring. Each timing is the median and the max of 5 runs (one untimed call of
each script first). Ids are deterministic (a keyed hash of the index): 60 % lower-case
UUIDs, 40 % serials "SN-" + 10 upper-case letters and digits. Timings are printed, never
asserted; every process started is stopped at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import hiredis
import redis

from gateway.config import RedisSettings
from gateway.model import Bucket
from gateway.store import Store
from gateway.store.cursor import ListCursor, read_scan_cursor
from gateway.store.keys import SEPARATOR, SHARDS, KeySchema
from gateway.store.listing import BlockedFilter, ListPage, Match
from gateway.store.scripts import load_script
from gateway.store.slots import key_slot

ROOT: Final = Path(__file__).resolve().parents[1]
SEED: Final = b"devicegate-list-scale"
PREFIX: Final = "dg"
CHUNK: Final = 20_000  # devices one fill task covers
BATCH: Final = 2_000  # commands a node gets in one pipeline round
RUNS: Final = 5  # runs a timing: median and max
WALK: Final = 50  # pages walked by `after=` before the timed one
CONTAINS_CAP: Final = 40  # answers a substring scan is followed for at most
SAMPLE: Final = 2_000  # records whose MEMORY USAGE is read
SPREAD_MS: Final = 30 * 86_400_000  # last activity: up to 30 days back
BUCKET: Final = Bucket(rate=10, burst=20)
HISTORY: Final = 50
ALNUM: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# (application, versions, os, os versions, manufacturer, models): one a device.
PROFILES: Final = (
    ("FieldApp", ("3.2.1", "3.3.0", "3.4.2"), "Android", ("13", "14", "15"), "Samsung",
     ("Galaxy S24", "Galaxy A54", "Galaxy XCover7")),
    ("Courier", ("2.14.0", "2.15.1"), "iOS", ("17.5", "18.1"), "Apple",
     ("iPhone 15", "iPhone 13")),
    ("Scanner Pro", ("5.0.3", "5.1.0"), "Android", ("11", "13"), "Zebra",
     ("TC52", "TC58", "MC3300")),
    ("MeterRead", ("1.9.7", "2.0.0"), "Android", ("14", "15"), "Google",
     ("Pixel 8", "Pixel 7a")),
)  # fmt: skip
NAMES: Final = (
    "Warehouse scanner {}",
    "Truck {} north",
    "Truck {} south",
    "Front desk tablet {}",
    "Loading dock {}",
)


# -- the devices (deterministic: any index, in any process) ---------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    id: str
    last_active_us: int
    declared: str  # ARGV[7] of enforce.lua
    name: str  # the custom name it gets if renamed


def device(i: int, base_us: int) -> Spec:
    """Device number `i`: id, last activity, declared fields, all from a keyed hash of i."""
    d = hashlib.blake2b(i.to_bytes(8, "little"), key=SEED, digest_size=32).digest()
    if d[0] < 154:  # 60 %: a UUID (version 4 form), lower-case
        h = d[1:17].hex()
        device_id = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[d[17] & 3]}{h[17:20]}-{h[20:]}"
    else:  # a serial, upper-case: the id index folds its case
        n = int.from_bytes(d[1:9], "little")
        chars = []
        for _ in range(10):
            n, r = divmod(n, 36)
            chars.append(ALNUM[r])
        device_id = "SN-" + "".join(chars)
    app, versions, os_name, os_versions, maker, models = PROFILES[d[22] % len(PROFILES)]
    declared = SEPARATOR.join(
        (app, versions[d[23] % len(versions)], os_name, os_versions[d[24] % len(os_versions)],
         maker, models[d[25] % len(models)])
    )  # fmt: skip
    back_ms = int.from_bytes(d[18:22], "little") % SPREAD_MS
    name = NAMES[d[26] % len(NAMES)].format(i // 1000)
    return Spec(device_id, base_us - back_ms * 1000, declared, name)


def blocked_indexes(start: int, stop: int) -> range:
    """1 in 100: every index divisible by 100."""
    return range(-(-start // 100) * 100, stop, 100)


def renamed_indexes(start: int, stop: int) -> list[int]:
    """1 in 1,000: index 1000 k + 10 (k mod 10), so 1 renamed device in 10 is blocked too."""
    picked = (1000 * k + 10 * (k % 10) for k in range(start // 1000, stop // 1000 + 1))
    return [i for i in picked if start <= i < stop]


# -- engines ---------------------------------------------------------------------------------


@dataclass
class Engine:
    name: str
    url: str
    primaries: list[int]  # ports
    replicas: list[int]
    shard_port: list[int]  # the primary holding each shard
    stop: Callable[[], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_single() -> Engine:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="devicegate-bench-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--logfile", os.path.join(workdir, "redis.log")],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

    client = redis.Redis(port=port, socket_timeout=1)
    try:
        for _ in range(500):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise SystemExit(f"redis-server exited at start ({proc.returncode})") from None
                time.sleep(0.02)
    except BaseException:
        stop()
        raise
    finally:
        client.close()
    return Engine("single", f"redis://127.0.0.1:{port}/0", [port], [], [port] * SHARDS, stop)


def start_cluster() -> Engine:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.rig.redis_cluster import RedisCluster

    # A long node timeout: 6 servers and the fill on 2 cores must not look like a failure.
    cluster = RedisCluster(primaries=3, replicas=1, node_timeout_ms=15_000)
    try:
        nodes = cluster.nodes
        primaries = [n.port for n in nodes if n.role == "primary"]
        replicas = [n.port for n in nodes if n.role == "replica"]
        keys = KeySchema(PREFIX)
        owner = {slot: n.port for n in nodes if n.role == "primary" for slot in n.slots}
        shard_port = [owner[key_slot(keys.shard(i).active)] for i in range(SHARDS)]
        for port in primaries:
            with redis.Redis(port=port) as client:
                # A replica that falls behind during the fill is not cut off (and resynced).
                client.config_set("client-output-buffer-limit", "replica 0 0 0")
    except BaseException:
        cluster.stop()
        raise
    return Engine("cluster", cluster.url, primaries, replicas, shard_port, cluster.stop)


# -- the fill and the marks: worker processes, raw sockets, hiredis --------------------------


@dataclass(frozen=True)
class Job:
    shard_port: tuple[int, ...]
    shas: dict[str, str]  # script name -> sha, loaded on every primary
    base_us: int
    sharded: bool  # a cluster: block events go to the shard's channel by SPUBLISH


_job: Job | None = None
_conns: dict[int, tuple[socket.socket, Any]] = {}


def _worker_init(job: Job) -> None:
    global _job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _job = job


def _conn(port: int) -> tuple[socket.socket, Any]:
    conn = _conns.get(port)
    if conn is None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _conns[port] = (sock, hiredis.Reader())
    return conn


def pack(*command: str | int) -> bytes:
    """One command in RESP (hiredis's packer; its stub types the tuple as one item)."""
    packer = cast(Callable[[tuple[str | int, ...]], bytes], hiredis.pack_command)
    return packer(command)


def _flush(pending: dict[int, list[bytes]]) -> list[Any]:
    """Send each node its commands, then read every reply; raises on an error reply."""
    sent = [(port, len(cmds)) for port, cmds in pending.items() if cmds]
    for port, _ in sent:
        _conn(port)[0].sendall(b"".join(pending[port]))
        pending[port] = []
    replies: list[Any] = []
    for port, count in sent:
        sock, reader = _conn(port)
        got = 0
        while got < count:
            reply = reader.gets()
            if reply is False:
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionError(f"redis on port {port} closed the connection")
                reader.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"redis on port {port}: {reply}")
            replies.append(reply)
            got += 1
    return replies


def _run(commands: Iterable[tuple[int, bytes]]) -> list[Any]:
    """(port, packed command) pairs, pipelined by node in rounds of BATCH."""
    pending: dict[int, list[bytes]] = {}
    replies: list[Any] = []
    for port, command in commands:
        cmds = pending.setdefault(port, [])
        cmds.append(command)
        if len(cmds) >= BATCH:
            replies += _flush(pending)
    replies += _flush(pending)
    return replies


def fill_task(bounds: tuple[int, int]) -> tuple[int, int]:
    """Register devices [start, stop) through enforce.lua; (devices, new records)."""
    job = _job
    assert job is not None
    keys = KeySchema(PREFIX)
    sha = job.shas["enforce.lua"]

    def commands() -> Iterable[tuple[int, bytes]]:
        for i in range(*bounds):
            spec = device(i, job.base_us)
            k = keys.enforce(spec.id)
            port = job.shard_port[shard_number(k[2])]
            yield port, pack(
                "EVALSHA", sha, 4, *k, spec.last_active_us, BUCKET.rate_milli, BUCKET.burst,
                "0", HISTORY, spec.id, spec.declared, "0",
            )  # fmt: skip

    replies = _run(commands())
    return len(replies), sum(1 for r in replies if r[6] == 1)


def mark_task(bounds: tuple[int, int]) -> tuple[int, int]:
    """Block and rename the devices of [start, stop) picked for it; (blocked, renamed)."""
    job = _job
    assert job is not None
    keys = KeySchema(PREFIX)
    publish = "SPUBLISH" if job.sharded else "PUBLISH"

    def commands() -> Iterable[tuple[int, bytes]]:
        for i in blocked_indexes(*bounds):
            spec = device(i, job.base_us)
            k = keys.device(spec.id)
            channel = keys.device_channel(spec.id, sharded=job.sharded)
            yield job.shard_port[shard_number(k.active)], pack(
                "EVALSHA", job.shas["block.lua"], 4, k.record, k.active, k.blocked,
                k.blocked_version, "", spec.id, channel, publish,
            )  # fmt: skip
        for i in renamed_indexes(*bounds):
            spec = device(i, job.base_us)
            k = keys.device(spec.id)
            sha = job.shas["rename.lua"]
            yield (
                job.shard_port[shard_number(k.active)],
                pack("EVALSHA", sha, 2, k.record, k.names, spec.id, spec.name),
            )

    replies = _run(commands())
    blocked = len(blocked_indexes(*bounds))
    return blocked, len(replies) - blocked


def shard_number(index_key: str) -> int:
    """The shard number of a shard key `<p>:{dNNN}:...`."""
    start = index_key.index("{d") + 2
    return int(index_key[start : start + 3])


def run_pool(
    pool: Any, task: Callable[[tuple[int, int]], tuple[int, int]], count: int, what: str
) -> tuple[float, int, int]:
    """Run `task` over every CHUNK of [0, count); seconds taken and the summed answers."""
    chunks = [(s, min(s + CHUNK, count)) for s in range(0, count, CHUNK)]
    started = time.perf_counter()
    a = b = done = 0
    step = max(1, len(chunks) // 10)
    for n, (x, y) in enumerate(pool.imap_unordered(task, chunks), 1):
        a, b = a + x, b + y
        done += 1
        if n % step == 0 and n < len(chunks):
            elapsed = time.perf_counter() - started
            print(f"  {what}: {n / len(chunks):4.0%} in {elapsed:6.1f} s", file=sys.stderr,
                  flush=True)  # fmt: skip
    return time.perf_counter() - started, a, b


# -- memory ----------------------------------------------------------------------------------


def used_memory(ports: Sequence[int]) -> int:
    total = 0
    for port in ports:
        with redis.Redis(port=port) as client:
            total += int(client.info("memory")["used_memory"])
    return total


def memory_usage(clients: dict[int, redis.Redis], keyed: Iterable[tuple[int, bytes]]) -> int:
    """Sum of MEMORY USAGE (exact: SAMPLES 0) over (port, key) pairs, pipelined by node."""
    pending: dict[int, list[bytes]] = {}
    total = 0

    def flush(port: int) -> int:
        pipe = clients[port].pipeline(transaction=False)
        for key in pending[port]:
            pipe.memory_usage(key, samples=0)
        pending[port] = []
        return sum(int(x or 0) for x in pipe.execute())

    for port, key in keyed:
        pending.setdefault(port, []).append(key)
        if len(pending[port]) >= 5_000:
            total += flush(port)
    for port in list(pending):
        total += flush(port)
    return total


def index_memory(engine: Engine, clients: dict[int, redis.Redis]) -> dict[str, int]:
    """Bytes of each kind of index key, summed over the shards."""
    keys = KeySchema(PREFIX)
    parts: dict[str, list[tuple[int, bytes]]] = {
        "activity zsets": [], "blocked zsets": [], "id index": [], "names + words": [],
    }  # fmt: skip
    for i in range(SHARDS):
        port, s = engine.shard_port[i], keys.shard(i)
        parts["activity zsets"].append((port, s.active.encode()))
        parts["blocked zsets"] += [(port, s.blocked.encode()), (port, s.blocked_version.encode())]
        parts["names + words"] += [(port, s.names.encode()), (port, (s.names[:-5] + "nw").encode())]
        directory = (s.active[:-6] + "ix").encode()
        heads = cast(list[bytes], clients[port].zrange(directory, 0, -1))
        parts["id index"] += [(port, directory)] + [(port, directory + b":" + h) for h in heads]
    return {what: memory_usage(clients, keyed) for what, keyed in parts.items()}


# -- timings ---------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    times: list[float] = field(default_factory=list)  # seconds
    rows: int | None = None
    total: int | None = None
    note: str = ""


@dataclass
class Targets:
    uuid_prefix: str
    serial_prefix: str
    middle: str  # a list cursor from the middle of the list


async def timings(url: str, targets: Targets) -> list[Row]:
    store = Store.from_settings(RedisSettings(url=url, timeout=5.0))
    out: list[Row] = []

    async def failed(row: Row, started: float, exc: Exception) -> None:
        """Note a call that failed (a timeout: the script may still run in Redis), and
        wait until Redis answers again so that the next call is not refused (BUSY)."""
        elapsed = time.perf_counter() - started
        waited = time.perf_counter()
        while not await store.ping() and time.perf_counter() - waited < 600:
            await asyncio.sleep(0.05)
        busy = time.perf_counter() - waited
        message = f"{type(exc).__name__}: {exc}".split(";")[0][:80]
        row.note = f"FAILED after {elapsed:.1f} s ({message}); Redis busy {busy:.1f} s more"

    async def timed(label: str, call: Callable[[], Awaitable[ListPage]]) -> ListPage | None:
        row = Row(label)
        out.append(row)
        page = None
        for _ in range(RUNS):
            started = time.perf_counter()
            try:
                page = await call()
            except Exception as exc:
                await failed(row, started, exc)
                return None
            row.times.append(time.perf_counter() - started)
        assert page is not None
        row.rows, row.total = len(page.devices), page.total
        row.note = "truncated" if page.truncated else ""
        return page

    def lister(
        blocked: BlockedFilter = "all",
        *,
        name: str | None = None,
        page: int = 1,
        after: str | None = None,
        match: Match = "prefix",
    ) -> Callable[[], Awaitable[ListPage]]:
        return lambda: store.list_page(
            name=name, blocked=blocked, page=page, after=after, match=match
        )

    try:
        # One untimed call of each script: loads it on every node.
        warm = Row("(untimed: loading the scripts)")
        for call in (lister(), lister(name="warehouse"), lister(name="x-", match="contains")):
            started = time.perf_counter()
            try:
                await call()
            except Exception as exc:
                await failed(warm, started, exc)
                out.append(warm)

        filters: tuple[BlockedFilter, ...] = ("all", "hide", "only")
        for blocked in filters:
            await timed(f"page 1, blocked={blocked}", lister(blocked))
        for blocked in filters:
            walk = Row(f"walk after= pages 2-{WALK + 1}, blocked={blocked} (1 run a page)")
            out.append(walk)
            cursor = (await store.list_page(blocked=blocked)).next_cursor
            for _ in range(WALK):
                if cursor is None:
                    break
                started = time.perf_counter()
                try:
                    answer = await store.list_page(blocked=blocked, after=cursor)
                except Exception as exc:
                    await failed(walk, started, exc)
                    cursor = None
                    break
                walk.times.append(time.perf_counter() - started)
                cursor = answer.next_cursor
            walk.note = walk.note or f"{len(walk.times)} pages"
            if cursor is not None:
                await timed(f"page {WALK + 2} by after=, blocked={blocked}",
                            lister(blocked, after=cursor))  # fmt: skip
        for blocked in filters:
            await timed(f"after= a middle cursor, blocked={blocked}",
                        lister(blocked, after=targets.middle))  # fmt: skip
        for blocked in filters:
            await timed(f"page=50 (offset 980), blocked={blocked}", lister(blocked, page=50))
        searches: list[tuple[str, BlockedFilter]] = [
            (targets.uuid_prefix, "all"),
            (targets.serial_prefix, "all"),
            ("warehouse", "all"),
            ("warehouse", "only"),
            ("north", "only"),
            ("sn-", "all"),  # 40 % of the ids: the capped worst case, last
        ]
        for name, blocked in searches:
            await timed(f"prefix {name!r}, blocked={blocked}", lister(blocked, name=name))
        for needle in ("scanner 12", "x-"):
            row = Row(f"contains {needle!r}: each answer (<= {CONTAINS_CAP})")
            out.append(row)
            after, found, done = None, 0, False
            for _ in range(CONTAINS_CAP):
                started = time.perf_counter()
                try:
                    answer = await store.list_page(name=needle, match="contains", after=after)
                except Exception as exc:
                    await failed(row, started, exc)
                    break
                row.times.append(time.perf_counter() - started)
                found += len(answer.devices)
                after = answer.next_cursor
                if after is None:
                    done = True
                    break
            row.rows = found
            slowest = f", the slowest #{row.times.index(max(row.times)) + 1}" if row.times else ""
            if not row.note and done:
                row.note = f"{len(row.times)} answers, done{slowest}"
            elif not row.note and after is not None:
                # Not through yet: how far, in shards, and so about how many answers in all.
                at = read_scan_cursor(after, SHARDS).shard
                whole = f"~{len(row.times) * SHARDS / at:,.0f}" if at else "?"
                row.note = (
                    f"{len(row.times)} answers: at shard {at}/{SHARDS}, {whole} in all{slowest}"
                )
    finally:
        await store.close()
    return out


SLOWLOG_US: Final = 1000  # the longest commands of the timings: those over 1 ms


def script_names() -> dict[str, str]:
    """sha -> the listing's script name (the per-node variants marked)."""
    names = {}
    for name in ("list.lua", "search.lua", "scan.lua"):
        names[hashlib.sha1(load_script(name).encode()).hexdigest()] = name
        text = load_script(name, cross_slot=True)
        names[hashlib.sha1(text.encode()).hexdigest()] = f"{name} (per node)"
    return names


def slowest(clients: dict[int, redis.Redis]) -> list[tuple[str, str]]:
    """From SLOWLOG: per script, how many runs took over 1 ms, and the longest (what a
    node spends without serving anything else, its data plane included)."""
    names = script_names()
    longest: dict[str, list[int]] = {}
    for client in clients.values():
        for entry in client.slowlog_get(100_000):
            raw = entry.get("command", b"")
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            command = text.split(" ")[:2]
            what = "other commands"
            if command[0].upper() == "EVALSHA" and len(command) > 1:
                what = names.get(command[1].lower(), "EVALSHA " + command[1][:8])
            longest.setdefault(what, []).append(int(entry["duration"]))
    return [
        (f"  {what}", f"{len(runs):,} runs over 1 ms, longest {max(runs) / 1000:,.1f} ms")
        for what, runs in sorted(longest.items(), key=lambda x: -max(x[1]))
    ]


# -- one engine ------------------------------------------------------------------------------


@dataclass
class Result:
    engine: str
    facts: list[tuple[str, str]]
    rows: list[Row]


def bench_engine(kind: str, count: int, workers: int) -> Result:
    print(f"== {kind}: starting", file=sys.stderr, flush=True)
    engine = start_single() if kind == "single" else start_cluster()
    clients: dict[int, redis.Redis] = {}
    try:
        clients = {port: redis.Redis(port=port, socket_timeout=60) for port in engine.primaries}
        shas = {}
        for name in ("enforce.lua", "block.lua", "rename.lua"):
            text = load_script(name)
            shas[name] = hashlib.sha1(text.encode()).hexdigest()
            for client in clients.values():
                client.script_load(text)
        base_us = time.time_ns() // 1000
        job = Job(tuple(engine.shard_port), shas, base_us, engine.name == "cluster")
        before = used_memory(engine.primaries)
        context = multiprocessing.get_context("fork")
        with context.Pool(workers, _worker_init, (job,)) as pool:
            print(f"== {kind}: filling {count:,} devices", file=sys.stderr, flush=True)
            fill_s, sent, new = run_pool(pool, fill_task, count, "fill")
            filled = used_memory(engine.primaries) - before
            keys = KeySchema(PREFIX)
            sample = [device(j * count // SAMPLE, base_us).id for j in range(min(SAMPLE, count))]
            record = memory_usage(
                clients,
                ((engine.shard_port[shard_number(keys.device(d).active)],
                  keys.device(d).record.encode()) for d in sample),
            ) / len(sample)  # fmt: skip
            mark_s, blocked, renamed = run_pool(pool, mark_task, count, "block/rename")
        marked = used_memory(engine.primaries) - before
        indexes = index_memory(engine, clients)
        replica_memory = used_memory(engine.replicas) if engine.replicas else 0

        # Search targets: a known UUID's first 6 characters, a known serial's first 6
        # given in lower case; a cursor from the middle of shard 0's activity index.
        ids = (device(i, base_us).id for i in range(count))
        first_uuid = next((d for d in ids if not d.startswith("SN-")), "0")
        ids = (device(i, base_us).id for i in range(count))
        first_serial = next((d for d in ids if d.startswith("SN-")), "SN-0")
        shard0 = clients[engine.shard_port[0]]
        active0 = keys.shard(0).active
        middle_rank = int(shard0.zcard(active0)) // 2
        middle = cast(
            list[tuple[bytes, float]],
            shard0.zrevrange(active0, middle_rank, middle_rank, withscores=True),
        )
        middle_id, middle_score = middle[0]
        targets = Targets(
            uuid_prefix=first_uuid[:6],
            serial_prefix=first_serial[:6].lower(),
            middle=ListCursor(int(middle_score), middle_id.decode()).encode(),
        )
        for client in clients.values():
            client.config_set("slowlog-log-slower-than", SLOWLOG_US)
            client.config_set("slowlog-max-len", 100_000)
            client.slowlog_reset()
        print(f"== {kind}: timing the list", file=sys.stderr, flush=True)
        rows = asyncio.run(timings(engine.url, targets))
        slow = slowest(clients)
    finally:
        engine.stop()  # first: nothing (not even a closed stderr) may keep it running
        for client in clients.values():
            client.close()
        print(f"== {kind}: stopped", file=sys.stderr, flush=True)

    per = 1 / count
    shown = "+".join(str(p) for p in engine.primaries)
    facts = [
        ("engine", f"{engine.name} ({len(engine.primaries)} primaries, "
                   f"{len(engine.replicas)} replicas; ports {shown})"),
        ("fill (enforce.lua, raw EVALSHA pipelines)",
         f"{fill_s:,.1f} s, {sent / fill_s:,.0f} devices/s, {workers} workers, "
         f"{new:,} new records"),
        ("block 1/100 + rename 1/1000 (pipelined)",
         f"{mark_s:,.1f} s: {blocked:,} blocked, {renamed:,} renamed"),
        ("used_memory / device after the fill", f"{filled * per:,.0f} B "
                                                f"({filled / 2**30:,.2f} GiB in all)"),
        ("used_memory / device after blocks, renames", f"{marked * per:,.0f} B "
                                                       f"({marked / 2**30:,.2f} GiB in all)"),
        (f"  record hash (MEMORY USAGE, {len(sample):,} sampled)", f"{record:,.0f} B"),
    ]  # fmt: skip
    for what, size in indexes.items():
        facts.append((f"  {what} (all shards) / device", f"{size * per:,.1f} B"))
    rest = marked * per - record - sum(indexes.values()) * per
    facts.append(("  rest (key table, allocator, buckets)", f"{rest:,.1f} B"))
    if engine.replicas:
        facts.append(("replicas' used_memory (not counted above)",
                      f"{replica_memory / 2**30:,.2f} GiB"))  # fmt: skip
    facts.append(("scripts of the timings (SLOWLOG, per node)", ""))
    facts += slow
    facts.append(("search targets", f"{targets.uuid_prefix!r} (of {first_uuid}), "
                                    f"{targets.serial_prefix!r} (of {first_serial})"))  # fmt: skip
    return Result(engine.name, facts, rows)


# -- output ----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def print_table(header: list[str], lines: list[list[str]], note: bool = True) -> None:
    """Column 0 (and the last, a note, if `note`) to the left, the others to the right."""
    left = {0, len(header) - 1} if note else {0}
    widths = [max(len(x[c]) for x in [header, *lines]) for c in range(len(header))]

    def show(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if c in left else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(show(header))
    print("  ".join("-" * w for w in widths))
    for cells in lines:
        print(show(cells))


def print_result(result: Result) -> None:
    print(f"\n### {result.engine}")
    width = max(len(k) for k, _ in result.facts)
    for key, value in result.facts:
        print(f"{key:<{width}}  {value}")
    print()
    lines = []
    for row in result.rows:
        median = ms(statistics.median(row.times)) if row.times else "-"
        most = ms(max(row.times)) if row.times else "-"
        total = "-" if row.total is None else f"{row.total:,}"
        rows = "-" if row.rows is None else f"{row.rows:,}"
        lines.append([row.label, median, most, rows, total, row.note])
    print_table(["call", "median ms", "max ms", "rows", "total", "note"], lines)


def print_combined(results: list[Result]) -> None:
    labels = list(dict.fromkeys(row.label for r in results for row in r.rows))
    header = ["call"]
    for r in results:
        header += [f"{r.engine} med", f"{r.engine} max"]
    header += ["rows", "total", "note"]
    lines = []
    for label in labels:
        cells = [label]
        rows: list[str] = []
        totals: list[str] = []
        notes: list[str] = []
        for r in results:
            row = next((x for x in r.rows if x.label == label), None)
            if row is not None and row.note and not row.note.endswith(" pages"):
                notes.append(f"{r.engine}: {row.note}")
            if row is None or not row.times:
                cells += ["FAILED" if row is not None else "-", "-"]
                continue
            cells += [ms(statistics.median(row.times)), ms(max(row.times))]
            rows.append("-" if row.rows is None else f"{row.rows:,}")
            totals.append("-" if row.total is None else f"{row.total:,}")
        cells += ["/".join(dict.fromkeys(rows)), "/".join(dict.fromkeys(totals))]
        cells.append("; ".join(notes))
        lines.append(cells)
    print_table(header, lines)


def environment() -> list[str]:
    def run(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return "?"

    commit = run("git", "rev-parse", "--short", "HEAD")
    if run("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " (+ uncommitted changes in the working tree)"
    with open("/proc/meminfo") as meminfo:
        mem_kb = int(meminfo.readline().split()[1])
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"git: {commit}",
        f"redis: {run('redis-server', '--version')}",
        f"machine: {os.cpu_count()} cores, {mem_kb / 2**20:.1f} GiB RAM; "
        f"python {sys.version.split()[0]}, redis-py {redis.__version__}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument(
        "--engines", default="single,cluster", help="single and/or cluster, one after the other"
    )
    parser.add_argument("--fill-workers", type=int, default=2)
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"single", "cluster"}
    if unknown or not engines:
        parser.error(f"--engines: single and/or cluster, not {args.engines!r}")

    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C: every engine is stopped.
    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    print(f"devices: {args.devices:,}; engines: {', '.join(engines)}")
    for line in environment():
        print(line)
    results = []
    for kind in engines:
        result = bench_engine(kind, args.devices, args.fill_workers)
        print_result(result)
        sys.stdout.flush()
        results.append(result)
    if len(results) > 1:
        print(f"\n### both engines, {args.devices:,} devices: median and max of {RUNS} runs, ms")
        print_combined(results)
        print("rows, total: one value where the engines agree, else single/cluster")


if __name__ == "__main__":
    main()
