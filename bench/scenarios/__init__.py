"""The scenarios, one module each, in the order a full run takes them.

Each is a function ``run(bench) -> Outcome``. A scenario whose prerequisites have
not landed (the service, the LLM package and its fake upstream) returns
``Outcome(status="skipped", reason=...)``; one whose service fails returns
``status="failed"`` with the reason. Nothing is ever estimated in their place.
"""

from __future__ import annotations

from collections.abc import Callable

from .._context import Bench
from .._report import Outcome
from . import (
    bookkeeping,
    burst,
    coalescing,
    growth,
    hang,
    hits,
    local,
    loopshare,
    missburst,
    outage,
    scale,
)

__all__ = ["SCENARIOS", "Scenario"]

Scenario = Callable[[Bench], Outcome]

#: name -> (function, one-line description), in run order.
SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "hits": (hits.run, "100% cache hits: max throughput, open loop at 25/50/75%, batch of 100"),
    "local": (local.run, "local path (no LLM) vs bare onnxruntime; in-process path; decode cost"),
    "loopshare": (
        loopshare.run,
        "local path saturated (no LLM) beside hits at 50/s: hits' P99 vs at rest, per executor",
    ),
    "burst": (burst.run, "70% hits, 10x the rate for 10 s, fake LLM at ~1.5 s: shedding"),
    "missburst": (missburst.run, "every photo new, 100/s for 10 s, fake LLM at ~1.5 s: refusals"),
    "outage": (outage.run, "fake LLM fails everything for 20 s: breaker open and recovery"),
    "hang": (hang.run, "fake LLM hangs for 20 s: hedged by the local model, no timeouts"),
    "coalescing": (coalescing.run, "many concurrent requests over a few new photos"),
    "scale": (scale.run, "the hits scenario with --workers 1 and --workers 2"),
    "bookkeeping": (bookkeeping.run, "batch-check-cache x100 at max: hits exact, no writer drops"),
    "growth": (growth.run, "stats at BENCH_GROWTH_ROWS log rows (opt-in; bulk-loaded SQLite)"),
}
