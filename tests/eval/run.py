"""Classify the evaluation set and print accuracy, recall and confusion per half.

    python -m tests.eval.run [--split report|tune|all] [--markdown] [--data-dir DIR]

The set is split once (``split`` in ``labels.toml``, see ``split.py``): thresholds
may be chosen on the ``tune`` half; the ``report`` half is the number to quote.
``--split all`` (the default) classifies both and prints each half separately,
then both together. Rows are the true categories, columns the predicted ones.
Images whose source is unavailable here (a package or tool missing, a download
refused, bytes that no longer match their SHA-256) are listed as skipped, never
silently dropped. ``--markdown`` prints the tables in the form used by
``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from xintu import CATEGORIES, load_config

from .sources import SourceMismatch, SourceUnavailable, package_image

LABELS = Path(__file__).with_name("labels.toml")


@dataclass(frozen=True)
class Item:
    source: str
    sha256: str
    label: str
    split: str
    license: str
    note: str
    round: int = 1


def load_items(path: Path = LABELS) -> list[Item]:
    """The labelled images of ``labels.toml``, in file order."""
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    items = [
        Item(
            e["source"],
            e["sha256"],
            e["label"],
            e["split"],
            e["license"],
            e.get("note", ""),
            e.get("round", 1),
        )
        for e in raw["image"]
    ]
    for item in items:
        if item.label not in CATEGORIES:
            raise ValueError(f"{item.source}: unknown label {item.label!r}")
        if item.split not in ("tune", "report"):
            raise ValueError(f"{item.source}: unknown split {item.split!r}")
    return items


Row = tuple[Item, str, float, str, str]

ABBREV = {
    "social_activities": "social",
    "single_person": "single",
    "travel_scenery": "travel",
    "screenshot": "screen",
}


def _confusion(rows: list[Row]) -> dict[str, dict[str, int]]:
    cats = list(CATEGORIES)
    matrix = {t: dict.fromkeys(cats, 0) for t in cats}
    for item, predicted, *_rest in rows:
        matrix[item.label][predicted] += 1
    return matrix


def _print_half(title: str, rows: list[Row], markdown: bool) -> None:
    cats = list(CATEGORIES)
    heads = [ABBREV.get(c, c) for c in cats]
    matrix = _confusion(rows)
    correct = sum(matrix[c][c] for c in cats)
    total = len(rows)
    accuracy = f"{correct}/{total} = {correct / max(1, total):.1%}"
    if markdown:
        print(f"### {title}: accuracy **{accuracy}**")
        print()
        print("| true \\ predicted | " + " | ".join(heads) + " | recall |")
        print("| --- |" + " ---: |" * (len(cats) + 1))
        for t, h in zip(cats, heads, strict=True):
            n = sum(matrix[t].values())
            recall = f"{matrix[t][t]}/{n} = {matrix[t][t] / n:.0%}" if n else "-"
            cells = " | ".join(str(matrix[t][p]) if matrix[t][p] else "·" for p in cats)
            print(f"| **{h}** | {cells} | {recall} |")
        print()
    else:
        print(f"== {title}: accuracy {accuracy}")
        print("true \\ pred".ljust(14) + "".join(h[:7].rjust(8) for h in heads) + "  recall")
        for t, h in zip(cats, heads, strict=True):
            n = sum(matrix[t].values())
            recall = f"{matrix[t][t]}/{n}" if n else "-"
            cells = "".join(str(matrix[t][p] or ".").rjust(8) for p in cats)
            print(h[:13].ljust(14) + cells + "  " + recall)
        print()


def _short(source: str) -> str:
    return source.rsplit(":", 1)[-1].rsplit("/", 1)[-1].rsplit("!", 1)[-1]


def _names(items: list[Item]) -> dict[str, str]:
    """``{source: name}`` for the tables: the file name, or folder/name where two
    images share a file name (``ybc_food/test.jpg``, ``ybc_animal/test.jpg``)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[_short(item.source)] = counts.get(_short(item.source), 0) + 1
    names = {}
    for item in items:
        name = _short(item.source)
        if counts[name] > 1:
            path = item.source.rsplit(":", 1)[-1].rsplit("!", 1)[-1]
            name = "/".join(path.split("/")[-2:])
        names[item.source] = name
    return names


BINS = (0.0, 0.6, 0.7, 0.8, 0.9, 1.01)


def _reliability(rows: list[Row]) -> list[tuple[str, int, float, float]]:
    """``(bin, n, mean confidence, accuracy)`` per confidence bin (empty bins left out)."""
    table = []
    for low, high in itertools.pairwise(BINS):
        inside = [r for r in rows if low <= r[2] < high]
        if not inside:
            continue
        name = f"{low:.1f}-{min(high, 1.0):.1f}" if low else f"< {high:.1f}"
        mean = sum(r[2] for r in inside) / len(inside)
        right = sum(r[0].label == r[1] for r in inside) / len(inside)
        table.append((name, len(inside), mean, right))
    return table


