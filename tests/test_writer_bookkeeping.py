"""Exact bookkeeping under load: hit counts exact and request logs complete.

At full batch-check-cache throughput the writer used to drop most hit increments and
log rows (its inbox was full, and ``offer`` dropped). Now hits are folded per image
in a bounded table (they take no inbox slot), and what finds the inbox full goes to
the journal, to be replayed before newer work: nothing is dropped while the process
lives, and a hit never reaches the store before the result it counts.
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xintu import Category, Classification, Source
from xintu.actors import Writer
from xintu.actors._journal import Journal
from xintu.store import HitIncrement, RequestLogRow, ResultWrite, Store, WriteBatch, sqlite_path

from .backends import mysql_execute, open_test_store
from .fakes import MemoryStore

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def h(n: int) -> str:
    return hashlib.sha256(f"image-{n}".encode()).hexdigest()


def result(n: int) -> ResultWrite:
    return ResultWrite(h(n), Classification(Category.PETS, 0.75, Source.LOCAL, "m"), 10, T0)


def hit(n: int, count: int = 1, *, at: datetime = T0) -> HitIncrement:
    return HitIncrement(h(n), count, at)


def log_row(rid: str, n: int = 0) -> RequestLogRow:
    return RequestLogRow(rid, "u", "192.0.2.1", h(n), None, "pets", 0.5, True, "cache", 1.0, T0)


class SlowStore(MemoryStore):
    """Every apply takes *delay_s* (the autojump clock makes it instant)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def apply(self, batch: WriteBatch) -> bool:
        await trio.sleep(self.delay_s)
        return await super().apply(batch)


async def log_count(store: Store, url: str) -> int:
    if url.startswith("sqlite"):
        conn = sqlite3.connect(sqlite_path(url))
        try:
            return int(conn.execute("SELECT COUNT(*) FROM request_log").fetchone()[0])
        finally:
            conn.close()
    rows = await mysql_execute(url, "SELECT COUNT(*) FROM request_log")
    return int(rows[0][0])


# --- the load of the issue: a tiny inbox, a slow store -------------------------------


async def test_a_tiny_inbox_and_a_slow_store_lose_nothing(tmp_path: Path, store_url: str) -> None:
    """10,000 hit increments over 50 images and 2,000 log rows against an inbox of 8,
    offered far faster than the store commits: every hit is counted, every row is
    there, nothing is dropped (the old writer dropped nearly all of them)."""
    async with open_test_store(store_url, tmp_path / "d") as store:
        writer = Writer(
            store,
            inbox_size=8,
            max_batch=16,
            flush_ms=1,
            retry_initial_s=0.001,
            retry_max_s=0.01,
            journal_dir=tmp_path / "journal",
        )
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                for n in range(50):
                    await writer.put(result(n))
                await writer.wait_idle()
                for i in range(10_000):
                    assert writer.offer(hit(i % 50, at=T0 + timedelta(seconds=i)))
                    if i % 5 == 0:
                        assert writer.offer(log_row(f"r{i // 5}", i % 50))
                    if i % 100 == 99:  # the store gets a turn now and then
                        await trio.lowlevel.checkpoint()
                await writer.wait_idle()
                writer.close()
        stats = writer.statistics()
        assert stats.ops_dropped == 0
        assert stats.overflowed_ops > 0  # the inbox was full: the journal took the rest
        assert stats.hits_folded > 0  # 8 images folded (the table's bound is the inbox's)
        assert Journal(tmp_path / "journal").pending() == []
        entries = await store.get_many([h(n) for n in range(50)])
        assert {n: entries[h(n)].hit_count for n in range(50)} == {n: 200 for n in range(50)}
        assert entries[h(49)].last_hit_at == T0 + timedelta(seconds=9_999)
        assert await log_count(store, store_url) == 2_000


