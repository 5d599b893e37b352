"""The writer's journal: pending writes survive a store that is down at shutdown.

The store that goes down is the in-memory fake (failures on demand, commits that
happen and then fail); replays go into the real stores (SQLite and MariaDB, through
``store_url``) as well. The journal does file I/O in worker threads, so these tests
run on the real clock with millisecond retry delays; every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing

from xintu import Category, Classification, Source
from xintu.actors import Writer
from xintu.actors._journal import ClaimedFile, Journal, decode_batch, encode_batch
from xintu.errors import StoreUnavailable
from xintu.store import AliasWrite, HitIncrement, RequestLogRow, ResultWrite, Store, WriteBatch

from .backends import open_test_store
from .fakes import MemoryStore

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def result(data: bytes, *, at: datetime | None = None) -> ResultWrite:
    c = Classification(
        category=list(Category)[data[0] % 8],
        confidence=0.75,
        source=Source.LOCAL,
        model="m",
        description="d\u00e9j\u00e0 vu",
        provider=None,
        local_inference_result={"top5": [["tabby", 0.5]], "faces": 0, "rule": "x"},
    )
    return ResultWrite(h(data), c, len(data), at)


def log_row(rid: str, data: bytes) -> RequestLogRow:
    return RequestLogRow(
        request_id=rid,
        user_id="u\u00e9",
        ip="203.0.113.9",
        image_hash=h(data),
        image_size=len(data),
        category="pets",
        confidence=0.5,
        from_cache=False,
        source="local",
        processing_time_ms=12.5,
        created_at=T0,
    )


def writer_for(store: Store, journal: Path | None, **kw: object) -> Writer:
    params: dict[str, object] = {
        "inbox_size": 1000,
        "max_batch": 50,
        "flush_ms": 1,
        "retry_initial_s": 0.001,
        "retry_max_s": 0.01,
    }
    params.update(kw)
    return Writer(store, journal_dir=journal, **params)  # type: ignore[arg-type]


class FailsForGood(MemoryStore):
    """A store that goes down for good at its first failure (injected or real)."""

    async def apply(self, batch: WriteBatch) -> bool:
        try:
            return await super().apply(batch)
        except StoreUnavailable:
            self.down = True
            raise


async def run_writer(writer: Writer, ops: Sequence[object], *, close: bool = True) -> None:
    """Start *writer*, hand it *ops*, close it and wait for it to return."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for op in ops:
                await writer.put(op)  # type: ignore[arg-type]
            if close:
                writer.close()


# --- the file format -----------------------------------------------------------------


def test_batch_round_trip() -> None:
    batch = WriteBatch(
        batch_id="b-1",
        results=(result(b"a", at=T0), result(b"b")),
        hits=(HitIncrement(h(b"a"), 3, T0),),
        logs=(log_row("r-1", b"a"),),
    )
    again = decode_batch(encode_batch(batch))
    assert again == batch
    assert again.results[0].classification.local_inference_result == {
        "top5": [["tabby", 0.5]],
        "faces": 0,
        "rule": "x",
    }
    assert again.results[0].created_at == T0
    assert again.logs[0].created_at == T0


def test_batch_round_trip_with_aliases() -> None:
    batch = WriteBatch(
        batch_id="b-2",
        results=(result(b"a", at=T0),),
        aliases=(
            AliasWrite("key:\u00e9", h(b"original"), h(b"a"), T0),
            AliasWrite("*", h(b"other"), h(b"a")),
        ),
    )
    again = decode_batch(encode_batch(batch))
    assert again == batch
    assert again.aliases[0].created_at == T0


def test_a_line_written_before_aliases_still_reads() -> None:
    """Journal files left by a Xintu without aliases have no ``aliases`` key."""
    old = (
        '{"batch_id":"b-old","hits":[{"count":2,"image_hash":"' + h(b"a") + '",'
        '"last_hit_at":"2026-01-02T03:04:05.678901+00:00"}],"logs":[],"results":[],"v":1}'
    )
    batch = decode_batch(old)
    assert batch == WriteBatch("b-old", hits=(HitIncrement(h(b"a"), 2, T0),))


