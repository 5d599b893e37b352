"""Scenario 1, hits: 100 % cache hits on ``check-cache``, and ``batch-check-cache``.

The service classifies N generated photos (the seeding), then gets only
``check-cache`` requests for their hashes: a closed loop finds the maximum
throughput, then open loops run at 25, 50 and 75 % of it. A closed loop on
``batch-check-cache`` with 100 hashes per request follows, alternated with the
same requests asking for the local model's evidence (``?evidence=true``): hashes/s
and the bytes of one answer, lean and with evidence, measured in the same run.
The hello-world app on the same Hypercorn settings runs beside it (idle while the
service is measured) and gets the same loads interleaved with the service's: the
closed loops alternate in short runs (service, hello, service, hello, ...), and
each open-loop rate runs on the service and then at the same absolute rate on
hello-world. The ratios compare the two.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from .._context import Bench, missing_service
from .._loadgen import LoadResult, poisson_schedule
from .._plots import plot_timeline
from .._report import Check, Outcome, Row
from .._services import Service
from .._stats import summarize, timeline

__all__ = ["measure_hits", "run"]

BATCH = 100
#: The open loops' fixed pool of keep-alive connections (see bench._loadgen).
OPEN_CONNECTIONS = 64


def _closed_pairs(
    bench: Bench,
    targets: Sequence[tuple[Service, Sequence[bytes]]],
    *,
    duration_s: float,
    reps: int,
) -> list[dict[str, Any]]:
    """Closed loops alternating between *targets* (A, B, A, B, ...), merged per target.

    Alternating short runs instead of one long run each spreads the machine's noise
    evenly over the service and its baseline, so their ratio is fairer.
    """
    runs: list[list[LoadResult]] = [[] for _ in targets]
    cpu = [0.0 for _ in targets]
    for _ in range(reps):
        for i, (svc, payloads) in enumerate(targets):
            cpu0 = svc.cpu_seconds()
            runs[i].append(bench.closed(svc, payloads, duration_s=duration_s / reps))
            cpu[i] += svc.cpu_seconds() - cpu0
    out = []
    for i, results in enumerate(runs):
        shifted = []
        for k, r in enumerate(results):
            rows = r.samples.copy()
            for col in ("intended", "started", "sent", "done"):
                rows[col] += k * duration_s / reps
            shifted.append(rows)
        summary = summarize(np.concatenate(shifted), duration_s=duration_s)
        summary["service_cpu_s"] = round(cpu[i], 2)
        summary["generator_cpu_s"] = round(sum(r.generator_cpu_s for r in results), 2)
        out.append(summary)
    return out


def _open(bench: Bench, svc: Service, payloads: Sequence[bytes], rate: float, seed: int) -> Any:
    span = bench.dur(8.0, 1.5)
    offsets = poisson_schedule([(span, rate)], seed=seed)
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(payloads), len(offsets))
    result = bench.open(
        svc, payloads, offsets, choice, max_conns=OPEN_CONNECTIONS, warm_conns=OPEN_CONNECTIONS
    )
    return result, span


def measure_hits(
    bench: Bench, label: str, *, workers: int, fractions: Sequence[float], batch: bool
) -> tuple[dict[str, Any], list[Row], list[str]]:
    """The hit load on a service with *workers* and on hello-world, interleaved."""
    photos, hashes = bench.hit_set()
    size = min(BATCH, len(hashes))
    out: dict[str, Any] = {"workers": workers, "photos": len(photos), "open": {}}
    hello_open: dict[float, dict[str, Any]] = {}
    open_runs: list[tuple[float, LoadResult, float]] = []
    closed_s, reps = bench.dur(8.0, 1.5), int(bench.dur(4, 1))
    with (
        bench.xintu(label, workers=workers, store_url=bench.hit_store()) as svc,
        bench.hello(workers) as hello,
    ):
        if not bench.hit_store_seeded:
            out["seeding"] = bench.seed(svc, photos)
            bench.hit_store_seeded = True
        single = bench.check_cache_payloads(svc, hashes)
        h_single = bench.check_cache_payloads(hello, hashes)
        for target, payloads in ((svc, single), (hello, h_single)):  # warm-up: every LRU
            bench.closed(target, payloads, duration_s=bench.dur(1.0, 0.5))
        out["closed"], hello_closed = _closed_pairs(
            bench, [(svc, single), (hello, h_single)], duration_s=closed_s, reps=reps
        )
        max_rps = out["closed"]["goodput_rps"]
        for i, frac in enumerate(fractions):  # each rate on the service, then on hello-world
            result, span = _open(bench, svc, single, frac * max_rps, bench.settings.seed + i)
            out["open"][f"{round(frac * 100)}%"] = summarize(result.samples, start=0.0, end=span)
            open_runs.append((frac, result, span))
            h_open, h_span = _open(bench, hello, h_single, frac * max_rps, bench.settings.seed + i)
            hello_open[frac] = summarize(h_open.samples, start=0.0, end=h_span)
        if batch:
            lean = bench.batch_payloads(svc, hashes, size)
            out["batch"], hello_batch, out["batch_evidence"] = _closed_pairs(
                bench,
                [
                    (svc, lean),
                    (hello, bench.batch_payloads(hello, hashes, size)),
                    (svc, [_with_evidence(p) for p in lean]),
                ],
                duration_s=bench.dur(6.0, 1.0),
                reps=int(bench.dur(2, 1)),
            )
            out["batch_bytes"] = _answer_bytes(svc, hashes[:size])
    out["hello"] = {"closed": hello_closed} | {
        f"open_{round(f * 100)}%": v for f, v in hello_open.items()
    }
    if batch:
        out["hello"]["batch"] = hello_batch

    w = f"w{workers}"
    hello_name = f"hello-world {w}"
    rows = [
        Row(
            f"check-cache max throughput ({w}, closed loop)",
            max_rps,
            "req/s",
            hello_name,
            hello_closed["goodput_rps"],
            f"{bench.settings.closed_connections} connections; "
            f"service CPU {_cpu_ms(out['closed'])} ms/req",
        ),
        Row(
            f"check-cache P99 at max ({w})",
            out["closed"]["latency_accepted_ms"]["p99"],
            "ms",
            hello_name,
            hello_closed["latency_accepted_ms"]["p99"],
            "closed loop: P99 grows with the connection count",
        ),
    ]
    for frac, _result, _span in open_runs:
        key = f"{round(frac * 100)}%"
        s = out["open"][key]
        lat = s["latency_accepted_ms"]
        rows.append(
            Row(
                f"check-cache P99 at {key} of max ({w}, open loop)",
                lat["p99"],
                "ms",
                hello_name + " same rate",
                hello_open[frac]["latency_accepted_ms"]["p99"],
                f"{s['offered_rps']:.0f} req/s offered, goodput {s['goodput_rps']:.0f}/s; "
                f"P50 {lat['p50']} ms, P99.9 {lat['p999']} ms, max {lat['max']} ms; {_lag(s)}",
            )
        )
    if batch:
        b = out["batch"]
        b_lat = b["latency_accepted_ms"]
        rows.append(
            Row(
                f"batch-check-cache x{size} throughput ({w})",
                b["goodput_rps"],
                "req/s",
                hello_name,
                out["hello"]["batch"]["goodput_rps"],
                f"= {b['goodput_rps'] * size:,.0f} hashes/s; "
                f"P50 {b_lat['p50']} ms, P99 {b_lat['p99']} ms",
            )
        )
    if batch:
        ev, sizes = out["batch_evidence"], out["batch_bytes"]
        rows += [
            Row(
                f"batch-check-cache x{size} answer, lean ({w})",
                sizes["lean"],
                "bytes",
                "with ?evidence=true",
                sizes["evidence"],
                "every item a hit; the local model's evidence left out unless asked for",
            ),
            Row(
                f"batch-check-cache x{size} throughput, lean ({w})",
                out["batch"]["goodput_rps"] * size,
                "hashes/s",
                "with ?evidence=true",
                ev["goodput_rps"] * size,
                "closed loops alternated in one run; "
                f"P99 {out['batch']['latency_accepted_ms']['p99']} ms lean, "
                f"{ev['latency_accepted_ms']['p99']} ms with evidence",
            ),
        ]
    rows.append(bench.rss_row(label, f"hello-w{workers}"))
    plots = [_plot(bench, label, open_runs)] if open_runs else []
    return out, rows, plots


_BATCH_LINE = b"POST /api/v1/classify/batch-check-cache HTTP/1.1"


def _with_evidence(request: bytes) -> bytes:
    """A batch-check-cache request that asks for the local model's evidence."""
    assert request.startswith(_BATCH_LINE), request[:80]
    return request.replace(b"batch-check-cache ", b"batch-check-cache?evidence=true ", 1)


