"""The circuit breaker, the retry budget and the backoff, on Trio's autojump clock."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from xintu.llm import Breaker, BreakerState
from xintu.llm._retry import BackoffPolicy, RetryBudget


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def breaker(**kw: float) -> Breaker:
    params: dict[str, float] = {
        "window_s": 30.0,
        "min_calls": 4,
        "failure_ratio": 0.5,
        "open_s": 15.0,
        "half_open_probes": 2,
        "consecutive_failures": 0,
    }
    params.update(kw)
    return Breaker(
        "openai",
        window_s=params["window_s"],
        min_calls=int(params["min_calls"]),
        failure_ratio=params["failure_ratio"],
        open_s=params["open_s"],
        half_open_probes=int(params["half_open_probes"]),
        consecutive_failures=int(params["consecutive_failures"]),
    )


def outcome(b: Breaker, ok: bool) -> None:
    permit = b.try_acquire()
    assert permit is not None
    if ok:
        permit.success()
    else:
        permit.failure()


async def test_stays_closed_below_min_calls(clock: trio.testing.MockClock) -> None:
    # No awaits: nothing here can block, so no fail_after either.
    b = breaker()
    for _ in range(3):
        outcome(b, False)
    assert b.state is BreakerState.CLOSED
    s = b.statistics()
    assert (s.failures_in_window, s.successes_in_window, s.failure_ratio) == (3, 0, 1.0)


async def test_consecutive_failures_open_it_before_the_ratio_does(
    clock: trio.testing.MockClock,
) -> None:
    """A window full of earlier successes keeps the ratio low; five failures in a
    row open it anyway. A success in between resets the run."""
    with capture_logs() as logs:
        b = breaker(min_calls=4, consecutive_failures=5)
        for _ in range(20):
            outcome(b, True)
        for _ in range(4):
            outcome(b, False)
        outcome(b, True)  # the run of failures starts over
        for _ in range(4):
            outcome(b, False)
        assert b.state is BreakerState.CLOSED
        assert b.statistics().consecutive_failures == 4
        outcome(b, False)  # the fifth in a row; 9 of 30 is far below the ratio
        assert b.state is BreakerState.OPEN
    opened = [e for e in logs if e["event"] == "breaker_opened"]
    assert [(e["reason"], e["failures"]) for e in opened] == [("consecutive_failures", 5)]
    assert b.statistics().consecutive_failures == 0


async def test_abandoned_calls_count_neither_way_and_opening_names_the_failure(
    clock: trio.testing.MockClock,
) -> None:
    """A call cut short by its caller's deadline is no verdict: any number of them
    leave the breaker as it was. When it opens, the log says what failed last."""
    with capture_logs() as logs:
        b = breaker(min_calls=4, consecutive_failures=3)
        for _ in range(50):
            permit = b.try_acquire()
            assert permit is not None
            permit.abandon()
        s = b.statistics()
        assert (s.state, s.successes_in_window, s.failures_in_window) == ("closed", 0, 0)
        for _ in range(3):
            permit = b.try_acquire()
            assert permit is not None
            permit.failure("unauthorized")
        assert b.state is BreakerState.OPEN
    opened = [e for e in logs if e["event"] == "breaker_opened"]
    assert [(e["reason"], e["last_failure"]) for e in opened] == [
        ("consecutive_failures", "unauthorized")
    ]


async def test_consecutive_failures_zero_is_off(clock: trio.testing.MockClock) -> None:
    b = breaker(min_calls=1000, consecutive_failures=0)
    for _ in range(50):
        outcome(b, False)
    assert b.state is BreakerState.CLOSED


async def test_opens_on_ratio_then_half_open_then_closes(clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60), capture_logs() as logs:
        b = breaker()
        outcome(b, True)
        outcome(b, True)
        outcome(b, False)
        assert b.state is BreakerState.CLOSED  # 1/3 failed
        outcome(b, False)  # 2/4 failed: ratio reached with min_calls
        assert b.state is BreakerState.OPEN
        assert b.try_acquire() is None
        assert not b.would_allow()
        s = b.statistics()
        assert (s.opened_total, s.rejected_total) == (1, 1)
        assert s.open_until == pytest.approx(trio.current_time() + 15.0)

        await trio.sleep(14.9)
        assert b.try_acquire() is None
        await trio.sleep(0.1)
        assert b.state is BreakerState.HALF_OPEN
        p1, p2 = b.try_acquire(), b.try_acquire()
        assert p1 is not None
        assert p2 is not None
        assert p1.probe
        assert b.try_acquire() is None  # the probe cap
        assert not b.would_allow()
        assert b.statistics().probes_in_flight == 2
        p1.success()
        assert b.state is BreakerState.CLOSED
        p2.failure()  # stale: a probe of the previous state
        assert b.state is BreakerState.CLOSED
        assert b.statistics().failures_in_window == 0

    events = [(e["event"], e.get("reason")) for e in logs]
    assert events == [
        ("breaker_opened", "failure_ratio"),
        ("breaker_half_open", "open_period_over"),
        ("breaker_closed", "probe_succeeded"),
    ]
    assert logs[0]["provider"] == "openai"
    assert (logs[0]["failures"], logs[0]["calls"]) == (2, 4)


async def test_failed_probe_reopens(clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        b = breaker(min_calls=1, open_s=5.0)
        outcome(b, False)
        assert b.state is BreakerState.OPEN
        await trio.sleep(5)
        probe = b.try_acquire()
        assert probe is not None
        probe.failure()
        assert b.state is BreakerState.OPEN
        assert b.statistics().opened_total == 2
        await trio.sleep(5)
        assert b.state is BreakerState.HALF_OPEN


async def test_abandoned_probe_frees_its_slot(clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        b = breaker(min_calls=1, half_open_probes=1, open_s=1.0)
        outcome(b, False)
        await trio.sleep(1)
        probe = b.try_acquire()
        assert probe is not None
        assert b.try_acquire() is None
        probe.abandon()
        probe.failure()  # after abandon: a no-op
        assert b.state is BreakerState.HALF_OPEN
        assert b.try_acquire() is not None


async def test_window_slides(clock: trio.testing.MockClock) -> None:
    with trio.fail_after(120):
        b = breaker(window_s=10.0)
        outcome(b, False)
        outcome(b, False)
        outcome(b, False)
        await trio.sleep(10)
        outcome(b, False)  # the first three have left the window
        assert b.state is BreakerState.CLOSED
        for _ in range(3):
            outcome(b, True)
        outcome(b, False)  # 2 of 5 in window
        assert b.state is BreakerState.CLOSED


async def test_outcome_of_a_call_admitted_before_opening_is_ignored(
    clock: trio.testing.MockClock,
) -> None:
    b = breaker(min_calls=1, open_s=10.0)
    slow = b.try_acquire()
    assert slow is not None
    outcome(b, False)
    assert b.state is BreakerState.OPEN
    slow.success()
    assert b.state is BreakerState.OPEN


async def test_retry_budget(clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        budget = RetryBudget(ratio=0.5, min_retries=1, window_s=10.0)
        for _ in range(4):
            budget.record_call()
        assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
        s = budget.statistics()
        assert (s.calls_in_window, s.retries_in_window, s.retries_allowed) == (4, 3, 3)
        assert s.exhausted_total == 1
        await trio.sleep(10)
        assert budget.statistics().retries_allowed == 1
        assert budget.try_spend()
        assert not budget.try_spend()


def test_backoff_full_jitter_and_retry_after() -> None:
    policy = BackoffPolicy(max_attempts=5, initial_s=0.2, max_s=1.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (5, 1.0)]:
        delays = [policy.delay_s(attempt, rng, retry_after_s=None) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole interval
        assert min(delays) < ceiling * 0.2
    assert policy.delay_s(1, rng, retry_after_s=3.0) == 3.0
