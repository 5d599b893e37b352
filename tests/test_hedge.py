"""Hedging a slow LLM call with the local model (the chain's hedge, issue 14).

On Trio's autojump clock, with the fake upstream (:mod:`xintu.testing.fakellm`)
behind ``httpx.ASGITransport`` (its latency, and its hangs, are Trio time), a
Trio-native local pool that takes :data:`LOCAL_S`, and the dispatcher, cache and
writer wired as the runtime wires them (a late LLM answer replaces the cached
local one in the LRU and the store).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from xintu import Source
from xintu.actors import ClassifyRequest
from xintu.actors._chain import ChainStatistics
from xintu.llm import LlmConfig
from xintu.testing.fakellm import FakeLlm

from . import llm_service
from .llm_service import Service, ask, photo

KEY = "sk-hedge-key"
#: How long the local pool takes to answer one photo.
LOCAL_S = 0.3
#: hedge_after_s in these tests: with no call history yet, the budget.
HEDGE_S = 2.0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def config(**llm: Any) -> LlmConfig:
    return llm_service.llm_config(KEY, **({"hedge_after_s": HEDGE_S, "hedge_min_s": 0.5} | llm))


def upstream(latency_s: float = 0.0, *, hang: bool = False) -> FakeLlm:
    return llm_service.fake_upstream(latency_s, key=KEY, hang=hang)


@asynccontextmanager
async def service(fake: FakeLlm, **llm: Any) -> AsyncIterator[Service]:
    """The request path, hedging (:func:`tests.llm_service.service`): a late LLM
    answer replaces the cached local one."""
    async with llm_service.service(fake, config(**llm), local_s=LOCAL_S, hedging=True) as s:
        yield s


@asynccontextmanager
async def aimed(fake: FakeLlm, **llm: Any) -> AsyncIterator[Service]:
    """:func:`service` with a latency target of 3 s, a hedge budget as long (3 s, no
    call history yet) and a priority lane of :data:`LOCAL_S` a photo: the hedge's
    time is set by the target, not the budget."""
    cfg = config(**({"hedge_after_s": 3.0} | llm))
    async with llm_service.service(
        fake, cfg, local_s=LOCAL_S, hedging=True, latency_target_s=3.0
    ) as s:
        s.local.urgent_s = LOCAL_S
        yield s


async def test_a_hung_upstream_is_hedged_by_the_local_model(
    clock: trio.testing.MockClock,
) -> None:
    """The upstream never answers: the caller gets the local answer at the hedge
    budget plus the local time, not at the call's deadline (10 s less the 1.5 s
    reserve) nor at the upstream's own timeout."""
    fake = upstream(hang=True)
    data, _ = photo(1)
    with trio.fail_after(60):
        async with service(fake) as s:
            start = trio.current_time()
            answer = await ask(s.dispatcher, data)
            took = trio.current_time() - start
            stats = s.chain.statistics()
    assert answer.classification.source is Source.LOCAL
    assert took == pytest.approx(HEDGE_S + LOCAL_S)
    assert stats == ChainStatistics({}, 0, hedges_started=1, hedges_local_won=1)
    assert fake.calls == 1


async def test_no_hedge_when_the_upstream_answers_in_time(clock: trio.testing.MockClock) -> None:
    fake = upstream(0.5)
    data, _ = photo(2)
    with trio.fail_after(60):
        async with service(fake) as s:
            start = trio.current_time()
            answer = await ask(s.dispatcher, data)
            took = trio.current_time() - start
            stats = s.chain.statistics()
    assert answer.classification.source is Source.LLM
    assert took == pytest.approx(0.5)
    assert stats == ChainStatistics({}, 0)
    assert s.local.calls == 0


