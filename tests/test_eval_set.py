"""The evaluation set's integrity: labels, sources, checksums, licences and the split.

Fast and offline: images inside packages are not fetched here (that is
``python -m tests.eval.run``'s job); the committed machine-made images are hashed.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from tests.eval import sources
from tests.eval.run import Item, Row, _ece, _reliability
from tests.eval.sources import IMAGES_DIR, KINDS, SourceUnavailable, rcc_member
from tests.eval.split import assign_splits, expected_splits, split_for_new
from xintu import CATEGORIES

LABELS = Path(__file__).parent / "eval" / "labels.toml"
MIN_IMAGES = 150
# Issue 13 asks for at least 12 per category (pets has 15, foods 12) and at least 6
# of each in each half, so that one image moves a half's recall by at most 17 points.
MIN_PER_CATEGORY = 12
MIN_PER_HALF = 6
MAX_COMMITTED_BYTES = 200_000
MAX_COMMITTED_TOTAL = 10_000_000


@pytest.fixture(scope="module")
def entries() -> list[dict[str, str]]:
    with LABELS.open("rb") as fh:
        image: list[dict[str, str]] = tomllib.load(fh)["image"]
        return image


def test_every_entry_is_complete(entries: list[dict[str, str]]) -> None:
    for e in entries:
        assert set(e) <= {"source", "sha256", "label", "split", "license", "note", "round"}, e
        rnd = e.get("round", 1)
        assert isinstance(rnd, int), e
        assert rnd >= 1, e
        assert e["label"] in CATEGORIES, e
        assert e["split"] in ("tune", "report"), e
        assert re.fullmatch(r"[0-9a-f]{64}", e["sha256"]), e
        assert e["license"].strip(), e


def test_sources_are_well_formed(entries: list[dict[str, str]]) -> None:
    patterns = {
        "wheel": r"wheel:[A-Za-z0-9_.-]+==[^:]+:[^:!]+(![^!]+)?",
        "sdist": r"sdist:[A-Za-z0-9_.-]+==[^:]+:[^:!]+(![^!]+)?",
        "npm": r"npm:(@[a-z0-9_.-]+/)?[a-z0-9_.-]+@[0-9][^:]*:[^:!]+(![^!]+)?",
        "deb": r"deb:[a-z0-9.+-]+=[^:]+:[^/][^:!]+(![^!]+)?",
        "file": r"file:[A-Za-z0-9_.-]+",
        "skimage": r"skimage:[A-Za-z0-9_.-]+",
        "sklearn": r"sklearn:[A-Za-z0-9_.-]+",
        "matplotlib": r"matplotlib:[A-Za-z0-9_.-]+",
    }
    assert set(patterns) == set(KINDS)
    for e in entries:
        kind = e["source"].split(":", 1)[0]
        assert kind in patterns, e["source"]
        assert re.fullmatch(patterns[kind], e["source"]), e["source"]


def test_no_image_is_listed_twice(entries: list[dict[str, str]]) -> None:
    for key in ("source", "sha256"):
        dupes = [v for v, n in Counter(e[key] for e in entries).items() if n > 1]
        assert not dupes, f"{key} listed twice: {dupes}"


def test_size_and_coverage(entries: list[dict[str, str]]) -> None:
    assert len(entries) >= MIN_IMAGES
    per_label = Counter(e["label"] for e in entries)
    for category in CATEGORIES:
        assert per_label[category] >= MIN_PER_CATEGORY, (category, per_label[category])


def test_halves_are_stratified_and_balanced(entries: list[dict[str, str]]) -> None:
    counts = Counter((e["label"], e["split"]) for e in entries)
    for category in CATEGORIES:
        tune, report = counts[(category, "tune")], counts[(category, "report")]
        assert tune >= MIN_PER_HALF, (category, tune, report)
        assert report >= MIN_PER_HALF, (category, tune, report)
        assert abs(tune - report) <= 1, (category, tune, report)


def test_recorded_split_follows_the_seeded_rule(entries: list[dict[str, str]]) -> None:
    # The first split (round 1) by assign_splits; images added later (round 2, ...)
    # by split_for_new, replayed in split-key order after every earlier round.
    triples = [(e["source"], e["label"], int(e.get("round", 1))) for e in entries]
    assert {e["source"]: e["split"] for e in entries} == expected_splits(triples)
    first = [(e["source"], e["label"]) for e in entries if e.get("round", 1) == 1]
    assert {s: e["split"] for e in entries if (s := e["source"]) in dict(first)} == (
        assign_splits(first)
    ), "an image of the first split changed half"


def test_later_rounds_never_move_earlier_images() -> None:
    first = [(f"p{i}", "pets") for i in range(5)] + [(f"f{i}", "foods") for i in range(3)]
    before = expected_splits([(s, label, 1) for s, label in first])
    later = [("p-new-a", "pets", 2), ("p-new-b", "pets", 2), ("f-new", "foods", 3)]
    after = expected_splits([(s, label, 1) for s, label in first] + later)
    assert {s: after[s] for s in before} == before
    pets = [after[s] for s in after if s.startswith("p")]
    assert abs(pets.count("tune") - pets.count("report")) <= 1


def test_a_new_image_goes_to_the_smaller_half() -> None:
    existing = [("a", "pets", "tune"), ("b", "pets", "tune"), ("c", "pets", "report")]
    assert split_for_new("d", "pets", existing) == "report"
    assert split_for_new("d", "foods", existing) in ("tune", "report")


def test_committed_images_match_and_stay_small(entries: list[dict[str, str]]) -> None:
    listed = {e["source"][5:]: e["sha256"] for e in entries if e["source"].startswith("file:")}
    on_disk = {p.name: p for p in IMAGES_DIR.iterdir() if p.is_file()}
    assert set(listed) == set(on_disk), "tests/images/ and labels.toml disagree"
    total = 0
    for name, path in on_disk.items():
        data = path.read_bytes()
        total += len(data)
        assert len(data) < MAX_COMMITTED_BYTES, name
        assert hashlib.sha256(data).hexdigest() == listed[name], name
    assert total <= MAX_COMMITTED_TOTAL


def _rcc(files: dict[str, bytes]) -> bytes:
    """A minimal Qt resource bundle (format 2) of one folder holding *files*."""
    names = b""
    name_offsets = {}
    for name in ["res", *files]:
        name_offsets[name] = len(names)
        encoded = name.encode("utf-16-be")
        names += len(name).to_bytes(2, "big") + (0).to_bytes(4, "big") + encoded
    payload = b""
    data_offsets = {}
    for name, blob in files.items():
        data_offsets[name] = len(payload)
        payload += len(blob).to_bytes(4, "big") + blob

    def node(name_off: int, flags: int, a: int, b: int) -> bytes:
        return (
            name_off.to_bytes(4, "big")
            + flags.to_bytes(2, "big")
            + a.to_bytes(4, "big")
            + b.to_bytes(4, "big")
            + bytes(8)
        )

    tree = node(0, 2, 1, 1) + node(name_offsets["res"], 2, len(files), 2)
    for name in files:
        tree += node(name_offsets[name], 0, 0, data_offsets[name])
    header = 20
    tree_at, payload_at = header, header + len(tree)
    names_at = payload_at + len(payload)
    head = b"qres" + b"".join(n.to_bytes(4, "big") for n in (2, tree_at, payload_at, names_at))
    return head + tree + payload + names


def test_rcc_reader_finds_stored_files() -> None:
    bundle = _rcc({"a.webp": b"first", "b.jpg": b"second"})
    assert rcc_member(bundle, "res/b.jpg") == b"second"
    assert rcc_member(bundle, "res/a.webp") == b"first"
    with pytest.raises(SourceUnavailable):
        rcc_member(bundle, "res/missing.png")


def test_two_runs_unpacking_one_package_keep_one_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An evaluation and a benchmark sharing the cache once unpacked opencv-doc at the
    # same time into one ".tmp" folder; the second rename then found nothing to move.
    monkeypatch.setattr(sources, "DEB_CACHE", tmp_path)
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/bin/{tool}")
    (tmp_path / "pkg_1.0-1_all.deb").write_bytes(b"not read by the fake dpkg-deb")
    other_run: list[Path] = []
    started: list[bool] = []

    def fake_run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        assert cmd[:2] == ["dpkg-deb", "-x"], cmd
        dest = Path(cmd[-1])
        (dest / "usr").mkdir(parents=True, exist_ok=True)
        (dest / "usr" / "photo.jpg").write_bytes(b"photo")
        if not started:  # while this run unpacks, another one does the same package
            started.append(True)
            other_run.append(sources._deb_root("pkg=1.0-1"))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources, "_run", fake_run)
    root = sources._deb_root("pkg=1.0-1")
    assert root == other_run[0]
    assert (root / "usr" / "photo.jpg").read_bytes() == b"photo"
    assert (root / ".unpacked").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]


def test_reliability_bins_and_calibration_error() -> None:
    def row(label: str, predicted: str, conf: float) -> Row:
        return (
            Item(f"file:{label}{conf}", "0" * 64, label, "tune", "x", ""),
            predicted,
            conf,
            "r",
            "",
        )

    rows = [
        row("other", "other", 0.95),
        row("pets", "other", 0.91),  # two answers at ~0.93, one right: 50 %
        row("pets", "pets", 0.65),  # one at 0.65, right: 100 %
    ]
    table = _reliability(rows)
    assert [(b, n) for b, n, _m, _a in table] == [("0.6-0.7", 1), ("0.9-1.0", 2)]
    assert table[1][2] == pytest.approx(0.93)
    assert table[1][3] == 0.5
    # |0.65 - 1| * 1 + |0.93 - 0.5| * 2, over 3 answers
    assert _ece(rows) == pytest.approx((0.35 + 0.86) / 3)
