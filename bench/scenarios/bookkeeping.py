"""Scenario: exact bookkeeping at the maximum ``batch-check-cache`` throughput.

A closed loop of ``batch-check-cache`` requests of 100 seeded hashes (every item a
cache hit: one hit increment each, and one request-log row per request carrying its
counts, ``hashes_hit``) drives the writer as hard as the service can answer. The log
is counted as the hits its rows record (``COALESCE(hashes_hit, 1)`` a row), and its
rows against the requests answered. Afterwards the scenario waits for the store to settle,
stops the service (SIGTERM: the writer flushes or journals what it holds) and counts,
in the store itself, the hit counts and request-log rows the load added, against
the hits the answers reported; plus the writer's ``dropped`` and ``journaled``
operations from ``/metrics`` and anything left in the journal at exit.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .._context import Bench, missing_service
from .._report import Check, Outcome, Row
from .._services import HOST, Service
from .._stats import summarize

__all__ = ["run"]

BATCH = 100
SETTLE_TIMEOUT_S = 60.0
_WRITER_OPS = re.compile(r'^xintu_writer_operations_total\{outcome="(\w+)"\} ([0-9.e+]+)$', re.M)


def _writer_ops(svc: Service) -> dict[str, float]:
    """The writer's operations by outcome, from ``/metrics``."""
    text = httpx.get(f"{svc.url}/metrics", timeout=10.0).text
    out: dict[str, float] = {}
    for outcome, value in _WRITER_OPS.findall(text):
        out[outcome] = out.get(outcome, 0.0) + float(value)
    return out


def _store_totals(url: str) -> tuple[int, int]:
    """(sum of hit counts, request-log rows) in the store at *url*."""
    hits_sql = "SELECT COALESCE(SUM(hit_count), 0) FROM image_classification_cache"
    # Hits the log records: a batch check's row its hashes_hit, any other row one.
    logs_sql = "SELECT COALESCE(SUM(COALESCE(hashes_hit, 1)), 0) FROM request_log"
    if url.startswith("sqlite"):
        from xintu.store import sqlite_path

        conn = sqlite3.connect(sqlite_path(url), timeout=30.0)
        try:
            hits = conn.execute(hits_sql).fetchone()[0]
            logs = conn.execute(logs_sql).fetchone()[0]
        finally:
            conn.close()
        return int(hits), int(logs)
    import trio
    import trio_mysql

    parts = urlsplit(url)

    async def query() -> tuple[int, int]:
        conn = trio_mysql.connect(
            host=parts.hostname or HOST,
            port=parts.port or 3306,
            user=parts.username or "root",
            password=parts.password or "",
            db=parts.path.lstrip("/"),
        )
        with trio.fail_after(30):
            await conn.connect()
            try:
                async with conn.cursor() as cur:
                    await cur.execute(hits_sql)
                    (hits,) = await cur.fetchone()
                    await cur.execute(logs_sql)
                    (logs,) = await cur.fetchone()
            finally:
                await conn.aclose()
        return int(hits), int(logs)

    return trio.run(query)


def _settled_totals(url: str) -> tuple[int, int]:
    """:func:`_store_totals` once two readings half a second apart agree."""
    last = _store_totals(url)
    for _ in range(int(SETTLE_TIMEOUT_S / 0.5)):
        time.sleep(0.5)
        now = _store_totals(url)
        if now == last:
            break
        last = now
    return last


def _journaled(journal: Path) -> tuple[int, int]:
    """(hit counts, log rows) still in the journal (the service journaled them at exit)."""
    from xintu.actors._journal import Journal

    hits = logs = 0
    for claimed in Journal(journal).claim():
        hits += sum(h.count for b in claimed.batches for h in b.hits)
        logs += sum(row.requests for b in claimed.batches for row in b.logs)
        claimed.release()
    return hits, logs


def run(bench: Bench) -> Outcome:
    """Closed loop of batch-check-cache x100; every hit and log row accounted for."""
    if (why := missing_service()) is not None:
        return Outcome("bookkeeping", status="skipped", reason=why)
    t0 = time.monotonic()
    photos, hashes = bench.hit_set()
    size = min(BATCH, len(hashes))
    url = bench.hit_store()
    journal = bench.data_dir / "journal"
    details: dict[str, Any] = {"batch": size}
    with bench.xintu("bookkeeping", store_url=url) as svc:
        if not bench.hit_store_seeded:
            details["seeding"] = bench.seed(svc, photos)
            bench.hit_store_seeded = True
        hits0, logs0 = _settled_totals(url)  # the seeding's own log rows included
        ops0 = _writer_ops(svc)
        cpu0 = svc.cpu_seconds()
        duration_s = bench.dur(10.0, 3.0)
        result = bench.closed(svc, bench.batch_payloads(svc, hashes, size), duration_s=duration_s)
        load = summarize(result.samples, duration_s=duration_s)
        load["service_cpu_s"] = round(svc.cpu_seconds() - cpu0, 2)
        served = load["accepted"] * size  # every item of every 200 is a hit
        # Let the writer catch up (or give up waiting), then stop the service.
        settle0 = time.monotonic()
        last: tuple[int, int] | None = None
        while time.monotonic() - settle0 < SETTLE_TIMEOUT_S:
            now = _store_totals(url)
            if (now[0] - hits0 >= served and now[1] - logs0 >= served) or now == last:
                break
            last = now
            time.sleep(1.0)
        details["settle_s"] = round(time.monotonic() - settle0, 1)
        ops1 = _writer_ops(svc)
    hits1, logs1 = _store_totals(url)
    left_hits, left_logs = _journaled(journal)
    hits, logs = hits1 - hits0 + left_hits, logs1 - logs0 + left_logs
    delta = {k: ops1.get(k, 0.0) - ops0.get(k, 0.0) for k in ("applied", "journaled", "dropped")}
    details |= {
        "load": load,
        "hits_served": served,
        "hits_stored": hits1 - hits0,
        "log_rows_stored": logs1 - logs0,
        "journal_left_at_exit": {"hits": left_hits, "log_rows": left_logs},
        "writer_ops": delta,
    }
    hashes_s = load["goodput_rps"] * size
    note = (
        f"{load['goodput_rps']:.0f} req/s = {hashes_s:,.0f} hashes/s; "
        f"store + journal at exit: {hits:,}/{served:,} hits counted, {logs:,}/{served:,} "
        "hits in the request log (one row per request) "
        f"({left_hits:,} and {left_logs:,} of them in the journal); writer ops journaled "
        f"{delta['journaled']:,.0f}; writer settled {details['settle_s']} s after the load"
    )
    rows = [
        Row(
            f"batch-check-cache x{size} at max: writer ops dropped",
            delta["dropped"],
            "ops",
            note=note,
        ),
        Row(f"batch-check-cache x{size} throughput (bookkeeping run)", hashes_s, "hashes/s"),
    ]
    checks = [
        Check(
            "no writer operation dropped",
            delta["dropped"] == 0,
            f"dropped {delta['dropped']:.0f}",
        ),
        Check(
            "hit counts exact and request log complete (store + journal)",
            hits == served and logs == served,
            note,
        ),
    ]
    out = Outcome("bookkeeping", rows=rows, details=details, checks=checks)
    out.seconds = time.monotonic() - t0
    return out