def _answer_bytes(svc: Service, hashes: Sequence[str]) -> dict[str, int]:
    """Body bytes of one batch-check-cache answer for *hashes*, lean and with evidence."""
    out = {}
    for name, query in (("lean", ""), ("evidence", "?evidence=true")):
        resp = httpx.post(
            f"{svc.url}/api/v1/classify/batch-check-cache{query}",
            json={"image_hashes": list(hashes)},
            timeout=30.0,
        )
        resp.raise_for_status()
        out[name] = len(resp.content)
    return out


def _cpu_ms(s: dict[str, Any]) -> str:
    done = s["accepted"] + s["refused"]
    return f"{1000 * s['service_cpu_s'] / done:.2f}" if done else "?"


def _lag(s: dict[str, Any]) -> str:
    late = s["lateness"]
    wait = f"client wait for a connection P99 {late['client_wait_p99_ms']} ms"
    if late["generator_lagged"]:
        return f"**generator lagged** (P99 lateness {late['p99_ms']} ms); {wait}"
    return f"generator on time (P99 lateness {late['p99_ms']} ms); {wait}"


def _plot(bench: Bench, label: str, runs: list[tuple[float, LoadResult, float]]) -> str:
    """The open-loop runs one after the other on one time axis."""
    parts, windows, shift = [], [], 0.0
    for frac, result, span in runs:
        s = result.samples.copy()
        for col in ("intended", "sent", "done"):
            s[col] += shift
        parts.append(s)
        windows.append((shift, shift + span, f"{round(frac * 100)}%"))
        shift += span + 1.0
    series = timeline(np.concatenate(parts), bin_s=0.5)
    path = bench.out_dir / f"{label}.png"
    plot_timeline(path, series, title=f"{label}: check-cache, open loop", windows=windows)
    return path.name


def run(bench: Bench) -> Outcome:
    """Scenario 1 on the run's default worker count."""
    if (why := missing_service()) is not None:
        return Outcome("hits", status="skipped", reason=why)
    t0 = time.monotonic()
    details, rows, plots = measure_hits(
        bench,
        "hits",
        workers=bench.settings.workers,
        fractions=(0.5,) if bench.settings.quick else (0.25, 0.5, 0.75),
        batch=True,
    )
    out = Outcome("hits", rows=rows, details=details, plots=plots, checks=hit_checks(details))
    out.seconds = time.monotonic() - t0
    return out


def hit_checks(details: dict[str, Any]) -> list[Check]:
    """Every answer of the closed loop was a 200 from the cache."""
    closed = details["closed"]
    cached = closed["sources"].get("cache", 0)
    return [
        Check(
            f"all check-cache answers are hits (w{details['workers']})",
            closed["errors"] == 0 and closed["refused"] == 0 and cached == closed["accepted"],
            f"{closed['status_counts']}, sources {closed['sources']}",
        )
    ]
