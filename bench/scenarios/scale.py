"""Scenario 6, scale: the hits scenario with ``--workers 1`` and ``--workers 2``.

Each worker count gets its own service and its own hello-world baseline with the
same worker count; the last row is the throughput ratio of two workers to one. On a
2-core machine the generator processes share those cores with the workers, so the
ceiling is the machine, not the service: the note says how much CPU the generator
took.
"""

from __future__ import annotations

import time

from .._context import Bench, missing_service
from .._report import Outcome, Row
from .hits import hit_checks, measure_hits

__all__ = ["run"]


def run(bench: Bench) -> Outcome:
    """Hits at 1 and 2 Hypercorn workers."""
    if (why := missing_service()) is not None:
        return Outcome("scale", status="skipped", reason=why)
    t0 = time.monotonic()
    out = Outcome("scale")
    max_rps: dict[int, float] = {}
    for workers in (1, 2):
        details, rows, plots = measure_hits(
            bench,
            f"scale-w{workers}",
            workers=workers,
            fractions=() if bench.settings.quick else (0.5,),
            batch=False,
        )
        out.details[f"w{workers}"] = details
        out.rows.extend(rows)
        out.plots.extend(plots)
        out.checks.extend(hit_checks(details))
        max_rps[workers] = details["closed"]["goodput_rps"]
        gen = details["closed"]["generator_cpu_s"]
        svc = details["closed"]["service_cpu_s"]
        out.details[f"w{workers}"]["cpu_split"] = {"generator_cpu_s": gen, "service_cpu_s": svc}
    out.rows.append(
        Row(
            "check-cache max throughput, 2 workers vs 1",
            max_rps[2],
            "req/s",
            "1 worker",
            max_rps[1],
            "2 cores shared by the workers and the generator processes",
        )
    )
    out.seconds = time.monotonic() - t0
    return out
