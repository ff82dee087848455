"""Log rate-limiting: RepeatFilter's windows and summaries, and setup_logging's wiring."""

from __future__ import annotations

import atexit
import io
import logging
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from gateway.logs import ACCESS_LOGGER, RepeatFilter, flush_logs, setup_logging
from tests.rig.clock import FakeClock
from tests.rig.waits import until

STORE_DOWN = "store unavailable (on_error=%s): %s"


class Captured(logging.Handler):
    """Keeps what passes its filters."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def rig(clock: FakeClock, **options: Any) -> tuple[RepeatFilter, Captured]:
    handler = Captured()
    repeat = RepeatFilter(handler, clock=clock.seconds, **options)
    handler.addFilter(repeat)
    return repeat, handler


def record(
    msg: str = STORE_DOWN,
    args: tuple[object, ...] = ("open", "boom"),
    *,
    name: str = "gateway.enforce",
    level: int = logging.WARNING,
    fields: dict[str, Any] | None = None,
) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    if fields is not None:
        rec.fields = fields
    return rec


def repeated(rec: logging.LogRecord) -> int | None:
    """The summary's count, None for an ordinary line."""
    fields = getattr(rec, "fields", None)
    return fields.get("repeated") if isinstance(fields, dict) else None


def test_first_line_passes(clock: FakeClock) -> None:
    _, handler = rig(clock)
    first = record()
    handler.handle(first)
    assert handler.records == [first]


def test_repeats_within_the_window_are_suppressed(clock: FakeClock) -> None:
    _, handler = rig(clock)
    for i in range(50):
        handler.handle(record(STORE_DOWN, ("open", f"error {i}")))
        clock.advance(199)  # 50 records in 9.95 s: all inside the first window
    assert [r.getMessage() for r in handler.records] == [
        "store unavailable (on_error=open): error 0"
    ]


def test_summary_carries_the_count_and_the_last_message(clock: FakeClock) -> None:
    repeat, handler = rig(clock)
    handler.handle(record(STORE_DOWN, ("open", "error 0")))
    for i in range(1, 4):
        handler.handle(record(STORE_DOWN, ("closed", f"error {i}"), fields={"device_id": f"d{i}"}))
    clock.advance(10_000)
    # The next record of the kind writes the summary and opens the next window with it.
    handler.handle(record(STORE_DOWN, ("open", "error 4")))
    assert len(handler.records) == 2
    summary = handler.records[1]
    assert (summary.name, summary.levelno) == ("gateway.enforce", logging.WARNING)
    assert summary.getMessage() == "store unavailable (on_error=closed): error 3"
    assert vars(summary)["fields"] == {"device_id": "d3", "repeated": 3, "window_s": 10}
    # flush() (shutdown) writes what the new window counted: the record that closed the old.
    repeat.flush()
    assert [repeated(r) for r in handler.records] == [None, 3, 1]
    assert handler.records[2].getMessage() == "store unavailable (on_error=open): error 4"
    assert repeat.open_windows == 0


def test_a_storm_gives_one_line_then_one_summary_per_window(clock: FakeClock) -> None:
    repeat, handler = rig(clock)
    for _ in range(350):  # one warning every 100 ms for 35 s
        handler.handle(record())
        clock.advance(100)
    repeat.flush()
    assert [repeated(r) for r in handler.records] == [None, 99, 100, 100, 50]


def test_a_window_without_repeats_is_forgotten(clock: FakeClock) -> None:
    repeat, handler = rig(clock)
    handler.handle(record())
    clock.advance(10_000)
    handler.handle(record())
    assert [repeated(r) for r in handler.records] == [None, None]
    assert repeat.open_windows == 1


@pytest.mark.parametrize(
    ("second", "written"),
    [
        pytest.param(
            record(STORE_DOWN, ("closed", "other text")), 1, id="same-template-other-args"
        ),
        pytest.param(record("upstream failed: %r", ("boom",)), 2, id="other-template"),
        pytest.param(record(name="gateway.dataplane.exchange"), 2, id="other-logger"),
        pytest.param(record(level=logging.ERROR), 2, id="other-level"),
    ],
)
def test_a_kind_is_logger_level_and_template(
    clock: FakeClock, second: logging.LogRecord, written: int
) -> None:
    _, handler = rig(clock)
    handler.handle(record())
    handler.handle(second)
    assert len(handler.records) == written


@pytest.mark.parametrize(
    ("name", "level"),
    [
        pytest.param(ACCESS_LOGGER, logging.INFO, id="access-info"),
        pytest.param(ACCESS_LOGGER, logging.WARNING, id="access-warning"),
        pytest.param("gateway.enforce", logging.DEBUG, id="debug"),
        pytest.param("gateway.enforce", logging.INFO, id="info"),
    ],
)
def test_never_filtered(clock: FakeClock, name: str, level: int) -> None:
    repeat, handler = rig(clock)
    for _ in range(100):
        handler.handle(record("request", (), name=name, level=level))
    assert len(handler.records) == 100
    assert repeat.open_windows == 0


