"""Percentiles, goodput, shedding and generator lateness from exact recorded samples.

Percentiles are nearest-rank over every recorded latency (``numpy.percentile`` with
``method="inverted_cdf"``): P99 is the smallest latency that at least 99 % of the
requests did not exceed. With fewer than 1,000 samples P99.9 is simply the maximum;
``count`` is always reported next to it.

*Accepted* means a 2xx answer; *refused* means 429 or 503 (load shedding); every
other outcome, including the generator's pseudo-statuses for connection errors,
client timeouts and requests unfinished at the end, is an *error*.

Latency is measured from the intended send time. *Lateness* is how long after its
intended time the generator started a request (its own scheduling delay); a run whose
P99 lateness is over :data:`LATE_P99_MS` or where more than :data:`LATE_SHARE` of
requests were over :data:`LATE_MS` late measured the generator, not the service, and
is flagged. *Client wait* is the time from that start until the request was written
to a connection (a busy fixed pool, or connecting): it is caused by the server being
slow, is part of the latency, and is reported next to the lateness.
:func:`breakdown` splits a set of samples' latency into those parts and the rest
(from the connection to the whole answer: sending the body, the server, the answer).

:func:`histogram_window` reads a Prometheus histogram of the service (the
event-loop lag) from two scrapes of ``/metrics``: the observations between them,
their quantiles interpolated within a bucket as PromQL's ``histogram_quantile``
does, and the bucket the largest one fell in (its exact value is not exported).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from ._http import SOURCES
from ._loadgen import STATUS_CONNECT_ERROR, STATUS_TIMEOUT, STATUS_UNFINISHED

__all__ = [
    "LATE_MS",
    "LATE_P99_MS",
    "LATE_SHARE",
    "PERCENTILES",
    "breakdown",
    "histogram_window",
    "lateness",
    "percentiles",
    "status_name",
    "summarize",
    "timeline",
]

#: (key, percentile) pairs reported for every latency distribution.
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p999", 99.9),
)
LATE_P99_MS = 5.0
LATE_MS = 10.0
LATE_SHARE = 0.01
REFUSED = (429, 503)

_PSEUDO = {
    STATUS_CONNECT_ERROR: "connect_error",
    STATUS_TIMEOUT: "client_timeout",
    STATUS_UNFINISHED: "unfinished",
}


def status_name(status: int) -> str:
    """``"200"``, ``"503"``, or the name of a pseudo-status."""
    return _PSEUDO.get(status, str(status))


def _source_name(code: int) -> str:
    if code >= len(SOURCES):
        return "other"
    return SOURCES[code] or "none"


def percentiles(values_ms: npt.ArrayLike) -> dict[str, float | int | None]:
    """count, mean, P50, P90, P99, P99.9 and max (nearest rank), in the input's unit."""
    x = np.asarray(values_ms, dtype=np.float64)
    x = x[~np.isnan(x)]
    out: dict[str, float | int | None] = {"count": int(x.size)}
    if x.size == 0:
        out |= {key: None for key, _ in PERCENTILES} | {"max": None, "mean": None}
        return out
    qs = np.percentile(x, [q for _, q in PERCENTILES], method="inverted_cdf")
    out |= {key: round(float(v), 3) for (key, _), v in zip(PERCENTILES, qs, strict=True)}
    out["max"] = round(float(x.max()), 3)
    out["mean"] = round(float(x.mean()), 3)
    return out


def lateness(samples: npt.NDArray[Any]) -> dict[str, Any]:
    """The generator's lateness against its schedule, whether it lagged, and client wait."""
    started = samples["started"]
    late_ms = (started - samples["intended"])[~np.isnan(started)] * 1000.0
    stats = percentiles(late_ms)
    share = float(np.mean(late_ms > LATE_MS)) if late_ms.size else 0.0
    p99 = stats["p99"] or 0.0
    lagged = bool(p99 > LATE_P99_MS or share > LATE_SHARE)
    sent = samples["sent"]
    wait = percentiles(((sent - started) * 1000.0)[~np.isnan(sent)])
    return {
        "p50_ms": stats["p50"],
        "p99_ms": stats["p99"],
        "max_ms": stats["max"],
        "share_over_10ms": round(share, 5),
        "generator_lagged": lagged,
        "client_wait_p50_ms": wait["p50"],
        "client_wait_p99_ms": wait["p99"],
    }