async def test_the_writer_writes_aliases_after_their_results(
    tmp_path: Path, store_url: str
) -> None:
    """Aliases go through the writer like any write: folded into the batch of their
    result, or journaled while the store is down and replayed later, keeping the
    time they were made (so a later upload of the same alias still wins)."""
    journal = tmp_path / "journal"
    down = MemoryStore()
    down.down = True
    early = AliasWrite("key:a", h(b"orig-1"), h(b"x"))  # no time: stamped when journaled
    await run_writer(writer_for(down, journal), [result(b"x"), early])
    (claimed,) = list_claims(Journal(journal))
    (journaled,) = [a for b in claimed.batches for a in b.aliases]
    claimed.release()
    assert journaled.created_at is not None
    async with open_test_store(store_url, tmp_path / "d") as store:
        writer = writer_for(store, journal)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                await writer.wait_idle()  # the replay
                await writer.put(result(b"y"))
                await writer.put(AliasWrite("key:b", h(b"orig-2"), h(b"y")))
                await writer.put(AliasWrite("*", h(b"orig-3"), h(b"y")))
                await writer.wait_idle()
                writer.close()
        stats = writer.statistics()
        assert (stats.replayed_batches, stats.ops_dropped) == (1, 0)
        found = await store.get_many([h(b"orig-1"), h(b"orig-2"), h(b"orig-3")], scope="key:a")
        assert {k: e.image_hash for k, e in found.items()} == {
            h(b"orig-1"): h(b"x"),
            h(b"orig-3"): h(b"y"),
        }
        entry = await store.get(h(b"orig-2"), scope="key:b")
        assert entry is not None
        assert entry.image_hash == h(b"y")


