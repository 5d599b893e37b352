"""Store read errors in the cache: counted, misses only within a budget, then 503.

A failed store read used to be a silent miss, and a miss is a re-classification
(an LLM call): in a store outage every request became one. The cache now counts
failed reads and lets them turn into misses only within its read error budget;
past it a lookup raises :class:`~xintu.errors.Unavailable` (503 with Retry-After).
"""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

from xintu import Category, Classification, Source
from xintu.actors import (
    Answer,
    Cache,
    Chain,
    ClassifyRequest,
    Dispatcher,
    Envelope,
    Writer,
)
from xintu.actors._cache import ReadErrorBudget
from xintu.actors._envelope import open_reply, wait_reply
from xintu.errors import Unavailable
from xintu.store import Lru

from .fakes import FakePool, MemoryStore


def h(n: int) -> str:
    return hashlib.sha256(f"photo {n}".encode()).hexdigest()


def cache_on(store: MemoryStore, *, budget: int, window_s: float = 60.0) -> Cache:
    writer = Writer(store, inbox_size=100, max_batch=10, flush_ms=5)  # never run: no hits here
    return Cache(store, Lru(100), writer, read_error_budget=budget, read_error_window_s=window_s)


async def test_failed_reads_are_misses_within_the_budget_then_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    store.down = True
    cache = cache_on(store, budget=3, window_s=60.0)
    with trio.fail_after(600):  # virtual time (autojump_clock)
        for n in range(3):
            assert await cache.lookup(h(n)) is None
        with pytest.raises(Unavailable) as refused:
            await cache.lookup(h(3))
        assert str(refused.value) == "the cache cannot be read now; retry later"
        # One miss comes back every 20 s (3 per 60 s).
        assert refused.value.retry_after_s == pytest.approx(20.0)
        stats = cache.statistics()
        assert (stats.store_errors, stats.store_error_misses, stats.store_error_refusals) == (
            4,
            3,
            1,
        )
        assert stats.misses == 3
        await trio.sleep(20.0)
        assert await cache.lookup(h(4)) is None  # refilled by one
        with pytest.raises(Unavailable):
            await cache.lookup(h(5))
        # The store is back: reads work and cost no budget.
        store.down = False
        assert await cache.lookup(h(6)) is None
        assert cache.statistics().store_errors == 6


async def test_a_failed_batch_read_spends_one_miss_per_hash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    store.down = True
    cache = cache_on(store, budget=10)
    with trio.fail_after(600):  # virtual time (autojump_clock)
        assert await cache.lookup_many([h(n) for n in range(6)]) == {}
        with pytest.raises(Unavailable) as refused:
            await cache.lookup_many([h(n) for n in range(6, 11)])  # 5 > the 4 left
        assert refused.value.retry_after_s == pytest.approx(6.0)  # 1 miss per 6 s
        with pytest.raises(Unavailable) as never:
            await cache.lookup_many([h(n) for n in range(20)])  # more than the budget holds
        assert never.value.retry_after_s == 60.0
        stats = cache.statistics()
        assert (stats.store_errors, stats.store_error_misses, stats.store_error_refusals) == (
            3,
            6,
            2,
        )


def test_the_budget_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="need size >= 0 and window_s > 0"):
        ReadErrorBudget(-1, 60.0)
    with pytest.raises(ValueError, match="need size >= 0 and window_s > 0"):
        ReadErrorBudget(1, 0.0)


class Counting(FakePool):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def answer(self, data: bytes, image_hash: str, deadline: float) -> Classification:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        return Classification(Category.OTHER, 0.5, Source.LOCAL, "counting")


async def test_a_store_outage_costs_at_most_the_budget_in_classifications(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Through the dispatcher: new uploads while the store cannot be read are
    classified only within the budget; the rest are answered Unavailable."""
    store = MemoryStore()
    store.down = True
    classifier = Counting()
    writer = Writer(store, inbox_size=1000, max_batch=50, flush_ms=5)
    cache = Cache(store, Lru(1000), writer, read_error_budget=5, read_error_window_s=60.0)
    dispatcher = Dispatcher(
        cache=cache,
        writer=writer,
        chain=Chain(classifier),
        inbox_size=64,
        max_in_flight=64,
        flight_grace_s=10.0,
    )
    answered, refused = 0, []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with trio.open_nursery() as inner:
                await inner.start(dispatcher.run)
                for n in range(12):
                    data = f"upload {n}".encode()
                    send, receive = open_reply(Answer)
                    deadline = trio.current_time() + 10
                    request = ClassifyRequest(data, hashlib.sha256(data).hexdigest(), f"r{n}")
                    dispatcher.submit(Envelope(request, deadline, send))
                    try:
                        await wait_reply(receive, deadline)
                        answered += 1
                    except Unavailable as exc:
                        refused.append(exc)
                dispatcher.close()
            store.down = False  # let the writer flush and stop
            writer.close()
    assert (answered, len(refused), classifier.calls) == (5, 7, 5)
    assert all(exc.retry_after_s >= 1.0 for exc in refused)