def breakdown(samples: npt.NDArray[Any]) -> dict[str, Any]:
    """Where the latency of *samples* went, each part's percentiles in ms: ``late``
    (the generator's lateness: intended to started), ``connection`` (started to sent:
    waiting for a pooled connection, or opening one), ``rest`` (sent to done: the
    body written, the server's work, the answer read) and ``total``. Only samples
    with an answer (``done``) count; percentiles of the parts do not add up."""
    s = samples[~np.isnan(samples["done"]) & ~np.isnan(samples["sent"])]
    return {
        "late_ms": percentiles((s["started"] - s["intended"]) * 1000.0),
        "connection_ms": percentiles((s["sent"] - s["started"]) * 1000.0),
        "rest_ms": percentiles((s["done"] - s["sent"]) * 1000.0),
        "total_ms": percentiles((s["done"] - s["intended"]) * 1000.0),
    }


def _buckets(scrape: dict[str, float], name: str) -> dict[float, float]:
    """``{le: cumulative count}`` of histogram *name* (no other labels) in *scrape*."""
    prefix = f'{name}_bucket{{le="'
    out: dict[float, float] = {}
    for key, value in scrape.items():
        if key.startswith(prefix):
            out[float(key[len(prefix) :].split('"', 1)[0])] = value
    return out


def histogram_window(
    before: dict[str, float], after: dict[str, float], name: str, *, scale: float = 1000.0
) -> dict[str, Any]:
    """Histogram *name* between two scrapes (:func:`bench._services.parse_metrics`),
    values times *scale* (seconds to ms by default): ``count``, ``mean``, ``p50``,
    ``p90``, ``p99`` (interpolated linearly within their bucket, as
    ``histogram_quantile``; a quantile in the open bucket is its lower bound),
    ``max_over`` and ``max_upto`` (the bucket the largest observation fell in:
    ``max_upto`` is None for the open bucket) and ``over`` (observations above each
    finite bound). All None/empty when either scrape lacks the histogram (a service
    without it, or one that did not answer)."""
    b0, b1 = _buckets(before, name), _buckets(after, name)
    empty: dict[str, Any] = {
        "count": 0,
        "mean": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max_over": None,
        "max_upto": None,
        "over": {},
    }
    if not b1 or set(b0) != set(b1):
        return empty
    bounds = sorted(b1)
    cumulative = [b1[le] - b0[le] for le in bounds]
    count = cumulative[-1]
    if count <= 0:
        return empty
    total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)

    def quantile(q: float) -> float:
        rank = q * count
        for i, le in enumerate(bounds):
            if cumulative[i] >= rank:
                lower = bounds[i - 1] if i else 0.0
                if math.isinf(le):
                    return lower * scale
                below = cumulative[i - 1] if i else 0.0
                inside = cumulative[i] - below
                share = (rank - below) / inside if inside else 1.0
                return (lower + (le - lower) * share) * scale
        return bounds[-2] * scale  # not reached: the last bucket holds every count

    top = next(i for i, c in enumerate(cumulative) if c >= count)
    finite = [le for le in bounds if not math.isinf(le)]
    return {
        "count": int(count),
        "mean": round(total / count * scale, 3),
        "p50": round(quantile(0.5), 3),
        "p90": round(quantile(0.9), 3),
        "p99": round(quantile(0.99), 3),
        "max_over": round(bounds[top - 1] * scale, 3) if top else 0.0,
        "max_upto": None if math.isinf(bounds[top]) else round(bounds[top] * scale, 3),
        "over": {f"{le * scale:g}": int(count - cumulative[bounds.index(le)]) for le in finite},
    }


