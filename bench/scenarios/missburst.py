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
Where the refusals' time goes, as the client saw it: the generator's lateness,
the wait for a connection (a new one: the service closes a connection whose
upload it refused before reading the body), and the rest (body, server, answer),
beside the refusals' latency in the service's own request log (with
``XINTU_LOG_LEVEL=info``), where those refused after their body was read and
hashed (past the header check: the log line has an ``image_hash``) are counted
apart. From ``/metrics`` scraped as the burst starts and ends:
the service's event-loop lag over the burst (``xintu_event_loop_lag_seconds``: how
late an LLM answer that has arrived is read) and the connections it accepted. The
samples are kept in ``missburst-samples.npy`` (``bench._loadgen.SAMPLE_DTYPE``).
Checks: refusals are 503/429 with ``Retry-After`` and fast (P99 <=
:data:`REFUSAL_FAST_MS`); accepted P99 within the deadline; nothing else fails.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._context import Bench, missing_service
from .._loadgen import poisson_schedule
from .._report import Check, Outcome, Row, loop_lag_row
from .._services import MetricsAt
from .._stats import REFUSED, breakdown, histogram_window, percentiles, summarize
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
#: What is read from /metrics as the burst starts and ends.
LAG = "xintu_event_loop_lag_seconds"
ACCEPTED = "xintu_connections_accepted_total"
SCRAPED = (LAG, ACCEPTED)
ROUTE = "/api/v1/classify"
#: A request that waited this long for its connection opened a new one (a pooled,
#: kept-alive one is taken in microseconds; the pool of 2,048 is never full here).
NEW_CONNECTION_MS = 0.2


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
        t0 = bench.gen.start_time(sum(len(p) for p in payloads))
        scrapes = MetricsAt(svc, {"start": t0, "end": t0 + burst_s}, SCRAPED)
        try:
            run = drive(
                bench,
                seeded,
                settings,
                payloads,
                offsets,
                choice,
                tags,
                start_at=t0,
                max_conns=2048,
            )
            scrapes.join()
        finally:
            scrapes.cancel()
        after = svc.metrics(SCRAPED)
        counters = service_counters(svc) | hedge_counters(svc)
        logged_refusals = percentiles(svc.logged_latencies_ms(route=ROUTE, status=503))
        # Refused after the body was read and hashed (past the header check).
        logged_late = percentiles(svc.logged_latencies_ms(route=ROUTE, status=503, hashed=True))
    result, upstream = run.result, run.upstream
    s = result.samples
    np.save(bench.out_dir / "missburst-samples.npy", s)
    w = summarize(s, start=0.0, end=burst_s)
    start, end = scrapes.get("start"), scrapes.get("end")
    lag = histogram_window(start, end, LAG)
    in_burst = s[(s["intended"] >= 0.0) & (s["intended"] < burst_s)]
    status = in_burst["status"]
    refused = in_burst[np.isin(status, REFUSED)]
    refused_parts = breakdown(refused)
    opened = (refused["sent"] - refused["started"]) * 1000.0 >= NEW_CONNECTION_MS
    refused_by_connection = {
        "new": breakdown(refused[opened]),
        "kept_alive": breakdown(refused[~opened]),
    }
    accepted_parts = breakdown(in_burst[(status >= 200) & (status < 300)])
    new_conns = end[ACCEPTED] - start[ACCEPTED] if ACCEPTED in end and ACCEPTED in start else None
    details = run_details(
        params,
        run,
        series_t0=result.t0,
        window=w,
        service_counters=counters,
        t0_monotonic=t0,
        loop_lag_burst=lag,
        loop_lag_whole_run=histogram_window(start, after, LAG),
        refused_breakdown=refused_parts,
        refused_breakdown_by_connection=refused_by_connection,
        accepted_breakdown=accepted_parts,
        refused_logged_by_service_ms=logged_refusals,
        refused_after_the_body_logged_ms=logged_late,
        connections_accepted_burst=new_conns,
        connections_accepted_whole_run=(
            after[ACCEPTED] - start[ACCEPTED] if ACCEPTED in after and ACCEPTED in start else None
        ),
        scrapes={"start": start, "end": end, "after": after},
    )
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
    late, conn, rest = (refused_parts[k] for k in ("late_ms", "connection_ms", "rest_ms"))
    new, kept = refused_by_connection["new"], refused_by_connection["kept_alive"]
    out.rows += [
        Row(
            "refused P99, split",
            refused_parts["total_ms"]["p99"],
            "ms",
            "the service's own P99 for them",
            logged_refusals["p99"],
            f"generator lateness P99 {late['p99']} ms; waiting for / opening a connection "
            f"P50 {conn['p50']} ms, P99 {conn['p99']} ms; the rest (body, server, answer) "
            f"P50 {rest['p50']} ms, P99 {rest['p99']} ms; the service's request log: "
            f"P50 {logged_refusals['p50']} ms over {logged_refusals['count']}, of which "
            f"{logged_late['count']} refused after their body was read and hashed (P50 "
            f"{logged_late['p50']} ms, max {logged_late['max']} ms) (XINTU_LOG_LEVEL=info)",
        ),
        Row(
            "connections the service accepted during the burst",
            new_conns,
            "conns",
            "requests sent",
            w["requests"],
            "xintu_connections_accepted_total on /metrics; a refusal decided before "
            "the body is read closes its connection (Connection: close), so the next "
            "request opens a new one. Refusals on a new connection: "
            f"{new['total_ms']['count']}, the rest P50 {new['rest_ms']['p50']} ms, P99 "
            f"{new['rest_ms']['p99']} ms; on a kept-alive one: {kept['total_ms']['count']}, "
            f"P50 {kept['rest_ms']['p50']} ms, P99 {kept['rest_ms']['p99']} ms",
        ),
        loop_lag_row("event-loop lag P99 during the burst", lag),
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
