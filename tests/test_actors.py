"""The actors on their own: singleflight, admission bounds, writer exactness, batching.

Time-based behaviour runs on Trio's ``autojump_clock``; the store is the in-memory
fake (no threads, so the clock can jump), the classifier chain a Trio-native pool
whose calls are counted.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import outcome
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xintu import Category, Classification, Source
from xintu.actors import (
    Answer,
    Cache,
    Chain,
    ClassifyRequest,
    Dispatcher,
    Envelope,
    LocalPool,
    Writer,
)
from xintu.actors._chain import ChainStatistics
from xintu.actors._envelope import open_reply, wait_reply
from xintu.actors._supervisor import CrashRecord
from xintu.errors import BadImage, ClassifierError, DeadlineExceeded, Draining, Overloaded
from xintu.llm import LlmError, LlmUnavailable, UpstreamTimeout
from xintu.llm._errors import CallAbandoned
from xintu.store import CachedEntry, HitIncrement, Lru, ResultWrite

from .fakes import FakeDecoded, FakeModel, FakePool, MemoryStore, fake_category

PROPERTY = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def answer_for(data: bytes) -> Classification:
    return Classification(
        category=list(Category)[data[0] % 8] if data else Category.OTHER,
        confidence=0.9,
        source=Source.LOCAL,
        model="counted",
    )


class CountingClassifier(FakePool):
    """Trio-native pool: counts calls per hash; waits on ``gate`` if given."""

    def __init__(self, gate: trio.Event | None = None) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.gate = gate

    async def answer(self, data: bytes, image_hash: str, deadline: float) -> Classification:
        self.calls[image_hash] += 1
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(0.01)
        return answer_for(data)


@asynccontextmanager
async def system(
    classify: FakePool,
    *,
    inbox_size: int = 64,
    max_in_flight: int = 64,
    store: MemoryStore | None = None,
) -> AsyncIterator[tuple[Dispatcher, Writer, Cache, MemoryStore]]:
    store = store or MemoryStore()
    writer = Writer(store, inbox_size=1000, max_batch=50, flush_ms=5)
    cache = Cache(store, Lru(1000), writer)
    dispatcher = Dispatcher(
        cache=cache,
        writer=writer,
        chain=Chain(classify),
        inbox_size=inbox_size,
        max_in_flight=max_in_flight,
        flight_grace_s=10.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as inner:
            await inner.start(dispatcher.run)
            yield dispatcher, writer, cache, store
            dispatcher.close()
        writer.close()


async def ask(dispatcher: Dispatcher, data: bytes, deadline: float) -> Answer:
    send, receive = open_reply(Answer)
    dispatcher.submit(Envelope(ClassifyRequest(data, h(data), "r"), deadline, send))
    return await wait_reply(receive, deadline)


@PROPERTY
@given(st.lists(st.sampled_from([b"a", b"b", b"c", b"d"]), min_size=1, max_size=40))
async def test_singleflight_one_call_per_new_image(images: list[bytes]) -> None:
    gate = trio.Event()
    classifier = CountingClassifier(gate)
    answers: dict[int, Answer] = {}
    with trio.fail_after(10):
        async with system(classifier) as (dispatcher, writer, _, store):
            deadline = trio.current_time() + 60

            async def one(i: int, data: bytes) -> None:
                answers[i] = await ask(dispatcher, data, deadline)

            async with trio.open_nursery() as nursery:
                for i, data in enumerate(images):
                    nursery.start_soon(one, i, data)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            await writer.wait_idle()
    assert classifier.calls == Counter({h(d): 1 for d in set(images)})
    for i, data in enumerate(images):
        assert answers[i].classification == answer_for(data)
        assert answers[i].from_cache is False
    assert set(store.rows) == {h(d) for d in set(images)}


@PROPERTY
@given(
    inbox=st.integers(1, 8),
    in_flight=st.integers(1, 4),
    burst=st.integers(1, 40),
)
async def test_admission_is_bounded_and_every_admitted_request_answered_once(
    inbox: int, in_flight: int, burst: int
) -> None:
    gate = trio.Event()
    classifier = CountingClassifier(gate)
    outcomes: list[outcome.Outcome[Answer]] = []
    retry_afters: list[float] = []
    refused = 0
    with trio.fail_after(10):
        async with system(classifier, inbox_size=inbox, max_in_flight=in_flight) as (
            dispatcher,
            *_,
        ):
            receivers = []
            deadline = trio.current_time() + 60
            for i in range(burst):
                data = f"img-{i}".encode()
                send, receive = open_reply(Answer)
                try:
                    dispatcher.submit(Envelope(ClassifyRequest(data, h(data), "r"), deadline, send))
                except Overloaded as exc:
                    refused += 1
                    retry_afters.append(exc.retry_after_s)
                    continue
                receivers.append(receive)
                stats = dispatcher.statistics()
                assert stats.queued <= inbox
                assert stats.in_flight <= in_flight
            # Nothing was waited for above: admission never blocks. The dispatcher,
            # parked in receive(), takes the first envelope straight off the channel.
            assert min(burst, inbox) <= len(receivers) <= min(burst, inbox + 1)
            await trio.testing.wait_all_tasks_blocked()
            assert dispatcher.statistics().in_flight <= in_flight
            gate.set()
            for receive in receivers:
                with receive:
                    outcomes.append(await receive.receive())
                    with pytest.raises(trio.EndOfChannel):
                        await receive.receive()  # exactly one answer
    assert refused == burst - len(receivers)
    assert all(r >= 1 for r in retry_afters)
    admitted = len(outcomes)
    ok = [o for o in outcomes if isinstance(o, outcome.Value)]
    over = [o for o in outcomes if isinstance(o, outcome.Error)]
    assert len(ok) + len(over) == admitted
    for o in over:
        assert isinstance(o.error, Overloaded)  # in-flight table full: refused, not lost
    assert sum(classifier.calls.values()) == len(ok)


async def test_deadline_gives_504_and_the_work_is_still_cached(autojump_clock: object) -> None:
    gate = trio.Event()
    classifier = CountingClassifier(gate)
    async with system(classifier) as (dispatcher, writer, _, store):
        with pytest.raises(DeadlineExceeded):
            await ask(dispatcher, b"slow", trio.current_time() + 1.0)
        gate.set()
        await trio.sleep(1)
        await writer.wait_idle()
        answer = await ask(dispatcher, b"slow", trio.current_time() + 1.0)
    assert answer.from_cache is True
    assert classifier.calls[h(b"slow")] == 1
    assert h(b"slow") in store.rows


async def test_cancelled_caller_does_not_cancel_shared_work(autojump_clock: object) -> None:
    gate = trio.Event()
    classifier = CountingClassifier(gate)
    async with system(classifier) as (dispatcher, writer, _, store):
        deadline = trio.current_time() + 30
        with trio.move_on_after(0.5):
            await ask(dispatcher, b"shared", deadline)  # the "client" leaves
        survivor: list[Answer] = []

        async def stay() -> None:
            survivor.append(await ask(dispatcher, b"shared", deadline))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stay)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        await writer.wait_idle()
    assert survivor[0].classification == answer_for(b"shared")
    assert classifier.calls[h(b"shared")] == 1
    assert h(b"shared") in store.rows


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["hit", "flush"]), st.integers(0, 3)), max_size=30))
async def test_hit_count_equals_hits_served(steps: list[tuple[str, int]]) -> None:
    store = MemoryStore()
    images = [f"photo-{i}".encode() for i in range(4)]
    served: Counter[str] = Counter()
    with trio.fail_after(10):
        async with system(CountingClassifier(), store=store) as (dispatcher, writer, *_):
            deadline = trio.current_time() + 60
            for data in images:
                await ask(dispatcher, data, deadline)  # misses: classified, not hits
            for action, i in steps:
                if action == "flush":
                    await writer.wait_idle()
                    continue
                answer = await ask(dispatcher, images[i], deadline)
                if answer.from_cache:
                    served[h(images[i])] += 1
            await writer.wait_idle()
    for data in images:
        assert store.rows[h(data)].hit_count == served[h(data)]


async def test_writer_retry_after_ambiguous_commit_counts_once(autojump_clock: object) -> None:
    store = MemoryStore()
    data = b"x"
    now = datetime.now(UTC)
    writer = Writer(store, inbox_size=100, max_batch=100, flush_ms=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.put(ResultWrite(h(data), answer_for(data), 1))
        await writer.wait_idle()
        store.ambiguous_applies = 1  # commit happens, then the connection "breaks"
        store.fail_applies = 0
        for _ in range(5):
            writer.offer(HitIncrement(h(data), 1, now))
        await writer.wait_idle()
        store.fail_applies = 3  # store down for three tries
        writer.offer(HitIncrement(h(data), 2, now))
        await writer.wait_idle()
        writer.close()
    assert store.rows[h(data)].hit_count == 7
    stats = writer.statistics()
    assert stats.retries == 4
    assert stats.batches_duplicate == 1
    assert stats.store_healthy is True


async def test_writer_holds_writes_while_store_down(autojump_clock: object) -> None:
    store = MemoryStore()
    store.down = True
    writer = Writer(store, inbox_size=100, max_batch=10, flush_ms=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(25):
            await writer.put(ResultWrite(h(bytes([i])), answer_for(bytes([i])), 1))
        await trio.sleep(30)
        assert not writer.statistics().store_healthy
        assert store.rows == {}
        store.down = False
        await writer.wait_idle()
        writer.close()
    assert len(store.rows) == 25


async def test_local_pool_batches_and_answers_every_job() -> None:
    model = FakeModel()
    pool = LocalPool(
        model, inbox_size=32, decode_threads=2, inference_threads=1, max_batch=4, max_wait_ms=50
    )
    images = [f"p{i}".encode() for i in range(10)] + [b"bad-1"]
    results: dict[bytes, outcome.Outcome[Classification]] = {}

    async def one(data: bytes) -> None:
        request = ClassifyRequest(data, h(data), "r")
        results[data] = await outcome.acapture(pool.classify, request, trio.current_time() + 60)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            async with trio.open_nursery() as callers:
                for data in images:
                    callers.start_soon(one, data)
            pool.close()
    assert isinstance(results[b"bad-1"], outcome.Error)
    assert all(isinstance(results[d], outcome.Value) for d in images[:-1])
    assert sum(model.batches) == 10
    assert max(model.batches) <= 4
    stats = pool.statistics()
    assert stats.completed == 10
    assert stats.failed == 1


class GatedModel(FakeModel):
    """Records the order of preparations; the first one waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[bytes] = []
        self.release = threading.Event()

    def prepare(self, data: bytes) -> FakeDecoded:
        with self._lock:
            self.order.append(data)
            first = len(self.order) == 1
        if first and not self.release.wait(10):
            raise AssertionError("never released")
        return super().prepare(data)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await trio.sleep(0.005)
    raise AssertionError("condition never met")


