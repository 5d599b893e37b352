"""The tuning / report split of the evaluation set.

    python -m tests.eval.split          # print the counts per category and half
    python -m tests.eval.split --check  # exit 1 unless labels.toml matches the rule

Rule: within each category, images are ordered by ``sha256(SEED + source)`` and
dealt alternately to ``tune`` and ``report`` (the first to ``tune``). The result is
written into ``labels.toml`` as each image's ``split`` and is fixed from then on:
thresholds may be chosen while looking at the ``tune`` half only; the ``report``
half is only ever reported on. An image added later takes the half that has fewer
images of its category (ties: the parity of its hash), so earlier assignments never
move. Later additions carry ``round = N`` (2, 3, ...; the first split is round 1)
and are dealt in the order of their split key, after every image of an earlier
round; ``--check`` replays that (``expected_splits``) and fails on any difference.
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


def expected_splits(entries: list[tuple[str, str, int]]) -> dict[str, str]:
    """``{source: split}`` the rule gives ``(source, label, round)`` entries.

    Round 1 is split by :func:`assign_splits`; each later round's images are added
    one at a time, in the order of their split key, with :func:`split_for_new`.
    """
    first = [(source, label) for source, label, rnd in entries if rnd == 1]
    result = assign_splits(first)
    placed = [(source, label, result[source]) for source, label in first]
    for rnd in sorted({rnd for _s, _l, rnd in entries if rnd != 1}):
        added = sorted(
            ((source, label) for source, label, r in entries if r == rnd),
            key=lambda pair: split_key(pair[0]),
        )
        for source, label in added:
            result[source] = split_for_new(source, label, placed)
            placed.append((source, label, result[source]))
    return result


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
        expected = expected_splits([(i.source, i.label, i.round) for i in items])
        moved = [i.source for i in items if expected[i.source] != i.split]
        if moved:
            raise SystemExit(f"split differs from the rule: {', '.join(moved)}")
        unbalanced = [
            label
            for label in {item.label for item in items}
            if abs(counts[(label, "tune")] - counts[(label, "report")]) > 1
        ]
        if unbalanced:
            raise SystemExit(f"unbalanced halves: {', '.join(sorted(unbalanced))}")


if __name__ == "__main__":
    main()
