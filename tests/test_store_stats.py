"""``/api/v1/stats`` on the store: the SQLite stats read runs beside the lookups,
and a batch check's one request-log row counts as its hits."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing

from xintu import Category, Classification, Source
from xintu.store import RequestLogRow, ResultWrite, Store, WriteBatch
from xintu.store._base import time_text

from .backends import open_test_store
from .test_store import change_schema

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


# --- a batch check is one request-log row ------------------------------------------


def batch_row(request_id: str, asked: int, hit: int, at: datetime) -> RequestLogRow:
    return RequestLogRow(
        request_id=request_id,
        user_id="u",
        ip="192.0.2.1",
        image_hash=None,
        image_size=None,
        category=None,
        confidence=None,
        from_cache=hit > 0,
        source="cache" if hit else None,
        processing_time_ms=3.0,
        created_at=at,
        hashes_asked=asked,
        hashes_hit=hit,
    )


async def test_a_batch_check_row_counts_its_hits(store: Store) -> None:
    """One row per batch check, with its counts; the stats count its hits as
    requests served from the cache, as the row per hit did."""
    now = datetime.now(UTC)
    single = dataclasses.replace(batch_row("one", 1, 1, now), hashes_asked=None, hashes_hit=None)
    with trio.fail_after(TEST_TIMEOUT_S):
        logs = (batch_row("b100", 100, 37, now), batch_row("b0", 5, 0, now), single)
        assert await store.apply(WriteBatch(uuid.uuid4().hex, logs=logs))
        row = await store.get_request_log("b100")
        assert row is not None
        assert (row.hashes_asked, row.hashes_hit, row.from_cache) == (100, 37, True)
        assert await store.get_request_log("b0") == batch_row("b0", 5, 0, row.created_at)
        stats = await store.album_stats(now)
        assert (stats.requests_total, stats.requests_from_cache_total) == (38, 38)
        assert dict(stats.sources) == {"cache": 38}
        # A row logged again (another batch, the same request id) counts nothing.
        assert await store.apply(WriteBatch(uuid.uuid4().hex, logs=logs[:1]))
        assert (await store.album_stats(now)).requests_total == 38


async def test_the_stats_backfill_counts_a_batch_row_as_its_hits(
    own_store_url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(own_store_url, tmp_path) as store:
            logs = (batch_row("b1", 10, 4, now), batch_row("b2", 3, 0, now))
            assert await store.apply(WriteBatch(uuid.uuid4().hex, logs=logs))
            expected = (await store.album_stats(now)).requests_total
        assert expected == 4
        await change_schema(
            own_store_url,
            "DROP TABLE stats_requests",
            "DROP TABLE stats_cache",
            "UPDATE schema_version SET version = 3",
        )
        async with open_test_store(own_store_url, tmp_path) as store:
            stats = await store.album_stats(now)
            assert (stats.requests_total, stats.requests_from_cache_total) == (4, 4)


def test_a_batch_row_needs_both_counts_in_order() -> None:
    at = datetime.now(UTC)
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(batch_row("x", 3, 1, at), hashes_hit=None)
    with pytest.raises(ValueError, match=r"need 0 <= hashes_hit <= hashes_asked, got 4"):
        batch_row("x", 3, 4, at)
