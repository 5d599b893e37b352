"""The event-loop lag monitor (xintu/actors/_looplag.py) and its histogram on /metrics.

Time runs on Trio's mock clocks: a jump of the clock while the monitor sleeps is a
stall of exactly that length, as the loop sees it. One test blocks the real loop
(a synchronous sleep in a task, what CPU work on the loop does) and one reads the
histogram from /metrics of a running app; one sums two processes' histograms the
way ``--workers N`` does.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from xintu import load_config
from xintu._metrics import Metrics
from xintu.actors._looplag import INTERVAL_S, LAG_BUCKETS_S, LoopLag
from xintu.http import create_app

from .fakes import FakeModel
from .test_ops import metric

LAG = "xintu_event_loop_lag_seconds"


def _bucket(seconds: float) -> int:
    """The index of the bucket a lag of *seconds* counts in."""
    return next((i for i, b in enumerate(LAG_BUCKETS_S) if seconds <= b), len(LAG_BUCKETS_S))


async def test_an_idle_loop_wakes_on_time(autojump_clock: trio.testing.MockClock) -> None:
    """On an idle loop every wake is on time: one a interval, all in the first bucket."""
    monitor = LoopLag()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            await trio.sleep(1.0 + INTERVAL_S / 2)
            monitor.close()
    s = monitor.statistics()
    assert s.wakes == round(1.0 / INTERVAL_S)
    assert s.counts[0] == s.wakes
    assert sum(s.counts) == s.wakes
    assert (s.max_s, s.total_s, s.interval_s) == (0.0, 0.0, INTERVAL_S)


async def test_a_stall_is_one_late_wake_in_its_bucket(mock_clock: trio.testing.MockClock) -> None:
    """The clock jumping past the monitor's wake (a stall, as the loop sees it) is
    one wake that late, in the bucket of that lag; the next wake is on time again,
    and a stall past the last bound counts in the open bucket."""
    monitor = LoopLag()
    with trio.fail_after(60):  # mock time: it moves only when told
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            mock_clock.jump(INTERVAL_S + 0.3)
            await trio.testing.wait_all_tasks_blocked()
            first = monitor.statistics()
            mock_clock.jump(INTERVAL_S)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(INTERVAL_S + 7.0)
            await trio.testing.wait_all_tasks_blocked()
            monitor.close()
    assert first.wakes == 1
    assert first.last_s == pytest.approx(0.3)
    assert first.counts[_bucket(0.3)] == 1 == sum(first.counts)
    assert first.sums[_bucket(0.3)] == pytest.approx(0.3)
    s = monitor.statistics()
    assert s.wakes == 3
    assert s.counts[0] == 1  # on time after the stall
    assert s.counts[-1] == 1  # over the last bound (5 s)
    assert s.max_s == pytest.approx(7.0)
    assert s.total_s == pytest.approx(7.3)


def test_a_lag_on_a_bound_counts_in_that_bound() -> None:
    """Prometheus ``le``: a lag equal to a bound is in that bound's bucket; a
    negative lag (a clock that moved back) is no lag."""
    monitor = LoopLag()
    for lag in (0.05, 0.001, -0.002, 5.0, 5.001):
        monitor.record(lag)
    s = monitor.statistics()
    assert s.counts[LAG_BUCKETS_S.index(0.05)] == 1
    assert s.counts[0] == 2  # 0.001 and the negative one
    assert s.counts[LAG_BUCKETS_S.index(5.0)] == 1
    assert s.counts[-1] == 1
    assert s.sums[0] == pytest.approx(0.001)


async def test_close_stops_it_before_and_after_it_started() -> None:
    closed_first = LoopLag()
    closed_first.close()
    with trio.fail_after(5):
        await closed_first.run()  # returns at once
        monitor = LoopLag()
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            monitor.close()
    assert closed_first.statistics().wakes == 0


def _block_the_loop(seconds: float) -> None:
    """What CPU work on the event loop does: nothing else runs meanwhile."""
    time.sleep(seconds)


async def test_a_blocked_loop_is_recorded() -> None:
    """A task that holds the real loop for 250 ms makes the monitor's next wake
    about that late: one wake in the (0.2, 0.5] bucket."""
    monitor = LoopLag(interval_s=0.01)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            await trio.sleep(0.02)
            _block_the_loop(0.25)
            await trio.sleep(0.03)
            monitor.close()
    s = monitor.statistics()
    assert 0.2 < s.max_s < 0.5
    assert s.counts[_bucket(0.3)] == 1


def _exposition(metrics: Metrics) -> str:
    return metrics.render().decode()


def test_metrics_export_the_lags_as_a_histogram() -> None:
    """Each sample adds the wakes new since the last one: bucket counts and the sum
    exact, bounds included, nothing counted twice."""
    monitor = LoopLag()
    metrics = Metrics()
    for lag in (0.0004, 0.001, 0.3, 7.0):
        monitor.record(lag)
    metrics.sample_loop_lag(monitor.statistics())
    text = _exposition(metrics)
    assert metric(text, f"{LAG}_bucket", le="0.001") == 2
    assert metric(text, f"{LAG}_bucket", le="0.2") == 2
    assert metric(text, f"{LAG}_bucket", le="0.5") == 3
    assert metric(text, f"{LAG}_bucket", le="5.0") == 3
    assert metric(text, f"{LAG}_bucket", le="+Inf") == 4
    assert metric(text, f"{LAG}_count") == 4
    assert metric(text, f"{LAG}_sum") == pytest.approx(7.3014)
    metrics.sample_loop_lag(monitor.statistics())  # nothing new
    monitor.record(0.002)
    monitor.record(0.002)
    metrics.sample_loop_lag(monitor.statistics())
    text = _exposition(metrics)
    assert metric(text, f"{LAG}_bucket", le="0.001") == 2
    assert metric(text, f"{LAG}_bucket", le="0.002") == 4
    assert metric(text, f"{LAG}_count") == 6
    assert metric(text, f"{LAG}_sum") == pytest.approx(7.3054)


async def test_metrics_show_a_stall_of_the_running_app(tmp_path: Path) -> None:
    """The runtime starts the monitor; /metrics shows its wakes, and a stall of the
    real loop (a task holding it for 350 ms: the monitor, due within 100 ms of
    its start, wakes 250-350 ms late) in the bucket of its length. (The
    app's store and model start in threads, which the autojump clock would race
    past: this one runs on the real clock.)"""
    config = load_config(env={}, data={"dir": str(tmp_path)})
    app = create_app(config, model_factory=lambda _c: FakeModel())
    async with app.test_app():
        with trio.fail_after(30):
            client = app.test_client()
            await trio.sleep(3 * INTERVAL_S)
            _block_the_loop(INTERVAL_S + 0.25)
            await trio.sleep(INTERVAL_S)
            text = (await (await client.get("/metrics")).get_data()).decode()
    assert metric(text, f"{LAG}_count") >= 3
    assert metric(text, f"{LAG}_bucket", le="0.5") - metric(text, f"{LAG}_bucket", le="0.2") == 1
    assert 0.25 <= metric(text, f"{LAG}_sum") < 0.5


def _worker(lags: list[float]) -> None:
    """One worker process of ``--workers N``: its own monitor's lags, sampled once."""
    monitor = LoopLag()
    for lag in lags:
        monitor.record(lag)
    Metrics().sample_loop_lag(monitor.statistics())


