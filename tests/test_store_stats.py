"""``/api/v1/stats`` on the store: the SQLite stats read runs beside the lookups,
and a batch check's one request-log row counts as its hits."""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
import trio.testing

from xintu import Category, Classification, Source
from xintu.store import ResultWrite, WriteBatch
from xintu.store._base import time_text

from .backends import open_test_store

TEST_TIMEOUT_S = 30.0


def new_hash() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def _fill_log(path: Path, rows: int, now: datetime) -> None:
    """*rows* request-log rows within the latency window, straight into the file."""
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO request_log (request_id, source, processing_time_ms, created_at) "
            "VALUES (?, 'llm', ?, ?)",
            [
                (f"r{i}", float(i % 500), time_text(now - timedelta(seconds=i % 3000)))
                for i in range(rows)
            ],
        )
    conn.close()


async def test_sqlite_stats_leave_the_lookup_connection_free(tmp_path: Path) -> None:
    """A stats read (20,000 latency rows) does not hold the connection lookups use:
    a lookup made while it runs waits for no connection and is answered."""
    path = tmp_path / "stats.sqlite3"
    url = f"sqlite:///{path}"
    now = datetime.now(UTC)
    h = new_hash()
    answer = Classification(Category.PETS, 0.9, Source.LLM, model="m")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(url, tmp_path) as store:
            assert await store.apply(WriteBatch("b1", results=(ResultWrite(h, answer, 10),)))
        await trio.to_thread.run_sync(_fill_log, path, 40_000, now)
        async with open_test_store(url, tmp_path) as store:
            waiting: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.album_stats, now)
                await trio.testing.wait_all_tasks_blocked()
                # The stats read is under way in its thread; now a lookup.
                found: list[object] = []

                async def lookup() -> None:
                    found.append(await store.get(h))

                nursery.start_soon(lookup)
                await trio.testing.wait_all_tasks_blocked()
                waiting.append(store.statistics().pool_waiting)
            assert waiting == [0]
            assert len(found) == 1
            assert found[0] is not None
            assert store.statistics().pool_size == 3
