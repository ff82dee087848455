"""The pipelined script connection against a real redis-server: batching and every failure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from gateway.errors import StoreUnavailable
from gateway.store.pipeline import ScriptPipeline
from tests.rig.redis_server import RedisServer, calls, command_stats

pytestmark = pytest.mark.integration

TIMEOUT = 0.5  # generous: a loaded CI machine must not trip it where no fault is injected

# Echoes its first key and first argument, or fails on request.
SCRIPT = """
if ARGV[1] == 'fail' then return redis.error_reply('ERR asked to fail') end
return {KEYS[1], ARGV[1]}
"""


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
async def pipeline(own_redis: RedisServer) -> AsyncIterator[ScriptPipeline]:
    p = ScriptPipeline(own_redis.url, SCRIPT, timeout=TIMEOUT)
    yield p
    await p.close()


class _CountingTransport:
    """Stands in for the pipeline's transport and counts its writes (uvloop's transports
    take no new attributes, so the transport is wrapped rather than patched)."""

    def __init__(self, inner: Any, writes: list[int]) -> None:
        self._inner = inner
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def count_writes(p: ScriptPipeline) -> list[int]:
    """Wrap the open transport to count socket writes."""
    writes: list[int] = []
    p._transport = _CountingTransport(p._transport, writes)  # type: ignore[assignment]
    return writes


async def test_concurrent_calls_share_one_write_and_each_gets_its_own_answer(
    pipeline: ScriptPipeline,
) -> None:
    await pipeline.connect()
    writes = count_writes(pipeline)
    replies = await asyncio.gather(*(pipeline.call([f"k{i}"], [str(i)]) for i in range(500)))
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(500)]
    assert len(writes) == 1


async def test_calls_in_later_ticks_are_later_batches(pipeline: ScriptPipeline) -> None:
    await pipeline.connect()
    writes = count_writes(pipeline)
    for i in range(3):
        assert await pipeline.call(["k"], [str(i)]) == [b"k", str(i).encode()]
    assert len(writes) == 3


async def test_an_error_reply_fails_only_its_call(pipeline: ScriptPipeline) -> None:
    results = await asyncio.gather(
        pipeline.call(["a"], ["1"]),
        pipeline.call(["b"], ["fail"]),
        pipeline.call(["c"], ["3"]),
        return_exceptions=True,
    )
    assert results[0] == [b"a", b"1"]
    assert isinstance(results[1], StoreUnavailable)
    assert "asked to fail" in str(results[1])
    assert results[2] == [b"c", b"3"]


async def test_noscript_is_recovered_by_loading_the_script_once(
    pipeline: ScriptPipeline, own_redis: RedisServer
) -> None:
    assert await pipeline.call(["k"], ["1"]) == [b"k", b"1"]
    with redis.Redis(port=own_redis.port) as admin:
        admin.script_flush()
        admin.config_resetstat()
    replies = await asyncio.gather(*(pipeline.call(["k"], [str(i)]) for i in range(10)))
    assert replies == [[b"k", str(i).encode()] for i in range(10)]
    stats = command_stats(own_redis)
    # Every call was sent again after one NOSCRIPT each; the script was loaded per NOSCRIPT.
    assert calls(stats, "evalsha") == 20
    assert calls(stats, "evalsha", "failed_calls") == 10
    assert await pipeline.call(["k"], ["x"]) == [b"k", b"x"]


@pytest.mark.timing
async def test_a_restarted_redis_is_reconnected_to(
    pipeline: ScriptPipeline, own_redis: RedisServer
) -> None:
    assert await pipeline.call(["k"], ["1"]) == [b"k", b"1"]
    await asyncio.to_thread(own_redis.kill)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await pipeline.call(["k"], ["2"])
    assert time.monotonic() - started < 1.0
    await asyncio.to_thread(own_redis.start)
    # The restarted server has an empty script cache: the new connection loads it first.
    assert await pipeline.call(["k"], ["3"]) == [b"k", b"3"]


@pytest.mark.timing
async def test_a_frozen_redis_fails_calls_at_the_timeout_then_recovers(
    pipeline: ScriptPipeline, own_redis: RedisServer
) -> None:
    await pipeline.connect()
    own_redis.freeze()
    try:
        started = time.monotonic()
        results = await asyncio.gather(
            *(pipeline.call(["k"], [str(i)]) for i in range(20)), return_exceptions=True
        )
        took = time.monotonic() - started
    finally:
        own_redis.thaw()
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert TIMEOUT <= took < TIMEOUT + 0.1
    assert await pipeline.call(["k"], ["after"]) == [b"k", b"after"]


async def test_cancelled_callers_never_shift_the_answers(pipeline: ScriptPipeline) -> None:
    await pipeline.connect()
    tasks = [asyncio.ensure_future(pipeline.call([f"k{i}"], [str(i)])) for i in range(300)]
    await asyncio.sleep(0)  # the batch is written
    for task in tasks[::3]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == [f"k{i}".encode(), str(i).encode()]
    assert await pipeline.call(["z"], ["z"]) == [b"z", b"z"]


async def test_auth_and_database_selection() -> None:
    server = RedisServer(extra_args=["--requirepass", "s3cret-pass"])
    try:
        good = ScriptPipeline(
            f"redis://:s3cret-pass@127.0.0.1:{server.port}/3",
            "return redis.call('SET', KEYS[1], ARGV[1])",
            timeout=0.5,
        )
        assert await good.call(["where"], ["db3"]) == b"OK"
        with redis.Redis(port=server.port, password="s3cret-pass", db=3) as check:
            assert check.get("where") == b"db3"
        await good.close()
        bad = ScriptPipeline(f"redis://:wrong@127.0.0.1:{server.port}/0", SCRIPT, timeout=0.5)
        with pytest.raises(StoreUnavailable, match="session setup"):
            await bad.call(["k"], ["1"])
        await bad.close()
    finally:
        server.stop()


@pytest.mark.timing
async def test_unreachable_redis_fails_fast() -> None:
    from tests.rig.system import free_port

    p = ScriptPipeline(f"redis://127.0.0.1:{free_port()}/0", SCRIPT, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="connect failed"):
        await p.call(["k"], ["1"])
    assert time.monotonic() - started < 0.5
    await p.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await p.call(["k"], ["1"])