async def test_the_late_llm_answer_replaces_the_cached_local_one(
    clock: trio.testing.MockClock,
) -> None:
    """The upstream answers in 4 s: the caller has the local answer at 2.3 s; at
    4 s the LLM's answer replaces it in the LRU and the store, so the next caller
    gets the LLM's from the cache."""
    fake = upstream(4.0)
    data, h = photo(3)
    with trio.fail_after(60):
        async with service(fake) as s:
            start = trio.current_time()
            first = await ask(s.dispatcher, data)
            took = trio.current_time() - start
            assert s.cache.lru.get(h) is not None
            assert s.cache.lru.get(h).classification.source is Source.LOCAL  # type: ignore[union-attr]
            await s.replaced.wait()
            replaced_at = trio.current_time() - start
            await s.writer.wait_idle()
            later = await ask(s.dispatcher, data)
            stats = s.chain.statistics()
    assert first.classification.source is Source.LOCAL
    assert took == pytest.approx(HEDGE_S + LOCAL_S)
    assert replaced_at == pytest.approx(4.0)
    assert later.from_cache is True
    assert later.classification.source is Source.LLM
    assert s.store.rows[h].classification.source is Source.LLM
    assert stats == ChainStatistics({}, 0, hedges_started=1, hedges_local_won=1, hedges_replaced=1)
    assert fake.calls == 1


async def test_a_hedge_takes_the_local_pools_priority_lane(
    clock: trio.testing.MockClock,
) -> None:
    """A full local queue does not hold a hedge back: the caller has waited already,
    and the hedge takes the priority lane (classify_now), so the hung call is
    answered at the budget plus the local time (before: behind the whole queue)."""
    fake = upstream(hang=True)
    data, _ = photo(4)
    with trio.fail_after(60):
        async with service(fake) as s:
            s.local.takes = False  # the queue of new work is full
            start = trio.current_time()
            answer = await ask(s.dispatcher, data)
            took = trio.current_time() - start
            stats = s.chain.statistics()
    assert answer.classification.source is Source.LOCAL
    assert took == pytest.approx(HEDGE_S + LOCAL_S)
    assert s.local.urgent == 1
    assert stats == ChainStatistics({}, 0, hedges_started=1, hedges_local_won=1)


@pytest.mark.parametrize(("age_s", "answered_at"), [(0.0, 3.0), (1.0, 2.0)])
async def test_the_hedge_starts_in_time_for_the_latency_target(
    clock: trio.testing.MockClock, age_s: float, answered_at: float
) -> None:
    """Budget 3 s (no call history yet), latency target 3 s, the priority lane's
    expected time 0.3 s: the hedge starts at 2.7 s, not at the budget, so the
    caller is answered by the target (3.0 s) even when the budget is as long as
    the target. The target counts from the request's arrival: one that arrived
    1 s before it reached the chain (its body, the hash, the cache lookup) is
    hedged 1.7 s into the call and answered 2 s after it reached the chain, 3 s
    after it arrived, as the client counts."""
    fake = upstream(4.0)
    data, _ = photo(6)
    with trio.fail_after(60):
        async with aimed(fake) as s:
            start = trio.current_time()
            answer = await ask(s.dispatcher, data, age_s=age_s)
            took = trio.current_time() - start
    assert answer.classification.source is Source.LOCAL
    assert took == pytest.approx(answered_at)


async def test_a_longer_priority_lane_brings_the_hedge_forward(
    clock: trio.testing.MockClock,
) -> None:
    """The hedge time is looked at again while the call runs: at 1 s other hedges
    make the priority lane 1 s long, so this hedge starts at 2 s (3 s target less
    1 s) instead of the 2.7 s it was set for when the call started."""
    fake = upstream(4.0)
    data, _ = photo(11)
    with trio.fail_after(60):
        async with aimed(fake) as s:

            async def lane_grows() -> None:
                await trio.sleep(1.0)
                s.local.urgent_s = 1.0

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lane_grows)
                answer = await ask(s.dispatcher, data)
            took = trio.current_time() - start
    assert answer.classification.source is Source.LOCAL
    assert took == pytest.approx(2.0 + LOCAL_S)


