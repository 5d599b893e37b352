"""One open-loop run against a seeded service and the fake LLM, as ``burst``,
``missburst``, ``outage`` and ``hang`` all make it.

The steps they share: the outcome when seeding never reached the upstream
(:func:`unreached`); the run itself with the fake's counters sampled around it
(:func:`drive`: the deadline plus 10 s per request, stragglers waited for up to the
deadline plus 5 s); the details every such scenario reports (:func:`run_details`);
the timeline plot with the upstream's call rate (:func:`plot_run`); and the checks
on refusals and on the generator (:func:`refusal_checks`, :func:`lag_check`).
What differs (phases, windows, rows) stays in each scenario.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .._context import Bench
from .._loadgen import LoadResult, poisson_schedule
from .._plots import plot_timeline
from .._report import Check, Outcome
from .._stats import timeline
from ._llm import LlmSettings, SeededService, StatsPoller
from ._mixed import mixed_load

__all__ = [
    "Driven",
    "MixedRun",
    "drive",
    "lag_check",
    "mixed_with_outage",
    "plot_run",
    "refusal_checks",
    "run_details",
    "unreached",
]


def unreached(name: str) -> Outcome:
    """The outcome of a scenario whose service never called the fake upstream."""
    return Outcome(name, status="failed", reason="the service never called the LLM upstream")


@dataclass
class Driven:
    """What :func:`drive` measured: the load's samples, the fake's counters after
    it, and the poller that sampled them during it."""

    result: LoadResult
    upstream: dict[str, Any]
    poller: StatsPoller


@dataclass
class MixedRun:
    """A mixed load (:func:`~._mixed.mixed_load`) to start at ``t0`` (monotonic)."""

    payloads: list[bytes]
    choice: npt.NDArray[np.int64]
    tags: npt.NDArray[np.int16]
    offsets: npt.NDArray[np.float64]
    t0: float


def mixed_with_outage(
    bench: Bench,
    seeded: SeededService,
    *,
    rate: float,
    total_s: float,
    hit_share: float,
    seed: int,
    salt: str,
    outage_at_s: float,
    outage_s: float,
    **control: Any,
) -> MixedRun:
    """``outage`` and ``hang``'s load: *rate* req/s for *total_s* mixing the seeded
    photos with new ones, starting half a second after the generator is ready, with
    the fake's outage window (*control*: e.g. ``error_mode="hang"``) *outage_at_s*
    into it for *outage_s*."""
    offsets = poisson_schedule([(total_s, rate)], seed=bench.settings.seed + seed)
    payloads, choice, tags = mixed_load(
        bench, seeded.svc, offsets, hit_share=hit_share, known=seeded.known, salt=salt
    )
    t0 = bench.gen.start_time(sum(len(p) for p in payloads)) + 0.5
    seeded.fake.control(
        **control,
        outage_start_s=t0 + outage_at_s - time.monotonic(),
        outage_duration_s=outage_s,
    )
    return MixedRun(payloads, choice, tags, offsets, t0)


def drive(
    bench: Bench,
    seeded: SeededService,
    settings: LlmSettings,
    payloads: Sequence[bytes],
    offsets: npt.NDArray[np.float64],
    choice: npt.NDArray[np.int64],
    tags: npt.NDArray[np.int16],
    *,
    start_at: float | None = None,
    max_conns: int | None = None,
) -> Driven:
    """Run the open loop against the seeded service, sampling the fake's counters."""
    kw: dict[str, Any] = {}
    if start_at is not None:
        kw["start_at"] = start_at
    if max_conns is not None:
        kw["max_conns"] = max_conns
    poller = StatsPoller(seeded.fake)
    poller.start()
    try:
        result = bench.open(
            seeded.svc,
            payloads,
            offsets,
            choice,
            tags=tags,
            timeout_s=settings.deadline_s + 10.0,
            grace_s=settings.deadline_s + 5.0,
            **kw,
        )
    finally:
        poller.stop()
    return Driven(result, seeded.fake.stats(), poller)


def run_details(
    params: dict[str, Any], run: Driven, *, series_t0: float, **more: Any
) -> dict[str, Any]:
    """The details every such scenario reports, then *more* (its windows, counters)."""
    return {
        "params": params,
        **more,
        "upstream": {k: v for k, v in run.upstream.items() if k != "images"},
        "upstream_series": run.poller.series(series_t0),
        "load": run.result.params,
        "generator_cpu_s": round(run.result.generator_cpu_s, 2),
        "client_errors": run.result.client_errors,
    }


def plot_run(
    bench: Bench,
    name: str,
    run: Driven,
    settings: LlmSettings,
    *,
    title: str,
    windows: list[tuple[float, float, str]],
) -> str:
    """The scenario's timeline (``<name>.png``) with the upstream's call rate; its file name."""
    plot = bench.out_dir / f"{name}.png"
    plot_timeline(
        plot,
        timeline(run.result.samples, bin_s=1.0),
        title=title,
        windows=windows,
        deadline_ms=settings.deadline_s * 1000,
        extra_rates={"upstream LLM calls": run.poller.call_rate(run.result.t0)},
    )
    return plot.name


def refusal_checks(w: dict[str, Any], fast_ms: float) -> list[Check]:
    """Refusals are 503/429 with ``Retry-After`` and fast (P99 <= *fast_ms*), and
    nothing else fails, over the summary window *w*."""
    refused = w["latency_refused_ms"]
    return [
        Check(
            "refusals are 503/429 with Retry-After",
            w["refused_with_retry_after"] == w["refused"],
            f"{w['refused']} refused, {w['refused_with_retry_after']} with Retry-After",
        ),
        Check(
            f"refusals are fast (P99 <= {fast_ms:.0f} ms)",
            refused["count"] == 0 or (refused["p99"] or 0.0) <= fast_ms,
            f"refused P99 {refused['p99']} ms over {refused['count']}",
        ),
        Check("nothing else fails", w["errors"] == 0, f"statuses {w['status_counts']}"),
    ]


def lag_check(w: dict[str, Any]) -> Check:
    """The load generator kept its schedule over the summary window *w*."""
    late = w["lateness"]
    return Check(
        "generator kept its schedule",
        not late["generator_lagged"],
        f"lateness P99 {late['p99_ms']} ms, {late['share_over_10ms']:.2%} over 10 ms",
    )
