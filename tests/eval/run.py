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
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from xintu import CATEGORIES, load_config
from xintu.model import ensure_model
from xintu.vision import LocalClassifier

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
        )
        for e in raw["image"]
    ]
    for item in items:
        if item.label not in CATEGORIES:
            raise ValueError(f"{item.source}: unknown label {item.label!r}")
        if item.split not in ("tune", "report"):
            raise ValueError(f"{item.source}: unknown split {item.split!r}")
    return items


def _short(source: str) -> str:
    return source.rsplit(":", 1)[-1].rsplit("/", 1)[-1]


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

    if args.markdown:
        print("| image | half | true | predicted | conf. | rule | description |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for item, predicted, conf, rule, desc in rows:
            mark = "" if predicted == item.label else " **✗**"
            print(
                f"| {_short(item.source)} | {item.split} | {item.label} | {predicted}{mark} | "
                f"{conf:.2f} | {rule} | {desc} |"
            )
        print()
    else:
        width = max(len(_short(i.source)) for i, *_r in rows) if rows else 10
        for item, predicted, conf, rule, desc in rows:
            mark = "  " if predicted == item.label else "✗ "
            print(
                f"{mark}{_short(item.source):<{width}} {item.split:<6} {item.label:<18} -> "
                f"{predicted:<18} {conf:.2f} {rule:<24} {desc}"
            )
        print()
    for half in halves:
        _print_half(f"{half} half", [r for r in rows if r[0].split == half], args.markdown)
    if len(halves) > 1:
        _print_half("both halves", rows, args.markdown)
    for item, why in skipped:
        print(f"skipped: {item.source} ({why})")
    print(f"{len(rows)} images classified in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