async def test_hedges_falling_due_together_start_early_enough_for_all(
    clock: trio.testing.MockClock,
) -> None:
    """Three calls admitted together fall due together; the priority lane takes
    0.3 s a photo, one after another, so the three hedges need 0.9 s of it before
    the 3 s target: each starts at 2.1 s (the fake lane answers them side by side
    at 2.4 s), where one alone would start at 2.7 s."""
    fake = upstream(4.0)
    photos = [photo(20 + n)[0] for n in range(3)]
    took: list[float] = []
    with trio.fail_after(60):
        async with aimed(fake) as s:
            start = trio.current_time()

            async def one(data: bytes) -> None:
                await ask(s.dispatcher, data)
                took.append(trio.current_time() - start)

            async with trio.open_nursery() as nursery:
                for data in photos:
                    nursery.start_soon(one, data)
            stats = s.chain.statistics()
    assert took == pytest.approx([2.1 + LOCAL_S] * 3)
    assert stats.hedges_local_won == 3


async def test_local_admission_counts_the_hedges_due_before_its_target(
    clock: trio.testing.MockClock,
) -> None:
    """A hung call waits for its hedge (due at 2.7 s, before the 3 s target): work
    for the local pool asked about meanwhile counts that hedge as a job ahead of it,
    since the hedge will take the priority lane first. Once the hedge has started,
    the lane counts it instead."""
    fake = upstream(hang=True)
    data, _ = photo(30)
    with trio.fail_after(60):
        async with aimed(fake, workers=1) as s:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, s.dispatcher, data)
                await trio.sleep(0.5)
                # The one LLM worker is busy: the work goes to the local pool.
                assert s.chain.would_take(trio.current_time() + 10)
                await trio.sleep(2.3)  # the hedge started at 2.7 s, answers at 3 s
                assert s.chain.would_take(trio.current_time() + 10)
    assert s.local.asked_ahead == [1, 0]


async def test_a_call_still_queued_when_the_local_answer_wins_is_withdrawn(
    clock: trio.testing.MockClock,
) -> None:
    """One LLM worker, calls of 6 s. A takes the worker; B queues behind it. Both
    are hedged at 2 s and answered locally at 2.3 s. B's call has not started: it
    is withdrawn, and B's LLM answer comes from a background re-classification
    once the worker is idle (after A's call), not from a call made at normal
    priority ahead of callers still waiting."""
    fake = upstream(6.0)
    (a, _), (b, hb) = photo(7), photo(8)
    with trio.fail_after(120):
        async with llm_service.service(
            fake, config(workers=1), local_s=LOCAL_S, hedging=True, rechecks=True
        ) as s:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, s.dispatcher, a)
                await trio.sleep(0.01)
                answer = await ask(s.dispatcher, b)
            # A's call ends at 6 s; B's re-classification runs then: done at 12 s.
            await trio.sleep(12.0)
            await s.writer.wait_idle()
            pool, chain = s.pool.statistics(), s.chain.statistics()
    assert answer.classification.source is Source.LOCAL
    assert chain.hedges_withdrawn == 1
    assert chain.upgrades_queued == 1
    assert pool.succeeded == 1  # A's call; B's never made at normal priority
    assert pool.recheck_succeeded == 1  # B's, in the background
    assert s.store.rows[hb].classification.source is Source.LLM
    assert fake.calls == 2


async def test_the_hedges_local_call_is_cancelled_when_the_llm_wins(
    clock: trio.testing.MockClock,
) -> None:
    """The upstream answers at 2.1 s, 0.1 s into the hedge: the caller has the LLM's
    answer, and the local call nobody waits for is cancelled (a hedge costs the
    local pool only while it may still be needed)."""
    fake = upstream(2.1)
    data, _ = photo(9)
    with trio.fail_after(60):
        async with service(fake) as s:
            answer = await ask(s.dispatcher, data)
            await trio.sleep(1.0)
            stats = s.chain.statistics()
    assert answer.classification.source is Source.LLM
    assert stats == ChainStatistics({}, 0, hedges_started=1, hedges_llm_won=1)
    assert (s.local.calls, s.local.answered) == (1, 0)