async def test_the_priority_lane_goes_ahead_of_the_queue() -> None:
    """An LLM fallback (classify_now) waits for the preparation in progress, not for
    the queue; every queued job is still answered."""
    model = GatedModel()
    pool = LocalPool(
        model, inbox_size=32, decode_threads=1, inference_threads=1, max_batch=4, max_wait_ms=1
    )
    queued = [f"q{i}".encode() for i in range(6)]
    answers: list[outcome.Outcome[Classification]] = []

    async def queue_job(data: bytes) -> None:
        request = ClassifyRequest(data, h(data), "r")
        answers.append(await outcome.acapture(pool.classify, request, trio.current_time() + 60))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            for data in queued:
                nursery.start_soon(queue_job, data)
                await trio.testing.wait_all_tasks_blocked()  # queued, in this order
            # The decode worker has taken the first job and holds the one thread.
            await _until(lambda: model.order == [b"q0"])
            urgent_answer: list[Classification] = []

            async def urgent_job() -> None:
                request = ClassifyRequest(b"urgent", h(b"urgent"), "r")
                urgent_answer.append(await pool.classify_now(request))

            nursery.start_soon(urgent_job)
            # The priority lane waits for the thread, ahead of the worker's next job.
            await _until(lambda: pool._decode_limiter.statistics().tasks_waiting == 1)
            model.release.set()
            await _until(lambda: len(answers) == len(queued) and bool(urgent_answer))
            urgent = urgent_answer[0]
            pool.close()
    assert urgent.category == fake_category(b"urgent")
    assert model.order[:2] == [b"q0", b"urgent"]  # right after the one in progress
    assert all(isinstance(a, outcome.Value) for a in answers)
    stats = pool.statistics()
    assert (stats.completed, stats.urgent) == (7, 1)


