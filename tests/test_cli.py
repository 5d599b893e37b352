"""The command line: model build, classify-local, config show, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from xintu.cli import main


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(__import__("os").environ):
        if name.startswith("XINTU_"):
            monkeypatch.delenv(name)
    data = tmp_path / "data"
    monkeypatch.setenv("XINTU_DATA_DIR", str(data))
    monkeypatch.setenv("XINTU_LOG_FORMAT", "json")
    return data


def test_model_build_then_verify(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "build"]) == 0
    path = env / "models" / "efficientnet-lite0.onnx"
    assert path.is_file()
    assert str(path) in capsys.readouterr().out
    path.write_bytes(path.read_bytes()[:1000])  # corrupt it
    assert main(["model", "build"]) == 0
    assert path.stat().st_size > 1_000_000


def test_classify_local_prints_category_and_evidence(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    photo = tmp_path / "coffee.jpg"
    Image.fromarray(skimage_data.coffee()).save(photo, "JPEG")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a photo")
    assert main(["classify-local", "--json", str(photo), str(junk)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["category"] == "foods"
    assert 0 < lines[0]["confidence"] <= 1
    assert len(lines[0]["evidence"]["top5"]) == 5
    assert lines[1] == {"path": str(junk), "error": "the file is not a recognised image"}


def test_config_show_redacts_and_names_origins(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XINTU_STORE_URL", "mysql://app:hunter2@db:3306/xintu")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert 'url = "mysql://app:***@db:3306/xintu"  # env' in out
    assert "max_batch = 1  # default" in out


def test_bad_configuration_stops_with_the_key(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XINTU_SERVER_WORKERS", "many")
    assert main(["config", "show"]) == 2
    assert capsys.readouterr().err == (
        "xintu: configuration error: server.workers: expected int, got 'many'\n"
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "service.toml"
    path.write_text('[server]\nbind = "127.0.0.1:8123"\n')
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{file}", "config", "show"],
        ["config", "show", "--config", "{file}"],
        ["config", "--config", "{file}", "show"],
        ["--config", "{other}", "config", "show", "--config", "{file}"],  # the later wins
        ["config", "show"],  # with XINTU_CONFIG
    ],
)
def test_config_file_before_or_after_the_command(
    env: Path,
    config_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[server]\nbind = "127.0.0.1:9999"\n')
    if "--config" not in argv:
        monkeypatch.setenv("XINTU_CONFIG", str(config_file))
    argv = [a.format(file=config_file, other=other) for a in argv]
    assert main(argv) == 0
    assert 'bind = "127.0.0.1:8123"  # file' in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--config", "{file}"],
        ["serve", "--workers", "2", "--config", "{file}"],
        ["--config", "{file}", "serve", "--workers", "2"],
        ["serve", "--workers", "2"],  # with XINTU_CONFIG
        ["model", "build", "--config", "{file}"],
        ["classify-local", "x.jpg", "--config", "{file}"],
    ],
)
def test_every_command_reads_the_config_file(
    env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    """A bad value in the file stops every command before it starts, wherever
    ``--config`` stands (so none of these starts a server or builds a model)."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nmax_batch = "eight"\n')
    if "--config" not in argv:
        monkeypatch.setenv("XINTU_CONFIG", str(bad))
    assert main([a.format(file=bad) for a in argv]) == 2
    assert capsys.readouterr().err == (
        "xintu: configuration error: model.max_batch: expected int, got 'eight'\n"
    )