def test_memory_is_bounded_the_oldest_window_is_flushed(clock: FakeClock) -> None:
    repeat, handler = rig(clock, max_keys=16)
    handler.handle(record("kind 0", ()))
    handler.handle(record("kind 0", ()))  # a repeat the eviction must not lose
    for i in range(1, 1000):
        handler.handle(record(f"kind {i}", ()))
        assert repeat.open_windows <= 16
    summaries = [r for r in handler.records if repeated(r) is not None]
    assert [(r.getMessage(), repeated(r)) for r in summaries] == [("kind 0", 1)]
    assert len(handler.records) == 1000 + 1
    # An evicted kind starts over with a line of its own; the newest kinds are still held.
    handler.handle(record("kind 0", ()))
    handler.handle(record("kind 999", ()))
    assert [r.getMessage() for r in handler.records[-1:]] == ["kind 0"]
    assert len(handler.records) == 1000 + 2


def test_threads_share_one_count(clock: FakeClock) -> None:
    repeat, handler = rig(clock)

    def storm() -> None:
        for _ in range(1000):
            handler.handle(record())

    threads = [threading.Thread(target=storm) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    repeat.flush()
    assert [repeated(r) for r in handler.records] == [None, 7999]


async def test_the_summary_comes_without_a_further_record_on_a_loop(clock: FakeClock) -> None:
    _, handler = rig(clock, window_s=0.01)
    handler.handle(record(STORE_DOWN, ("open", "error 0")))
    handler.handle(record(STORE_DOWN, ("open", "error 1")))  # arms the loop's timer
    clock.advance(10)
    await until(lambda: len(handler.records) == 2, "the summary from the loop's timer")
    assert repeated(handler.records[1]) == 1
    assert handler.records[1].getMessage() == "store unavailable (on_error=open): error 1"


async def test_the_timer_waits_for_the_filters_clock(clock: FakeClock) -> None:
    reads = 0

    def counting() -> float:
        nonlocal reads
        reads += 1
        return clock() / 1_000_000

    handler = Captured()
    handler.addFilter(RepeatFilter(handler, window_s=0.01, clock=counting))
    handler.handle(record())
    handler.handle(record())
    armed = reads
    # The loop's timer fired (it read the clock) but the window is still open by the clock.
    await until(lambda: reads > armed, "the loop's timer")
    assert len(handler.records) == 1
    clock.advance(10)
    await until(lambda: len(handler.records) == 2, "the summary once the clock moved")


@pytest.fixture
def root_restored() -> Iterator[None]:
    """Puts back the root logger as pytest had it after a test runs setup_logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access_disabled = logging.getLogger("aiohttp.access").disabled
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = access_disabled
    atexit.unregister(flush_logs)


@pytest.mark.usefixtures("root_restored")
def test_500_store_unavailable_warnings_give_one_line_and_one_summary(clock: FakeClock) -> None:
    out = io.StringIO()
    setup_logging(stream=out, clock=clock.seconds)
    log = logging.getLogger("gateway.enforce")
    for i in range(500):
        log.warning(STORE_DOWN, "open", f"Error {i} connecting to 127.0.0.1:6379.")
    clock.advance(10_000)
    log.warning(STORE_DOWN, "open", "Error 500 connecting to 127.0.0.1:6379.")
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["message"], line.get("repeated")) for line in lines] == [
        ("store unavailable (on_error=open): Error 0 connecting to 127.0.0.1:6379.", None),
        ("store unavailable (on_error=open): Error 499 connecting to 127.0.0.1:6379.", 499),
    ]
    assert lines[1]["window_s"] == 10
    assert (lines[1]["level"], lines[1]["logger"]) == ("warning", "gateway.enforce")


@pytest.mark.usefixtures("root_restored")
def test_setup_logging_twice_keeps_one_handler_and_flushes_the_first(clock: FakeClock) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(stream=first, clock=clock.seconds)
    for _ in range(3):
        logging.getLogger("gateway.enforce").warning(STORE_DOWN, "open", "boom")
    setup_logging(stream=second, clock=clock.seconds)
    (handler,) = logging.getLogger().handlers
    assert [type(f) for f in handler.filters] == [RepeatFilter]
    assert [orjson.loads(line).get("repeated") for line in first.getvalue().splitlines()] == [
        None,
        2,
    ]
    logging.getLogger("gateway.enforce").warning(STORE_DOWN, "open", "boom")
    assert len(second.getvalue().splitlines()) == 1
