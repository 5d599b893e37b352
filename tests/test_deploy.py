"""Deployments: the wheel holds what the service reads at run time, and
``xintu serve --workers N`` serves every setting of its configuration in every worker.

The wheel is built the way the Containerfile's build stage builds it: from the files
its ``COPY`` lines bring into the build (as a clean clone has them), with pip's
build isolation. ``.ci/wheel-smoke`` goes further: it installs the wheel with its
dependencies into a fresh virtual environment and classifies a photo with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from xintu import load_config
from xintu._serve import _worker_environment, worker_config

from .test_ops import metric
from .test_serve import _free_port

ROOT = Path(__file__).resolve().parent.parent
# The console script of the environment running the tests.
XINTU = Path(sys.executable).with_name("xintu")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def _tracked(root: Path) -> list[str]:
    """Files of the checkout as a clean clone has them (tracked or new, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    # A tracked file deleted in the working tree is not part of the build.
    return sorted(p for p in out.split("\0") if p and (root / p).is_file())


def _build_stage_copies(containerfile: str) -> list[tuple[str, str]]:
    """``(source, destination)`` of each ``COPY`` of the first stage, destinations
    relative to its ``WORKDIR``."""
    copies: list[tuple[str, str]] = []
    for line in containerfile.split("\nFROM ", 2)[1].splitlines():
        if not line.startswith("COPY "):
            continue
        args = [w for w in shlex.split(line)[1:] if not w.startswith("--")]
        copies += [(src, args[-1]) for src in args[:-1]]
    assert copies, "no COPY in the Containerfile's build stage"
    return copies


def _build_context(dest: Path) -> None:
    """The files the Containerfile's build stage copies, laid out as it does."""
    files = _tracked(ROOT)
    for src, to in _build_stage_copies((ROOT / "Containerfile").read_text()):
        matched = [p for p in files if p == src or p.startswith(src.rstrip("/") + "/")]
        assert matched, f"Containerfile copies {src}, which the checkout does not hold"
        for p in matched:
            if p == src:  # a file: into the folder `to/`, or to the name `to`
                target = dest / to / Path(p).name if to.endswith("/") else dest / to
            else:  # a folder: its contents into `to`
                target = dest / to / Path(p).relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / p).read_bytes())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the Containerfile's build context."""
    src = tmp_path_factory.mktemp("context")
    _build_context(src)
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [*PIP, "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob("xintu-*.whl")
    return path


def test_wheel_holds_the_package_and_every_file_it_reads(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    # What the service reads with importlib.resources, named for a clear failure.
    for name in (
        "xintu/defaults.toml",
        "xintu/py.typed",
        "xintu/http/static/index.html",
        "xintu/http/static/app.js",
        "xintu/http/static/app.css",
        "xintu/http/static/favicon.svg",
    ):
        assert name in names, name
    # Every file of the package, code or data, and nothing else.
    source = {p for p in _tracked(ROOT) if p.startswith("xintu/")}
    assert {n for n in names if n.startswith("xintu/")} == source
    assert "xintu = xintu.cli:main" in scripts


_INSTALLED = """
import json, sys
from importlib import resources
import xintu
from xintu import load_config
static = resources.files("xintu.http") / "static"
json.dump(
    {
        "file": xintu.__file__,
        "defaults": resources.files("xintu").joinpath("defaults.toml").read_text("utf-8"),
        "static": sorted(p.name for p in static.iterdir()),
        "config": load_config(env={}).redacted(),
    },
    sys.stdout,
)
"""


def test_installed_package_reads_its_defaults_and_page(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel (not the source tree), the package's defaults equal
    ``config/xintu.toml`` and its page's files are there."""
    site = tmp_path / "site"
    installed = subprocess.run(
        [*PIP, "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("XINTU_")}
    env["PYTHONPATH"] = str(site)
    ran = subprocess.run(
        [sys.executable, "-c", _INSTALLED],
        cwd=tmp_path,  # outside the checkout: nothing comes from the source tree
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    found = json.loads(ran.stdout)
    assert Path(found["file"]).is_relative_to(site)
    assert found["defaults"] == (ROOT / "config" / "xintu.toml").read_text("utf-8")
    assert found["static"] == sorted(p.name for p in (ROOT / "xintu/http/static").iterdir())
    assert found["config"] == json.loads(json.dumps(load_config(env={}).redacted()))


def test_worker_config_is_the_parents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a spawned worker reads equals the parent's configuration, secrets
    included; the environment is restored afterwards."""
    for name in list(os.environ):
        if name.startswith(("XINTU_", "PROMETHEUS_")):
            monkeypatch.delenv(name)
    file = tmp_path / "service.toml"
    file.write_text(f'[security]\napi_key_sha256 = ["{"ab" * 32}"]\n')
    parent = load_config(file, server={"bind": "127.0.0.1:8123", "workers": 3})
    before = dict(os.environ)
    with _worker_environment(parent):
        metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir()
        worker = worker_config()
    assert worker == parent
    assert worker.security.api_key_sha256 == ("ab" * 32,)
    assert dict(worker.origins) == dict(parent.origins)
    assert dict(os.environ) == before
    assert not metrics_dir.exists()
    # Not spawned by serve (hypercorn xintu._asgi:app): from the environment.
    monkeypatch.setenv("XINTU_CONFIG", str(file))
    alone = worker_config()
    assert alone.security.api_key_sha256 == ("ab" * 32,)
    assert alone.server.bind == load_config(env={}).server.bind  # no --bind here


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _wait_all_workers_ready(
    base: str, proc: subprocess.Popen[bytes], key: str, workers: int, timeout_s: float = 90
) -> None:
    """Until the summed ``xintu_ready`` gauge says every worker is ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-4000:] if proc.stderr else ""
            raise AssertionError(f"server exited early with {proc.returncode}:\n{err}")
        try:
            resp = httpx.get(f"{base}/metrics", headers=_bearer(key), timeout=2)
            if resp.status_code == 200 and metric(resp.text, "xintu_ready") == workers:
                return
        except (httpx.TransportError, AssertionError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{workers} workers not ready in {timeout_s} s")


def _curl_status(url: str, body: str, *headers: str) -> str:
    """The status ``curl`` gets for a JSON POST (a new connection each call)."""
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"]
    for header in ("Content-Type: application/json", *headers):
        args += ["-H", header]
    return subprocess.run(
        [*args, "--data", body, url], capture_output=True, text=True, timeout=20, check=True
    ).stdout


@pytest.mark.parametrize("given", ["after the command", "before the command"])
def test_every_worker_serves_the_config_file(tmp_path: Path, given: str) -> None:
    """``xintu serve --workers 2 --config FILE`` (or ``xintu --config FILE serve ...``)
    with API keys in the file: no worker is open without a key. The data directory
    is relative in the file, and the processes run outside the checkout.
    (``XINTU_CONFIG`` takes the same path: tests/test_cli.py.)"""
    key = "deploy-test-key-" + hashlib.sha256(given.encode()).hexdigest()[:16]
    (tmp_path / "service.toml").write_text(
        "[server]\n"
        "drain_delay_s = 0.0\n"
        "[data]\n"
        'dir = "data"\n'
        "[security]\n"
        f'api_key_sha256 = ["{hashlib.sha256(key.encode()).hexdigest()}"]\n'
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    serve = ["serve", "--workers", "2", "--bind", f"127.0.0.1:{port}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XINTU_", "PROMETHEUS_"))}
    if given == "after the command":
        argv = [str(XINTU), *serve, "--config", "service.toml"]
    else:
        argv = [str(XINTU), "--config", "service.toml", *serve]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    check = f"{base}/api/v1/classify/check-cache"
    body = {"image_hash": "ab" * 32}
    try:
        _wait_all_workers_ready(base, proc, key, workers=2)
        # A new connection for each request, so that both workers take some.
        for _ in range(40):
            refused = httpx.post(check, json=body, timeout=10)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error_code"] == "unauthorized"
            wrong = httpx.post(check, json=body, headers=_bearer("not-the-key"), timeout=10)
            assert wrong.status_code == 401, wrong.text
            answered = httpx.post(check, json=body, headers=_bearer(key), timeout=10)
            assert answered.status_code == 200, answered.text
            assert answered.json()["cached"] is False
        for _ in range(10):
            assert _curl_status(check, json.dumps(body)) == "401"
            assert _curl_status(check, json.dumps(body), f"Authorization: Bearer {key}") == "200"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert b"Traceback" not in stderr, stderr.decode()[-3000:]
    # The relative data directory is the one in the processes' working directory.
    assert (tmp_path / "data" / "xintu.sqlite3").is_file()
