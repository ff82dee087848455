"""The pipeline's batch variant against a real redis-server: one call a tick, each caller's own
answer, and every failure confined to the calls it concerns."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator

import hiredis
import pytest
import redis

from gateway.errors import StoreUnavailable
from gateway.store.pipeline import BATCH_MAX, MAX_IN_FLIGHT, Batching, ScriptPipeline
from gateway.store.scripts import CROSS_SLOT
from tests.rig.redis_server import RedisServer, calls, command_stats, reset_stats

pytestmark = pytest.mark.integration

TIMEOUT = 0.5

# Echoes its first key and first argument, or fails on request (tests/test_pipeline.py's).
SCRIPT = """
if ARGV[1] == 'fail' then return redis.error_reply('ERR asked to fail') end
return {KEYS[1], ARGV[1]}
"""

# The same for each call of a batch (gateway.store.pipeline.Batching's calling convention),
# tagged so that a test tells a batch's answer from the plain script's.
BATCH = """
local n = tonumber(ARGV[1])
local out, k, a = {}, 0, 2 * n + 1
for c = 1, n do
  local nk, na = tonumber(ARGV[2 * c]), tonumber(ARGV[2 * c + 1])
  if ARGV[a + 1] == 'fail' then
    out[c] = redis.error_reply('ERR asked to fail')
  else
    out[c] = {KEYS[k + 1], ARGV[a + 1], 'batched', tostring(nk), tostring(na)}
  end
  k, a = k + nk, a + na
end
return out
"""


def sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(params=["declared", "cross_slot"])
async def batching(
    request: pytest.FixtureRequest, own_redis: RedisServer
) -> AsyncIterator[ScriptPipeline]:
    """A batching pipeline: keys declared (one server), or in ARGV (a cluster node's form,
    which one server runs too)."""
    cross = request.param == "cross_slot"
    batch = Batching(CROSS_SLOT + BATCH if cross else BATCH, cross_slot=cross)
    p = ScriptPipeline.for_url(own_redis.url, SCRIPT, timeout=TIMEOUT, batch=batch)
    await p.connect()
    yield p
    await p.close()


def batch_calls(server: RedisServer) -> tuple[int, int]:
    """EVALSHA calls since the last reset: (all of them, how many failed)."""
    stats = command_stats(server)
    return calls(stats, "evalsha"), calls(stats, "evalsha", "failed_calls")


async def test_a_tick_s_calls_are_one_script_call_and_each_gets_its_own_answer(
    batching: ScriptPipeline, own_redis: RedisServer
) -> None:
    reset_stats(own_redis)
    replies = await asyncio.gather(
        *(batching.call([f"k{i}", "other"], [str(i), "x", "y"]) for i in range(50))
    )
    assert replies == [
        [f"k{i}".encode(), str(i).encode(), b"batched", b"2", b"3"] for i in range(50)
    ]
    assert batch_calls(own_redis) == (1, 0)


async def test_a_lone_call_is_the_plain_script(
    batching: ScriptPipeline, own_redis: RedisServer
) -> None:
    reset_stats(own_redis)
    assert await batching.call(["k"], ["1"]) == [b"k", b"1"]
    assert await batching.call(["k"], ["2"]) == [b"k", b"2"]
    assert batch_calls(own_redis) == (2, 0)


async def test_a_tick_larger_than_batch_max_is_split(
    batching: ScriptPipeline, own_redis: RedisServer
) -> None:
    reset_stats(own_redis)
    count = 2 * BATCH_MAX + 1  # two full batches, then one call alone
    replies = await asyncio.gather(*(batching.call([f"k{i}"], [str(i)]) for i in range(count)))
    assert [r[:2] for r in replies] == [[f"k{i}".encode(), str(i).encode()] for i in range(count)]
    assert replies[-1] == [f"k{count - 1}".encode(), str(count - 1).encode()]  # plain
    assert batch_calls(own_redis) == (3, 0)


async def test_a_failed_entry_fails_only_its_call(
    batching: ScriptPipeline, own_redis: RedisServer
) -> None:
    reset_stats(own_redis)
    results = await asyncio.gather(
        batching.call(["a"], ["1"]),
        batching.call(["b"], ["fail"]),
        batching.call(["c"], ["3"]),
        return_exceptions=True,
    )
    assert results[0] == [b"a", b"1", b"batched", b"1", b"1"]
    assert isinstance(results[1], StoreUnavailable)
    assert "asked to fail" in str(results[1])
    assert results[2] == [b"c", b"3", b"batched", b"1", b"1"]
    # Where keys travel in ARGV (a cluster node's batch), a failed entry is sent once more
    # alone, keys declared, so that Redis can redirect it: the plain script fails it too.
    assert batch_calls(own_redis)[0] == (2 if batching._cross_slot else 1)


class RecordingNode:
    """A loopback server speaking just enough RESP to tell the pipeline's commands apart: +OK
    to SCRIPT LOAD and ASKING, `:1` to the plain script, and one `:1` per call to the batch
    script; it records each command's name and, for EVALSHA, whether it was the batch."""

    def __init__(self, batch_sha: str) -> None:
        self.batch_sha = batch_sha.encode()
        self.commands: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    name = bytes(command[0]).upper().decode()
                    if name != "EVALSHA":
                        self.commands.append(name)
                        writer.write(b"+OK\r\n")
                    elif command[1] == self.batch_sha:
                        n = int(command[3 + int(command[2])])  # ARGV[1]: the calls in it
                        self.commands.append(f"batch of {n}")
                        writer.write(b"*%d\r\n" % n + b":1\r\n" * n)
                    else:
                        self.commands.append("alone")
                        writer.write(b":1\r\n")
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_a_call_behind_asking_goes_alone_between_batches() -> None:
    """ASKING holds for the next command only: the asked call is sent alone right behind it,
    and the calls around it still batch, in their order."""
    node = RecordingNode(sha(BATCH))
    port = await node.start()
    p = ScriptPipeline.for_url(
        f"redis://127.0.0.1:{port}/0", SCRIPT, timeout=TIMEOUT, batch=Batching(BATCH)
    )
    try:
        await p.connect()
        replies = await asyncio.gather(
            p.call(["a"], ["1"]),
            p.call(["b"], ["2"]),
            p.call(["c"], ["3"], asking=True),
            p.call(["d"], ["4"]),
            p.call(["e"], ["5"]),
        )
        assert list(replies) == [1] * 5
        assert node.commands == ["SCRIPT", "SCRIPT", "batch of 2", "ASKING", "alone", "batch of 2"]
    finally:
        await p.close()
        await node.close()


