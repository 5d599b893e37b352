"""The local pool with its model in worker processes (``model.executor = "process"``).

Real processes (``python -m xintu.actors._procworker``) with the fake model of
:mod:`tests.proc_models`, and for the service's life cycle ``xintu serve`` with the
real one. Processes run on the real clock: the waits here are for processes to
start, die or exit, each bounded.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import outcome
import pytest
import trio

from xintu import Classification, Config
from xintu.actors import ClassifyRequest, LocalPool
from xintu.actors._procs import ProcessModel, default_processes
from xintu.errors import BadImage, ClassifierError, ConfigError, Draining, ModelError
from xintu.vision import build_local_model

from .fakes import fake_category
from .proc_models import build_broken, build_fake

pytestmark = pytest.mark.slow


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_pool(
    config: Config, processes: int = 2, build: Callable[..., object] = build_fake
) -> LocalPool:
    model = ProcessModel(config, build=build, processes=processes)
    return LocalPool(
        model, inbox_size=16, decode_threads=5, inference_threads=3, max_batch=8, max_wait_ms=50
    )


def procs(pool: LocalPool) -> ProcessModel:
    assert isinstance(pool.model, ProcessModel)
    return pool.model


def alive(pid: int) -> bool:
    """True while *pid* runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll *condition* (a process's state, which no Trio event reports)."""
    deadline = trio.current_time() + timeout_s
    while not condition():
        if trio.current_time() > deadline:
            raise AssertionError(f"not in {timeout_s} s: {what}")
        await trio.sleep(0.02)


async def test_photos_are_answered_in_the_processes_errors_per_photo(config: Config) -> None:
    pool = make_pool(config)
    images = [f"p{i}".encode() for i in range(12)] + [b"bad-1", b"boom"]
    results: dict[bytes, outcome.Outcome[Classification]] = {}

    async def one(data: bytes) -> None:
        request = ClassifyRequest(data, h(data), "r")
        results[data] = await outcome.acapture(pool.classify, request, trio.current_time() + 60)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            assert len(procs(pool).pids()) == 2
            async with trio.open_nursery() as callers:
                for data in images:
                    callers.start_soon(one, data)
            urgent = await pool.classify_now(ClassifyRequest(b"pid", h(b"pid"), "r"))
            pids = procs(pool).pids()
            counted = pool.model_statistics()
            pool.close()
    assert all(results[d].unwrap().category == fake_category(d) for d in images[:12])
    bad, boom = results[b"bad-1"], results[b"boom"]
    assert isinstance(bad, outcome.Error)
    assert isinstance(bad.error, BadImage)
    assert str(bad.error) == "not an image"
    assert isinstance(boom, outcome.Error)
    assert isinstance(boom.error, ClassifierError)
    assert str(boom.error) == "local classifier failed: RuntimeError"
    assert int(urgent.description or "0") in pids  # classified in a worker process
    assert urgent.model == "proc-fake-model"
    stats = pool.statistics()
    assert (stats.completed, stats.failed, stats.urgent) == (13, 2, 1)
    assert procs(pool).statistics().died == 0
    # Each process's model counts its own; the pool adds them up (15 photos, errors too).
    assert counted.prepared == 15
    assert counted.pids <= set(pids)
    # Closed: every process has exited (stdin closed after the queue was done), and
    # what their models counted is kept.
    assert not any(alive(p) for p in pids)
    assert pool.model_statistics() == counted
    with pytest.raises(Draining):
        await procs(pool).classify(b"late")


async def test_a_killed_process_answers_its_photo_with_an_error_and_is_replaced(
    config: Config, tmp_path: Path
) -> None:
    pool = make_pool(config)
    held = tmp_path / "held"
    answers: list[outcome.Outcome[Classification]] = []

    async def hold() -> None:
        data = b"hold:" + str(held).encode()
        answers.append(
            await outcome.acapture(
                pool.classify, ClassifyRequest(data, h(data), "r"), trio.current_time() + 60
            )
        )

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            first = procs(pool).pids()
            nursery.start_soon(hold)
            await until(lambda: held.exists() and held.read_text() != "", "the photo is held")
            victim = int(held.read_text())
            assert victim in first
            os.kill(victim, signal.SIGKILL)
            await until(lambda: bool(answers), "the held photo is answered")
            # The other process still answers meanwhile, and the slot is refilled.
            ok = await pool.classify(ClassifyRequest(b"after", h(b"after"), "r"), 1e9)
            await until(lambda: len(procs(pool).pids()) == 2, "a replacement is ready")
            replaced = procs(pool).pids()
            after_kill = pool.statistics()
            by_pid = await pool.classify(ClassifyRequest(b"pid", h(b"pid"), "r"), 1e9)
            pool.close()
    (answer,) = answers
    assert isinstance(answer, outcome.Error)
    assert isinstance(answer.error, ClassifierError)
    assert str(answer.error) == "the local model's worker process died (killed by signal 9)"
    assert ok.category == fake_category(b"after")
    assert victim not in replaced
    assert set(first) - {victim} <= set(replaced)
    assert int(by_pid.description or "0") in replaced
    stats = procs(pool).statistics()
    assert (stats.died, stats.started) == (1, 3)
    assert pool.statistics().failed == 1
    assert (after_kill.processes, after_kill.process_deaths) == (2, 1)  # what /metrics reads


async def test_a_model_that_cannot_be_built_fails_the_start(config: Config) -> None:
    pool = make_pool(config, build=build_broken)
    with trio.fail_after(60):
        with pytest.raises(
            ModelError, match=r"^the local model could not be built: ModelError: no model in "
        ):
            await pool.run()
    assert procs(pool).statistics().alive == 0


async def test_the_pool_takes_the_shape_of_its_processes(config: Config) -> None:
    """N decode workers = the processes, no batching (no max_wait_ms to wait)."""
    pool = make_pool(config, processes=3)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            assert len(procs(pool).pids()) == 3
            results = []
            async with trio.open_nursery() as callers:
                for i in range(6):
                    data = f"s{i}".encode()

                    async def one(data: bytes = data) -> None:
                        results.append(
                            await pool.classify(ClassifyRequest(data, h(data), "r"), 1e9)
                        )

                    callers.start_soon(one)
            pool.close()
    assert len(results) == 6
    stats = pool.statistics()
    assert (stats.batches, stats.mean_batch_size) == (6, 1.0)


def test_default_processes_share_the_cpus_between_service_workers(config: Config) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert default_processes(config) == cpus
    two = config.replace(server={"workers": 2})
    assert default_processes(two) == max(1, cpus // 2)
    assert default_processes(config.replace(model={"processes": 5})) == 5


def test_an_unknown_model_kind_is_a_config_error(config: Config) -> None:
    from xintu import load_config

    with pytest.raises(ConfigError, match=r"^model\.kind: must be one of efficientnet-lite0; "):
        load_config(env={"XINTU_MODEL_KIND": "resnet"})
    with pytest.raises(ConfigError, match=r"^model\.executor: must be one of process, thread; "):
        load_config(env={"XINTU_MODEL_EXECUTOR": "gpu"})
    # A configuration built around load_config's checks meets the factory's own.
    forged = config.replace(model={"kind": "resnet"})
    with pytest.raises(
        ConfigError, match=r"^model\.kind: must be one of efficientnet-lite0; got 'resnet'$"
    ):
        build_local_model(forged)


# --- the service's processes live and die with it ---------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = []
        # Every thread's children: Trio starts processes from a worker thread.
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        out.extend(kids)
        todo.extend(kids)
    return out


def _worker_processes(pid: int) -> list[int]:
    found = []
    for p in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"xintu.actors._procworker" in cmdline:
            found.append(p)
    return found


def _serve(tmp_path: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XINTU_")}
    env |= {
        "XINTU_DATA_DIR": str(tmp_path / "data"),
        "XINTU_MODEL_EXECUTOR": "process",
        "XINTU_MODEL_PROCESSES": "2",
        "XINTU_SERVER_DRAIN_DELAY_S": "0",
    }
    argv = [sys.executable, "-m", "xintu", "serve", "--bind", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*argv, "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server not ready in time")


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_worker_processes_end_with_the_service_on_sigterm(tmp_path: Path, workers: int) -> None:
    """Two per service process (model.processes = 2), under Hypercorn's daemonic
    workers too. SIGTERM to the service and to its worker processes (as a process
    manager that signals the whole group): the worker processes ignore it, the
    service drains and closes them, and all exit."""
    proc, base = _serve(tmp_path, workers)
    try:
        photo = (Path(__file__).parent / "images" / "idcard_scan_856x540.jpg").read_bytes()
        resp = httpx.post(f"{base}/api/v1/classify", files={"image": ("a.jpg", photo)}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["data"]["source"] == "local"
        children = _worker_processes(proc.pid)
        assert len(children) == 2 * max(1, workers)
    finally:
        proc.send_signal(signal.SIGTERM)
        for child in _worker_processes(proc.pid):
            os.kill(child, signal.SIGTERM)  # ignored: the drain ends them
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert _wait_gone(children, 10.0) == []
    assert b"Traceback" not in stderr, stderr.decode()[-2000:]


def test_the_worker_processes_end_when_the_service_is_killed(tmp_path: Path) -> None:
    proc, _ = _serve(tmp_path, 0)
    children = _worker_processes(proc.pid)
    assert len(children) == 2
    proc.kill()  # SIGKILL: no drain; the kernel closes the pipes
    proc.communicate(timeout=30)
    assert _wait_gone(children, 10.0) == []
