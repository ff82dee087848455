"""A primary SIGKILLed under load, on a real Redis Cluster and a real Sentinel deployment.

What the gateway promises: requests follow `on_error` only while no primary serves the
device (the cluster's node timeout, or Sentinel's down-after plus the promotion); a blocked
device stays 403 the whole time (each process's local copy of the blocked ids) and none of
its requests reaches the upstream; enforcement resumes on the promoted replica within 2 s of
the promotion, with no restart; an acknowledged block is not lost. On a cluster with the
default `cluster-require-full-coverage yes`, every node answers CLUSTERDOWN from the moment
the primary is marked failed until its replica takes over, so every device meets on_error
for that time, not only the failed primary's (each primary's own breaker then lets the
first call after the promotion through). The longer version, with several gateway
processes, belongs to bench/chaos.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from gateway.model import Bucket
from gateway.store.breaker import COOLDOWN
from gateway.store.keys import KeySchema
from tests.rig.gateway import (
    Load,
    StartGateway,
    assert_envelope,
    assert_no_traceback,
    figure,
    make_settings,
    send,
)
from tests.rig.redis_cluster import RedisCluster
from tests.rig.redis_sentinel import RedisSentinel
from tests.rig.upstream import CountingUpstream
from tests.rig.waits import WAIT, until

pytestmark = [pytest.mark.integration, pytest.mark.timing]

KEYS = KeySchema("dg")


def fleet(deployment: RedisCluster | RedisSentinel, victim: int | None) -> list[str]:
    """Twelve device ids; on a cluster, half of them on the primary that will be killed."""
    if isinstance(deployment, RedisSentinel) or victim is None:
        return [f"fleet-{i}" for i in range(12)]
    on: list[str] = []
    off: list[str] = []
    for i in range(10_000):
        device = f"fleet-{i}"
        mine = deployment.primary_for_key(KEYS.device(device).record) == victim
        side = on if mine else off
        if len(side) < 6:
            side.append(device)
        if len(on) == 6 and len(off) == 6:
            return on + off
    raise AssertionError("no ids found on the victim")


@pytest.mark.parametrize("engine", ["cluster", "sentinel"])
async def test_primary_killed_under_load_blocked_stay_403_enforcement_resumes(
    engine: str,
    request: pytest.FixtureRequest,
    upstream: CountingUpstream,
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    deployment: RedisCluster | RedisSentinel = request.getfixturevalue(f"real_{engine}")
    if isinstance(deployment, RedisCluster):
        victim = deployment.primary_for_key(KEYS.device("fleet-0").record)
    else:
        victim = deployment.primary_port()
    devices = fleet(deployment, victim)
    blocked = devices[0]  # on the victim (on a cluster: its slot's primary dies)
    gw = await start_gateway(make_settings(upstream, deployment.url, "open"))
    for device in devices:
        assert (await send(http, gw.url, device)).enforced
    await gw.store.block(blocked)  # acknowledged once a replica has it (write_replicas auto)
    await until(lambda: blocked in gw.store.blocked, "the block to reach the local copy")
    seen_before = len(upstream.seen)

    load = Load(http, gw.url, devices, clients=8)
    load.start(pace=0.03)
    await asyncio.sleep(0.5)  # the scenario: enforced traffic, then the kill
    killed = time.monotonic()
    if isinstance(deployment, RedisCluster):
        await asyncio.to_thread(deployment.kill_primary, victim)
        await asyncio.to_thread(deployment.wait_failover, victim)
    else:
        await asyncio.to_thread(deployment.kill_primary)
        await asyncio.to_thread(deployment.wait_failover)
    promoted = time.monotonic()
    victim_devices = devices[1:6] if isinstance(deployment, RedisCluster) else devices[1:]
    await until(
        lambda: any(
            a.sent >= promoted and a.enforced and a.device in victim_devices for a in load.answers
        ),
        "enforcement on the promoted replica",
        WAIT,
    )
    # Every device is enforced again once each primary's breaker let a probe through (a
    # breaker opened by CLUSTERDOWN waits its cool-down): then a tail of enforced traffic.
    settled = promoted + COOLDOWN + 0.3
    await asyncio.sleep(max(0.0, settled + 0.5 - time.monotonic()))  # the scenario's tail
    answers = await load.stop()
    resumed = min(
        a.done for a in answers if a.sent >= promoted and a.enforced and a.device in victim_devices
    )

    for answer in answers:
        assert_envelope(answer)
    assert [a.status for a in answers if a.status >= 500] == []  # on_error open
    of_blocked = [a for a in answers if a.device == blocked]
    assert of_blocked and all(a.status == 403 for a in of_blocked)
    blocked_paths = {f"/r/{blocked}?n={a.tag}" for a in of_blocked}
    assert not [s for s in upstream.seen[seen_before:] if s.raw_path in blocked_paths]
    figure("requests", len(answers))
    figure("unenforced answers", sum(not a.enforced and a.device != blocked for a in answers))
    figure("seconds from promotion to enforcement", resumed - promoted)
    # Nothing unenforced before the kill: the outage is the failover's, no longer.
    assert all(a.enforced or a.device == blocked for a in answers if a.done < killed)
    assert resumed - promoted < 2.0
    # Settled, every device but the blocked one (a 403 carries no rate-limit headers) is
    # enforced again.
    late = [a for a in answers if a.sent > settled and not a.enforced and a.device != blocked]
    assert late == [], [(a.device, a.status, a.sent - promoted) for a in late]
    record = await gw.store.get_device(blocked)
    assert record is not None and record.blocked  # the acknowledged block survived
    assert_no_traceback(gateway_log)


async def test_slots_moved_under_load_lose_no_record_and_reset_no_bucket(
    real_cluster: RedisCluster,
    upstream: CountingUpstream,
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    gateway_log: pytest.LogCaptureFixture,
) -> None:
    """The slots of active devices move to another primary (MIGRATE key by key, as
    `redis-cli --cluster reshard` does) while they send: every enforced request is counted
    in its record, an exhausted bucket stays exhausted, and nothing but on_error's
    unenforced answers (ASK/TRYAGAIN past the call's budget) reaches a client."""
    source = real_cluster.primary_for_key(KEYS.device("move-0").record)
    target = next(n.port for n in real_cluster.nodes if n.role == "primary" and n.port != source)
    devices = [
        d
        for d in (f"move-{i}" for i in range(2000))
        if real_cluster.primary_for_key(KEYS.device(d).record) == source
    ][:8]
    limited = devices[0]
    gw = await start_gateway(make_settings(upstream, real_cluster.url, "open"))
    await gw.store.set_rate_limit(limited, Bucket(rate=0.01, burst=2))
    for device in devices:
        assert (await send(http, gw.url, device)).enforced
    assert (await send(http, gw.url, limited)).status == 200  # the bucket's last token
    before = {d: await gw.store.get_device(d) for d in devices}

    load = Load(http, gw.url, devices, clients=8)
    load.start(pace=0.02)
    await asyncio.sleep(0.3)  # the scenario: traffic before the move
    slots = sorted({real_cluster.slot_for_key(KEYS.device(d).record) for d in devices})
    await asyncio.to_thread(real_cluster.move_slots, slots, target)
    await asyncio.sleep(0.5)  # the scenario: traffic after it
    answers = await load.stop()

    for answer in answers:
        assert_envelope(answer)
    assert [a.status for a in answers if a.status >= 500] == []
    assert all(real_cluster.primary_for_key(KEYS.device(d).record) == target for d in devices)
    of_limited = [a for a in answers if a.device == limited]
    assert of_limited and all(a.status == 429 for a in of_limited if a.enforced)
    for device in devices:
        old, new = before[device], await gw.store.get_device(device)
        assert old is not None and new is not None, device
        enforced = sum(a.enforced for a in answers if a.device == device)
        assert new.request_count - old.request_count == enforced, device  # none lost
        assert new.first_seen == old.first_seen
    figure("requests", len(answers))
    figure("unenforced during the move", sum(not a.enforced for a in answers))
    assert_no_traceback(gateway_log)
