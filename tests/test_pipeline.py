"""The pipelined script connection against a real redis-server: batching and every failure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import hiredis
import pytest
import redis

from gateway.errors import StoreRedirect, StoreUnavailable
from gateway.store.pipeline import ConnectTo, ScriptPipeline
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
    p = ScriptPipeline.for_url(own_redis.url, SCRIPT, timeout=TIMEOUT)
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
        good = ScriptPipeline.for_url(
            f"redis://:s3cret-pass@127.0.0.1:{server.port}/3",
            "return redis.call('SET', KEYS[1], ARGV[1])",
            timeout=0.5,
        )
        assert await good.call(["where"], ["db3"]) == b"OK"
        with redis.Redis(port=server.port, password="s3cret-pass", db=3) as check:
            assert check.get("where") == b"db3"
        await good.close()
        bad = ScriptPipeline.for_url(
            f"redis://:wrong@127.0.0.1:{server.port}/0", SCRIPT, timeout=0.5
        )
        with pytest.raises(StoreUnavailable, match="session setup"):
            await bad.call(["k"], ["1"])
        await bad.close()
    finally:
        server.stop()


@pytest.mark.timing
async def test_unreachable_redis_fails_fast() -> None:
    from tests.rig.system import free_port

    p = ScriptPipeline.for_url(f"redis://127.0.0.1:{free_port()}/0", SCRIPT, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="connect failed"):
        await p.call(["k"], ["1"])
    assert time.monotonic() - started < 0.5
    await p.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await p.call(["k"], ["1"])


class ScriptedNode:
    """A loopback server speaking just enough RESP: `+OK`-style replies to session setup
    (SCRIPT LOAD, ASKING), and `reply` (raw RESP) to every EVALSHA; counts what it got."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.commands: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    name = bytes(command[0]).upper()
                    self.commands.append(name)
                    writer.write(self.reply if name == b"EVALSHA" else b"+OK\r\n")
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_a_read_only_reply_drops_the_connection_and_resolves_again() -> None:
    """A replica or a demoted primary answers READONLY: that call fails, and the next one
    asks `resolve` for the primary again on a new connection (Sentinel's failover)."""
    node = ScriptedNode(b"-READONLY You can't write against a read only replica.\r\n")
    port = await node.start()
    resolved = 0

    async def resolve() -> ConnectTo:
        nonlocal resolved
        resolved += 1
        return ConnectTo("127.0.0.1", port)

    p = ScriptPipeline(resolve, SCRIPT, timeout=TIMEOUT)
    try:
        for attempt in (1, 2):
            with pytest.raises(StoreUnavailable, match="not a usable primary"):
                await p.call(["k"], ["1"])
            assert (resolved, node.connections) == (attempt, attempt)
    finally:
        await p.close()
        await node.close()


@pytest.mark.parametrize(
    "reply, kind",
    [
        (b"-MOVED 3999 127.0.0.1:7002\r\n", "MOVED"),
        (b"-ASK 3999 127.0.0.1:7002\r\n", "ASK"),
        (b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n", "TRYAGAIN"),
    ],
)
async def test_cluster_redirects_fail_only_their_call_as_store_redirect(
    reply: bytes, kind: str
) -> None:
    node = ScriptedNode(reply)
    port = await node.start()
    p = ScriptPipeline.for_url(f"redis://127.0.0.1:{port}/0", SCRIPT, timeout=TIMEOUT)
    try:
        with pytest.raises(StoreRedirect) as caught:
            await p.call(["k"], ["1"])
        assert caught.value.kind == kind
        if kind != "TRYAGAIN":
            assert (caught.value.slot, caught.value.host, caught.value.port) == (
                3999,
                "127.0.0.1",
                7002,
            )
        with pytest.raises(StoreRedirect):
            await p.call(["k"], ["1"], asking=True)
        assert node.connections == 1  # a redirect keeps the connection
        assert node.commands[-2:] == [b"ASKING", b"EVALSHA"]  # ASKING right before the call
    finally:
        await p.close()
        await node.close()
