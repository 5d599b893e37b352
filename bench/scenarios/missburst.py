"""Scenario 'missburst': a burst of new photos only, beside the mixed ``burst``.

For :data:`BURST_S` seconds (3 s with ``--quick``) an open-loop Poisson stream of
:data:`RATE_RPS` ``POST /api/v1/classify`` per second uploads ~60 KB JPEGs the
service has never seen: every request is a miss, nothing is a cache hit that could
hide the admission's work. The fake LLM answers after a lognormal ~1.5 s (median),
so the LLM pool (``llm.workers`` / ~1.6 s ≈ 5 calls/s) and the local model (~8
photos/s on two cores) together take a small part of it: the rest must be refused
at once (503 with ``Retry-After``, decided from the headers, before the body is
read), and what is accepted should be answered near ``server.latency_target_s``,
not near the deadline. It stops by itself: the load ends after the burst and the
stragglers' wait is bounded by the deadline.

Measured: accepted P99 (against the latency target), refused P99, answered and
refused counts, sources, and the service's shed, fallback and hedge counters.
Checks: refusals are 503/429 with ``Retry-After`` and fast (P99 <=
:data:`REFUSAL_FAST_MS`); accepted P99 within the deadline; nothing else fails.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._context import Bench, missing_service
from .._loadgen import poisson_schedule
from .._report import Check, Outcome, Row
from .._stats import summarize
from ._llm import (
    hedge_counters,
    llm_missing,
    llm_settings,
    seeded_llm_service,
    service_counters,
)
from ._mixed import TAG_MISS
from ._open import drive, lag_check, plot_run, refusal_checks, run_details, unreached

__all__ = ["run"]

RATE_RPS = 100.0
BURST_S = 10.0
LATENCY_MEDIAN_MS = 1500.0
LATENCY_SIGMA = 0.4
#: A refusal slower than this is not "fast".
REFUSAL_FAST_MS = 200.0


def run(bench: Bench) -> Outcome:
    """Scenario 'missburst'."""
    if (why := missing_service() or llm_missing()) is not None:
        return Outcome("missburst", status="skipped", reason=why)
    t_start = time.monotonic()
    env = {"XINTU_SERVER_REQUEST_DEADLINE_S": "5"} if bench.settings.quick else {}
    settings = llm_settings(bench, env)
    from xintu import load_config

    server = load_config(env=dict(bench.settings.env) | env).server
    # A service from before server.latency_target_s aims at the deadline.
    target_s = min(getattr(server, "latency_target_s", settings.deadline_s), settings.deadline_s)
    burst_s = bench.dur(BURST_S, 3.0)
    params: dict[str, Any] = {
        "rate_rps": RATE_RPS,
        "burst_s": burst_s,
        "fake_latency_median_ms": LATENCY_MEDIAN_MS,
        "fake_latency_sigma": LATENCY_SIGMA,
        "deadline_s": settings.deadline_s,
        "latency_target_s": target_s,
        "llm_workers": settings.workers,
        "service_env": env,
    }
    with seeded_llm_service(
        bench,
        "missburst",
        env=env,
        known=int(bench.dur(16, 8)),
        latency_median_ms=LATENCY_MEDIAN_MS,
        latency_sigma=LATENCY_SIGMA,
    ) as seeded:
        params["seeding"] = seeded.seeding
        if not seeded.reached_upstream:
            return unreached("missburst")
        svc = seeded.svc
        offsets = poisson_schedule([(burst_s, RATE_RPS)], seed=bench.settings.seed + 7)
        fresh = bench.photos(len(offsets), "missburst-new")
        payloads = bench.classify_payloads(svc, fresh)
        choice = np.arange(len(offsets), dtype=np.int64)
        tags = np.full(len(offsets), TAG_MISS, dtype=np.int16)
        run = drive(bench, seeded, settings, payloads, offsets, choice, tags, max_conns=2048)
        counters = service_counters(svc) | hedge_counters(svc)
    result, upstream = run.result, run.upstream
    s = result.samples
    w = summarize(s, start=0.0, end=burst_s)
    details = run_details(params, run, series_t0=result.t0, window=w, service_counters=counters)
    plot = plot_run(
        bench,
        "missburst",
        run,
        settings,
        title=f"missburst: {RATE_RPS:.0f} new photos/s for {burst_s:.0f} s, LLM ~1.5 s",
        windows=[(0.0, burst_s, "burst")],
    )
    out = Outcome("missburst", details=details, plots=[plot])
    lat, refused = w["latency_accepted_ms"], w["latency_refused_ms"]
    out.rows = [
        Row(
            "accepted P99 (every photo new)",
            lat["p99"],
            "ms",
            "latency target",
            target_s * 1000.0,
            f"P50 {lat['p50']} ms, P90 {lat['p90']} ms, max {lat['max']} ms; "
            f"deadline {settings.deadline_s * 1000:.0f} ms",
        ),
        Row(
            "refused P99",
            refused["p99"],
            "ms",
            note=f"P50 {refused['p50']} ms; {w['refused']} refused, "
            f"{w['refused_with_retry_after']} with Retry-After",
        ),
        Row(
            "photos answered",
            w["accepted"],
            "req",
            "photos sent",
            w["requests"],
            f"statuses {w['status_counts']}; sources {w['sources']}",
        ),
        Row(
            "goodput",
            w["goodput_rps"],
            "req/s",
            "offered",
            w["offered_rps"],
            f"upstream calls {upstream['calls']}, max in flight {upstream['max_in_flight']} "
            f"(llm.workers = {settings.workers})",
        ),
    ]
    out.rows.append(bench.rss_row("missburst"))
    checks = refusal_checks(w, REFUSAL_FAST_MS)
    out.checks = [
        *checks[:2],
        Check(
            "accepted P99 within the deadline",
            (lat["p99"] or 0.0) <= settings.deadline_s * 1000.0,
            f"{lat['p99']} ms; deadline {settings.deadline_s * 1000:.0f} ms",
        ),
        *checks[2:],
        lag_check(w),
    ]
    out.seconds = time.monotonic() - t_start
    return out