async def test_the_priority_lane_raises_the_images_own_error() -> None:
    pool = LocalPool(
        FakeModel(), inbox_size=4, decode_threads=1, inference_threads=1, max_batch=4, max_wait_ms=1
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with pytest.raises(ClassifierError, match="not running"):
                await pool.classify_now(ClassifyRequest(b"x", h(b"x"), "r"))
            await nursery.start(pool.run)
            with pytest.raises(BadImage):
                await pool.classify_now(ClassifyRequest(b"bad-urgent", h(b"bad-urgent"), "r"))
            pool.close()
            with pytest.raises(Draining):
                await pool.classify_now(ClassifyRequest(b"late", h(b"late"), "r"))


async def test_supervisor_restarts_a_crashing_worker(autojump_clock: object) -> None:
    crashes = CrashRecord(max_recent=3, window_s=60)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            raise RuntimeError("boom")

    await crashes.supervise("flaky", flaky)
    assert runs == 5
    assert crashes.crashes_total == 4
    assert crashes.healthy is False  # 4 crashes within the window
    await trio.sleep(61)
    assert crashes.healthy is True


# --- the classifier chain ----------------------------------------------------------


class FakeLlm(FakePool):
    """The chain's primary: answers from the LLM, or raises ``error``."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.error = error
        self.enabled = True
        self.is_healthy = True
        self.offered: list[str] = []
        self.hedge_s: float | None = None
        self.admit_by: list[float | None] = []

    async def classify(  # type: ignore[override]
        self, request: ClassifyRequest, deadline: float, *, admit_by: float | None = None
    ) -> Classification:
        self.admit_by.append(admit_by)
        return await super().classify(request, deadline)

    def would_take(  # type: ignore[override]
        self, deadline: float, *, admit_by: float | None = None
    ) -> bool:
        self.admit_by.append(admit_by)
        return super().would_take(deadline)

    def hedge_after_s(self) -> float | None:
        return self.hedge_s

    async def answer(self, data: bytes, image_hash: str, deadline: float) -> Classification:
        await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return Classification(category=Category.PETS, confidence=0.8, source=Source.LLM, model="m")

    def healthy(self) -> bool:
        return self.is_healthy

    def offer_recheck(self, data: bytes, image_hash: str) -> bool:
        self.offered.append(image_hash)
        return True


class LaneRecorder(CountingClassifier):
    """The chain's local pool: records which way each request came in."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: list[str] = []

    async def classify(self, request: ClassifyRequest, deadline: float) -> Classification:
        self.lanes.append("inbox")
        return await super().classify(request, deadline)

    async def classify_now(self, request: ClassifyRequest) -> Classification:
        self.lanes.append("priority")
        return await super().classify_now(request)


def queued_failure() -> LlmError:
    exc = UpstreamTimeout("llm", "no LLM answer before the deadline")
    exc.queued = True
    return exc


def abandoned() -> LlmError:
    exc = CallAbandoned("llm", "no LLM answer before the deadline")
    exc.queued = True
    return exc


@pytest.mark.parametrize(
    ("error", "reason", "lane"),
    [
        (None, None, None),
        (LlmUnavailable("breakers open", reason="breaker_open"), "breaker_open", "inbox"),
        (LlmUnavailable("full", reason="inbox_full"), "inbox_full", "inbox"),
        (queued_failure(), "llm_failed", "priority"),
        (abandoned(), "deadline", "priority"),  # cut short by the caller's deadline
    ],
)
async def test_the_chain_falls_from_the_llm_to_the_local_pool(
    autojump_clock: object, error: LlmError | None, reason: str | None, lane: str | None
) -> None:
    """Any LLM failure or refusal falls to local, counted by reason; work the LLM had
    queued goes through the local pool's priority lane, a refusal through its inbox."""
    llm, local = FakeLlm(error), LaneRecorder()
    chain = Chain(local, llm=llm)
    request = ClassifyRequest(b"\x01photo", h(b"\x01photo"), "r")
    with trio.fail_after(10):
        result = await chain.classify(request, trio.current_time() + 10)
    if reason is None:
        assert result.source is Source.LLM
        assert local.lanes == []
        assert chain.statistics().fallbacks == {}
    else:
        assert result == answer_for(b"\x01photo")
        assert local.lanes == [lane]
        assert chain.statistics().fallbacks == {reason: 1}


async def test_a_disabled_llm_is_no_fallback(autojump_clock: object) -> None:
    llm, local = FakeLlm(), LaneRecorder()
    llm.enabled = False
    chain = Chain(local, llm=llm)
    request = ClassifyRequest(b"\x02photo", h(b"\x02photo"), "r")
    with trio.fail_after(10):
        await chain.classify(request, trio.current_time() + 10)
    assert local.lanes == ["inbox"]
    assert chain.statistics().fallbacks == {}


async def test_the_chain_sheds_work_the_local_pool_cannot_answer_in_time(
    autojump_clock: object,
) -> None:
    local = LaneRecorder()
    local.wait_s = 5.0
    chain = Chain(local, llm=FakeLlm(LlmUnavailable("off", reason="breaker_open")))
    request = ClassifyRequest(b"\x03photo", h(b"\x03photo"), "r")
    with pytest.raises(Overloaded) as info:
        await chain.classify(request, trio.current_time() + 1.0)
    assert str(info.value) == "the local classifier cannot answer before the deadline"
    assert info.value.retry_after_s == 5.0
    assert local.lanes == []
    assert chain.statistics() == ChainStatistics({"breaker_open": 1}, shed_for_deadline=1)


async def test_admission_aims_at_the_latency_target(autojump_clock: object) -> None:
    """Both pools are asked about the target (3 s from now), not the 10 s deadline,
    and never about more than the deadline; local work expected in 4 s is refused at
    once although the deadline would allow it."""
    llm, local = FakeLlm(LlmUnavailable("off", reason="breaker_open")), LaneRecorder()
    llm.takes = local.takes = False
    chain = Chain(local, llm=llm, latency_target_s=3.0)
    now = trio.current_time()
    assert chain.refusal(now + 10) is not None
    assert chain.refusal(now + 2) is not None
    assert local.asked == [now + 3, now + 2]
    assert llm.admit_by == [now + 3, now + 2]
    local.wait_s = 4.0
    request = ClassifyRequest(b"\x05photo", h(b"\x05photo"), "r")
    with pytest.raises(Overloaded) as info:
        await chain.classify(request, now + 10)
    assert str(info.value) == "the local classifier cannot answer before the deadline"
    assert local.lanes == []
    local.wait_s = 2.5
    assert (await chain.classify(request, now + 10)).source is Source.LOCAL
    assert chain.statistics().shed_for_deadline == 3


def test_the_chain_refuses_what_no_classifier_would_take() -> None:
    llm, local = FakeLlm(), LaneRecorder()
    llm.takes, local.takes, local.wait_s = False, False, 2.5
    chain = Chain(local, llm=llm)
    refusal = chain.refusal(10.0)
    assert isinstance(refusal, Overloaded)
    assert str(refusal) == "no classifier can answer before the deadline"
    assert refusal.retry_after_s == 2.5
    llm.takes = True
    assert chain.refusal(10.0) is None  # the LLM would take it
    llm.takes, local.takes = False, True
    assert chain.refusal(10.0) is None  # the local pool would
    assert chain.statistics().shed_for_deadline == 1


@pytest.mark.parametrize(
    ("error", "healthy", "draining", "upgraded"),
    [
        (LlmUnavailable("no time", reason="no_time"), True, False, True),
        (LlmUnavailable("queue", reason="queue_too_long"), True, False, True),
        (abandoned(), True, False, True),
        (LlmUnavailable("no time", reason="no_time"), False, False, False),  # LLM down
        (LlmUnavailable("no time", reason="no_time"), True, True, False),  # draining
        (LlmUnavailable("breakers open", reason="breaker_open"), True, False, False),
        (LlmUnavailable("full", reason="inbox_full"), True, False, False),
        (queued_failure(), True, False, False),  # the LLM failed: not for lack of time
    ],
)
async def test_a_rushed_local_answer_is_queued_for_an_llm_upgrade(
    autojump_clock: object, error: LlmError, healthy: bool, draining: bool, upgraded: bool
) -> None:
    """A local answer made only because the caller's deadline left the LLM no room,
    while the LLM is healthy, is offered for re-classification at once."""
    llm, local = FakeLlm(error), LaneRecorder()
    llm.is_healthy = healthy
    chain = Chain(local, llm=llm)
    if draining:
        chain.begin_drain()
    request = ClassifyRequest(b"\x04photo", h(b"\x04photo"), "r")
    with trio.fail_after(10):
        result = await chain.classify(request, trio.current_time() + 10)
    assert result == answer_for(b"\x04photo")
    assert llm.offered == ([h(b"\x04photo")] if upgraded else [])
    assert chain.statistics().upgrades_queued == (1 if upgraded else 0)


def test_a_hit_on_a_local_answer_queues_a_recheck_while_the_llm_is_healthy() -> None:
    llm = FakeLlm()
    chain = Chain(LaneRecorder(), llm=llm)
    now = datetime.now(UTC)
    local_entry = CachedEntry(h(b"l"), answer_for(b"l"), 1, now, None)
    llm_answer = Classification(category=Category.PETS, confidence=1, source=Source.LLM, model="m")
    llm_entry = CachedEntry(h(b"m"), llm_answer, 1, now, None)
    chain.cached_hit(local_entry, b"l")
    chain.cached_hit(llm_entry, b"m")  # already the LLM's answer
    chain.cached_hit(local_entry, b"")  # no bytes in hand (a check-cache hit)
    llm.is_healthy = False
    chain.cached_hit(local_entry, b"l")
    llm.is_healthy = True
    chain.begin_drain()
    chain.cached_hit(local_entry, b"l")
    assert llm.offered == [h(b"l")]
