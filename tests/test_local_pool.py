"""The local pool's batching: queued jobs gathered into full batches, no idle waits.

The model is :class:`tests.fakes.FakeModel` (it records every batch size). The pool
runs ``prepare`` and ``infer`` in real threads, so these tests use Trio's real clock:
no test sleeps, and only the one about ``max_wait_ms`` waits for it (50 ms).
"""

from __future__ import annotations

import hashlib
import threading

import outcome
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xintu import Classification
from xintu.actors import ClassifyRequest, LocalPool

from .fakes import FakeDecoded, FakeModel, fake_category

#: Longer than any test may take: a batch that waited for it would time the test out.
FOREVER_MS = 600_000


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_pool(model: FakeModel, *, max_batch: int, max_wait_ms: int, threads: int = 2) -> LocalPool:
    return LocalPool(
        model,
        inbox_size=64,
        decode_threads=threads,
        inference_threads=threads,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
    )


async def classify_all(
    pool: LocalPool, images: list[bytes]
) -> dict[bytes, outcome.Outcome[Classification]]:
    """Queue every image before the pool starts, then run the pool until all are answered."""
    results: dict[bytes, outcome.Outcome[Classification]] = {}

    async def one(data: bytes) -> None:
        request = ClassifyRequest(data, h(data), "r")
        results[data] = await outcome.acapture(pool.classify, request, trio.current_time() + 60)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as callers:
                for data in images:
                    callers.start_soon(one, data)
                await trio.testing.wait_all_tasks_blocked()  # all queued in the inbox
                await nursery.start(pool.run)
            pool.close()
    return results


@pytest.mark.parametrize(
    ("max_batch", "batches"),
    [(8, [8, 8, 8]), (5, [5, 5, 5, 5, 4]), (1, [1] * 24)],
)
async def test_queued_jobs_are_gathered_into_full_batches(
    max_batch: int, batches: list[int]
) -> None:
    """24 queued jobs make ceil(24 / max_batch) session runs, not 24 runs of one:
    one runner gathers at a time, so two runners do not split the backlog."""
    model = FakeModel()
    pool = make_pool(model, max_batch=max_batch, max_wait_ms=FOREVER_MS)
    images = [f"q{i}".encode() for i in range(24)]
    results = await classify_all(pool, images)
    assert model.batches == batches
    assert all(results[d].unwrap().category == fake_category(d) for d in images)
    stats = pool.statistics()
    assert (stats.batches, stats.completed, stats.failed) == (len(batches), 24, 0)
    assert stats.mean_batch_size == 24 / len(batches)


async def test_a_lone_job_is_not_held_for_max_wait() -> None:
    """With nothing else queued or being prepared, the batch of one runs at once."""
    model = FakeModel()
    pool = make_pool(model, max_batch=8, max_wait_ms=FOREVER_MS)
    results = await classify_all(pool, [b"alone"])
    assert results[b"alone"].unwrap().category == fake_category(b"alone")
    assert model.batches == [1]


class SlowModel(FakeModel):
    """``prepare(b"slow...")`` blocks until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def prepare(self, data: bytes) -> FakeDecoded:
        if data.startswith(b"slow") and not self.release.wait(10):
            raise AssertionError("never released")
        return super().prepare(data)


async def test_a_batch_waits_at_most_max_wait_for_an_image_still_being_prepared() -> None:
    model = SlowModel()
    pool = make_pool(model, max_batch=8, max_wait_ms=50)
    answers: dict[bytes, Classification] = {}

    async def one(data: bytes) -> None:
        answers[data] = await pool.classify(ClassifyRequest(data, h(data), "r"), 60.0)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            nursery.start_soon(one, b"slow")
            await trio.testing.wait_all_tasks_blocked()  # "slow" is being prepared
            await one(b"fast")  # answered although "slow" is still on the way
            assert model.batches == [1]
            assert b"slow" not in answers
            model.release.set()
            while b"slow" not in answers:
                await trio.testing.wait_all_tasks_blocked(cushion=0.001)
            pool.close()
    assert model.batches == [1, 1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_batch=st.integers(1, 9),
    threads=st.integers(1, 3),
    kinds=st.lists(st.booleans(), min_size=1, max_size=30),
)
async def test_every_job_answered_once_in_bounded_batches(
    max_batch: int, threads: int, kinds: list[bool]
) -> None:
    """Whatever the sizes and failures: each job gets its answer, batches stay within
    ``max_batch``, and with nothing failing the batches are as full as they can be."""
    model = FakeModel()
    pool = make_pool(model, max_batch=max_batch, max_wait_ms=FOREVER_MS, threads=threads)
    images = [(b"bad" if bad else b"ok") + bytes([i]) for i, bad in enumerate(kinds)]
    results = await classify_all(pool, images)
    good = [d for d in images if not d.startswith(b"bad")]
    assert sorted(results) == sorted(images)
    assert all(isinstance(results[d], outcome.Error) for d in images if d.startswith(b"bad"))
    assert all(results[d].unwrap().category == fake_category(d) for d in good)
    assert sum(model.batches) == len(good)
    assert all(1 <= b <= max_batch for b in model.batches)
    if len(good) == len(images):
        assert len(model.batches) == -(-len(images) // max_batch)
