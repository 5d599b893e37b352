"""Writes the store refuses for good: set aside in the poison journal, never a stall.

A real schema error on each backend (SQLite: a column the insert names is renamed
away; MariaDB: a NOT NULL column without a default is added) makes every request-log
insert fail in a way no retry can fix. The writer must keep committing everything
else, keep the refused rows on disk apart from the ordinary journal, and commit them
once the schema is fixed: at the next start, or when asked.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from xintu import Category, Classification, Source
from xintu.actors import Writer
from xintu.actors._journal import Journal
from xintu.actors._writer import POISON_DIR
from xintu.errors import StoreRejected
from xintu.store import HitIncrement, RequestLogRow, ResultWrite, Store, WriteBatch, sqlite_path

from .backends import mysql_execute, open_test_store
from .fakes import MemoryStore

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
TEST_TIMEOUT_S = 20.0


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def result(data: bytes) -> ResultWrite:
    c = Classification(Category.PETS, 0.75, Source.LOCAL, "m")
    return ResultWrite(h(data), c, len(data), T0)


def log_row(rid: str) -> RequestLogRow:
    return RequestLogRow(rid, "u", "192.0.2.1", None, None, "pets", 0.5, False, "local", 1.0, T0)


async def schema(url: str, *statements: str) -> None:
    """Change the schema behind the store's back."""
    if url.startswith("sqlite"):

        def run() -> None:
            conn = sqlite3.connect(sqlite_path(url))
            try:
                for sql in statements:
                    conn.execute(sql)
                conn.commit()
            finally:
                conn.close()

        await trio.to_thread.run_sync(run)
    else:
        for sql in statements:
            await mysql_execute(url, sql)


async def break_request_log(url: str) -> None:
    if url.startswith("sqlite"):
        await schema(url, "ALTER TABLE request_log RENAME COLUMN ip TO client_ip")
    else:  # 1364: Field 'must_have' doesn't have a default value
        await schema(url, "ALTER TABLE request_log ADD COLUMN must_have VARCHAR(8) NOT NULL")


async def fix_request_log(url: str) -> None:
    if url.startswith("sqlite"):
        await schema(url, "ALTER TABLE request_log RENAME COLUMN client_ip TO ip")
    else:
        await schema(url, "ALTER TABLE request_log DROP COLUMN must_have")


def writer_for(store: Store, journal: Path) -> Writer:
    return Writer(
        store,
        inbox_size=100,
        max_batch=50,
        flush_ms=1,
        retry_initial_s=0.001,
        retry_max_s=0.01,
        journal_dir=journal,
    )


def poisoned_request_ids(poison: Journal) -> list[str]:
    ids: list[str] = []
    for claimed in poison.claim():
        ids += [row.request_id for batch in claimed.batches for row in batch.logs]
        claimed.release()
    return sorted(ids)


async def feed(writer: Writer, ops: Sequence[object]) -> None:
    for op in ops:
        await writer.put(op)  # type: ignore[arg-type]
    await writer.wait_idle()


async def test_a_schema_error_is_set_aside_and_later_batches_commit(
    own_store_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    poison = Journal(journal / POISON_DIR)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(own_store_url, tmp_path / "d") as store:
            # The error is real, and of the class that says "never retry".
            await break_request_log(own_store_url)
            with pytest.raises(StoreRejected):
                await store.apply(WriteBatch("probe", logs=(log_row("probe"),)))

            writer = writer_for(store, journal)
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                # A batch that mixes the cache's writes and a log row: the cache's
                # part commits, the log row is set aside.
                await feed(writer, [result(b"a"), log_row("r-1")])
                # Later batches commit: the writer is not stalled.
                await feed(writer, [result(b"b"), HitIncrement(h(b"a"), 2, T0)])
                # A batch of log rows only is set aside whole.
                await feed(writer, [log_row("r-2"), log_row("r-3")])
                await feed(writer, [HitIncrement(h(b"b"), 1, T0)])
                stats = writer.statistics()
                assert (stats.poisoned_batches, stats.poisoned_ops) == (2, 3)
                assert stats.poison_pending_ops == 3
                assert stats.store_healthy is True
                assert stats.ops_dropped == 0
                assert stats.retries == 0  # refused for good: never retried
                # Asked to replay while the schema is still broken: nothing changes.
                assert await writer.replay_poisoned() == 0
                assert writer.statistics().poison_pending_ops == 3
                writer.close()

            a, b = await store.get(h(b"a")), await store.get(h(b"b"))
            assert a is not None
            assert b is not None
            assert (a.hit_count, b.hit_count) == (2, 1)
            # Apart from the ordinary journal, which the ordinary replay reads.
            assert Journal(journal).pending() == []
            assert poison.count_operations() == 3
            assert poisoned_request_ids(poison) == ["r-1", "r-2", "r-3"]

            # The operator fixes the schema; the next start commits what was set aside.
            await fix_request_log(own_store_url)
            for rid in ("r-1", "r-2", "r-3"):
                assert await store.get_request_log(rid) is None
            again = writer_for(store, journal)
            async with trio.open_nursery() as nursery:
                await nursery.start(again.run)
                await again.wait_idle()
                stats = again.statistics()
                assert (stats.poison_replayed_batches, stats.poison_pending_ops) == (2, 0)
                await feed(again, [log_row("r-4")])
                again.close()
            for rid in ("r-1", "r-2", "r-3", "r-4"):
                assert await store.get_request_log(rid) is not None
            assert poison.pending() == []
            # Committed once: the hit counts did not move.
            a = await store.get(h(b"a"))
            assert a is not None
            assert a.hit_count == 2


async def test_replay_poisoned_on_request_after_a_fix(own_store_url: str, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(own_store_url, tmp_path / "d") as store:
            await break_request_log(own_store_url)
            writer = writer_for(store, journal)
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                await feed(writer, [log_row("r-1")])
                await feed(writer, [log_row("r-2")])
                assert writer.statistics().poison_pending_ops == 2
                await fix_request_log(own_store_url)
                assert await writer.replay_poisoned() == 2
                assert writer.statistics().poison_pending_ops == 0
                assert await writer.replay_poisoned() == 0
                writer.close()
            assert await store.get_request_log("r-1") is not None
            assert await store.get_request_log("r-2") is not None
            assert Journal(journal / POISON_DIR).pending() == []


class RejectsLogs(MemoryStore):
    """Refuses every batch with a request-log row, as a broken request_log would."""

    async def apply(self, batch: WriteBatch) -> bool:
        if batch.logs:
            await trio.lowlevel.checkpoint()
            raise StoreRejected("injected: request_log refuses the row")
        return await super().apply(batch)


async def test_without_a_journal_a_refused_batch_is_dropped_and_counted() -> None:
    store = RejectsLogs()
    writer = Writer(store, inbox_size=100, max_batch=50, flush_ms=1)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await feed(writer, [result(b"a"), log_row("r-1"), log_row("r-2")])
            await feed(writer, [result(b"b")])
            writer.close()
    stats = writer.statistics()
    assert set(store.rows) == {h(b"a"), h(b"b")}
    assert (stats.poisoned_batches, stats.poisoned_ops, stats.ops_dropped) == (1, 2, 2)
    assert (stats.ops_applied, stats.poison_pending_ops) == (2, 0)
    assert await writer.replay_poisoned() == 0
