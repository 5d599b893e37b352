"""What a scenario returns, and how a run is written: JSON and a Markdown table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Check", "Outcome", "Row", "fmt", "loop_lag_row", "render_markdown", "write_json"]

Status = Literal["ok", "skipped", "failed"]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table: a number, and its ratio to a same-run baseline."""

    measure: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value

    def as_dict(self) -> dict[str, Any]:
        ratio = self.ratio
        return asdict(self) | {"ratio": None if ratio is None else round(ratio, 4)}


@dataclass(frozen=True, slots=True)
class Check:
    """A pass/fail requirement checked by a scenario."""

    name: str
    passed: bool
    detail: str


@dataclass
class Outcome:
    """A scenario's result: table rows, checks, full details and plot files."""

    name: str
    status: Status = "ok"
    reason: str = ""
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 1),
            "rows": [r.as_dict() for r in self.rows],
            "checks": [asdict(c) for c in self.checks],
            "plots": self.plots,
            "details": self.details,
        }


def fmt(value: float | None, unit: str = "") -> str:
    """A number for the table: 3 significant figures, never scientific."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def render_markdown(run: dict[str, Any], outcomes: list[Outcome]) -> str:
    """The run's table: every scenario, its rows with ratios, its checks, or why skipped."""
    facts = run["machine"]
    lines = [
        f"# Xintu benchmark {facts['timestamp']}",
        "",
        f"`{run['command']}` on {facts['cpu_model']} ({facts['cpus_usable']} usable cores), "
        f"Python {facts['python']}, commit `{(facts['git_commit'] or '?')[:12]}`"
        f"{' (dirty)' if facts['git_dirty'] else ''}, store {run['params']['store']}, "
        f"{run['params']['generator_processes']} generator processes"
        f"{', quick' if run['params']['quick'] else ''}.",
        "",
        "| scenario | measure | value | baseline (same run) | ratio | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        if o.status != "ok":
            lines.append(f"| {o.name} | **{o.status}** | | | | {o.reason} |")
            continue
        for r in o.rows:
            base = f"{r.baseline}: {fmt(r.baseline_value, r.unit)}" if r.baseline else ""
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
            lines.append(
                f"| {o.name} | {r.measure} | {fmt(r.value, r.unit)} | {base} | {ratio} | {r.note} |"
            )
    checks = [(o.name, c) for o in outcomes for c in o.checks]
    if checks:
        lines += ["", "| scenario | check | result | detail |", "| --- | --- | --- | --- |"]
        for name, c in checks:
            lines.append(f"| {name} | {c.name} | {'PASS' if c.passed else 'FAIL'} | {c.detail} |")
    plots = [(o.name, p) for o in outcomes for p in o.plots]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"- {name}: [{Path(p).name}]({Path(p).name})" for name, p in plots]
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def loop_lag_row(
    measure: str, lag: dict[str, Any], baseline: str = "", base: float | None = None
) -> Row:
    """A row of the service's event-loop lag over a phase (:func:`bench._stats.histogram_window`
    of ``xintu_event_loop_lag_seconds``): its P99, with P50, the bucket of the largest
    lag and how many wakes were over 50 ms and over 1 s in the note."""
    if not lag["count"]:
        return Row(measure, None, "ms", note="no xintu_event_loop_lag_seconds on /metrics")
    if lag["max_upto"] is None:
        largest = f"over {fmt(lag['max_over'])} ms"
    else:
        largest = f"in ({fmt(lag['max_over'])}, {fmt(lag['max_upto'])}] ms"
    over = lag["over"]
    return Row(
        measure,
        lag["p99"],
        "ms",
        baseline,
        base,
        f"P50 {fmt(lag['p50'])} ms, mean {fmt(lag['mean'])} ms, largest {largest}; "
        f"{lag['count']} wakes, "
        f"{over.get('50', 0)} over 50 ms, {over.get('1000', 0)} over 1 s "
        "(histogram_quantile of the /metrics histogram)",
    )
