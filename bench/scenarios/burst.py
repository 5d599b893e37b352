"""Scenario 2, burst: steady load, then ten times the rate for 10 s, then steady again.

Every request is ``POST /api/v1/classify``: 70 % upload a photo the service already
knows (a hit), 30 % a photo it has never seen (a miss, which goes to the LLM). The
fake LLM answers after a lognormal ~1.5 s (median). The steady rate is sized from
the service's own settings so that steady misses use 60 % of the LLM pool
(``llm.workers`` / mean latency); the burst is ten times that.

With ``--quick`` the phases are 3, 3 and 4 s and the service's request deadline is
5 s (stated in the details).

Checks: the accepted requests' P99 stays within the configured deadline; refusals
are 503 (or 429) with ``Retry-After`` and come back fast; nothing else fails (no
other 5xx, no 504, no client timeout or connection error).
"""

from __future__ import annotations

import time
from typing import Any

from .._context import Bench, missing_service
from .._loadgen import poisson_schedule
from .._report import Check, Outcome, Row
from .._stats import summarize
from ._llm import llm_missing, llm_settings, lognormal_mean_s, seeded_llm_service, service_counters
from ._mixed import TAG_HIT, TAG_MISS, mixed_load
from ._open import drive, lag_check, plot_run, refusal_checks, run_details, unreached

__all__ = ["run"]

HIT_SHARE = 0.7
BURST_FACTOR = 10.0
LATENCY_MEDIAN_MS = 1500.0
LATENCY_SIGMA = 0.4
STEADY_LLM_USE = 0.6
#: A refusal slower than this is not "fast".
REFUSAL_FAST_MS = 200.0