def test_workers_histograms_are_summed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In multiprocess mode (``--workers N``) /metrics on any worker shows every
    worker's wakes: the histograms are summed."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    ctx = mp.get_context("spawn")  # a fresh interpreter reads the directory setting
    for lags in ([0.0005, 0.03], [0.7, 0.0001, 0.0002]):
        proc = ctx.Process(target=_worker, args=(lags,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
    text = _exposition(Metrics())  # reads every process's files, as /metrics does
    assert metric(text, f"{LAG}_count") == 5
    assert metric(text, f"{LAG}_bucket", le="0.001") == 3
    assert metric(text, f"{LAG}_bucket", le="0.05") == 4
    assert metric(text, f"{LAG}_bucket", le="+Inf") == 5
    assert metric(text, f"{LAG}_sum") == pytest.approx(0.7308)


def test_accepted_connections_are_a_counter() -> None:
    """Beside the lag, the bench reads how many connections the service accepted
    over a burst (a refusal before the body closes its connection):
    ``xintu_connections_accepted_total`` follows the gate's count."""
    from xintu._connections import ConnectionStatistics

    metrics = Metrics()
    metrics.sample_connections(
        ConnectionStatistics(limit=10, open=2, peak=3, accepted=5, refused=1)
    )
    metrics.sample_connections(
        ConnectionStatistics(limit=10, open=0, peak=3, accepted=9, refused=1)
    )
    text = _exposition(metrics)
    assert metric(text, "xintu_connections_accepted_total") == 9
    assert metric(text, "xintu_connections_refused_total") == 1
