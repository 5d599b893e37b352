"""``GET /api/v1/stats``: what the store knows about the album, computed by the store.

The queries are shared by every backend (written with ``:name`` parameters; the
dialect spells them and encodes the times); the shared store runs
:func:`stats_queries` and hands the rows to :func:`assemble_stats`. No query
grows with the tables: totals, today's counts, sources, categories and hits are
read from the counters the store keeps as it writes (``stats_requests`` and
``stats_cache``, :mod:`._schema`; a few rows per day), and latencies read at
most :data:`LATENCY_SAMPLE` recent rows of ``request_log`` through its
``created_at`` index. The answer is the one the full scans of ``request_log``
and ``image_classification_cache`` gave (:func:`backfill_statements` are those
scans, run once when the counters are created), except that requests pruned
from the log by its retention still count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np

__all__ = [
    "LATENCY_SAMPLE",
    "AlbumStats",
    "CacheKey",
    "RequestKey",
    "assemble_stats",
    "backfill_statements",
    "stats_queries",
]

# A stats_requests row's key: (UTC day, category or "", source or "none").
RequestKey = tuple[date, str, str]
# A stats_cache row's key: (category, source or "").
CacheKey = tuple[str, str]

# Most request_log rows read for the latency percentiles.
LATENCY_SAMPLE = 20_000
# Latency percentiles cover this recent window.
LATENCY_WINDOW = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class AlbumStats:
    """Totals and distributions, JSON-ready through :meth:`as_dict`."""

    generated_at: datetime
    requests_total: int
    requests_from_cache_total: int
    requests_today: int
    requests_from_cache_today: int
    cached_images: int
    cache_hits_total: int
    llm_calls_saved: int
    sources: Mapping[str, int]
    categories: Mapping[str, int]
    latency_ms: Mapping[str, Mapping[str, float]]
    latency_window_s: float

    @property
    def cache_hit_rate(self) -> float:
        return self.requests_from_cache_total / self.requests_total if self.requests_total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at.isoformat().replace("+00:00", "Z"),
            "totals": {
                "requests": self.requests_total,
                "from_cache": self.requests_from_cache_total,
                "cached_images": self.cached_images,
                "cache_hits": self.cache_hits_total,
            },
            "today": {
                "requests": self.requests_today,
                "from_cache": self.requests_from_cache_today,
            },
            "cache_hit_rate": round(self.cache_hit_rate, 4),
            "llm_calls_saved": self.llm_calls_saved,
            "sources": dict(self.sources),
            "categories": dict(self.categories),
            "latency_ms": {k: dict(v) for k, v in self.latency_ms.items()},
            "latency_window_s": self.latency_window_s,
        }


def stats_queries(
    now: datetime,
    *,
    encode_time: Callable[[datetime], Any],
    encode_date: Callable[[date], Any],
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name → (SQL with ``:name`` parameters, parameters) for one stats computation."""
    today = now.astimezone(UTC).date()
    window = now - LATENCY_WINDOW
    return {
        "totals": (
            "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(from_cache), 0) FROM stats_requests",
            {},
        ),
        "today": (
            "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(from_cache), 0) "
            "FROM stats_requests WHERE day >= :day",
            {"day": encode_date(today)},
        ),
        "sources": (
            "SELECT source, SUM(requests) FROM stats_requests GROUP BY source "
            "HAVING SUM(requests) > 0",
            {},
        ),
        "cache": (
            "SELECT category, SUM(entries), SUM(hits), "
            "SUM(CASE WHEN source = 'llm' THEN hits ELSE 0 END) "
            "FROM stats_cache GROUP BY category HAVING SUM(entries) > 0",
            {},
        ),
        "latency": (
            "SELECT COALESCE(source, 'none'), processing_time_ms FROM request_log "
            f"WHERE created_at >= :since ORDER BY created_at DESC LIMIT {LATENCY_SAMPLE}",
            {"since": encode_time(window)},
        ),
    }


def backfill_statements(day: Callable[[str], str]) -> tuple[str, ...]:
    """Fill the counters from the rows already in the tables (one full scan of each);
    *day* is the dialect's SQL for a timestamp column's UTC day."""
    return (
        "DELETE FROM stats_requests",
        "DELETE FROM stats_cache",
        # A batch check's row counts as its hits (RequestLogRow.requests).
        "INSERT INTO stats_requests (day, category, source, requests, from_cache) "
        f"SELECT {day('created_at')}, COALESCE(category, ''), COALESCE(source, 'none'), "
        "COALESCE(SUM(COALESCE(hashes_hit, 1)), 0), "
        "COALESCE(SUM(COALESCE(hashes_hit, from_cache)), 0) FROM request_log GROUP BY 1, 2, 3",
        "INSERT INTO stats_cache (category, source, entries, hits) "
        "SELECT category, COALESCE(source, ''), COUNT(*), COALESCE(SUM(hit_count), 0) "
        "FROM image_classification_cache GROUP BY 1, 2",
    )


def assemble_stats(now: datetime, rows: Mapping[str, Sequence[Sequence[Any]]]) -> AlbumStats:
    totals = rows["totals"][0]
    today = rows["today"][0]
    categories: dict[str, int] = {}
    hits = 0
    saved = 0
    for category, count, category_hits, llm_hits in rows["cache"]:
        categories[str(category)] = int(count)
        hits += int(category_hits)
        saved += int(llm_hits)
    by_source: dict[str, list[float]] = {}
    for source, ms in rows["latency"]:
        by_source.setdefault(str(source), []).append(float(ms))
    latency = {
        source: {
            "count": float(len(values)),
            "p50": round(float(np.percentile(values, 50)), 2),
            "p99": round(float(np.percentile(values, 99)), 2),
        }
        for source, values in sorted(by_source.items())
    }
    return AlbumStats(
        generated_at=now,
        requests_total=int(totals[0]),
        requests_from_cache_total=int(totals[1]),
        requests_today=int(today[0]),
        requests_from_cache_today=int(today[1]),
        cached_images=sum(categories.values()),
        cache_hits_total=hits,
        # Every hit on an answer the LLM gave is an LLM call the cache saved.
        llm_calls_saved=saved,
        sources={str(s): int(n) for s, n in rows["sources"]},
        categories=dict(sorted(categories.items())),
        latency_ms=latency,
        latency_window_s=LATENCY_WINDOW.total_seconds(),
    )
