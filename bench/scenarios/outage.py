"""Scenario 3, outage: the fake LLM fails every call for 20 s mid-run, then recovers.

Steady open-loop classify load (70 % hits, 30 % new photos) runs before, during and
after the outage. The fake answers in ~0.5 s (median) and, during the outage, with
HTTP 500 after that same latency. The miss rate is half of what the LLM pool or the
local model could take, whichever is less (the local path's throughput as the
``local`` scenario measured it in this run, else :data:`LOCAL_DEFAULT_IMG_S`), so the
fallback can absorb the outage and what is measured is the breaker. Measured:

- time until the breaker opens: from the outage's start to the first reading of
  ``xintu_breaker_state`` = open on the service's ``/metrics`` (sampled every 0.2 s),
  and, from the fake's side, to the moment upstream calls stop (no new call for
  :data:`QUIET_S`; the fake's counters are sampled every 0.1 s);
- accepted P99 during the outage (misses fall back to the local model) against P99
  before it;
- misses' P99 once the breaker is open (from its opening to the outage's end)
  against the local path's P99 at 70 % of its maximum (the ``local`` scenario, when
  it ran first in the same invocation: ``python -m bench local outage``);
- upstream calls made during the outage (retries and half-open probes included);
- time to recover: from the outage's end to the first miss answered by the LLM.

With ``--quick`` the outage is 5 s, ``llm.breaker_open_s`` is lowered to 3 s and
``llm.breaker_min_calls`` to 5 (stated in the details) so that opening and recovery
fit the run.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._context import Bench, missing_service
from .._http import SOURCES
from .._report import Check, Outcome, Row
from .._stats import summarize
from ._llm import (
    BreakerPoller,
    StatsPoller,
    llm_missing,
    llm_settings,
    lognormal_mean_s,
    seeded_llm_service,
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
#: Upstream silent this long means the breaker is open (well under breaker_open_s).
QUIET_S = 1.5

# Issue 14's outage target: once the breaker is open, misses' P99 within this
# many times the local path's P99 at the same load.
OPEN_P99_MAX_RATIO = 1.5


def _breaker_opened(poller: StatsPoller, start: float, end: float) -> float | None:
    """First sample time in [start, end) after which no call starts for QUIET_S."""
    samples = [s for s in poller.samples if start <= s[0] < end]
    for i, (t, calls, _f, _in) in enumerate(samples):
        later = [s for s in samples[i:] if s[0] <= t + QUIET_S]
        if later and later[-1][0] >= t + QUIET_S - 0.3 and later[-1][1] == calls:
            return t
    return None


def run(bench: Bench) -> Outcome:
    """Scenario 3."""
    if (why := missing_service() or llm_missing()) is not None:
        return Outcome("outage", status="skipped", reason=why)
    t_start = time.monotonic()
    quick_env = {"XINTU_LLM_BREAKER_OPEN_S": "3", "XINTU_LLM_BREAKER_MIN_CALLS": "5"}
    env = quick_env if bench.settings.quick else {}
    settings = llm_settings(bench, env)
    capacity = settings.workers / lognormal_mean_s(LATENCY_MEDIAN_MS, LATENCY_SIGMA)
    local = bench.measured.get("local_img_s", LOCAL_DEFAULT_IMG_S)
    rate = LLM_USE * min(capacity, local) / (1.0 - HIT_SHARE)
    before = bench.dur(10.0, 2.0)
    outage_s = bench.dur(20.0, 5.0)
    after = bench.dur(settings.breaker_open_s + 10.0, settings.breaker_open_s + 3.0)
    total = before + outage_s + after
    params: dict[str, Any] = {
        "rate_rps": round(rate, 2),
        "llm_capacity_per_s": round(capacity, 2),
        "local_capacity_img_s": local,
        "hit_share": HIT_SHARE,
        "phases_s": [before, outage_s, after],
        "fake_latency_median_ms": LATENCY_MEDIAN_MS,
        "service_env": env,
        "breaker_open_s": settings.breaker_open_s,
        "breaker_min_calls": settings.breaker_min_calls,
        "breaker_consecutive_failures": settings.breaker_consecutive_failures,
    }
    with seeded_llm_service(
        bench,
        "outage",
        env=env,
        known=int(bench.dur(60, 24)),
        latency_median_ms=LATENCY_MEDIAN_MS,
        latency_sigma=LATENCY_SIGMA,
    ) as seeded:
        params["seeding"] = seeded.seeding
        if not seeded.reached_upstream:
            return unreached("outage")
        breaker = BreakerPoller(seeded.svc, "openai")
        breaker.start()
        load = mixed_with_outage(
            bench,
            seeded,
            rate=rate,
            total_s=total,
            hit_share=HIT_SHARE,
            seed=3,
            salt="outage-new",
            outage_at_s=before,
            outage_s=outage_s,
        )
        t0, tags = load.t0, load.tags
        try:
            run = drive(
                bench, seeded, settings, load.payloads, load.offsets, load.choice, tags, start_at=t0
            )
        finally:
            breaker.stop()
    result, poller = run.result, run.poller
    s = result.samples
    o0, o1 = before, before + outage_s
    quiet = _breaker_opened(poller, t0 + o0, t0 + o1)
    state_open = breaker.first_open(t0 + o0, t0 + o1)
    # The service's own state when it was read; the fake's silence otherwise.
    opened = state_open if state_open is not None else quiet
    calls_during = poller.calls_at(t0 + o1) - poller.calls_at(t0 + o0)
    llm_code = SOURCES.index("llm")
    ok_llm = (s["source"] == llm_code) & (s["status"] == 200) & (s["tag"] == TAG_MISS)
    after_llm = s["done"][ok_llm & (s["done"] >= o1)]
    recovered = float(np.nanmin(after_llm)) - o1 if after_llm.size else None
    windows = {
        "before": summarize(s, start=0.0, end=o0),
        "outage": summarize(s, start=o0, end=o1),
        "after": summarize(s, start=o1, end=total),
        "all": summarize(s, start=0.0, end=total),
        "outage_misses": summarize(s, start=o0, end=o1, tag=TAG_MISS),
        "open_misses": summarize(
            s, start=o1 if opened is None else opened - t0, end=o1, tag=TAG_MISS
        ),
        "before_misses": summarize(s, start=0.0, end=o0, tag=TAG_MISS),
    }
    opened_after = None if opened is None else round(opened - (t0 + o0), 2)
    quiet_after = None if quiet is None else round(quiet - (t0 + o0), 2)
    recovered_after = None if recovered is None else round(recovered, 2)
    details = run_details(
        params,
        run,
        series_t0=t0,
        windows=windows,
        breaker_opened_after_s=opened_after,
        breaker_state_read=state_open is not None,
        upstream_quiet_after_s=quiet_after,
        upstream_calls_during_outage=calls_during,
        recovered_after_s=recovered_after,
    )
    plot = plot_run(
        bench,
        "outage",
        run,
        settings,
        title=f"outage: {rate:.0f} req/s, 70% hits; upstream fails for {outage_s:.0f} s",
        windows=[(o0, o1, "LLM outage")],
    )
    out = Outcome("outage", details=details, plots=[plot])
    local_p99 = bench.measured.get("local_open_p99_ms")
    bm, om = windows["before_misses"], windows["outage_misses"]
    out.rows = [
        Row(
            "time until the breaker opens",
            opened_after,
            "s",
            note=(
                "read from xintu_breaker_state on /metrics"
                if state_open is not None
                else "the service's state was not read: when upstream calls stopped"
            )
            + f"; upstream calls stopped after {quiet_after} s "
            f"(silent for {QUIET_S} s); breaker_min_calls "
            f"{settings.breaker_min_calls}, breaker_consecutive_failures "
            f"{settings.breaker_consecutive_failures}, fake latency ~{LATENCY_MEDIAN_MS:.0f} ms",
        ),
        Row(
            "misses' P99 during the outage",
            om["latency_accepted_ms"]["p99"],
            "ms",
            "misses' P99 before",
            bm["latency_accepted_ms"]["p99"],
            f"sources during outage {om['sources']}; all requests' P99 "
            f"{windows['outage']['latency_accepted_ms']['p99']} ms",
        ),
        Row(
            "misses' P99 once the breaker is open",
            windows["open_misses"]["latency_accepted_ms"]["p99"],
            "ms",
            "local path P99 at 70 % (local scenario)" if local_p99 else "",
            local_p99,
            f"{windows['open_misses']['requests']} misses from the opening to the outage's end"
            + ("" if local_p99 else "; run `python -m bench local outage` for the baseline"),
        ),
        Row(
            "upstream calls during the outage",
            calls_during,
            "calls",
            note=f"{om['requests']} misses in the outage",
        ),
        Row(
            "time to recover after the outage",
            recovered_after,
            "s",
            "breaker_open_s",
            settings.breaker_open_s,
            "first miss answered by the LLM after the outage ended",
        ),
    ]
    w = windows["all"]
    out.rows.append(bench.rss_row("outage"))
    out.checks = [
        Check(
            "nothing fails during or after the outage",
            w["errors"] == 0 and w["refused"] == 0,
            f"statuses {w['status_counts']}",
        ),
        Check(
            "the breaker opens during the outage",
            opened is not None,
            f"after {opened_after} s",
        ),
        Check(
            "the LLM answers again after the outage",
            recovered is not None,
            f"after {recovered_after} s",
        ),
    ]
    open_p99 = windows["open_misses"]["latency_accepted_ms"]["p99"]
    if local_p99:
        out.checks.append(
            Check(
                "misses' P99 once the breaker is open within 1.5x the local path's P99",
                open_p99 is not None and open_p99 <= OPEN_P99_MAX_RATIO * local_p99,
                f"{open_p99} ms vs local {local_p99} ms",
            )
        )
    out.seconds = time.monotonic() - t_start
    return out
