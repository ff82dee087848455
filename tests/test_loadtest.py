"""`gateway loadtest`: the pure parts (fleet, schedule, histogram, checks, report, options)
and the load engine against tiny loopback upstreams (open loop, closed loop, timeouts).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import itertools
import math
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from gateway.config import DeviceHeaders, parse_config
from gateway.identity import IdentityReader
from gateway.loadtest import cli
from gateway.loadtest.clock import PreciseEpollSelector, precise_loop
from gateway.loadtest.enforcement import (
    DeviceCheck,
    check,
    max_allowed,
    modeled_allowed,
)
from gateway.loadtest.fleet import (
    APPLICATIONS,
    HEADER_NAMES,
    ID_PREFIX,
    PLATFORMS,
    build_fleet,
    choose_blocked,
    device_id,
)
from gateway.loadtest.histogram import HIGHEST_US, LatencyHistogram
from gateway.loadtest.progress import Progress, progress_line
from gateway.loadtest.report import SCHEMA, build_report, render_table, write_json
from gateway.loadtest.results import ERROR_STATUS, DeviceTally, Recorder
from gateway.loadtest.runner import LoadRunner, error_kind, latency_us, post_body
from gateway.loadtest.schedule import arrivals, arrivals_until, post_choices
from gateway.loadtest.spec import LoadSpec, connection_limit
from gateway.model import Bucket
from tests.rig.loadtest_report import REPORT_KEYS
from tests.rig.system import free_port
from tests.rig.upstream import CountingUpstream, MakeUpstream, Reply, Slow

# ---------------------------------------------------------------- the fleet


def test_the_same_seed_gives_the_same_fleet_and_another_seed_another() -> None:
    assert list(build_fleet(300, seed=7)) == list(build_fleet(300, seed=7))
    assert {d.id for d in build_fleet(300, seed=7)}.isdisjoint(d.id for d in build_fleet(300, 8))


def test_a_larger_fleet_starts_with_the_smaller_one() -> None:
    assert build_fleet(500, seed=3)[:100] == list(build_fleet(100, seed=3))


def test_ids_are_unique_prefixed_and_indexed() -> None:
    fleet = build_fleet(2000, seed=1)
    assert len({d.id for d in fleet}) == 2000
    assert all(d.id.startswith(ID_PREFIX) and d.index == i for i, d in enumerate(fleet))
    assert all(len(d.id) == len(ID_PREFIX) + 16 for d in fleet)


def test_ids_are_distinct_by_construction() -> None:
    # A bijection of the index, not a random draw: no two devices can ever share an id.
    ids = {device_id(seed=5, index=i) for i in range(200_000)}
    assert len(ids) == 200_000


def test_a_device_is_the_same_whenever_and_in_whatever_order_it_is_built() -> None:
    one, other = build_fleet(1000, seed=3), build_fleet(1000, seed=3)
    assert [other[i] for i in reversed(range(1000))][::-1] == list(one)
    assert one[-1] == one[999] and one[2:4] == [one[2], one[3]]
    with pytest.raises(IndexError):
        one[1000]


def test_a_million_device_fleet_is_cheap_until_devices_send() -> None:
    started = time.process_time()
    fleet = build_fleet(1_000_000, seed=1)
    assert len(fleet) == 1_000_000 and fleet[999_999].index == 999_999
    assert time.process_time() - started < 10  # cadences only; headers on first use


def test_the_header_names_are_the_gateway_defaults() -> None:
    assert HEADER_NAMES == {
        field: getattr(DeviceHeaders(), field) for field in DeviceHeaders.__dataclass_fields__
    }


def test_the_gateway_reads_each_device_as_the_identity_it_declares() -> None:
    reader = IdentityReader(parse_config("", "test").devices)
    for device in build_fleet(300, seed=2):
        identity = reader.read(CIMultiDict(device.headers))
        assert identity is not None
        assert identity.id == device.id
        assert all(identity.fields())  # every field declared, none empty


def test_hardware_software_and_versions_are_coherent() -> None:
    apps = {name: {v for v, _ in versions} for name, versions in APPLICATIONS}
    platforms = {
        os_name: ({v for v, _ in versions}, {m: set(models) for m, models in makers})
        for os_name, versions, makers, _ in PLATFORMS
    }
    for device in build_fleet(1000, seed=4):
        h = device.headers
        assert h["X-App-Version"] in apps[h["X-App-Name"]]
        os_versions, makers = platforms[h["X-OS-Name"]]
        assert h["X-OS-Version"] in os_versions
        assert h["X-Device-Model"] in makers[h["X-Device-Manufacturer"]]
        assert h["User-Agent"].startswith(f"{h['X-App-Name']}/{h['X-App-Version']} (")


def test_a_fleet_is_a_realistic_mix() -> None:
    fleet = build_fleet(1000, seed=5)

    def distinct(header: str) -> collections.Counter[str]:
        return collections.Counter(d.headers[header] for d in fleet)

    assert len(distinct("X-App-Name")) == len(APPLICATIONS)
    assert set(distinct("X-OS-Name")) == {"Android", "iOS", "iPadOS"}
    assert distinct("X-OS-Name")["Android"] > distinct("X-OS-Name")["iOS"] > 100
    assert len(distinct("X-Device-Manufacturer")) >= 6
    assert len(distinct("X-Device-Model")) >= 20
    fieldapp = collections.Counter(
        d.headers["X-App-Version"] for d in fleet if d.headers["X-App-Name"] == "FieldApp"
    )
    assert len(fieldapp) >= 3
    assert fieldapp.most_common(1)[0][0] == "2.5.1"  # most devices run the newest release


def test_cadences_mix_chatty_and_quiet_devices() -> None:
    fleet = build_fleet(2000, seed=6)
    by_class = collections.Counter(d.cadence for d in fleet)
    assert 300 < by_class["foreground"] < 500  # 20 %
    assert 900 < by_class["sync"] < 1100  # 50 %
    assert 500 < by_class["background"] < 700  # 30 %
    fg = [d.weight for d in fleet if d.cadence == "foreground"]
    bg = [d.weight for d in fleet if d.cadence == "background"]
    assert min(fg) > 10 * max(bg)
    assert all(0 <= d.phase < 1 for d in fleet)


def test_device_rates_add_up_to_the_total_in_proportion_to_weight() -> None:
    fleet = build_fleet(50, seed=1)
    rates = fleet.rates(200.0)
    assert math.isclose(sum(rates), 200.0)
    for device, rate in zip(fleet, rates, strict=True):
        assert math.isclose(rate / rates[0], device.weight / fleet[0].weight)


@pytest.mark.parametrize(
    ("size", "share", "count"),
    [
        pytest.param(10, 0.0, 0, id="none"),
        pytest.param(10, 0.3, 3, id="a-share"),
        pytest.param(10, 0.01, 1, id="at-least-one"),
        pytest.param(10, 1.0, 10, id="all"),
        pytest.param(1000, 0.25, 250, id="large"),
    ],
)
def test_choose_blocked(size: int, share: float, count: int) -> None:
    chosen = choose_blocked(size, share, seed=9)
    assert len(chosen) == count == len(set(chosen))
    assert chosen == sorted(chosen) and all(0 <= i < size for i in chosen)
    assert chosen == choose_blocked(size, share, seed=9)


def test_choose_blocked_depends_on_the_seed_and_refuses_a_bad_share() -> None:
    assert choose_blocked(1000, 0.1, seed=1) != choose_blocked(1000, 0.1, seed=2)
    with pytest.raises(ValueError, match="blocked share"):
        choose_blocked(10, 1.5, seed=1)


# ---------------------------------------------------------------- the schedule


def test_each_device_sends_on_its_own_exact_cadence_without_drift() -> None:
    rates, phases = [3.0, 0.7, 11.0], [0.5, 0.0, 0.99]
    per_device: dict[int, list[float]] = collections.defaultdict(list)
    for offset, index in arrivals_until(rates, phases, horizon=2000.0):
        per_device[index].append(offset)
    for index, offsets in per_device.items():
        # The k-th send is computed from k, so even the 20,000th is exactly on time.
        expected = [(phases[index] + k) / rates[index] for k in range(len(offsets))]
        assert offsets == expected
        assert len(offsets) == math.ceil(2000.0 * rates[index] - phases[index])


def test_the_merged_schedule_is_in_time_order_at_the_fleet_rate() -> None:
    fleet = build_fleet(200, seed=3)
    rates = fleet.rates(500.0)
    events = list(arrivals_until(rates, fleet.phases, horizon=60.0))
    offsets = [o for o, _ in events]
    assert offsets == sorted(offsets)
    # Exactly what each device's cadence gives, and the fleet's rate within one per device.
    assert len(events) == sum(
        math.ceil(60.0 * r - d.phase) for r, d in zip(rates, fleet, strict=True)
    )
    assert abs(len(events) - 500 * 60) <= len(fleet)
    counts = collections.Counter(i for _, i in events)
    busiest = max(range(200), key=lambda i: rates[i])
    assert abs(counts[busiest] - rates[busiest] * 60) <= 1


def test_the_schedule_refuses_bad_rates_and_phases() -> None:
    with pytest.raises(ValueError, match="> 0"):
        next(arrivals([1.0, 0.0], [0.0, 0.0]))
    with pytest.raises(ValueError, match="phases"):
        next(arrivals([1.0], [1.0]))
    with pytest.raises(ValueError, match="one phase per rate"):
        next(arrivals([1.0], []))


def test_post_choices_are_seeded_and_keep_their_share() -> None:
    def take(share: float, seed: int) -> list[bool]:
        return list(itertools.islice(post_choices(share, seed), 10_000))

    assert take(0.3, 1) == take(0.3, 1) != take(0.3, 2)
    assert 2800 < sum(take(0.3, 1)) < 3200
    assert not any(take(0.0, 1)) and all(take(1.0, 1))


# ---------------------------------------------------------------- the histogram


def test_percentiles_of_a_known_distribution() -> None:
    h = LatencyHistogram()
    for us in range(1, 100_001):  # uniform 1 us .. 100 ms: the p-th percentile is p * 1000 us
        h.record(us)
    assert h.count == 100_000
    for p, value in h.percentiles((50.0, 90.0, 99.0, 99.9)).items():
        assert value == pytest.approx(p * 1000, rel=1e-3)
    assert h.max() == pytest.approx(100_000, rel=1e-3) and h.min() == 1
    assert h.mean() == pytest.approx(50_000, rel=1e-3)


def test_percentiles_of_a_skewed_distribution() -> None:
    rng = random.Random(1)
    values = sorted(round(rng.expovariate(1 / 2000)) + 1 for _ in range(50_000))
    h = LatencyHistogram()
    for v in values:
        h.record(v)
    for p, value in h.percentiles((50.0, 99.0, 99.9)).items():
        exact = values[round(p * 10) * len(values) // 1000 - 1]  # integer ranks: no float error
        assert value == pytest.approx(exact, rel=2e-3)


def test_the_histogram_clamps_adds_and_resets() -> None:
    h, other = LatencyHistogram(), LatencyHistogram()
    assert h.percentiles((50.0,)) == {50.0: 0} and h.max() == 0 and h.mean() == 0.0
    h.record(0)
    h.record(10 * HIGHEST_US)
    assert h.count == 2 and h.min() == 1 and h.max() >= HIGHEST_US
    other.record(500)
    h.add(other)
    assert h.count == 3
    h.reset()
    assert h.count == 0


# ---------------------------------------------------------------- results


def test_the_recorder_closes_intervals_and_keeps_the_totals() -> None:
    rec = Recorder()
    rec.on_send(0, 0.1)
    rec.on_response(0, 200, 1000, 0.2)
    rec.on_send(1, 0.3)
    rec.on_error(1, "timeout", 0.9)
    first = rec.tick(1.0)
    assert (first.responses, first.errors, first.p50_us) == (1, 1, 1000)
    rec.on_send(0, 1.1)
    rec.on_response(0, 429, 3000, 1.5)
    second = rec.tick(2.0)
    assert (second.responses, second.errors) == (1, 0)
    assert second.max_us == second.total_p99_us == pytest.approx(3000, rel=1e-3)  # 3 digits
    assert second.seconds == 1.0
    assert rec.total.count == 2 and rec.sent == 3
    assert (rec.completed, rec.failed) == (2, 1)
    assert rec.status == {200: 1, 429: 1} and rec.errors == {"timeout": 1}
    assert rec.devices.statuses[1] == {ERROR_STATUS: 1}
    assert rec.devices.window(0) == pytest.approx(1.4)
    assert rec.devices.send_times is None


def test_a_device_without_answers_has_no_window() -> None:
    tally = DeviceTally(keep_send_times=True)
    tally.on_send(0, 1.0)
    assert tally.window(0) == 0.0 and tally.window(1) == 0.0
    assert tally.send_times is not None and list(tally.send_times[0]) == [1.0]


# ---------------------------------------------------------------- the enforcement check


@pytest.mark.parametrize(
    ("bucket", "window", "expected"),
    [
        pytest.param(Bucket(2.0, 3), 0.0, 4, id="burst-plus-slack"),
        pytest.param(Bucket(2.0, 3), 2.0, 8, id="refilled"),
        pytest.param(Bucket(0.5, 1), 2.9, 3, id="fraction-floored"),
    ],
)
def test_max_allowed(bucket: Bucket, window: float, expected: int) -> None:
    assert max_allowed(bucket, window) == expected


@pytest.mark.parametrize(
    ("times", "bucket", "expected"),
    [
        pytest.param([], Bucket(1.0, 1), 0, id="nothing-sent"),
        pytest.param([0.0] * 10, Bucket(2.0, 3), 3, id="all-at-once-gets-the-burst"),
        pytest.param([k * 0.5 for k in range(10)], Bucket(2.0, 1), 10, id="at-the-rate"),
        pytest.param([k * 0.1 for k in range(21)], Bucket(2.0, 3), 7, id="faster-than-rate"),
        pytest.param([0.0, 0.0, 100.0, 100.0, 100.0], Bucket(1.0, 2), 4, id="refill-capped"),
    ],
)
def test_modeled_allowed(times: list[float], bucket: Bucket, expected: int) -> None:
    assert modeled_allowed(times, bucket) == expected


def _tally(rows: dict[int, dict[int, int]]) -> DeviceTally:
    tally = DeviceTally(keep_send_times=True)
    for device, statuses in rows.items():
        for status, n in statuses.items():
            for k in range(n):
                tally.on_send(device, k * 0.1)
                tally.on_done(device, status, k * 0.1 + 0.01)
    return tally


def test_check_counts_blocked_2xx_and_devices_over_their_bucket() -> None:
    fleet = build_fleet(4, seed=1)
    tally = _tally(
        {
            0: {403: 5},  # blocked, refused: fine
            1: {200: 2, 403: 1},  # blocked, yet two got through
            2: {200: 4, 429: 6},  # within burst 3 + 2/s * 0.91 s + 1
            3: {200: 9, 429: 1},  # over it
        }
    )
    bucket = Bucket(2.0, 3)
    result = check(fleet, tally, blocked=[0, 1], buckets={2: bucket, 3: bucket})
    assert result.blocked_2xx == 2 and result.blocked_answers == {403: 6, 200: 2}
    assert [c.id for c in result.checks] == [fleet[2].id, fleet[3].id]
    assert [c.id for c in result.over_limit] == [fleet[3].id]
    assert not result.passed
    ok = result.checks[0]
    assert (ok.allowed, ok.limited, ok.max_allowed, ok.share_429) == (4, 6, 5, 0.6)
    assert ok.modeled_allowed == 4 and ok.modeled_share_429 == pytest.approx(0.6)


def test_check_passes_and_counts_devices_of_unknown_bucket() -> None:
    fleet = build_fleet(4, seed=1)
    tally = _tally({0: {403: 2}, 2: {200: 3}, 3: {200: 1, ERROR_STATUS: 1}})
    result = check(fleet, tally, blocked=[0], buckets={2: Bucket(1.0, 5), 3: None})
    assert result.passed and result.unknown_bucket == 1 and len(result.checks) == 1
    body = result.as_json()
    assert body["passed"] and body["blocked_2xx"] == 0 and body["blocked_ids"] == [fleet[0].id]
    assert body["devices"][0]["ok"] and body["unknown_bucket_devices"] == 1


def test_a_device_check_is_only_ok_within_its_bound() -> None:
    make = lambda allowed: DeviceCheck("d", Bucket(1, 1), 10, 10, allowed, 10 - allowed, 1, 3, 2)  # noqa: E731
    assert make(3).ok and not make(4).ok


# ---------------------------------------------------------------- the report


def _recorded() -> Recorder:
    rec = Recorder()
    for k in range(100):
        rec.on_send(k % 3, k / 100)
        rec.on_response(k % 3, 200 if k % 10 else 429, 1000 + 10 * k, k / 100 + 0.002)
    rec.on_error(0, "timeout", 1.0)
    rec.tick(1.0)
    return rec


def test_the_report_has_the_documented_fields(tmp_path: Path) -> None:
    spec = LoadSpec(target="http://127.0.0.1:9/x", rate=100.0, duration=1.0)
    report = build_report(spec, 3, _recorded(), 1.25, "2026-11-23T17:27:09.915+00:00")
    assert set(report) == REPORT_KEYS and report["schema"] == SCHEMA
    assert report["requests"] == {"sent": 100, "answered": 100, "errors": 1, "per_second": 80.0}
    assert set(report["latency_us"]) == {"min", "mean", "p50", "p90", "p99", "p99_9", "max"}
    assert report["latency_us"]["p50"] == pytest.approx(1500, rel=1e-2)
    assert report["status"] == {"200": 90, "429": 10} and report["errors"] == {"timeout": 1}
    assert report["latency_from"] == "intended" and report["mode"] == "open"
    assert set(report["timeline"][0]) == {
        "t", "seconds", "responses", "errors", "per_second", "p50_us", "p99_us", "max_us",
    }  # fmt: skip
    path = tmp_path / "r.json"
    write_json(report, path)
    assert orjson.loads(path.read_bytes()) == report


def test_the_table_warns_when_the_generator_fell_behind_its_schedule() -> None:
    rec = _recorded()
    spec = LoadSpec(target="http://127.0.0.1:9/x", rate=100.0, duration=1.0)
    assert "WARNING" not in render_table(build_report(spec, 3, rec, 1.0, "now"))
    for _ in range(5):  # 5 of 105 sends late: not yet more than 5 %
        rec.on_send(0, 0.5, lag=0.0015)
    assert "WARNING" not in render_table(build_report(spec, 3, rec, 1.0, "now"))
    rec.on_send(1, 0.6, lag=0.25)  # 6 of 106
    report = build_report(spec, 3, rec, 1.0, "now")
    assert report["generator"] == {
        "late_sends": 6,
        "late_after_us": 1000,
        "max_send_lag_us": 250000,
    }
    warning = render_table(report).splitlines()[-1]
    assert warning.startswith("WARNING ")
    assert "the generator sent 6% of requests late (up to 250.000 ms)" in warning


def test_the_table_shows_throughput_percentiles_and_statuses() -> None:
    spec = LoadSpec(target="http://127.0.0.1:9/x", concurrency=8, duration=1.0)
    table = render_table(build_report(spec, 3, _recorded(), 1.0, "now"))
    assert "closed loop at concurrency 8, 3 devices" in table
    assert "latency (from sent)" in table
    for line in ("throughput", "p50", "p90", "p99 ", "p99.9", "max", "200", "429", "timeout"):
        assert line in table
    assert "enforcement" not in table


def test_progress_lines_rewrite_one_terminal_line() -> None:
    rec = _recorded()
    out = io.StringIO()
    progress = Progress(out)
    progress(rec.timeline[0])
    progress.finish()
    text = out.getvalue()
    assert text.startswith("\r\x1b[2K") and text.endswith("\n") and text.count("\n") == 1
    line = progress_line(rec.timeline[0], errors_so_far=1)
    assert "100.0 req/s" in line and "errors 1" in line and "p50" in line and "p99" in line


# ---------------------------------------------------------------- engine helpers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(LoadSpec("http://h", concurrency=7), 7, id="closed-loop-concurrency"),
        pytest.param(LoadSpec("http://h", rate=1.0, timeout=1.0), 16, id="open-loop-floor"),
        pytest.param(LoadSpec("http://h", rate=50.0, timeout=2.0), 100, id="rate-times-timeout"),
        pytest.param(LoadSpec("http://h", rate=1e5, timeout=10.0), 1024, id="open-loop-cap"),
        pytest.param(LoadSpec("http://h", rate=1e5, connections=3), 3, id="given"),
    ],
)
def test_connection_limit(spec: LoadSpec, expected: int) -> None:
    assert connection_limit(spec) == expected


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        pytest.param(TimeoutError(), "timeout", id="timeout"),
        pytest.param(aiohttp.ServerTimeoutError(), "timeout", id="server-timeout"),
        pytest.param(aiohttp.ServerDisconnectedError(), "disconnected", id="disconnected"),
        pytest.param(aiohttp.ClientPayloadError(), "payload", id="payload"),
        pytest.param(ConnectionResetError(), "os", id="os"),
        pytest.param(aiohttp.TooManyRedirects(None, ()), "TooManyRedirects", id="other"),  # type: ignore[arg-type]
    ],
)
def test_error_kind(exc: BaseException, kind: str) -> None:
    assert error_kind(exc) == kind


def test_post_bodies_and_latency() -> None:
    assert [len(post_body(n)) for n in (0, 1, 256, 5000)] == [0, 1, 256, 5000]
    assert post_body(300) == post_body(300)
    assert latency_us(10.0, 10.0015) == 1500 and latency_us(10.0, 9.0) == 0


@pytest.mark.timing
def test_the_open_loop_clock_fires_timers_well_under_a_millisecond_late() -> None:
    # epoll_wait and uvloop sleep in whole milliseconds: open loop would charge that to the
    # target as latency. The loadtest's loop sleeps in select() on the epoll descriptor.
    async def lags() -> list[float]:
        loop = asyncio.get_running_loop()
        found = []
        for _ in range(200):
            fired = loop.create_future()
            due = time.monotonic() + 0.0003
            loop.call_later(0.0003, fired.set_result, None)
            await fired
            found.append(time.monotonic() - due)
        return sorted(found)

    with asyncio.Runner(loop_factory=precise_loop) as runner:
        found = runner.run(lags())
    assert found[0] >= -0.00001 and found[100] < 0.0002  # on epoll: 0.7 ms late at the median


def test_the_precise_selector_still_reports_events_and_honours_a_zero_timeout() -> None:
    selector = PreciseEpollSelector()
    left, right = socket.socketpair()
    try:
        selector.register(left, selectors.EVENT_READ)
        started = time.monotonic()
        assert selector.select(0) == [] and selector.select(0.02) == []
        assert time.monotonic() - started >= 0.02  # it did wait for the timeout
        right.send(b"x")
        ready = selector.select(5.0)  # an event ends the wait at once
        assert [(key.fileobj, events) for key, events in ready] == [(left, selectors.EVENT_READ)]
        assert time.monotonic() - started < 1.0
    finally:
        selector.close()
        left.close()
        right.close()


# ---------------------------------------------------------------- the engine, on loopback

OK = Reply(body=b"ok")  # the loopback upstream's answer (the rig's CountingUpstream)


def readings(upstream: CountingUpstream) -> str:
    """The URL the load is sent to, on `upstream`."""
    return f"{upstream.url}/api/readings"


async def run_spec(spec: LoadSpec, devices: int = 5, seed: int = 1) -> tuple[Recorder, float]:
    rec = Recorder()
    elapsed = await LoadRunner(spec, build_fleet(devices, seed), rec).run()
    return rec, elapsed


@pytest.mark.timing
async def test_open_loop_sends_the_schedule_with_the_fleet_headers(
    make_upstream: MakeUpstream,
) -> None:
    upstream = await make_upstream(OK)
    url = readings(upstream)
    spec = LoadSpec(url, rate=100.0, duration=1.5, post_share=0.25, post_bytes=300, seed=3)
    fleet = build_fleet(5, seed=3)
    rec = Recorder()
    ticks: list[float] = []
    elapsed = await LoadRunner(spec, fleet, rec).run(lambda p: ticks.append(p.t))
    planned = list(arrivals_until(fleet.rates(100.0), fleet.phases, 1.5))
    assert rec.sent == len(planned) == len(upstream.seen) and rec.status == {200: len(planned)}
    assert [rec.devices.sent[i] for i in range(5)] == [
        sum(1 for _, j in planned if j == i) for i in range(5)
    ]
    assert planned[-1][0] < elapsed < 2.5
    assert ticks[0] == pytest.approx(1.0, abs=0.1) and len(ticks) == 2
    posts = [seen.body_size for seen in upstream.seen if seen.method == "POST"]
    assert 0 < len(posts) < len(planned) / 2 and set(posts) == {300}
    ids = {d.id: d.headers for d in fleet}
    for seen in upstream.seen:
        expected = ids[seen.headers["X-Device-Id"]]
        assert all(seen.headers[name] == value for name, value in expected.items())


@pytest.mark.timing
async def test_open_loop_measures_from_the_intended_time_when_the_server_queues(
    make_upstream: MakeUpstream,
) -> None:
    # 40 req/s to a server that serves one request per 50 ms (20/s): a queue builds up.
    upstream = await make_upstream(Slow(0.05, OK, one_at_a_time=True))
    url = readings(upstream)
    open_rec, _ = await run_spec(LoadSpec(url, rate=40.0, duration=1.0, timeout=5.0))
    assert open_rec.sent >= 38 and open_rec.completed == open_rec.sent
    assert open_rec.total.percentiles((99.0,))[99.0] >= 700_000  # the queue, seen as latency
    # Closed loop at concurrency 1 never builds the queue, so it sees only the service time.
    closed_rec, _ = await run_spec(LoadSpec(url, concurrency=1, duration=0.5, timeout=5.0))
    assert closed_rec.total.percentiles((99.0,))[99.0] < 200_000


@pytest.mark.timing
async def test_open_loop_keeps_its_schedule_through_a_stalled_generator(
    make_upstream: MakeUpstream,
) -> None:
    url = readings(await make_upstream(OK))
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, time.sleep, 0.4)  # the generator itself freezes for 400 ms
    rec, _ = await run_spec(LoadSpec(url, rate=100.0, duration=1.0), devices=10)
    fleet = build_fleet(10, 1)
    planned = sum(1 for _ in arrivals_until(fleet.rates(100.0), fleet.phases, 1.0))
    # Nothing is skipped: the requests due during the freeze are sent late, not dropped ...
    assert abs(rec.sent - planned) <= 10 and rec.completed == rec.sent
    # ... and the wait counts as their latency (coordinated omission would hide it).
    assert rec.total.max() >= 300_000
    # The generator's own lag is reported too: it knows it was late.
    assert rec.late_sends > 10 and rec.max_send_lag >= 0.3
    assert rec.total.percentiles((50.0,))[50.0] < 100_000


@pytest.mark.timing
async def test_closed_loop_keeps_exactly_c_requests_in_flight(
    make_upstream: MakeUpstream,
) -> None:
    upstream = await make_upstream(Slow(0.02, OK))
    url = readings(upstream)
    rec, elapsed = await run_spec(LoadSpec(url, concurrency=4, duration=0.6), devices=20)
    assert upstream.most_in_progress == 4
    assert 60 <= rec.completed <= 4 * 0.62 / 0.02 and rec.failed == 0
    assert elapsed < 1.0


@pytest.mark.timing
async def test_every_request_is_bounded_by_the_timeout(make_upstream: MakeUpstream) -> None:
    url = readings(await make_upstream(Slow(30.0, OK)))
    started = time.monotonic()
    rec, _ = await run_spec(LoadSpec(url, rate=20.0, duration=0.5, timeout=0.3))
    assert time.monotonic() - started < 2.0
    assert rec.errors == {"timeout": rec.sent} and rec.completed == 0 and rec.sent >= 8


async def test_a_refused_connection_is_counted_as_an_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    rec, _ = await run_spec(LoadSpec(url, rate=50.0, duration=0.3, timeout=1.0))
    assert rec.sent > 0 and rec.errors == {"connect": rec.sent}


# ---------------------------------------------------------------- the command line


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gateway")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["loadtest", *argv])


def run_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(parse(*argv), env=env or {}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


T = "--target"
URL = "http://127.0.0.1:9/"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            [T, "ftp://x/"],
            "--target must be an http:// or https:// URL with a host, not 'ftp://x/'",
        ),
        pytest.param([T, "http://"], "--target must be an http:// or https:// URL with a host"),
        pytest.param([T, URL, "--devices", "0"], "--devices must be >= 1 and <= 1e+06, not 0"),
        pytest.param([T, URL, "--rate", "0"], "--rate must be > 0 and <= 1e+06, not 0"),
        pytest.param([T, URL, "--rate", "nan"], "--rate must be > 0 and <= 1e+06, not nan"),
        pytest.param([T, URL, "--concurrency", "0"], "--concurrency must be >= 1 and <= 10000"),
        pytest.param([T, URL, "--duration", "-1"], "--duration must be > 0 and <= 86400, not -1"),
        pytest.param([T, URL, "--timeout", "0"], "--timeout must be > 0 and <= 3600, not 0"),
        pytest.param([T, URL, "--post-share", "1.5"], "--post-share must be >= 0 and <= 1"),
        pytest.param([T, URL, "--post-bytes", "-1"], "--post-bytes must be >= 0"),
        pytest.param([T, URL, "--connections", "0"], "--connections must be >= 1"),
        pytest.param(
            [T, URL, "--blocked-share", "0.1"],
            "--blocked-share needs --admin-url and --admin-token to block devices",
        ),
        pytest.param(
            [T, URL, "--admin-url", URL],
            "--admin-url needs --admin-token (or $GATEWAY_ADMIN_TOKEN)",
        ),
        pytest.param([T, URL, "--admin-url", "x", "--admin-token", "t"], "--admin-url must be"),
        pytest.param(
            [T, URL, "--bucket-rate", "2"], "--bucket-rate and --bucket-burst go together"
        ),
        pytest.param(
            [T, URL, "--bucket-rate", "2", "--bucket-burst", "0"], "--bucket-burst must be >= 1"
        ),
        pytest.param([T, URL, "--report", "/nonexistent/dir/r.json"], "--report: directory"),
        pytest.param([T, URL, "--plot", "/nonexistent/p.png"], "--plot: directory"),
    ],
)
def test_bad_options_exit_2_with_a_message_naming_the_option(argv: list[str], message: str) -> None:
    code, out, err = run_cli(*argv)
    assert code == 2 and out == ""
    assert err.startswith(f"gateway loadtest: {message}")


def test_rate_and_concurrency_are_exclusive() -> None:
    with pytest.raises(SystemExit) as exc:
        parse(T, URL, "--rate", "5", "--concurrency", "5")
    assert exc.value.code == 2


def test_options_default_to_open_loop_and_show_progress_only_on_a_terminal() -> None:
    options = cli.options_from(parse(T, URL), {}, tty=True)
    assert options.spec.rate == cli.DEFAULT_RATE and options.spec.open_loop and options.progress
    assert not cli.options_from(parse(T, URL, "--no-progress"), {}, tty=True).progress
    assert not cli.options_from(parse(T, URL), {}, tty=False).progress
    closed = cli.options_from(parse(T, URL, "--concurrency", "3"), {}, tty=False)
    assert closed.spec.rate is None and closed.spec.concurrency == 3


def test_the_admin_token_may_come_from_the_environment() -> None:
    env = {"GATEWAY_ADMIN_TOKEN": "from-the-environment-0123"}
    options = cli.options_from(parse(T, URL, "--admin-url", URL), env, tty=False)
    assert options.admin_token == env["GATEWAY_ADMIN_TOKEN"] and options.checks_enforcement


def test_an_unreachable_target_exits_1_with_the_errors_in_the_table() -> None:
    target = f"http://127.0.0.1:{free_port()}/"
    code, out, err = run_cli(T, target, "--rate", "20", "--duration", "0.3", "--timeout", "1")
    assert code == 1 and err == ""
    assert "0 answered" in out and "connect" in out


async def test_cli_run_writes_the_report_and_the_plot(
    make_upstream: MakeUpstream, tmp_path: Path
) -> None:
    # `run` starts its own event loop: it runs in a worker thread while this loop serves.
    url = readings(await make_upstream(OK))
    report, plot = tmp_path / "r.json", tmp_path / "p.png"
    argv = [T, url, "--rate", "50", "--duration", "1.2", "--report", str(report)]
    code, out, err = await asyncio.to_thread(run_cli, *argv, "--plot", str(plot))
    assert (code, err) == (0, ""), out
    assert "throughput" in out and "\r" not in out  # not a terminal: no progress line
    assert orjson.loads(report.read_bytes())["status"]["200"] > 40
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_ctrl_c_stops_the_run_cleanly_with_exit_130() -> None:
    code = (
        "import argparse, sys\n"
        "from gateway.loadtest import cli\n"
        "p = argparse.ArgumentParser(); cli.add_parser(p.add_subparsers())\n"
        "sys.exit(cli.run(p.parse_args(['loadtest', *sys.argv[1:]])))\n"
    )
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(15)
        target = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        argv = [T, target, "--duration", "60", "--rate", "20"]
        proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-c", code, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            connection, _ = listener.accept()  # the load has started: never answer it
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=15)
            connection.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert err == "gateway loadtest: interrupted\n" and out == ""


async def test_a_report_that_cannot_be_written_exits_1(
    make_upstream: MakeUpstream, tmp_path: Path
) -> None:
    url = readings(await make_upstream(OK))
    (tmp_path / "r.json").mkdir()  # a directory where the file should go
    argv = [T, url, "--rate", "20", "--duration", "0.3", "--report", str(tmp_path / "r.json")]
    code, out, err = await asyncio.to_thread(run_cli, *argv)
    assert code == 1 and "throughput" in out
    assert err.startswith(f"gateway loadtest: cannot write {tmp_path / 'r.json'}: ")
