"""Classify the evaluation set and print the confusion table.

    python -m tests.eval.run [--markdown] [--data-dir DIR]

Rows are the true categories, columns the predicted ones. Images whose source is
unavailable here (a package not installed, a wheel that cannot be fetched) are
listed as skipped, never silently dropped. ``--markdown`` prints the tables in the
form used by ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from xintu import CATEGORIES, load_config
from xintu.model import ensure_model
from xintu.vision import LocalClassifier

from .sources import SourceUnavailable, package_image

LABELS = Path(__file__).with_name("labels.toml")


@dataclass(frozen=True)
class Item:
    source: str
    label: str
    note: str


def load_items() -> list[Item]:
    """The labelled images of ``labels.toml``, in file order."""
    with LABELS.open("rb") as fh:
        raw = tomllib.load(fh)
    items = [Item(e["source"], e["label"], e.get("note", "")) for e in raw["image"]]
    for item in items:
        if item.label not in CATEGORIES:
            raise ValueError(f"{item.source}: unknown label {item.label!r}")
    return items


def _short(source: str) -> str:
    return source.rsplit(":", 1)[-1].rsplit("/", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("XINTU_EVAL_CACHE", Path.home() / ".cache" / "xintu-eval")),
    )
    args = parser.parse_args()

    config = load_config(env={})
    model_path = ensure_model(args.data_dir)
    classifier = LocalClassifier(config.model, config.images, model_path)

    rows: list[tuple[Item, str, float, str, str]] = []
    skipped: list[tuple[Item, str]] = []
    for item in load_items():
        try:
            data = package_image(item.source)
        except SourceUnavailable as exc:
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

    cats = list(CATEGORIES)
    matrix = {t: dict.fromkeys(cats, 0) for t in cats}
    for item, predicted, *_rest in rows:
        matrix[item.label][predicted] += 1
    correct = sum(matrix[c][c] for c in cats)
    total = len(rows)

    abbrev = {
        "social_activities": "social",
        "single_person": "single",
        "travel_scenery": "travel",
        "screenshot": "screen",
    }
    heads = [abbrev.get(c, c) for c in cats]
    if args.markdown:
        print("| image | true | predicted | conf. | rule | description |")
        print("| --- | --- | --- | --- | --- | --- |")
        for item, predicted, conf, rule, desc in rows:
            mark = "" if predicted == item.label else " **✗**"
            print(
                f"| {_short(item.source)} | {item.label} | {predicted}{mark} | {conf:.2f} | "
                f"{rule} | {desc} |"
            )
        print()
        print("| true \\ predicted | " + " | ".join(heads) + " | recall |")
        print("| --- |" + " ---: |" * (len(cats) + 1))
        for t, h in zip(cats, heads, strict=True):
            n = sum(matrix[t].values())
            recall = f"{matrix[t][t]}/{n}" if n else "-"
            cells = " | ".join(str(matrix[t][p]) if matrix[t][p] else "·" for p in cats)
            print(f"| **{h}** | {cells} | {recall} |")
    else:
        width = max(len(_short(i.source)) for i, *_r in rows) if rows else 10
        for item, predicted, conf, rule, desc in rows:
            mark = "  " if predicted == item.label else "✗ "
            print(
                f"{mark}{_short(item.source):<{width}} {item.label:<18} -> {predicted:<18} "
                f"{conf:.2f} {rule:<24} {desc}"
            )
        print()
        print("true \\ pred".ljust(14) + "".join(h[:7].rjust(8) for h in heads))
        for t, h in zip(cats, heads, strict=True):
            print(h[:13].ljust(14) + "".join(str(matrix[t][p] or ".").rjust(8) for p in cats))
    print()
    print(f"accuracy: {correct}/{total} = {correct / max(1, total):.1%}")
    for item, why in skipped:
        print(f"skipped: {item.source} ({why})")


if __name__ == "__main__":
    main()
