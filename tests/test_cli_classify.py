"""``xintu classify``: local and server mode, outputs, sorting, dry runs, resuming.

Server mode runs against the real app over loopback HTTP with
:class:`tests.fakes.FakeModel` (exact categories and call counts); local mode runs
the real ONNX model on real photos from scikit-image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from xintu import Category, Classification, Source, load_config
from xintu.cli import main
from xintu.cli._classify import Options, Progress, collect, run
from xintu.errors import BadImage

from .fakes import FakeModel, fake_category
from .test_client import running_server, server_config


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("XINTU_"):
            monkeypatch.delenv(name)
    data = tmp_path / "data"
    monkeypatch.setenv("XINTU_DATA_DIR", str(data))
    monkeypatch.setenv("XINTU_LOG_FORMAT", "json")
    monkeypatch.setenv("XINTU_LOG_LEVEL", "warning")
    return data


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def server(tmp_path: Path, model: FakeModel) -> Iterator[str]:
    with running_server(server_config(tmp_path / "server"), model) as base:
        yield base


def fake_photos(folder: Path, count: int, *, start: int = 0) -> dict[Path, bytes]:
    """Files of distinct bytes (FakeModel classifies anything not starting with b"bad")."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(start, start + count):
        path = folder / f"img{i:02d}.jpg"
        path.write_bytes(f"photo number {i}".encode())
        out[path] = path.read_bytes()
    return out


def row(report: str, key: str) -> int:
    """The count in the summary table's row *key*."""
    found = re.search(rf"^  {re.escape(key)} +(\d+)$", report, re.MULTILINE)
    assert found is not None, f"no row {key!r} in:\n{report}"
    return int(found.group(1))