def run(bench: Bench) -> Outcome:
    """Scenario 2."""
    if (why := missing_service() or llm_missing()) is not None:
        return Outcome("burst", status="skipped", reason=why)
    t_start = time.monotonic()
    # --quick: a 5 s deadline, so that the stragglers of a short run end sooner.
    env = {"XINTU_SERVER_REQUEST_DEADLINE_S": "5"} if bench.settings.quick else {}
    settings = llm_settings(bench, env)
    capacity = settings.workers / lognormal_mean_s(LATENCY_MEDIAN_MS, LATENCY_SIGMA)
    steady = STEADY_LLM_USE * capacity / (1.0 - HIT_SHARE)
    burst = BURST_FACTOR * steady
    before, burst_s, after = bench.dur(10.0, 3.0), bench.dur(10.0, 3.0), bench.dur(15.0, 4.0)
    phases = [(before, steady), (burst_s, burst), (after, steady)]
    params: dict[str, Any] = {
        "hit_share": HIT_SHARE,
        "steady_rps": round(steady, 2),
        "burst_rps": round(burst, 2),
        "phases_s": [before, burst_s, after],
        "fake_latency_median_ms": LATENCY_MEDIAN_MS,
        "fake_latency_sigma": LATENCY_SIGMA,
        "deadline_s": settings.deadline_s,
        "llm_workers": settings.workers,
        "service_env": env,
    }
    with seeded_llm_service(
        bench,
        "burst",
        env=env,
        known=int(bench.dur(100, 32)),
        latency_median_ms=LATENCY_MEDIAN_MS,
        latency_sigma=LATENCY_SIGMA,
    ) as seeded:
        params["seeding"] = seeded.seeding
        if not seeded.reached_upstream:
            return unreached("burst")
        svc, known = seeded.svc, seeded.known
        offsets = poisson_schedule(phases, seed=bench.settings.seed + 2)
        payloads, choice, tags = mixed_load(
            bench, svc, offsets, hit_share=HIT_SHARE, known=known, salt="burst-new"
        )
        run = drive(bench, seeded, settings, payloads, offsets, choice, tags, max_conns=2048)
        counters = service_counters(svc)
    result, upstream = run.result, run.upstream
    s = result.samples
    b0, b1 = before, before + burst_s
    windows = {
        "before": summarize(s, start=0.0, end=b0),
        "burst": summarize(s, start=b0, end=b1),
        "after": summarize(s, start=b1, end=b1 + after),
        "all": summarize(s, start=0.0, end=b1 + after),
        "before_hits": summarize(s, start=0.0, end=b0, tag=TAG_HIT),
        "burst_hits": summarize(s, start=b0, end=b1, tag=TAG_HIT),
        "burst_misses": summarize(s, start=b0, end=b1, tag=TAG_MISS),
    }
    misses = int((tags == TAG_MISS).sum())
    details = run_details(
        params, run, series_t0=result.t0, windows=windows, service_counters=counters
    )
    plot = plot_run(
        bench,
        "burst",
        run,
        settings,
        title=f"burst: {steady:.0f} -> {burst:.0f} -> {steady:.0f} req/s, 70% hits, LLM ~1.5 s",
        windows=[(b0, b1, f"{BURST_FACTOR:.0f}x burst")],
    )
    out = Outcome("burst", details=details, plots=[plot])
    deadline_ms = settings.deadline_s * 1000.0
    for name in ("before", "burst", "after"):
        w = windows[name]
        lat = w["latency_accepted_ms"]
        where = "in" if name == "burst" else name
        out.rows.append(
            Row(
                f"accepted P99 {where} the burst",
                lat["p99"],
                "ms",
                "deadline",
                deadline_ms,
                f"{w['offered_rps']:.0f} req/s offered, goodput {w['goodput_rps']:.0f}/s, "
                f"refused {w['refused']}; P50 {lat['p50']} ms, P99.9 {lat['p999']} ms",
            )
        )
    bw = windows["burst"]
    bh, bm = windows["burst_hits"], windows["burst_misses"]
    out.rows += [
        Row(
            "hits' P99 in the burst (known photos re-uploaded)",
            bh["latency_accepted_ms"]["p99"],
            "ms",
            "hits' P99 before",
            windows["before_hits"]["latency_accepted_ms"]["p99"],
            f"P50 {bh['latency_accepted_ms']['p50']} ms; statuses {bh['status_counts']}",
        ),
        Row(
            "misses answered in the burst",
            bm["accepted"],
            "req",
            "misses sent",
            bm["requests"],
            f"statuses {bm['status_counts']}; answered P99 {bm['latency_accepted_ms']['p99']} ms",
        ),
        Row(
            "goodput in the burst",
            bw["goodput_rps"],
            "req/s",
            "offered",
            bw["offered_rps"],
            f"sources {bw['sources']}",
        ),
        Row(
            "refused P99 in the burst",
            bw["latency_refused_ms"]["p99"],
            "ms",
            note=f"{bw['refused']} refused ({bw['refused_rps']:.1f}/s), "
            f"{bw['refused_with_retry_after']} with Retry-After",
        ),
        Row(
            "upstream calls per miss",
            upstream["calls"] / misses if misses else None,
            "",
            note=f"{upstream['calls']} calls, {misses} misses; max in flight "
            f"{upstream['max_in_flight']} (llm.workers = {settings.workers})",
        ),
    ]
    out.rows.append(bench.rss_row("burst"))
    out.checks = _checks(windows, deadline_ms)
    out.checks.append(lag_check(windows["all"]))
    out.seconds = time.monotonic() - t_start
    return out


def _checks(windows: dict[str, dict[str, Any]], deadline_ms: float) -> list[Check]:
    phases = ("before", "burst", "after")
    p99s = {name: windows[name]["latency_accepted_ms"]["p99"] or 0.0 for name in phases}
    return [
        Check(
            "accepted P99 within the deadline (each phase)",
            max(p99s.values()) <= deadline_ms,
            ", ".join(f"{k} {v:.0f} ms" for k, v in p99s.items())
            + f"; deadline {deadline_ms:.0f} ms",
        ),
        *refusal_checks(windows["all"], REFUSAL_FAST_MS),
    ]