async def test_a_slow_store_at_full_rate_loses_nothing(tmp_path: Path) -> None:
    """The same on the memory store, each commit taking 2 ms (the journal's threads
    need the real clock): the writer is far behind for the whole run and catches up
    once the offers stop."""
    store = SlowStore(0.002)
    for n in range(50):
        store._apply(WriteBatch(f"seed-{n}", results=(result(n),)))
    writer = Writer(store, inbox_size=8, max_batch=16, flush_ms=1, journal_dir=tmp_path / "j")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(10_000):
                assert writer.offer(hit(i % 50))
                if i % 5 == 0:
                    assert writer.offer(log_row(f"r{i // 5}", i % 50))
                if i % 200 == 199:
                    await trio.lowlevel.checkpoint()
            assert writer.statistics().overflowed_ops > 0
            await writer.wait_idle()
            writer.close()
    assert writer.statistics().ops_dropped == 0
    assert {store.rows[h(n)].hit_count for n in range(50)} == {200}
    assert len(store.logs) == 2_000


# --- the fold table --------------------------------------------------------------------


async def test_hits_are_folded_and_take_no_inbox_slot(autojump_clock: trio.abc.Clock) -> None:
    """Without a journal too: 1,000 hits on one image against an inbox of 1 are one
    increment of 1,000 in one batch."""
    store = MemoryStore()
    store._apply(WriteBatch("seed", results=(result(0),)))
    writer = Writer(store, inbox_size=1, max_batch=10, flush_ms=5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            calls = store.apply_calls
            for i in range(1_000):
                assert writer.offer(hit(0, at=T0 + timedelta(seconds=i)))
            during = writer.statistics()
            assert (during.queued, during.hit_hashes, during.hits_folded) == (0, 1, 1_000)
            await writer.wait_idle()
            writer.close()
    stats = writer.statistics()
    assert (stats.ops_dropped, stats.ops_applied) == (0, 1_000)
    assert store.apply_calls - calls == 1
    assert store.rows[h(0)].hit_count == 1_000
    assert store.rows[h(0)].last_hit_at == T0 + timedelta(seconds=999)


async def test_past_the_tables_bound_a_hit_is_an_ordinary_operation(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    for n in range(5):
        store._apply(WriteBatch(f"seed-{n}", results=(result(n),)))
    writer = Writer(store, inbox_size=100, max_batch=100, flush_ms=5, max_hit_hashes=2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for _ in range(3):
                for n in range(5):
                    writer.offer(hit(n))
            during = writer.statistics()
            assert (during.hit_hashes, during.max_hit_hashes) == (2, 2)
            assert during.queued == 9  # images 2, 3, 4: three hits each, queued
            await writer.wait_idle()
            writer.close()
    assert [store.rows[h(n)].hit_count for n in range(5)] == [3] * 5


async def test_a_hit_never_reaches_the_store_before_its_result(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The result of a new image is still queued behind older operations when its
    hits come in: the hits wait (sealed) until the result is in a batch, since the
    store ignores an increment for an image it does not have."""
    store = MemoryStore()
    writer = Writer(store, inbox_size=10, max_batch=2, flush_ms=0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(5):
                writer.offer(log_row(f"r{i}"))
            await writer.put(result(7))
            for _ in range(4):
                writer.offer(hit(7))
            await writer.wait_idle()
            writer.close()
    assert store.rows[h(7)].hit_count == 4
    assert writer.statistics().ops_applied == 10


async def test_an_offer_after_the_writer_stopped_is_counted_as_dropped(tmp_path: Path) -> None:
    writer = Writer(MemoryStore(), inbox_size=4, max_batch=4, flush_ms=0, journal_dir=tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            writer.close()
    assert writer.offer(log_row("late")) is False
    assert writer.offer(hit(0)) is False
    assert writer.statistics().ops_dropped == 2


async def test_at_shutdown_the_fold_table_is_journaled_with_the_rest(tmp_path: Path) -> None:
    """The store is down at close: the batch in hand, the queue and the folded hits
    all reach the journal, and a later start replays them exactly once."""
    journal = tmp_path / "journal"
    store = MemoryStore()
    for n in range(3):
        store._apply(WriteBatch(f"seed-{n}", results=(result(n),)))
    store.down = True
    writer = Writer(
        store,
        inbox_size=4,
        max_batch=2,
        flush_ms=1,
        retry_initial_s=0.001,
        retry_max_s=0.01,
        journal_dir=journal,
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(30):
                writer.offer(hit(i % 3))
                writer.offer(log_row(f"r{i}"))
                await trio.lowlevel.checkpoint()
            writer.close()
    stats = writer.statistics()
    assert stats.ops_dropped == 0
    assert stats.journaled_ops == 60
    assert all(store.rows[h(n)].hit_count == 0 for n in range(3))
    store.down = False
    replayer = Writer(store, inbox_size=4, max_batch=2, flush_ms=1, journal_dir=journal)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(replayer.run)
            await replayer.wait_idle()
            replayer.close()
    assert [store.rows[h(n)].hit_count for n in range(3)] == [10, 10, 10]
    assert sorted(store.logs) == sorted(f"r{i}" for i in range(30))
    assert Journal(journal).pending() == []


# --- property: any interleaving of offers, failures and flushes ------------------------

IMAGES = 6  # 0..2 seeded; 3..5 get their result during the run

_action = st.one_of(
    st.tuples(st.just("hit"), st.integers(0, IMAGES - 1), st.integers(1, 3)),
    st.tuples(st.just("log"), st.just(0), st.just(0)),
    st.tuples(st.just("result"), st.integers(3, IMAGES - 1), st.just(0)),
    st.tuples(st.just("fail"), st.integers(1, 3), st.just(0)),
    st.tuples(st.just("ambiguous"), st.integers(1, 2), st.just(0)),
    st.tuples(st.just("down"), st.just(0), st.just(0)),
    st.tuples(st.just("up"), st.just(0), st.just(0)),
    st.tuples(st.just("run"), st.integers(1, 5), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=st.lists(_action, max_size=60),
    inbox=st.integers(1, 6),
    max_batch=st.integers(1, 4),
    max_hashes=st.integers(1, 4),
)
async def test_hit_counts_are_exact_for_any_interleaving(
    actions: list[tuple[str, int, int]], inbox: int, max_batch: int, max_hashes: int
) -> None:
    """Offers, store failures (before and after the commit), outages and flushes in
    any order: once the store is back and the writer idle, every image's hit count
    is exactly what was offered for it (after its result), every log row is there
    and nothing was dropped or left in the journal."""
    store = MemoryStore()
    for n in range(3):
        store._apply(WriteBatch(f"seed-{n}", results=(result(n),)))
    expected: Counter[int] = Counter()
    known = {0, 1, 2}
    logs = 0
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "journal"
        writer = Writer(
            store,
            inbox_size=inbox,
            max_batch=max_batch,
            flush_ms=1,
            retry_initial_s=0.001,
            retry_max_s=0.004,
            journal_dir=journal,
            max_hit_hashes=max_hashes,
        )
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                for kind, a, b in actions:
                    if kind == "hit" and a in known:  # a cache hit needs a result first
                        assert writer.offer(hit(a, b))
                        expected[a] += b
                    elif kind == "log":
                        assert writer.offer(log_row(f"r{logs}"))
                        logs += 1
                    elif kind == "result" and a not in known:
                        await writer.put(result(a))
                        known.add(a)
                    elif kind == "fail":
                        store.fail_applies += a
                    elif kind == "ambiguous":
                        store.ambiguous_applies += a
                    elif kind in ("down", "up"):
                        store.down = kind == "down"
                    elif kind == "run":
                        for _ in range(a):
                            await trio.lowlevel.checkpoint()
                    elif kind == "flush":
                        store.down = False
                        await writer.wait_idle()
                store.down = False
                await writer.wait_idle()
                writer.close()
        assert Journal(journal).pending() == []
    assert writer.statistics().ops_dropped == 0
    got = {n: store.rows[h(n)].hit_count for n in known}
    assert got == {n: expected[n] for n in known}
    assert len(store.logs) == logs
