"""Scenario 'hang': the fake LLM stops answering (hangs) for 20 s, beside ``outage``.

``outage`` makes the upstream fail fast (HTTP 500), which the breaker sees. A hung
upstream is worse: no answer, no error, and a call ends only at the caller's
deadline less ``llm.fallback_reserve_s`` (8.5 s by default). The breaker counts a
call still unanswered after ``llm.breaker_slow_call_s`` (5 s) as a failure, so it
opens a few seconds into the hang. What bounds a caller's wait meanwhile is the
hedge: after the pool's recent P95 call time (``llm.hedge_quantile``, within
``llm.hedge_min_s``..``hedge_after_s``) the local model classifies the photo
beside the hung call and answers.

Steady open-loop classify load as in ``outage`` (70 % known photos, 30 % new; the
fake answers in ~0.5 s median while healthy; the rate is half of what the LLM pool
or the local model could take, whichever is less). Phases: 10 s healthy, 20 s hung
(the fake's outage window with ``error_mode = hang``), 10 s after (5 + 5 + 3 s with
``--quick``). It stops by itself: the load ends after the last phase and the
stragglers' wait is bounded by the deadline.

Measured: the time until the breaker opens (``xintu_breaker_state`` on
``/metrics``, as in ``outage``), the new photos' accepted P99 during the hang
against the hedge budget
(read from the service's ``xintu_llm_hedge_after_seconds`` when the hang starts)
plus the local path's P99 (the ``local`` scenario's open-loop P99 at 70 %, when it
ran first: ``python -m bench local hang``); answered and refused counts and the
refusals' P99; the hedges (started, won by each side, replaced) from ``/metrics``;
the service's event-loop lag before and during the hang
(``xintu_event_loop_lag_seconds`` on ``/metrics`` scraped as the phases start and
end: a healthy answer that has arrived is read that late).
Checks: nothing fails; no new photo waits for the hung call (accepted P99 during the
hang below the deadline less the reserve).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .._context import Bench, missing_service
from .._report import Check, Outcome, Row, loop_lag_row
from .._services import MetricsAt
from .._stats import histogram_window, summarize
from ._llm import (
    BreakerPoller,
    hedge_counters,
    llm_missing,
    llm_settings,
    lognormal_mean_s,
    seeded_llm_service,
    service_counters,
)
from ._mixed import TAG_MISS
from ._open import drive, mixed_with_outage, plot_run, run_details, unreached

__all__ = ["run"]

HIT_SHARE = 0.7
LATENCY_MEDIAN_MS = 500.0
LATENCY_SIGMA = 0.3
LLM_USE = 0.5
#: Local throughput assumed when the ``local`` scenario did not run before.
LOCAL_DEFAULT_IMG_S = 6.0

_HEDGES = 'xintu_llm_hedges_total{outcome="%s"}'
_LAG = "xintu_event_loop_lag_seconds"


def run(bench: Bench) -> Outcome:
    """Scenario 'hang'."""
    if (why := missing_service() or llm_missing()) is not None:
        return Outcome("hang", status="skipped", reason=why)
    t_start = time.monotonic()
    settings = llm_settings(bench, {})
    capacity = settings.workers / lognormal_mean_s(LATENCY_MEDIAN_MS, LATENCY_SIGMA)
    local = bench.measured.get("local_img_s", LOCAL_DEFAULT_IMG_S)
    rate = LLM_USE * min(capacity, local) / (1.0 - HIT_SHARE)
    before, hang_s, after = bench.dur(10.0, 5.0), bench.dur(20.0, 5.0), bench.dur(10.0, 3.0)
    total = before + hang_s + after
    call_deadline_ms = (settings.deadline_s - settings.fallback_reserve_s) * 1000.0
    params: dict[str, Any] = {
        "rate_rps": round(rate, 2),
        "hit_share": HIT_SHARE,
        "phases_s": [before, hang_s, after],
        "fake_latency_median_ms": LATENCY_MEDIAN_MS,
        "deadline_s": settings.deadline_s,
        "fallback_reserve_s": settings.fallback_reserve_s,
    }
    with seeded_llm_service(
        bench,
        "hang",
        env={},
        known=int(bench.dur(60, 24)),
        latency_median_ms=LATENCY_MEDIAN_MS,
        latency_sigma=LATENCY_SIGMA,
    ) as seeded:
        params["seeding"] = seeded.seeding
        if not seeded.reached_upstream:
            return unreached("hang")
        svc = seeded.svc
        at_hang: dict[str, float] = {}
        load = mixed_with_outage(
            bench,
            seeded,
            rate=rate,
            total_s=total,
            hit_share=HIT_SHARE,
            seed=9,
            salt="hang-new",
            outage_at_s=before,
            outage_s=hang_s,
            error_mode="hang",
        )
        t0 = load.t0
        reader = threading.Timer(
            max(t0 + before - time.monotonic(), 0.0), lambda: at_hang.update(hedge_counters(svc))
        )
        reader.start()
        phases = {"start": t0, "hang": t0 + before, "hang_end": t0 + before + hang_s}
        scrapes = MetricsAt(svc, phases, (_LAG,))
        breaker = BreakerPoller(svc, "openai")
        breaker.start()
        try:
            run = drive(
                bench,
                seeded,
                settings,
                load.payloads,
                load.offsets,
                load.choice,
                load.tags,
                start_at=t0,
            )
            scrapes.join()
        finally:
            breaker.stop()
            scrapes.cancel()
        reader.join(5)
        counters = service_counters(svc) | hedge_counters(svc)
    result = run.result
    s = result.samples
    h0, h1 = before, before + hang_s
    windows = {
        "before_misses": summarize(s, start=0.0, end=h0, tag=TAG_MISS),
        "hang": summarize(s, start=h0, end=h1),
        "hang_misses": summarize(s, start=h0, end=h1, tag=TAG_MISS),
        "after_misses": summarize(s, start=h1, end=total, tag=TAG_MISS),
        "all": summarize(s, start=0.0, end=total),
    }
    lag_before = histogram_window(scrapes.get("start"), scrapes.get("hang"), _LAG)
    lag_hang = histogram_window(scrapes.get("hang"), scrapes.get("hang_end"), _LAG)
    opened = breaker.first_open(t0 + h0, t0 + h1)
    opened_after = None if opened is None else round(opened - (t0 + h0), 2)
    calls = 'xintu_llm_calls_total{outcome="%s",provider="openai"}'
    budget_s = at_hang.get("xintu_llm_hedge_after_seconds")
    local_p99 = bench.measured.get("local_open_p99_ms")
    baseline = budget_s * 1000.0 + local_p99 if budget_s and local_p99 else None
    details = run_details(
        params,
        run,
        series_t0=t0,
        windows=windows,
        breaker_opened_after_s=opened_after,
        hedge_budget_at_hang_s=budget_s,
        metrics_at_hang=at_hang,
        service_counters=counters,
        loop_lag_before=lag_before,
        loop_lag_hang=lag_hang,
    )
    plot = plot_run(
        bench,
        "hang",
        run,
        settings,
        title=f"hang: {rate:.0f} req/s, 70% hits; upstream hangs for {hang_s:.0f} s",
        windows=[(h0, h1, "LLM hangs")],
    )
    out = Outcome("hang", details=details, plots=[plot])
    hm, bm = windows["hang_misses"], windows["before_misses"]
    hang_p99 = hm["latency_accepted_ms"]["p99"]

    def hedges(outcome: str) -> float:
        return counters.get(_HEDGES % outcome, 0.0) - at_hang.get(_HEDGES % outcome, 0.0)

    out.rows = [
        Row(
            "time until the breaker opens while it hangs",
            opened_after,
            "s",
            "llm.breaker_slow_call_s",
            settings.breaker_slow_call_s,
            "read from xintu_breaker_state on /metrics; LLM calls in the run: "
            f"{counters.get(calls % 'failure', 0):.0f} failed (slow counts), "
            f"{counters.get(calls % 'abandoned', 0):.0f} abandoned; upstream calls "
            f"{run.upstream['calls']}, still in flight at the end {run.upstream['in_flight']}",
        ),
        Row(
            "new photos' P99 while the upstream hangs",
            hang_p99,
            "ms",
            "hedge budget + local path P99" if baseline else "",
            baseline,
            f"hedge budget {budget_s} s at the hang's start; local P99 {local_p99} ms"
            + ("" if local_p99 else " (run `python -m bench local hang` for it)")
            + f"; P50 {hm['latency_accepted_ms']['p50']} ms; sources {hm['sources']}",
        ),
        Row(
            "new photos' P99 before the hang (healthy LLM)",
            bm["latency_accepted_ms"]["p99"],
            "ms",
            note=f"sources {bm['sources']}",
        ),
        Row(
            "new photos' P99 while it hangs vs the hung call's deadline",
            hang_p99,
            "ms",
            "deadline less the reserve",
            call_deadline_ms,
            "what a caller waited before hedging: the hung call's end",
        ),
        Row(
            "photos answered while it hangs",
            windows["hang"]["accepted"],
            "req",
            "sent",
            windows["hang"]["requests"],
            f"statuses {windows['hang']['status_counts']}; refused P99 "
            f"{windows['hang']['latency_refused_ms']['p99']} ms",
        ),
        Row(
            "hedges from the hang on",
            hedges("started"),
            "",
            note=f"local won {hedges('local_won'):.0f}, LLM won {hedges('llm_won'):.0f}, "
            f"withdrawn from the LLM queue {hedges('withdrawn'):.0f}, late LLM answers "
            f"replaced {hedges('replaced'):.0f}",
        ),
        loop_lag_row(
            "event-loop lag P99 while the upstream hangs",
            lag_hang,
            "before the hang",
            lag_before["p99"],
        ),
        Row(
            "new photos' P99 after the hang",
            windows["after_misses"]["latency_accepted_ms"]["p99"],
            "ms",
            note=f"sources {windows['after_misses']['sources']}",
        ),
    ]
    out.rows.append(bench.rss_row("hang"))
    w = windows["all"]
    out.checks = [
        Check(
            "nothing fails during or after the hang",
            w["errors"] == 0 and w["refused"] == 0,
            f"statuses {w['status_counts']}",
        ),
        Check(
            "no new photo waits for the hung call (P99 < deadline less the reserve)",
            hang_p99 is not None and hang_p99 < call_deadline_ms,
            f"{hang_p99} ms vs {call_deadline_ms:.0f} ms",
        ),
        Check(
            "hedges were started while it hung",
            hedges("started") > 0,
            f"{hedges('started'):.0f} started",
        ),
    ]
    out.seconds = time.monotonic() - t_start
    return out
