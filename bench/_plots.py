"""PNG plots with matplotlib's Agg backend: latency and rates over time.

Each plot has two panels sharing the time axis: accepted requests' latency
percentiles per second (log scale, refusals' P99 dotted), and offered load, goodput,
refusals and errors per second. Windows such as a burst or an outage are shaded.
Figures are small (about 50 KB) so that a few can live in the repository.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

__all__ = ["plot_timeline"]

_DPI = 72


def _clean(values: Sequence[Any]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def plot_timeline(
    path: Path,
    series: dict[str, list[Any]],
    *,
    title: str,
    windows: Sequence[tuple[float, float, str]] = (),
    deadline_ms: float | None = None,
    extra_rates: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """Write the two-panel plot of *series* (from :func:`bench._stats.timeline`) to *path*.

    *extra_rates* adds dashed ``label: (t, per-second values)`` lines to the rate panel
    (e.g. upstream LLM calls per second).
    """
    t = series["t"]
    fig, (lat, rate) = plt.subplots(2, 1, figsize=(9.5, 5.6), sharex=True, dpi=_DPI)
    lat.plot(t, _clean(series["p50"]), label="accepted P50", color="tab:green")
    lat.plot(t, _clean(series["p99"]), label="accepted P99", color="tab:orange")
    lat.plot(t, _clean(series["max"]), label="accepted max", color="tab:red", lw=0.8)
    lat.plot(t, _clean(series["refused_p99"]), ":", label="refused P99", color="tab:purple")
    if deadline_ms is not None:
        lat.axhline(deadline_ms, color="black", lw=0.8, ls="--", label="deadline")
    lat.set_yscale("log")
    lat.set_ylabel("latency from intended send (ms)")
    lat.set_title(title, fontsize=11)
    lat.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    rate.plot(t, series["offered_rps"], label="offered", color="tab:gray", lw=0.9)
    rate.plot(t, series["goodput_rps"], label="goodput (2xx)", color="tab:blue")
    rate.plot(t, series["refused_rps"], label="refused (429/503)", color="tab:purple")
    rate.plot(t, series["error_rps"], label="errors", color="tab:red", lw=0.8)
    for label, (xs, ys) in (extra_rates or {}).items():
        rate.plot(xs, ys, "--", label=label, color="tab:brown", lw=0.9)
    rate.set_ylabel("requests/s")
    rate.set_xlabel("seconds since start of schedule")
    rate.grid(True, alpha=0.3)
    rate.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    for ax in (lat, rate):
        for start, end, label in windows:
            ax.axvspan(start, end, color="tab:orange", alpha=0.12, lw=0)
            if ax is rate:
                ax.text(
                    (start + end) / 2,
                    0.97,
                    label,
                    transform=ax.get_xaxis_transform(),
                    fontsize=8,
                    ha="center",
                    va="top",
                )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path