def _ece(rows: list[Row]) -> float:
    """Expected calibration error over :data:`BINS`: the gap, weighted by bin size."""
    return sum(n * abs(mean - acc) for _b, n, mean, acc in _reliability(rows)) / max(1, len(rows))


def _print_reliability(title: str, rows: list[Row], markdown: bool) -> None:
    """Mean confidence against accuracy per bin, for all answers and for ``other``."""
    others = [r for r in rows if r[1] == "other"]
    if markdown:
        print(f"### Calibration, {title}: mean confidence vs accuracy per bin")
        print()
        print(
            "| confidence | answers | mean conf. | accuracy "
            "| `other` answers | mean conf. | accuracy |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    else:
        print(
            f"== calibration, {title}: confidence bin, n, mean confidence, accuracy (all | other)"
        )
    by_bin = {b: (n, m, a) for b, n, m, a in _reliability(others)}
    for name, n, mean, acc in _reliability(rows):
        on, om, oa = by_bin.get(name, (0, 0.0, 0.0))
        other = f"{on} | {om:.2f} | {oa:.0%}" if on else "0 | · | ·"
        if markdown:
            print(f"| {name} | {n} | {mean:.2f} | {acc:.0%} | {other} |")
        else:
            print(f"{name:<10} {n:>4} {mean:6.2f} {acc:6.0%}   | {other.replace(' | ', ' ')}")
    summary = f"ECE {_ece(rows):.3f} over {len(rows)} answers; `other` alone {_ece(others):.3f}"
    print(("\n" if markdown else "") + summary)
    print()


def _print_other_cap(rows: list[Row]) -> None:
    """What a flat ``other`` confidence would do: the tune half's ``other`` accuracy
    as a ceiling on every ``other`` answer's confidence, scored on each half."""
    tune_other = [r for r in rows if r[0].split == "tune" and r[1] == "other"]
    if not tune_other:
        return
    cap = sum(r[0].label == "other" for r in tune_other) / len(tune_other)
    capped: list[Row] = [
        (i, p, min(c, cap) if p == "other" else c, rule, desc) for i, p, c, rule, desc in rows
    ]
    for half in ("tune", "report"):
        before = [r for r in rows if r[0].split == half]
        after = [r for r in capped if r[0].split == half]
        others = [r for r in after if r[1] == "other"]
        print(
            f"{half} half, `other` confidence capped at the tune half's `other` accuracy "
            f"({cap:.2f}): ECE {_ece(before):.3f} -> {_ece(after):.3f}; "
            f"`other` alone {_ece([r for r in before if r[1] == 'other']):.3f} -> "
            f"{_ece(others):.3f}"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--split", choices=("report", "tune", "all"), default="all")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("XINTU_EVAL_CACHE", Path.home() / ".cache" / "xintu-eval")),
    )
    args = parser.parse_args()
    started = time.monotonic()
    # Imported here: the model's modules take seconds to import, and the set's own
    # checks (tests/test_eval_set.py) use this module's tables without them.
    from xintu.model import ensure_model
    from xintu.vision import LocalClassifier

    config = load_config(env={})
    model_path = ensure_model(args.data_dir)
    classifier = LocalClassifier(config.model, config.images, model_path)

    halves = ("tune", "report") if args.split == "all" else (args.split,)
    rows: list[Row] = []
    skipped: list[tuple[Item, str]] = []
    for item in load_items():
        if item.split not in halves:
            continue
        try:
            data = package_image(item.source, item.sha256)
        except (SourceUnavailable, SourceMismatch) as exc:
            skipped.append((item, str(exc)))
            continue
        result = classifier.classify(data)
        evidence = result.local_inference_result or {}
        rows.append(
            (
                item,
                result.category.value,
                result.confidence,
                str(evidence.get("rule")),
                result.description or "",
            )
        )

    names = _names([row[0] for row in rows])
    if args.markdown:
        print("| image | half | true | predicted | conf. | rule | description |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for item, predicted, conf, rule, desc in rows:
            mark = "" if predicted == item.label else " **✗**"
            print(
                f"| {names[item.source]} | {item.split} | {item.label} | {predicted}{mark} | "
                f"{conf:.2f} | {rule} | {desc} |"
            )
        print()
    else:
        width = max(len(names[i.source]) for i, *_r in rows) if rows else 10
        for item, predicted, conf, rule, desc in rows:
            mark = "  " if predicted == item.label else "✗ "
            print(
                f"{mark}{names[item.source]:<{width}} {item.split:<6} {item.label:<18} -> "
                f"{predicted:<18} {conf:.2f} {rule:<24} {desc}"
            )
        print()
    for half in halves:
        _print_half(f"{half} half", [r for r in rows if r[0].split == half], args.markdown)
    if len(halves) > 1:
        _print_half("both halves", rows, args.markdown)
    for half in halves:
        _print_reliability(f"{half} half", [r for r in rows if r[0].split == half], args.markdown)
    if len(halves) > 1:
        _print_reliability("both halves", rows, args.markdown)
        _print_other_cap(rows)
    for item, why in skipped:
        print(f"skipped: {item.source} ({why})")
    print(f"{len(rows)} images classified in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
