"""Hedging a slow LLM call with the local model (the chain's hedge, issue 14).

On Trio's autojump clock, with the fake upstream (:mod:`xintu.testing.fakellm`)
behind ``httpx.ASGITransport`` (its latency, and its hangs, are Trio time), a
Trio-native local pool that takes :data:`LOCAL_S`, and the dispatcher, cache and
writer wired as the runtime wires them (a late LLM answer replaces the cached
local one in the LRU and the store).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from PIL import Image

from xintu import Classification, Source
from xintu.actors import Answer, Cache, Chain, ClassifyRequest, Dispatcher, Envelope, Writer
from xintu.actors._chain import ChainStatistics
from xintu.actors._envelope import open_reply, wait_reply
from xintu.llm import LlmConfig, LlmPool, llm_config_from
from xintu.store import Lru, ResultWrite
from xintu.testing.fakellm import Behaviour, FakeLlm

from .fakes import FakePool, MemoryStore, fake_category

KEY = "sk-hedge-key"
#: How long the local pool takes to answer one photo.
LOCAL_S = 0.3
#: hedge_after_s in these tests: with no call history yet, the budget.
HEDGE_S = 2.0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def photo(n: int) -> tuple[bytes, str]:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (n * 37 % 256, n * 91 % 256, 80)).save(out, "JPEG")
    data = out.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def config(**llm: Any) -> LlmConfig:
    env = {
        "XINTU_LLM_PROVIDERS": "fake",
        "XINTU_LLM_FAKE_BASE_URL": "http://fake.example/v1",
        "XINTU_LLM_FAKE_API_KEY": KEY,
        "XINTU_LLM_FAKE_MODEL": "fake-vl",
    }
    return llm_config_from({"hedge_after_s": HEDGE_S, "hedge_min_s": 0.5} | llm, env)


def upstream(latency_s: float = 0.0, *, hang: bool = False) -> FakeLlm:
    behaviour = Behaviour(latency_median_ms=latency_s * 1000, api_key=KEY)
    if hang:
        behaviour.error_rate, behaviour.error_mode = 1.0, "hang"
    return FakeLlm(behaviour, seed=1)


class LocalModel(FakePool):
    """The local pool: answers after LOCAL_S, by the bytes' hash; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def answer(self, data: bytes, image_hash: str, deadline: float) -> Classification:
        self.calls += 1
        await trio.sleep(LOCAL_S)
        return Classification(
            category=fake_category(data), confidence=0.5, source=Source.LOCAL, model="local"
        )


@dataclasses.dataclass
class Service:
    dispatcher: Dispatcher
    chain: Chain
    pool: LlmPool
    local: LocalModel
    writer: Writer
    cache: Cache
    store: MemoryStore
    replaced: trio.Event


@asynccontextmanager
async def service(fake: FakeLlm, **llm: Any) -> AsyncIterator[Service]:
    """Dispatcher, running chain (LLM pool, local pool), cache and writer, wired as
    the runtime wires them (``on_late``: the LLM's answer replaces the cached local
    one in the LRU and the store, as ``Runtime._recheck_done`` does)."""
    store = MemoryStore()
    writer = Writer(store, inbox_size=1000, max_batch=50, flush_ms=5)
    cache = Cache(store, Lru(1000), writer)
    replaced = trio.Event()

    async def late(image_hash: str, classification: Classification) -> None:
        old = cache.lru.get(image_hash)
        if old is not None:
            cache.remember(dataclasses.replace(old, classification=classification))
        await writer.put(ResultWrite(image_hash, classification, None))
        replaced.set()

    pool = LlmPool(config(**llm), transport=httpx.ASGITransport(app=fake), rng=random.Random(7))
    local = LocalModel()
    chain = Chain(local, llm=pool, on_late=late)
    dispatcher = Dispatcher(
        cache=cache,
        writer=writer,
        chain=chain,
        inbox_size=64,
        max_in_flight=64,
        flight_grace_s=10.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as inner:
            await inner.start(pool.run)
            await inner.start(chain.run)
            await inner.start(dispatcher.run)
            yield Service(dispatcher, chain, pool, local, writer, cache, store, replaced)
            dispatcher.close()
            chain.close()
            pool.close()
        writer.close()


async def ask(dispatcher: Dispatcher, data: bytes, within_s: float = 10.0) -> Answer:
    deadline = trio.current_time() + within_s
    send, receive = open_reply(Answer)
    dispatcher.submit(
        Envelope(ClassifyRequest(data, hashlib.sha256(data).hexdigest(), "r"), deadline, send)
    )
    return await wait_reply(receive, deadline)


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


async def test_no_hedge_when_the_local_pool_could_not_answer_in_time(
    clock: trio.testing.MockClock,
) -> None:
    """A hedge is extra work: it is not started when the local pool would not take
    it; the caller waits for the LLM as without hedging."""
    fake = upstream(4.0)
    data, _ = photo(4)
    with trio.fail_after(60):
        async with service(fake) as s:
            s.local.takes = False
            answer = await ask(s.dispatcher, data)
            stats = s.chain.statistics()
    assert answer.classification.source is Source.LLM
    assert stats == ChainStatistics({}, 0, hedges_skipped=1)
    assert s.local.calls == 0


async def test_a_hedge_starts_once_the_local_pool_has_room(
    clock: trio.testing.MockClock,
) -> None:
    """No room at the budget (2 s); room at 2.6 s: the hedge starts at the next
    look (every 0.25 s: 2.75 s) and answers 0.3 s later, before the hung call ends."""
    fake = upstream(hang=True)
    data, _ = photo(6)
    with trio.fail_after(60):
        async with service(fake) as s:
            s.local.takes = False
            start = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def room_at_2_6_s() -> None:
                    await trio.sleep(2.6)
                    s.local.takes = True

                nursery.start_soon(room_at_2_6_s)
                answer = await ask(s.dispatcher, data)
            took = trio.current_time() - start
            stats = s.chain.statistics()
    assert answer.classification.source is Source.LOCAL
    assert took == pytest.approx(HEDGE_S + 3 * 0.25 + LOCAL_S)
    assert stats == ChainStatistics({}, 0, hedges_started=1, hedges_local_won=1, hedges_skipped=1)


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
    0.1, 0.2, ..., 2.0 s: the 19th, 1.9 s), clamped to [hedge_min_s, hedge_after_s]."""
    fake = upstream()
    with trio.fail_after(600):
        async with service(fake, hedge_after_s=3.0) as s:
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
