"""The tuning / report split of the evaluation set.

    python -m tests.eval.split          # print the counts per category and half
    python -m tests.eval.split --check  # exit 1 unless labels.toml matches the rule

Rule: within each category, images are ordered by ``sha256(SEED + source)`` and
dealt alternately to ``tune`` and ``report`` (the first to ``tune``). The result is
written into ``labels.toml`` as each image's ``split`` and is fixed from then on:
thresholds may be chosen while looking at the ``tune`` half only; the ``report``
half is only ever reported on. An image added later takes the half that has fewer
images of its category (ties: the parity of its hash), so earlier assignments never
move.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import Counter, defaultdict

SEED = "xintu-eval-split-v1:"
SPLITS = ("tune", "report")


def split_key(source: str) -> str:
    return hashlib.sha256((SEED + source).encode()).hexdigest()


def assign_splits(items: list[tuple[str, str]]) -> dict[str, str]:
    """``{source: split}`` for ``(source, label)`` pairs, stratified per label."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for source, label in items:
        by_label[label].append(source)
    result: dict[str, str] = {}
    for sources in by_label.values():
        for i, source in enumerate(sorted(sources, key=split_key)):
            result[source] = SPLITS[i % 2]
    return result


def split_for_new(source: str, label: str, existing: list[tuple[str, str, str]]) -> str:
    """The half for an image added to a set already split (``(source, label, split)``)."""
    counts = Counter(split for _src, lab, split in existing if lab == label)
    if counts["tune"] != counts["report"]:
        return "tune" if counts["tune"] < counts["report"] else "report"
    return SPLITS[int(split_key(source), 16) % 2]


def main() -> None:
    from .run import load_items

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    items = load_items()
    counts = Counter((item.label, item.split) for item in items)
    for label in sorted({item.label for item in items}):
        print(
            f"{label:<18} tune {counts[(label, 'tune')]:>3}  report {counts[(label, 'report')]:>3}"
        )
    print(
        f"{'all':<18} tune {sum(i.split == 'tune' for i in items):>3}  "
        f"report {sum(i.split == 'report' for i in items):>3}"
    )
    if args.check:
        unbalanced = [
            label
            for label in {item.label for item in items}
            if abs(counts[(label, "tune")] - counts[(label, "report")]) > 1
        ]
        if unbalanced:
            raise SystemExit(f"unbalanced halves: {', '.join(sorted(unbalanced))}")


if __name__ == "__main__":
    main()