async def test_a_half_open_breakers_probe_is_hedged_at_once(
    clock: trio.testing.MockClock,
) -> None:
    """The upstream fails every call after 0.5 s. One failure opens the breaker;
    once its open period is over, the next miss is the half-open breaker's probe:
    the caller has the local answer after the local time, not after the probe's
    0.5 s failure plus the local time."""
    fake = upstream(0.5)
    fake.behaviour.error_rate = 1.0
    (a, _), (b, _) = photo(40), photo(41)
    with trio.fail_after(60):
        async with service(
            fake, breaker_consecutive_failures=1, breaker_open_s=5.0, retry_max_attempts=1
        ) as s:
            await ask(s.dispatcher, a)  # fails, opens the breaker
            assert not s.pool.healthy()
            await trio.sleep(6.0)  # half-open from here
            assert s.pool.hedge_after_s() == 0.0
            start = trio.current_time()
            answer = await ask(s.dispatcher, b)
            took = trio.current_time() - start
            calls = fake.calls
    assert answer.classification.source is Source.LOCAL
    assert took == pytest.approx(LOCAL_S)
    assert calls == 2  # the probe was made


async def test_hedging_is_off_at_zero(clock: trio.testing.MockClock) -> None:
    fake = upstream(4.0)
    data, _ = photo(5)
    with trio.fail_after(60):
        async with service(fake, hedge_after_s=0, hedge_min_s=0) as s:
            assert s.pool.hedge_after_s() is None
            answer = await ask(s.dispatcher, data)
            stats = s.chain.statistics()
    assert answer.classification.source is Source.LLM
    assert stats == ChainStatistics({}, 0)


async def test_the_hedge_budget_is_the_recent_p95_within_its_bounds(
    clock: trio.testing.MockClock,
) -> None:
    """hedge_after_s until 20 calls have answered; then their P95 (call times of
    0.1, 0.2, ..., 2.0 s: the 19th, 1.9 s), clamped to [hedge_min_s, hedge_after_s].

    The slow-call rule is off: calls of about 5 s (the ceiling's part) straddle its
    5 s threshold, and five of them past it would open the breaker mid-test."""
    fake = upstream()
    with trio.fail_after(600):
        async with service(fake, hedge_after_s=3.0, breaker_slow_call_s=0.0) as s:
            assert s.pool.hedge_after_s() == 3.0
            for n in range(20):
                fake.behaviour.latency_median_ms = 100.0 * (n + 1)
                data, h = photo(10 + n)
                await s.pool.classify(ClassifyRequest(data, h, "r"), trio.current_time() + 10)
                if n < 19:
                    assert s.pool.hedge_after_s() == 3.0
            p95 = s.pool.hedge_after_s()
            stats_p95 = s.pool.statistics().hedge_after_s
            # Twenty more at 5 s: the P95 is past the ceiling, which holds.
            fake.behaviour.latency_median_ms = 5000.0
            for n in range(20):
                data, h = photo(40 + n)
                await s.pool.classify(ClassifyRequest(data, h, "r"), trio.current_time() + 10)
            ceiling = s.pool.hedge_after_s()
    assert p95 == pytest.approx(1.9)
    assert stats_p95 == p95
    assert ceiling == 3.0


async def test_the_budget_has_a_floor(clock: trio.testing.MockClock) -> None:
    fake = upstream(0.1)
    with trio.fail_after(600):
        async with service(fake, hedge_min_s=0.5) as s:
            for n in range(20):
                data, h = photo(70 + n)
                await s.pool.classify(ClassifyRequest(data, h, "r"), trio.current_time() + 10)
            budget = s.pool.hedge_after_s()
    assert budget == 0.5