def _select(
    samples: npt.NDArray[Any], start: float | None, end: float | None, tag: int | None
) -> npt.NDArray[Any]:
    mask = np.ones(len(samples), dtype=bool)
    if start is not None:
        mask &= samples["intended"] >= start
    if end is not None:
        mask &= samples["intended"] < end
    if tag is not None:
        mask &= samples["tag"] == tag
    return samples[mask]


def summarize(
    samples: npt.NDArray[Any],
    *,
    duration_s: float | None = None,
    start: float | None = None,
    end: float | None = None,
    tag: int | None = None,
) -> dict[str, Any]:
    """Everything the report shows for the samples intended in ``[start, end)``.

    Rates divide by *duration_s*, else by ``end - start``, else by the span of the
    intended send times.
    """
    s = _select(samples, start, end, tag)
    status = s["status"].astype(np.int64)
    latency_ms = (s["done"] - s["intended"]) * 1000.0
    accepted = (status >= 200) & (status < 300)
    refused = np.isin(status, REFUSED)
    if duration_s is None:
        if start is not None and end is not None:
            duration_s = end - start
        elif len(s):
            duration_s = float(s["intended"].max() - s["intended"].min())
    rate = 1.0 / duration_s if duration_s else 0.0
    counts = Counter(status_name(int(v)) for v in status)
    sources = Counter(_source_name(int(v)) for v in s["source"][accepted])
    n_refused = int(refused.sum())
    return {
        "requests": len(s),
        "duration_s": round(duration_s or 0.0, 3),
        "offered_rps": round(len(s) * rate, 2),
        "goodput_rps": round(int(accepted.sum()) * rate, 2),
        "refused_rps": round(n_refused * rate, 2),
        "accepted": int(accepted.sum()),
        "refused": n_refused,
        "errors": int(len(s) - accepted.sum() - n_refused),
        "refused_with_retry_after": int((refused & s["retry_after"]).sum()),
        "status_counts": dict(sorted(counts.items())),
        "sources": dict(sorted(sources.items())),
        "latency_accepted_ms": percentiles(latency_ms[accepted]),
        "latency_refused_ms": percentiles(latency_ms[refused]),
        "lateness": lateness(s),
    }


def timeline(samples: npt.NDArray[Any], *, bin_s: float = 1.0) -> dict[str, list[Any]]:
    """Per-bin series for the plots.

    Offered load and latency are binned by intended send time; goodput, refusals and
    errors by completion time (what a server-side counter would show).
    """
    if len(samples) == 0:
        return {"t": []}
    status = samples["status"].astype(np.int64)
    end = float(np.nanmax(np.concatenate([samples["intended"], samples["done"]])))
    edges = np.arange(0.0, end + bin_s, bin_s)
    t = edges[:-1] + bin_s / 2
    accepted = (status >= 200) & (status < 300)
    refused = np.isin(status, REFUSED)
    errors = ~accepted & ~refused
    done = samples["done"]

    def rate(mask: npt.NDArray[np.bool_], when: npt.NDArray[np.float64]) -> list[float]:
        hist, _ = np.histogram(when[mask & ~np.isnan(when)], bins=edges)
        return [round(float(v) / bin_s, 2) for v in hist]

    latency_ms = (done - samples["intended"]) * 1000.0
    which = np.digitize(samples["intended"], edges) - 1
    series: dict[str, list[Any]] = {key: [] for key in ("p50", "p99", "max", "refused_p99")}
    for b in range(len(t)):
        in_bin = which == b
        acc = percentiles(latency_ms[in_bin & accepted])
        ref = percentiles(latency_ms[in_bin & refused])
        series["p50"].append(acc["p50"])
        series["p99"].append(acc["p99"])
        series["max"].append(acc["max"])
        series["refused_p99"].append(ref["p99"])
    return {
        "t": [round(float(v), 3) for v in t],
        "offered_rps": rate(np.ones(len(samples), dtype=bool), samples["intended"]),
        "goodput_rps": rate(accepted, done),
        "refused_rps": rate(refused, done),
        "error_rps": rate(errors, done),
        **series,
    }