@pytest.mark.parametrize(
    "text",
    ["", "{}", '{"v": 2}', '{"v": 1, "batch_id": "x"}', "[1, 2]", "not json"],
)
def test_decode_refuses_what_is_not_a_batch(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - json's and ours alike
        decode_batch(text)


def test_write_is_atomic_and_claim_reads_it_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    assert journal.pending() == []
    batches = [
        WriteBatch("b-1", results=(result(b"a"),)),
        WriteBatch("b-2", logs=(log_row("r", b"a"),)),
    ]
    path = journal.write(batches)
    assert path is not None
    assert path.parent == tmp_path / "journal"
    assert [p.name for p in journal.pending()] == [path.name]
    assert not list((tmp_path / "journal").glob("*.tmp"))
    (claimed,) = list_claims(journal)
    assert claimed.batches == batches
    assert claimed.skipped_lines == 0
    claimed.done()
    assert journal.pending() == []


def list_claims(journal: Journal) -> list[ClaimedFile]:
    return list(journal.claim())


def test_half_written_file_and_damaged_lines_are_never_replayed(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    good = [WriteBatch(f"b-{i}", results=(result(bytes([65 + i])),)) for i in range(3)]
    path = journal.write(good)
    assert path is not None
    # A crash while writing another file leaves only its temporary name behind.
    (tmp_path / "20990101T000000000000Z-1-dead.jsonl.tmp").write_bytes(path.read_bytes()[:50])
    # Damage: one line's payload changed under its checksum, and a half line at the end.
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"b-1"', b'"b-X"')
    path.write_bytes(b"".join(lines) + lines[2][:40])
    (claimed,) = list_claims(journal)
    assert [b.batch_id for b in claimed.batches] == ["b-0", "b-2"]
    assert claimed.skipped_lines == 2
    claimed.release()
    assert [p.name for p in journal.pending()] == [path.name]  # released, not deleted


def test_a_file_being_replayed_is_skipped_by_others(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.write([WriteBatch("b-1", results=(result(b"a"),))])
    first = next(iter(journal.claim()))
    assert list_claims(Journal(tmp_path)) == []  # locked (flock) by the first
    first.done()
    assert list_claims(Journal(tmp_path)) == []  # and now gone


# --- the writer: journal at shutdown, replay at start --------------------------------


async def test_store_down_at_shutdown_journals_everything(tmp_path: Path) -> None:
    with trio.fail_after(20):
        store = MemoryStore()
        store.down = True
        writer = writer_for(store, tmp_path / "journal", max_batch=4)
        ops = [result(bytes([i])) for i in range(10)] + [
            log_row(f"r{i}", bytes([i])) for i in range(3)
        ]
        await run_writer(writer, ops)
        stats = writer.statistics()
        assert stats.journaled_ops == 13
        assert stats.ops_dropped == 0
        assert stats.store_healthy is False
        assert store.rows == {}
        batches = [b for c in list_claims(Journal(tmp_path / "journal")) for b in c.batches]
        assert sorted(r.image_hash for b in batches for r in b.results) == sorted(
            h(bytes([i])) for i in range(10)
        )
        assert all(r.created_at is not None for b in batches for r in b.results)
        assert sorted(row.request_id for b in batches for row in b.logs) == ["r0", "r1", "r2"]
        assert all(len(b.results) + len(b.logs) <= 4 for b in batches)


async def test_a_long_outage_journals_the_overflow_and_replays_it_once(tmp_path: Path) -> None:
    """An outage longer than the inbox: once it is half full the queue goes to the
    journal, so puts never wait for the store and nothing is dropped; the first
    commit after the outage replays it, in order, each write once."""
    store = MemoryStore()
    store.down = True
    journal = tmp_path / "journal"
    writer = writer_for(store, journal, inbox_size=8, max_batch=4)
    ops: list[object] = [result(bytes([i])) for i in range(30)]
    ops += [HitIncrement(h(bytes([i % 3])), 1, T0) for i in range(30)]
    ops += [log_row(f"r{i}", bytes([i])) for i in range(30)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for op in ops:
                await writer.put(op)  # type: ignore[arg-type]  # never waits for the store
            during = writer.statistics()
            assert during.overflowed_ops > 0  # past the full inbox: on the way to the journal
            assert during.hits_folded == 30  # hits take no inbox slot
            assert during.ops_dropped == 0
            assert during.store_healthy is False
            assert store.rows == {}
            store.down = False
            await writer.wait_idle()
            writer.close()
    stats = writer.statistics()
    assert stats.ops_dropped == 0
    assert stats.journaled_ops > 0
    assert stats.replayed_batches >= 1
    assert Journal(journal).pending() == []
    assert len(store.rows) == 30
    assert [store.rows[h(bytes([i]))].hit_count for i in range(3)] == [10, 10, 10]
    assert sorted(store.logs) == sorted(f"r{i}" for i in range(30))


class SlowWhenDown(MemoryStore):
    """Down: the first attempt fails at once, later ones hang until released (a query
    timing out), as a store that stopped answering does."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()
        self.failed_once = False

    async def apply(self, batch: WriteBatch) -> bool:
        if self.down and self.failed_once:
            await self.release.wait()
        if self.down:
            self.failed_once = True
        return await super().apply(batch)


async def test_the_queue_is_journaled_while_a_commit_attempt_hangs(tmp_path: Path) -> None:
    store = SlowWhenDown()
    store.down = True
    writer = writer_for(store, tmp_path / "journal", inbox_size=8, max_batch=4)
    hashes = [h(bytes([i])) for i in range(3)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(3):
                await writer.put(result(bytes([i])))
            for _ in range(1000):  # until the first attempt has failed
                if store.failed_once:
                    break
                await trio.sleep(0.001)
            # The retry now hangs; log rows and hit counts keep coming, 40 log rows
            # against an inbox of 8 (hits are folded: they take no slot).
            for i in range(40):
                assert writer.offer(log_row(f"r{i}", bytes([i]))), i
                assert writer.offer(HitIncrement(hashes[i % 3], 1, T0)), i
                await trio.sleep(0.001)
            during = writer.statistics()
            assert during.ops_dropped == 0
            assert during.hits_folded == 40
            assert during.journal_files >= 5  # the inbox went to the journal, again and again
            store.down = False
            store.release.set()
            await writer.wait_idle()
            writer.close()
    assert Journal(tmp_path / "journal").pending() == []
    assert [store.rows[x].hit_count for x in hashes] == [14, 13, 13]
    assert sorted(store.logs) == sorted(f"r{i}" for i in range(40))


class Flaky(MemoryStore):
    """Each apply fails before committing with probability *p* (seeded)."""

    def __init__(self, seed: int, p: float) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self._p = p

    async def apply(self, batch: WriteBatch) -> bool:
        if self._rng.random() < self._p:
            await trio.lowlevel.checkpoint()
            raise StoreUnavailable("flaky")
        return await super().apply(batch)


@pytest.mark.parametrize("seed", range(4))
async def test_an_intermittent_store_ends_with_every_write_once(tmp_path: Path, seed: int) -> None:
    """Failures at any point (the batch in hand, a replay, between spills) while work
    keeps coming: once the writer is idle, the journal is empty and every write is in
    the store exactly once."""
    store = Flaky(seed, 0.6)
    writer = writer_for(store, tmp_path / "journal", inbox_size=6, max_batch=3)
    n = 60
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(n):
                await writer.put(result(bytes([i])))
                await writer.put(HitIncrement(h(bytes([i])), 2, T0))
                await writer.put(log_row(f"r{i}", bytes([i])))
            store._p = 0.0  # the store settles
            await writer.wait_idle()
            writer.close()
    assert Journal(tmp_path / "journal").pending() == []
    assert writer.statistics().ops_dropped == 0
    assert len(store.rows) == n
    assert {e.hit_count for e in store.rows.values()} == {2}
    assert len(store.logs) == n


async def test_without_a_journal_shutdown_keeps_retrying_until_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    store.down = True
    writer = writer_for(store, None)
    with trio.move_on_after(5) as waited:
        await run_writer(writer, [result(b"a")])
    assert waited.cancelled_caught  # it did not give up: nothing to fall back on
    assert writer.statistics().journaled_ops == 0


async def test_replay_at_start_applies_each_write_once(tmp_path: Path, store_url: str) -> None:
    journal = tmp_path / "journal"
    down = MemoryStore()
    down.down = True
    await run_writer(
        writer_for(down, journal),
        [result(b"x"), result(b"y"), log_row("r-x", b"x")],
    )
    assert Journal(journal).pending()
    async with open_test_store(store_url, tmp_path / "d") as store:
        writer = writer_for(store, journal)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                await writer.wait_idle()
                assert writer.statistics().replaying is False
                # New work after the replay: a hit on a replayed result counts.
                writer.offer(HitIncrement(h(b"x"), 2, T0 + timedelta(seconds=1)))
                await writer.wait_idle()
                writer.close()
        assert Journal(journal).pending() == []
        assert writer.statistics().replayed_batches == 1
        x = await store.get(h(b"x"))
        assert x is not None
        assert x.hit_count == 2
        assert (
            x.classification.local_inference_result
            == result(b"x").classification.local_inference_result
        )
        assert await store.get(h(b"y")) is not None
        row = await store.get_request_log("r-x")
        assert row is not None
        assert row.user_id == "u\u00e9"
        # A second start finds nothing to replay.
        again = writer_for(store, journal)
        await run_writer(again, [])
        assert again.statistics().replayed_batches == 0


async def test_batch_committed_before_the_failure_is_not_counted_twice(tmp_path: Path) -> None:
    """The commit happened, then the store 'failed' and stayed down: the batch is
    journaled under its id, and its replay is recognised as a duplicate."""
    with trio.fail_after(20):
        store = FailsForGood()
        journal = tmp_path / "journal"
        await run_writer(writer_for(store, journal), [result(b"a")])
        assert store.rows[h(b"a")].hit_count == 0
        store.ambiguous_applies = 1
        writer = writer_for(store, journal)
        await run_writer(writer, [HitIncrement(h(b"a"), 5, T0)])
        assert writer.statistics().journaled_ops == 1
        assert store.rows[h(b"a")].hit_count == 5  # committed once already
        store.down = False
        replayer = writer_for(store, journal)
        await run_writer(replayer, [])
        assert store.rows[h(b"a")].hit_count == 5
        assert replayer.statistics().batches_duplicate == 1
        assert Journal(journal).pending() == []


class VanishesAt(MemoryStore):
    """Its *n*-th ``apply`` finds the store closed: the process is going away."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.vanish_at = n

    async def apply(self, batch: WriteBatch) -> bool:
        if self.apply_calls + 1 == self.vanish_at:
            self.apply_calls += 1
            raise trio.ClosedResourceError("the store was closed")
        return await super().apply(batch)


async def test_interrupted_replay_is_resumed_without_double_counting(tmp_path: Path) -> None:
    with trio.fail_after(20):
        store = VanishesAt(0)
        journal = tmp_path / "journal"
        await run_writer(writer_for(store, journal), [result(b"a")])
        # Three batches of hits, journaled in one file.
        Journal(journal).write(
            [WriteBatch(f"b{n}", hits=(HitIncrement(h(b"a"), n, T0),)) for n in (1, 10, 100)]
        )
        assert len(Journal(journal).pending()) == 1
        store.vanish_at = store.apply_calls + 2  # the replay's second batch
        await run_writer(writer_for(store, journal), [])
        assert store.rows[h(b"a")].hit_count == 1  # one batch in, then the crash
        assert len(Journal(journal).pending()) == 1  # the file stays for the next start
        second = writer_for(store, journal)
        await run_writer(second, [])
        assert store.rows[h(b"a")].hit_count == 111
        assert second.statistics().batches_duplicate == 1
        assert Journal(journal).pending() == []


async def test_cancelled_writer_journals_what_it_holds(tmp_path: Path) -> None:
    store = MemoryStore()
    store.down = True
    journal = tmp_path / "journal"
    writer = writer_for(store, journal, flush_ms=0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for i in range(5):
                await writer.put(result(bytes([i])))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # no close: a shutdown out of time
    assert writer.statistics().journaled_ops == 5
    store.down = False
    await run_writer(writer_for(store, journal), [])
    assert len(store.rows) == 5


async def test_result_put_after_close_is_journaled(tmp_path: Path) -> None:
    with trio.fail_after(20):
        store = MemoryStore()
        journal = tmp_path / "journal"
        writer = writer_for(store, journal)
        await run_writer(writer, [])
        await writer.put(result(b"late"))
        assert writer.statistics().journaled_ops == 1
        assert writer.statistics().ops_dropped == 0
        await run_writer(writer_for(store, journal), [])
        assert h(b"late") in store.rows


async def test_unwritable_journal_counts_the_loss(tmp_path: Path) -> None:
    with trio.fail_after(20):
        store = MemoryStore()
        store.down = True
        blocked = tmp_path / "journal"
        blocked.write_text("a file where the directory should be")
        writer = writer_for(store, blocked)
        await run_writer(writer, [result(b"a"), result(b"b")])
        assert writer.statistics().ops_dropped == 2
        assert writer.statistics().journaled_ops == 0


def test_a_file_is_named_by_the_time_it_is_given(tmp_path: Path) -> None:
    """The writer dates a batch it had in hand by when it took it: replayed first."""
    journal = Journal(tmp_path)
    later = journal.write([WriteBatch("b2", logs=(log_row("r2", b"a"),))])
    earlier = journal.write([WriteBatch("b1", logs=(log_row("r1", b"a"),))], at=T0)
    assert journal.pending() == [earlier, later]


def test_journal_files_are_only_readable_by_the_owner(tmp_path: Path) -> None:
    path = Journal(tmp_path).write([WriteBatch("b", logs=(log_row("r", b"a"),))])
    assert path is not None
    assert os.stat(path).st_mode & 0o077 == 0
