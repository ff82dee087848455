"""Property test: enforce.lua's token bucket against a pure-Python model, fake and real Redis.

2,000 random sequences of up to 40 steps (elapsed time, clock steps backwards too) per
backend: allowed/denied, tokens left, Retry-After and time-to-full must match exactly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import RedisSettings
from gateway.model import Bucket, DeviceIdentity, ReplyCode
from gateway.store import Store
from tests.rig.bucket_model import BucketModel
from tests.rig.clock import FakeClock
from tests.rig.redis_cluster import RedisCluster
from tests.rig.redis_sentinel import RedisSentinel
from tests.rig.redis_server import RedisServer


@pytest.fixture(scope="module", params=["fake", "real"])
def runner(request: pytest.FixtureRequest) -> Iterator[tuple[asyncio.Runner, str]]:
    """An event loop kept across hypothesis examples, and the store's Redis URL."""
    with asyncio.Runner() as loop:
        if request.param == "fake":
            yield loop, "memory://"
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            yield loop, server.url


@pytest.fixture(scope="module", params=["cluster", "sentinel"])
def engine_runner(request: pytest.FixtureRequest) -> Iterator[tuple[asyncio.Runner, str]]:
    """The same on the session's Redis Cluster and Sentinel deployment."""
    engine: RedisCluster | RedisSentinel = request.getfixturevalue(f"redis_{request.param}")
    engine.ensure_healthy()
    with asyncio.Runner() as loop:
        yield loop, engine.url


rates = st.integers(min_value=1, max_value=50_000)  # milli-tokens per second
bursts = st.integers(min_value=1, max_value=20)
steps = st.lists(
    # Elapsed microseconds before each request; negative steps are a clock going backwards.
    st.one_of(
        st.integers(min_value=0, max_value=3_000_000),
        st.integers(min_value=-50_000, max_value=0),
        st.just(0),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rate_milli=rates,
    burst=bursts,
    elapsed=steps,
    anonymous=st.booleans(),
)
def test_lua_bucket_matches_the_model(
    runner: tuple[asyncio.Runner, str],
    rate_milli: int,
    burst: int,
    elapsed: list[int],
    anonymous: bool,
) -> None:
    check_against_the_model(runner, rate_milli, burst, elapsed, anonymous)


# Fewer examples: the arithmetic is the same script's; what differs is the way to it (the
# cluster's slot routing, a Sentinel-resolved primary), and each example starts a store.
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rate_milli=rates,
    burst=bursts,
    elapsed=steps,
    anonymous=st.booleans(),
)
def test_lua_bucket_matches_the_model_on_cluster_and_sentinel(
    engine_runner: tuple[asyncio.Runner, str],
    rate_milli: int,
    burst: int,
    elapsed: list[int],
    anonymous: bool,
) -> None:
    check_against_the_model(engine_runner, rate_milli, burst, elapsed, anonymous)


# The batched path: several devices' requests in one event-loop tick travel to Redis as one
# call of enforce_batch.lua (gateway.store.pipeline); each must still match its own model.
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rate_milli=rates,
    burst=bursts,
    elapsed=steps,
    anonymous=st.booleans(),
    lanes=st.integers(min_value=2, max_value=6),
)
def test_lua_bucket_matches_the_model_batched(
    redis_runner: tuple[asyncio.Runner, str],
    rate_milli: int,
    burst: int,
    elapsed: list[int],
    anonymous: bool,
    lanes: int,
) -> None:
    check_against_the_model(redis_runner, rate_milli, burst, elapsed, anonymous, lanes)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rate_milli=rates,
    burst=bursts,
    elapsed=steps,
    lanes=st.integers(min_value=2, max_value=6),
)
def test_lua_bucket_matches_the_model_batched_on_cluster_and_sentinel(
    engine_runner: tuple[asyncio.Runner, str],
    rate_milli: int,
    burst: int,
    elapsed: list[int],
    lanes: int,
) -> None:
    check_against_the_model(engine_runner, rate_milli, burst, elapsed, False, lanes)


@pytest.fixture(scope="module")
def redis_runner(redis_server: RedisServer) -> Iterator[tuple[asyncio.Runner, str]]:
    """An event loop kept across hypothesis examples, and a real Redis's URL."""
    with asyncio.Runner() as loop:
        yield loop, redis_server.url


def check_against_the_model(
    runner: tuple[asyncio.Runner, str],
    rate_milli: int,
    burst: int,
    elapsed: list[int],
    anonymous: bool,
    lanes: int = 1,
) -> None:
    """Each step, `lanes` requests at once (lane 0 anonymous when `anonymous`, the others
    devices, each with its own bucket: lane i's rate and burst derived from the drawn ones)
    against one model each."""
    loop, url = runner
    clock = FakeClock()
    store = Store.from_settings(
        RedisSettings(url=url, timeout=2.0, key_prefix=f"m{uuid.uuid4().hex[:8]}"), clock=clock
    )
    # Lane i: the drawn rate and burst moved by i, kept in their ranges.
    buckets = [
        (1 + (rate_milli - 1 + 997 * i) % 50_000, 1 + (burst - 1 + i) % 20) for i in range(lanes)
    ]
    models = [BucketModel(r, b) for r, b in buckets]
    policies = [Bucket(rate=r / 1000, burst=b) for r, b in buckets]
    identities = [
        None if anonymous and i == 0 else DeviceIdentity(f"d-{uuid.uuid4().hex}")
        for i in range(lanes)
    ]
    # An address's bucket is a key that expires when full; a device's lives in its record.
    address_bucket = store.keys.anonymous_bucket("198.51.100.7") if anonymous else None
    mismatches: list[tuple[object, ...]] = []

    async def forget_expiry(key: str, full_after_us: int, sent: float) -> None:
        """PERSIST the address's bucket: its expiry runs on Redis's real clock, not ours."""
        await store._admin.persist(key)
        if models[0].state is not None and not await store._admin.exists(key):
            # The expiry (full_after, in real milliseconds) passed before the PERSIST: on a
            # loaded machine a short one can. Redis then holds a full bucket, and so does
            # the model from here on. Any other missing key is a mismatch.
            if time.monotonic() - sent >= (full_after_us // 1000 + 1) / 1000:
                models[0].state = None
            else:
                mismatches.append(("bucket key missing", full_after_us))

    async def run() -> None:
        for step in elapsed:
            clock.now_us += step
            wanted = [model.take(clock.now_us) for model in models]
            sent = time.monotonic()
            got = await asyncio.gather(
                *(
                    store.enforce(identity, "198.51.100.7", policy, upload=False)
                    for identity, policy in zip(identities, policies, strict=True)
                )
            )
            if address_bucket is not None:
                await forget_expiry(address_bucket, got[0].full_after_us, sent)
            for lane, (want, reply) in enumerate(zip(wanted, got, strict=True)):
                seen = (
                    reply.outcome is ReplyCode.ALLOW,
                    reply.remaining,
                    reply.retry_after_us,
                    reply.full_after_us,
                )
                expected = (want.allowed, want.remaining, want.retry_after_us, want.full_after_us)
                if seen != expected:
                    mismatches.append((lane, step, expected, seen))
        await store.close()

    loop.run(run())
    assert mismatches == []