async def test_noscript_reloads_both_scripts_and_sends_the_batch_again(
    batching: ScriptPipeline, own_redis: RedisServer
) -> None:
    with redis.Redis(port=own_redis.port) as admin:
        admin.script_flush()
    reset_stats(own_redis)
    replies = await asyncio.gather(*(batching.call(["k"], [str(i)]) for i in range(10)))
    assert [r[1] for r in replies] == [str(i).encode() for i in range(10)]
    assert batch_calls(own_redis) == (2, 1)  # NOSCRIPT once, then answered
    with redis.Redis(port=own_redis.port) as admin:
        scripts = BATCH if not batching._cross_slot else CROSS_SLOT + BATCH
        assert admin.script_exists(sha(SCRIPT), sha(scripts)) == [True, True]
    assert await batching.call(["k"], ["alone"]) == [b"k", b"alone"]


async def test_cancelled_members_never_shift_the_answers(batching: ScriptPipeline) -> None:
    tasks = [asyncio.ensure_future(batching.call([f"k{i}"], [str(i)])) for i in range(300)]
    await asyncio.sleep(0)  # the batches are written
    for task in tasks[::3]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert isinstance(result, list)
            assert result[:2] == [f"k{i}".encode(), str(i).encode()]


async def test_a_batch_error_fails_every_member(own_redis: RedisServer) -> None:
    """A batch script that fails as a whole (here: it raises) fails each of its calls, and
    the connection keeps serving."""
    broken = Batching("return redis.call('NO-SUCH-COMMAND')")
    p = ScriptPipeline.for_url(own_redis.url, SCRIPT, timeout=TIMEOUT, batch=broken)
    try:
        results = await asyncio.gather(
            *(p.call(["k"], [str(i)]) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert "Redis error" in str(results[0])
        assert await p.call(["k"], ["alone"]) == [b"k", b"alone"]
    finally:
        await p.close()


async def test_the_in_flight_bound_counts_calls_not_batches(batching: ScriptPipeline) -> None:
    """MAX_IN_FLIGHT calls may wait at once, however few commands carry them: the next one
    is refused at once, and the calls waiting are all answered."""
    results = await asyncio.gather(
        *(batching.call([f"k{i}"], [str(i)]) for i in range(MAX_IN_FLIGHT + 1)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, StoreUnavailable)]
    assert len(refused) == 1 and "too many store calls" in str(refused[0])
    assert isinstance(results[-1], StoreUnavailable)  # the one past the bound
    assert sum(isinstance(r, list) for r in results) == MAX_IN_FLIGHT
    assert batching._waiting == 0
    assert await batching.call(["k"], ["after"]) == [b"k", b"after"]
