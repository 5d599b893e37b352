"""Scenario: ``/api/v1/stats`` on a store that has grown (opt-in: it writes GBs).

Set ``BENCH_GROWTH_ROWS`` (e.g. ``10000000``; at most :data:`MAX_ROWS`) to run it;
without it the scenario is skipped. It bulk-loads that many ``request_log`` rows
(a tenth as many cache rows) straight into a SQLite file of the store's schema
(``executemany`` in transactions of :data:`CHUNK` rows, spread over
:data:`DAYS` days, the last hour dense enough for the latency sample), stamps the
file as schema version 3 without the stats counters, and opens it with the store:
the migration fills the counters (one scan of each table, timed). Then it times
``Store.album_stats`` (what the endpoint runs; counters plus the latency sample)
against the full scans it used to run, and a cache lookup while stats run in a
loop beside it (SQLite's reader connection serves both, so a slow stats call
holds lookups up). Reported: load rate, migration time, stats and scan latency.

Run: ``BENCH_GROWTH_ROWS=10000000 .venv/bin/python -m bench growth`` (about 8 min
and 2.4 GB of temporary disk on a 2-vCPU VM; BENCHMARKS.md, "Stats at 10 M rows").
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .._context import Bench, missing_service
from .._report import Check, Outcome, Row

__all__ = ["run"]

ENV = "BENCH_GROWTH_ROWS"
MAX_ROWS = 20_000_000
CHUNK = 200_000
DAYS = 90
RECENT = 20_000  # rows in the last hour (the latency window)
SOURCES = ("cache", "cache", "cache", "llm", "local")
CATEGORIES = (
    "social_activities",
    "pets",
    "single_person",
    "foods",
    "travel_scenery",
    "screenshot",
    "idcard",
    "other",
)
# What /api/v1/stats ran before the counters: full scans of both tables.
SCANS = (
    "SELECT COUNT(*), COALESCE(SUM(from_cache), 0) FROM request_log",
    "SELECT COUNT(*), COALESCE(SUM(from_cache), 0) FROM request_log WHERE created_at >= ?",
    "SELECT COALESCE(source, 'none'), COUNT(*) FROM request_log GROUP BY source",
    "SELECT category, COUNT(*), COALESCE(SUM(hit_count), 0), "
    "COALESCE(SUM(CASE WHEN source = 'llm' THEN hit_count ELSE 0 END), 0) "
    "FROM image_classification_cache GROUP BY category",
)


def _text(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")


def _load(path: Path, rows: int, now: datetime) -> dict[str, float]:
    """Fill the file with *rows* log rows and rows // 10 cache rows; seconds taken."""
    rng = random.Random(20260101)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    span_s = DAYS * 86_400.0
    started = time.monotonic()
    log_sql = (
        "INSERT INTO request_log (request_id, user_id, ip, image_hash, image_size, category, "
        "confidence, from_cache, source, processing_time_ms, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    for start in range(0, rows, CHUNK):
        batch = []
        for i in range(start, min(rows, start + CHUNK)):
            age_s = rng.random() * 3600.0 if i >= rows - RECENT else rng.random() * span_s
            source = SOURCES[i % len(SOURCES)]
            batch.append(
                (
                    f"bench-{i:012d}",
                    f"user-{i % 1000}",
                    "192.0.2.1",
                    None,
                    None,
                    CATEGORIES[i % 8],
                    0.9,
                    int(source == "cache"),
                    source,
                    1.0 + (i % 500),
                    _text(now - timedelta(seconds=age_s)),
                )
            )
        conn.execute("BEGIN")
        conn.executemany(log_sql, batch)
        conn.execute("COMMIT")
    log_s = time.monotonic() - started
    started = time.monotonic()
    cache_sql = (
        "INSERT INTO image_classification_cache (image_hash, category, confidence, "
        "description, model_used, model_response, source, image_size, hit_count, created_at) "
        "VALUES (?, ?, 0.9, NULL, 'bench', NULL, ?, NULL, ?, ?)"
    )
    photos = max(1, rows // 10)
    for start in range(0, photos, CHUNK):
        batch2 = [
            (
                hashlib.sha256(f"bench photo {i}".encode()).hexdigest(),
                CATEGORIES[i % 8],
                "llm" if i % 3 else "local",
                i % 7,
                _text(now - timedelta(days=1)),
            )
            for i in range(start, min(photos, start + CHUNK))
        ]
        conn.execute("BEGIN")
        conn.executemany(cache_sql, batch2)
        conn.execute("COMMIT")
    cache_s = time.monotonic() - started
    # As a version-3 database: no counters yet.
    conn.execute("DROP TABLE stats_requests")
    conn.execute("DROP TABLE stats_cache")
    conn.execute("UPDATE schema_version SET version = 3")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"log_s": log_s, "cache_s": cache_s, "photos": float(photos)}


def _scan_ms(path: Path, now: datetime, repeats: int) -> float:
    conn = sqlite3.connect(path)
    day = _text(now.replace(hour=0, minute=0, second=0, microsecond=0))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for sql in SCANS:
            conn.execute(sql, (day,) if "?" in sql else ()).fetchall()
        times.append((time.perf_counter() - started) * 1000)
    conn.close()
    return statistics.median(times)


async def _with_store(path: Path, now: datetime, repeats: int) -> dict[str, Any]:
    import trio

    from xintu.store._sqlite import SQLiteStore

    started = time.monotonic()
    store = await SQLiteStore.open(path, query_timeout_s=600.0)
    out: dict[str, Any] = {"migrate_s": time.monotonic() - started}
    try:
        stats_ms = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            stats = await store.album_stats(now)
            stats_ms.append((time.perf_counter() - t0) * 1000)
        out["stats_ms"] = statistics.median(stats_ms)
        out["stats_max_ms"] = max(stats_ms)
        out["requests_total"] = stats.requests_total
        out["cached_images"] = stats.cached_images
        # Lookups while stats run back to back beside them.
        probe = hashlib.sha256(b"bench photo 1").hexdigest()
        lookup_ms: list[float] = []
        async with trio.open_nursery() as nursery:

            async def stats_loop() -> None:
                while True:
                    await store.album_stats(now)

            nursery.start_soon(stats_loop)
            for _ in range(200):
                t0 = time.perf_counter()
                assert await store.get(probe) is not None
                lookup_ms.append((time.perf_counter() - t0) * 1000)
            nursery.cancel_scope.cancel()
        lookup_ms.sort()
        out["lookup_p50_ms"] = lookup_ms[len(lookup_ms) // 2]
        out["lookup_p99_ms"] = lookup_ms[int(len(lookup_ms) * 0.99) - 1]
    finally:
        await store.aclose()
    return out


def run(bench: Bench) -> Outcome:
    name = "growth"
    missing = missing_service()
    if missing:
        return Outcome(name, status="skipped", reason=missing)
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return Outcome(name, status="skipped", reason=f"opt-in: set {ENV}=10000000 (rows)")
    rows = int(raw)
    if not 1 <= rows <= MAX_ROWS:
        return Outcome(name, status="failed", reason=f"{ENV} must be 1..{MAX_ROWS}, got {rows}")
    import trio

    from xintu.store._sqlite import SQLiteStore

    folder = bench.tmp / "growth"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "xintu.sqlite3"
    path.unlink(missing_ok=True)
    trio.run(lambda: _open_close(SQLiteStore, path))  # the schema, made by the store
    now = datetime.now(UTC)
    load = _load(path, rows, now)
    repeats = int(bench.dur(5, 2))
    scan_ms = _scan_ms(path, now, repeats)
    measured = trio.run(_with_store, path, now, repeats)
    size_mib = path.stat().st_size / 2**20
    path.unlink(missing_ok=True)
    outcome = Outcome(name)
    outcome.details = {"rows": rows, "file_mib": round(size_mib), **load, **measured}
    outcome.rows = [
        Row("request_log rows loaded", rows / load["log_s"], "rows/s", note=f"{rows:,} rows"),
        Row("migration to counters (one scan)", measured["migrate_s"], "s"),
        Row(
            "album_stats (counters + latency sample)",
            measured["stats_ms"],
            "ms",
            baseline="full scans (before)",
            baseline_value=scan_ms,
        ),
        Row("cache lookup beside stats, P99", measured["lookup_p99_ms"], "ms"),
    ]
    outcome.checks = [
        Check(
            "stats cost a tenth of the scans or less",
            measured["stats_ms"] <= scan_ms / 10,
            f"median {measured['stats_ms']:.0f} ms, max {measured['stats_max_ms']:.0f} ms "
            f"at {rows:,} rows; the scans: {scan_ms:.0f} ms",
        ),
        Check(
            "counters match the rows",
            measured["requests_total"] == rows and measured["cached_images"] == load["photos"],
            f"{measured['requests_total']:,} requests, {measured['cached_images']:,} photos",
        ),
    ]
    return outcome


async def _open_close(cls: Any, path: Path) -> None:
    store = await cls.open(path, query_timeout_s=60.0)
    await store.aclose()
