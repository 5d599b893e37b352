"""Choose the weights of ``xintu/vision/_categories.py`` on the tune half only.

    python -m tests.eval.tune [--values 0,0.25,0.5,0.75,1]

The groups of ``_categories.py`` whose weight is not 1 (``pet_lookalikes``,
``food_context``, ``travel_context``, ``screens``) are the mapping's only numbers.
This classifies every ``tune`` image once per candidate weight, one group at a time
with the others as they are, and prints the tune accuracy of each candidate; the
``report`` half is never read. The best value is the one with the most tune images
right; ties keep the current value, or else take the value nearest to it (a tie
says the tune half cannot tell them apart). The default candidates stay within 0..1:
a context group (a bottle, a boat, a monitor) never weighs more than the classes
that name the category themselves. Only the vote matrix changes between
candidates: decoding, the detectors and the model's probabilities are the
classifier's own, so the text path runs as it would in service.

``--constant MODULE.NAME=v1,v2,...`` (repeatable) sweeps a module-level threshold of
another file the same way, on the tune half only, for example
``xintu.vision._detect._CARD_SECOND_FACE_REL_HEIGHT=0.5,0.6,0.7,0.8,0.9``. Those
files are not changed here: the table says what the tune half would choose.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path

from xintu import load_config
from xintu.model import ensure_model
from xintu.vision import LocalClassifier, _classifier
from xintu.vision._categories import GROUPS, ClassGroup

from .run import Item, load_items
from .sources import SourceMismatch, SourceUnavailable, package_image

TUNED = tuple(g.name for g in GROUPS if g.weight != 1.0)


def _with_weight(name: str, weight: float) -> tuple[ClassGroup, ...]:
    return tuple(dataclasses.replace(g, weight=weight) if g.name == name else g for g in GROUPS)


def _correct(classifier: LocalClassifier, images: list[tuple[Item, bytes]]) -> list[str]:
    """The sources of the images the classifier gets right."""
    return [
        item.source
        for item, data in images
        if classifier.classify(data).category.value == item.label
    ]


def _sweep(
    label: str,
    current: float,
    values: list[float],
    apply: Callable[[float], None],
    score: Callable[[], set[str]],
    baseline: set[str],
) -> float:
    """Tune-half images right per value; prints them and returns the chosen value."""
    scores: dict[float, set[str]] = {}
    for value in sorted({*values, current}):
        apply(value)
        scores[value] = score()
    apply(current)
    top = max(len(s) for s in scores.values())
    best = min(
        (v for v, s in scores.items() if len(s) == top),
        key=lambda v: (v != current, abs(v - current)),
    )
    cells = "  ".join(f"{v:g}: {len(s)}" for v, s in scores.items())
    print(f"{label:<16} now {current:g}  tune right per value  {cells}  -> {best:g}")
    for value, right in scores.items():
        gained = sorted(s.rsplit("/", 1)[-1] for s in right - baseline)
        lost = sorted(s.rsplit("/", 1)[-1] for s in baseline - right)
        if gained or lost:
            print(f"    {value:g}: +{gained} -{lost}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--constant", action="append", default=[], metavar="MOD.NAME=V,V")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("XINTU_EVAL_CACHE", Path.home() / ".cache" / "xintu-eval")),
    )
    args = parser.parse_args()
    values = [float(v) for v in args.values.split(",")]

    config = load_config(env={})
    classifier = LocalClassifier(config.model, config.images, ensure_model(args.data_dir))
    images: list[tuple[Item, bytes]] = []
    for item in load_items():
        if item.split != "tune":
            continue  # the report half is never looked at here
        try:
            images.append((item, package_image(item.source, item.sha256)))
        except (SourceUnavailable, SourceMismatch) as exc:
            print(f"skipped: {item.source} ({exc})")
    baseline = set(_correct(classifier, images))
    print(f"tune half, weights as they are: {len(baseline)}/{len(images)}")

    def score() -> set[str]:
        return set(_correct(classifier, images))

    def use_groups(groups: tuple[ClassGroup, ...]) -> None:
        setattr(_classifier, "GROUPS", groups)  # noqa: B010 - a module global, on purpose
        classifier._votes = _classifier._vote_matrix(classifier._votes.shape[0])

    for name in TUNED:
        current = next(g.weight for g in GROUPS if g.name == name)
        _sweep(
            name,
            current,
            values,
            lambda v, n=name: use_groups(_with_weight(n, v)),  # type: ignore[misc]
            score,
            baseline,
        )
    use_groups(GROUPS)

    for spec in args.constant:
        target, _eq, raw = spec.partition("=")
        module_name, _dot, attr = target.rpartition(".")
        module = importlib.import_module(module_name)
        current = float(getattr(module, attr))
        _sweep(
            attr,
            current,
            [float(v) for v in raw.split(",")],
            lambda v, m=module, a=attr: setattr(m, a, v),  # type: ignore[misc]
            score,
            baseline,
        )


if __name__ == "__main__":
    main()