def tree(root: Path) -> dict[str, str]:
    """Every entry under *root*: file contents' hash, or a symlink's target."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = sha(path.read_bytes())
        else:
            out[rel] = "dir"
    return out


def real_photos(folder: Path) -> dict[str, Path]:
    skimage_data = pytest.importorskip("skimage.data")
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("chelsea", "coffee", "astronaut"):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(skimage_data, name)()).save(path, "JPEG", quality=90)
        out[name] = path
    return out


# --- walking folders -----------------------------------------------------------------------


def test_collect_walks_folders_for_images(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    (root / "trip" / ".thumbnails").mkdir(parents=True)
    (root / "sorted").mkdir()
    for name in ["a.JPG", "b.heic", "c.png", "notes.txt", ".hidden.jpg", "trip/d.webp"]:
        (root / name).write_bytes(b"x")
    (root / "trip" / ".thumbnails" / "t.jpg").write_bytes(b"x")
    (root / "sorted" / "s.jpg").write_bytes(b"x")
    named = tmp_path / "named.dat"
    named.write_bytes(b"x")
    found = collect([root, named, root / "c.png"], exclude=root / "sorted")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "pics/a.JPG",
        "pics/b.heic",
        "pics/c.png",
        "pics/trip/d.webp",
        "named.dat",
    ]
    with pytest.raises(FileNotFoundError):
        collect([tmp_path / "nope"])


# --- local mode, real photos ----------------------------------------------------------------------


def test_local_mode_on_real_photos_json_and_sorting(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = real_photos(tmp_path / "in")
    (tmp_path / "in" / "junk.jpg").write_bytes(b"not a photo")
    out = tmp_path / "results.json"
    album = tmp_path / "album"
    code = main(["classify", str(tmp_path / "in"), "--output", str(out), "--sort-into", str(album)])
    assert code == 1  # one file failed
    captured = capsys.readouterr()
    assert "4 photos, 3 classified, 1 failed" in captured.out
    assert "(local model)" in captured.out
    assert "junk.jpg: invalid_image: the file is not a recognised image" in captured.out
    assert "classified 4/4" in captured.err  # a plain count: stderr is not a terminal

    doc = json.loads(out.read_text())
    by_name = {Path(r["path"]).name: r for r in doc["results"]}
    assert by_name["chelsea.jpg"]["category"] == "pets"
    assert by_name["coffee.jpg"]["category"] == "foods"
    assert by_name["astronaut.jpg"]["category"] == "single_person"
    assert by_name["chelsea.jpg"]["source"] == "local"
    assert by_name["chelsea.jpg"]["image_hash"] == sha(photos["chelsea"].read_bytes())
    assert by_name["junk.jpg"]["error_code"] == "invalid_image"
    assert doc["summary"]["categories"] == {"pets": 1, "foods": 1, "single_person": 1}
    assert doc["summary"]["failed"] == 1

    assert (album / "pets" / "chelsea.jpg").read_bytes() == photos["chelsea"].read_bytes()
    assert (album / "foods" / "coffee.jpg").is_file()
    assert (album / "single_person" / "astronaut.jpg").is_file()
    assert photos["chelsea"].is_file()  # copy is the default

    # A re-run answers from the state file: nothing is classified or copied again.
    code = main(["classify", str(tmp_path / "in"), "--sort-into", str(album)])
    again = capsys.readouterr().out
    assert code == 1  # the junk is tried again, and fails again
    assert row(again, "resumed") == 3
    assert row(again, "already there") == 3
    assert sorted(p.name for p in (album / "pets").iterdir()) == ["chelsea.jpg"]


# --- server mode -----------------------------------------------------------------------------


def test_server_mode_sorts_and_writes_csv(
    env: Path, tmp_path: Path, server: str, model: FakeModel, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = fake_photos(tmp_path / "in", 30)
    (tmp_path / "in" / "zz.jpg").write_bytes(b"bad image")
    out = tmp_path / "results.csv"
    album = tmp_path / "album"
    code = main(
        [
            "classify",
            str(tmp_path / "in"),
            "--server",
            server,
            "--output",
            str(out),
            "--sort-into",
            str(album),
            "--concurrency",
            "3",
        ]
    )
    assert code == 1
    report = capsys.readouterr().out
    assert "31 photos, 30 classified, 1 failed in" in report
    assert f"({server})" in report
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 31
    for r in rows:
        path = Path(r["path"])
        if path.name == "zz.jpg":
            assert (r["category"], r["error_code"]) == ("", "invalid_image")
            continue
        category = fake_category(photos[path]).value
        assert r["category"] == category
        assert r["source"] == "local"
        assert r["from_cache"] == "False"
        assert r["action"] == "copied"
        assert Path(r["destination"]) == album / category / path.name
        assert (album / category / path.name).read_bytes() == photos[path]
    assert all(n == 1 for n in model.prepared.values())

    # Everything is known now: a fresh run (state ignored) is answered by the cache.
    args = ["classify", str(tmp_path / "in"), "--server", server, "--output", str(out)]
    code = main([*args, "--fresh"])
    assert code == 1
    report = capsys.readouterr().out
    assert "cache hits: 30 of 30 (100%)" in report
    assert all(n == 1 for data, n in model.prepared.items() if data != b"bad image")


def test_server_mode_sorts_real_photos_with_the_real_model(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = real_photos(tmp_path / "Pictures")
    album = tmp_path / "Album"
    with running_server(server_config(tmp_path / "server"), None) as base:
        code = main(
            ["classify", str(tmp_path / "Pictures"), "--server", base, "--sort-into", str(album)]
        )
        report = capsys.readouterr().out
        assert code == 0, report
        again = main(["classify", str(tmp_path / "Pictures"), "--server", base, "--fresh"])
    assert again == 0
    assert "cache hits: 3 of 3 (100%)" in capsys.readouterr().out
    assert row(report, "pets") == row(report, "foods") == row(report, "single_person") == 1
    assert row(report, "copied") == 3
    assert (album / "pets" / "chelsea.jpg").read_bytes() == photos["chelsea"].read_bytes()
    assert (album / "foods" / "coffee.jpg").is_file()
    assert (album / "single_person" / "astronaut.jpg").is_file()


@pytest.mark.parametrize("mode", ["copy", "move", "link"])
def test_sorting_modes_never_overwrite(
    env: Path, tmp_path: Path, server: str, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = fake_photos(tmp_path / "in", 4)
    first = next(iter(photos))
    category = fake_category(photos[first]).value
    album = tmp_path / "album"
    taken = album / category / first.name
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"a different photo with the same name")
    args = ["classify", str(tmp_path / "in"), "--server", server, "--sort-into", str(album)]
    assert main([*args, "--mode", mode]) == 0
    capsys.readouterr()

    assert taken.read_bytes() == b"a different photo with the same name"
    renamed = taken.with_name(f"{first.stem}-1{first.suffix}")
    for path, data in photos.items():
        dest = renamed if path == first else album / fake_category(data).value / path.name
        assert dest.read_bytes() == data
        assert path.exists() == (mode != "move")
        assert dest.is_symlink() == (mode == "link")
        if mode == "link":
            assert Path(os.readlink(dest)) == path.resolve()
    assert not list(album.rglob("*.part"))


def test_dry_run_changes_nothing(
    env: Path, tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = fake_photos(tmp_path / "in", 5)
    album = tmp_path / "album"
    album.mkdir()
    before_in, before_album = tree(tmp_path / "in"), tree(album)
    out = tmp_path / "r.json"
    code = main(
        [
            "classify",
            str(tmp_path / "in"),
            "--server",
            server,
            "--sort-into",
            str(album),
            "--mode",
            "move",
            "--output",
            str(out),
            "--dry-run",
        ]
    )
    assert code == 0
    report = capsys.readouterr().out
    assert (tree(tmp_path / "in"), tree(album)) == (before_in, before_album)
    assert not out.exists()
    for path, data in photos.items():
        dest = album / fake_category(data).value / path.name
        assert f"would move {path} -> {dest}" in report
    assert "dry run: nothing was written, copied, moved or linked" in report


def test_unreachable_server_and_usage_errors(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_photos(tmp_path / "in", 1)
    folder = str(tmp_path / "in")
    assert main(["classify", folder, "--server", "http://127.0.0.1:1"]) == 1
    assert capsys.readouterr().err.startswith(
        "xintu classify: http://127.0.0.1:1: no answer from the server: "
    )
    assert main(["classify", folder, "--mode", "move"]) == 2
    assert capsys.readouterr().err == "xintu classify: --mode needs --sort-into\n"
    assert main(["classify", folder, "--output", "r.txt"]) == 2
    assert capsys.readouterr().err == "xintu classify: --output must end in .json or .csv\n"
    assert main(["classify", str(tmp_path / "nope")]) == 2
    missing = tmp_path / "nope"
    assert capsys.readouterr().err == f"xintu classify: {missing}: no such file or folder\n"


# --- interrupting and resuming -----------------------------------------------------------------


class InterruptingClassifier:
    """Classifies like FakeModel; sends SIGINT to this process after *after* photos."""

    def __init__(self, after: int | None = None) -> None:
        self.after = after
        self.calls: list[bytes] = []
        self._lock = threading.Lock()

    def classify(self, data: bytes) -> Classification:
        with self._lock:
            self.calls.append(data)
            n = len(self.calls)
        if data.startswith(b"bad"):
            raise BadImage("not an image")
        if self.after is not None and n == self.after:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
        return Classification(fake_category(data), 0.5, Source.LOCAL, "fake-model")


def test_interrupt_then_resume_skips_finished_work(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = fake_photos(tmp_path / "in", 12)
    album = tmp_path / "album"
    config = load_config()
    options = Options(paths=[tmp_path / "in"], sort_into=album, concurrency=1)

    first = InterruptingClassifier(after=3)
    assert run(config, options, classifier=first) == 130
    err = capsys.readouterr().err
    state = album / ".xintu-state.jsonl"
    lines = [json.loads(line) for line in state.read_text().splitlines()]
    done = {line["image_hash"] for line in lines}
    assert 3 <= len(done) < 12  # cancelled soon after the signal
    assert f"interrupted after {len(done)} of 12 photos" in err
    assert f"(state: {state})" in err
    sorted_files = {p.read_bytes() for p in album.rglob("*.jpg")}
    assert {sha(b) for b in sorted_files} == done  # journaled exactly what was placed

    second = InterruptingClassifier()
    assert run(config, options, classifier=second) == 0
    report = capsys.readouterr().out
    assert {sha(b) for b in second.calls} == {sha(b) for b in photos.values()} - done
    assert row(report, "resumed") == len(done)
    assert {p.read_bytes() for p in album.rglob("*.jpg")} == set(photos.values())
    assert len(list(album.rglob("*.jpg"))) == 12  # nothing placed twice


def test_a_preseeded_state_file_is_trusted(
    env: Path, tmp_path: Path, server: str, model: FakeModel, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = fake_photos(tmp_path / "in", 3)
    seeded_path, seeded = next(iter(photos.items()))
    out = tmp_path / "out.json"
    state = tmp_path / "out.json.xintu-state.jsonl"
    row: dict[str, Any] = {
        "image_hash": sha(seeded),
        "category": "idcard",
        "confidence": 0.77,
        "source": "llm",
        "from_cache": False,
    }
    state.write_text(json.dumps(row) + "\n" + '{"image_hash": "torn li')  # killed mid-write
    code = main(["classify", str(tmp_path / "in"), "--server", server, "--output", str(out)])
    assert code == 0
    capsys.readouterr()
    results = {Path(r["path"]): r for r in json.loads(out.read_text())["results"]}
    assert results[seeded_path]["category"] == "idcard"
    assert results[seeded_path]["resumed"] is True
    assert model.prepared[seeded] == 0  # never sent
    for path, data in photos.items():
        if path != seeded_path:
            assert results[path]["category"] == fake_category(data).value
            assert model.prepared[data] == 1
    journal = state.read_text().splitlines()
    assert len(journal) == 4  # the seed, the torn line, and the two new results
    assert {json.loads(line)["image_hash"] for line in journal[2:]} == {
        sha(d) for p, d in photos.items() if p != seeded_path
    }


# --- progress ----------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_counts_otherwise() -> None:
    clock = iter(float(i) for i in range(100))
    tty = Terminal()
    bar = Progress(4, tty, clock=lambda: next(clock))
    for _ in range(4):
        bar.advance(Category.PETS.value)
    bar.clear()
    text = tty.getvalue()
    assert "\r[#######---------------------] 1/4  25%" in text
    assert "\r[############################] 4/4 100%" in text
    assert text.endswith("\r")

    plain = io.StringIO()
    count = Progress(25, plain, clock=lambda: 0.0)
    for _ in range(25):
        count.advance()
    assert plain.getvalue().splitlines() == [
        "classified 3/25",
        "classified 6/25",
        "classified 9/25",
        "classified 12/25",
        "classified 15/25",
        "classified 18/25",
        "classified 21/25",
        "classified 24/25",
        "classified 25/25",
    ]
