"""Scenario 4, coalescing: many concurrent requests over a few new photos.

``PER_PHOTO`` clients each upload each of ``PHOTOS`` photos the service has never
seen, all within a fraction of a second, while the fake LLM takes ~1 s to answer:
every request for one photo arrives while that photo's classification is in
flight. Singleflight means one upstream call per photo; the fake's per-image call
counts say how many there were (the fake hashes the image the service uploads,
which the service may have re-encoded, so the counts are matched by count, not by
hash: the photos have distinct pixels).
"""

from __future__ import annotations

import time

import numpy as np

from .._context import Bench, missing_service
from .._loadgen import uniform_schedule
from .._report import Check, Outcome, Row
from .._stats import summarize
from ._llm import fake_llm, llm_missing

__all__ = ["run"]

PHOTOS = 5
PER_PHOTO = 40
SPREAD_S = 0.25
LATENCY_MEDIAN_MS = 1000.0


def run(bench: Bench) -> Outcome:
    """Scenario 4."""
    if (why := missing_service() or llm_missing()) is not None:
        return Outcome("coalescing", status="skipped", reason=why)
    t_start = time.monotonic()
    photos = bench.photos(PHOTOS, "coalescing")  # distinct bases: distinct pixels
    n = PHOTOS * PER_PHOTO
    offsets = uniform_schedule([(SPREAD_S, n / SPREAD_S)])
    choice = np.arange(len(offsets), dtype=np.int64)
    with fake_llm(bench, "coalescing-fakellm", latency_median_ms=LATENCY_MEDIAN_MS) as fake:
        with bench.xintu("coalescing", env=fake.env) as svc:
            fake.reset()
            # Request i uploads photo i % PHOTOS as simulated user i.
            payloads = bench.classify_payloads(svc, [photos[i % PHOTOS] for i in range(n)])
            result = bench.open(
                svc, payloads, offsets, choice, timeout_s=30.0, grace_s=30.0, warm_conns=n
            )
            upstream = fake.stats(images=True)
    per_photo = sorted((int(v) for v in upstream.get("images", {}).values()), reverse=True)
    s = summarize(result.samples, duration_s=SPREAD_S)
    details = {
        "photos": PHOTOS,
        "requests_per_photo": PER_PHOTO,
        "spread_s": SPREAD_S,
        "fake_latency_median_ms": LATENCY_MEDIAN_MS,
        "upstream_calls_per_photo": per_photo,
        "upstream": {k: v for k, v in upstream.items() if k != "images"},
        "summary": s,
    }
    lat = s["latency_accepted_ms"]
    out = Outcome("coalescing", details=details)
    out.rows = [
        Row(
            "upstream calls per unique photo",
            upstream["calls"] / PHOTOS,
            "calls",
            "singleflight ideal",
            1.0,
            f"{n} requests over {PHOTOS} new photos in {SPREAD_S} s; per photo {per_photo}",
        ),
        Row(
            "latency of coalesced requests, P99",
            lat["p99"],
            "ms",
            "fake LLM median",
            LATENCY_MEDIAN_MS,
            f"P50 {lat['p50']} ms; sources {s['sources']}",
        ),
    ]
    out.checks = [
        Check(
            "one upstream call per photo",
            upstream["calls"] == PHOTOS and per_photo == [1] * PHOTOS,
            f"{upstream['calls']} calls; calls per uploaded image {per_photo}",
        ),
        Check("every request answered 200", s["accepted"] == n, f"statuses {s['status_counts']}"),
    ]
    out.seconds = time.monotonic() - t_start
    return out
