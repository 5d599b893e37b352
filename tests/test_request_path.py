"""The request path under real conditions: hurried callers and a shared upstream.

A caller's ``X-Deadline-Ms`` is its own business: it must neither open the breaker
that every caller shares (a slow but healthy upstream is not a failing one) nor
decide the answer that everyone gets from the cache afterwards (a local answer
made only for lack of time is upgraded by the LLM). On Trio's autojump clock,
with the fake upstream (:mod:`xintu.testing.fakellm`) behind
``httpx.ASGITransport``, so its latency is Trio time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import outcome
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from xintu import Classification, Source
from xintu.actors import ClassifyRequest
from xintu.llm import BreakerState, LlmConfig, UpstreamRejected
from xintu.llm._errors import CallAbandoned
from xintu.testing.fakellm import FakeLlm

from . import llm_service
from .llm_service import Service, ask, llm_pool, photo, running

KEY = "sk-right-key"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def config(*, key: str = KEY, **llm: Any) -> LlmConfig:
    """The shipped defaults (breaker: 5 failures in a row open it for 15 s) but for *llm*."""
    return llm_service.llm_config(key, **llm)


def slow_healthy(latency_s: float = 1.0) -> FakeLlm:
    return llm_service.fake_upstream(latency_s, key=KEY)


# --- 1. a caller's deadline is not the upstream's failure ------------------------------


async def test_hurried_callers_do_not_open_the_shared_breaker(
    clock: trio.testing.MockClock,
) -> None:
    """Five callers with 2.2 s deadlines against a healthy upstream answering in 1 s:
    each call is cut at 0.7 s (2.2 s less the 1.5 s reserve). Abandoned, not failed:
    the breaker stays closed and the next patient caller gets the LLM's answer."""
    fake = slow_healthy(1.0)
    errors: list[outcome.Outcome[Classification]] = []
    with trio.fail_after(60):
        async with running(llm_pool(config(), fake)) as pool:
            async with trio.open_nursery() as callers:
                for n in range(5):
                    data, h = photo(n)

                    async def one(data: bytes = data, h: str = h) -> None:
                        request = ClassifyRequest(data, h, "r")
                        errors.append(
                            await outcome.acapture(
                                pool.classify, request, trio.current_time() + 2.2
                            )
                        )

                    callers.start_soon(one)
            assert pool.statistics().providers[0].breaker.state is BreakerState.CLOSED
            data, h = photo(9)
            patient = await pool.classify(ClassifyRequest(data, h, "r"), trio.current_time() + 10)
            p = pool.statistics().providers[0]
    assert len(errors) == 5
    assert all(isinstance(e, outcome.Error) and isinstance(e.error, CallAbandoned) for e in errors)
    assert patient.source is Source.LLM
    assert (p.successes, p.failures, p.abandoned) == (1, 0, 5)
    assert p.last_failure is None
    assert p.breaker.opened_total == 0
    assert fake.calls == 6


async def test_the_upstreams_own_failures_still_open_it(clock: trio.testing.MockClock) -> None:
    """A wrong key (401) fails every call: the breaker opens, and says why."""
    fake = slow_healthy(0.1)
    with trio.fail_after(60), capture_logs() as logs:
        async with running(llm_pool(config(key="sk-wrong-key"), fake)) as pool:
            for n in range(5):
                data, h = photo(n)
                with pytest.raises(UpstreamRejected):
                    await pool.classify(ClassifyRequest(data, h, "r"), trio.current_time() + 10)
            p = pool.statistics().providers[0]
    assert p.breaker.state is BreakerState.OPEN
    assert (p.failures, p.abandoned, p.last_failure) == (5, 0, "unauthorized")
    assert p.last_failure_at is not None
    opened = [e for e in logs if e["event"] == "breaker_opened"]
    assert [(e["reason"], e["last_failure"]) for e in opened] == [
        ("consecutive_failures", "unauthorized")
    ]


# --- 2. a short deadline does not decide the cached answer -----------------------------


@asynccontextmanager
async def service(fake: FakeLlm, **llm: Any) -> AsyncIterator[Service]:
    """The request path without hedging (:func:`tests.llm_service.service`): the LLM
    pool's recheck of a rushed local answer replaces it."""
    async with llm_service.service(fake, config(**llm), local_s=0.01, hedging=False) as s:
        yield s


@pytest.mark.parametrize(
    ("within_s", "reason"),
    [
        (1.2, "no_time"),  # under the 1.5 s reserve: the LLM is not even asked
        (2.2, "deadline"),  # asked, then cut at 0.7 s by the caller's deadline
    ],
)
async def test_a_rushed_local_answer_is_upgraded_for_everyone(
    clock: trio.testing.MockClock, within_s: float, reason: str
) -> None:
    """The hurried caller gets the local answer in time; the cached answer that
    everyone after it gets becomes the LLM's, in the LRU and in the store."""
    fake = slow_healthy(1.0)
    data, h = photo(1)
    with trio.fail_after(60):
        async with service(fake) as s:
            hurried = await ask(s.dispatcher, data, within_s)
            assert hurried.classification.source is Source.LOCAL
            await s.replaced.wait()
            await s.writer.wait_idle()
            later = await ask(s.dispatcher, data, 10.0)
            chain = s.dispatcher._chain.statistics()
    assert later.from_cache is True
    assert later.classification.source is Source.LLM
    assert s.store.rows[h].classification.source is Source.LLM
    assert chain.fallbacks == {reason: 1}
    assert chain.upgrades_queued == 1


async def test_no_upgrade_when_the_llm_itself_is_down(clock: trio.testing.MockClock) -> None:
    """The local answer made because the LLM is failing (not for lack of time) is
    not queued as an upgrade: rechecks of cached hits handle those later."""
    fake = slow_healthy(0.1)
    fake.behaviour.error_rate = 1.0
    data, h = photo(2)
    with trio.fail_after(60):
        async with service(fake, retry_max_attempts=1) as s:
            answer = await ask(s.dispatcher, data, 10.0)
            await s.writer.wait_idle()
            chain = s.dispatcher._chain.statistics()
            accepted = s.pool.statistics().recheck_accepted
    assert answer.classification.source is Source.LOCAL
    assert s.store.rows[h].classification.source is Source.LOCAL
    assert chain.fallbacks == {"llm_failed": 1}
    assert (chain.upgrades_queued, accepted) == (0, 0)
