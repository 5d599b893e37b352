"""Serving for real: Hypercorn's trio worker on loopback, signals and graceful drain."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from PIL import Image

from xintu import load_config
from xintu._serve import serve_in_process

from .fakes import FakeDecoded, FakeModel


async def test_sigterm_finishes_in_flight_work_then_exits(tmp_path: Path) -> None:
    """SIGTERM: readiness fails and new work is refused at once, the request in
    flight still gets its answer, the writer flushes, then serve returns."""
    config = load_config(
        env={},
        data={"dir": str(tmp_path)},
        server={"bind": "127.0.0.1:0", "graceful_timeout_s": 10.0, "drain_delay_s": 5.0},
    )
    gate = trio.Event()
    entered = trio.Event()
    model = FakeModel()
    original = model.prepare

    def gated(data: bytes) -> FakeDecoded:
        trio.from_thread.run_sync(entered.set)
        trio.from_thread.run(gate.wait)
        return original(data)

    model.prepare = gated  # type: ignore[method-assign]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve_in_process(
                    config, model_factory=lambda _c: model, task_status=task_status
                )
            )
            base = binds[0]
            async with httpx.AsyncClient(base_url=base, timeout=15) as client:
                assert (await client.get("/readyz")).status_code == 200
                answers: list[httpx.Response] = []

                def post_in_flight() -> httpx.Response:
                    # Its own client in a thread: the test's event loop stays free.
                    return httpx.post(
                        f"{base}/api/v1/classify",
                        files={"image": ("a.jpg", b"in flight")},
                        timeout=15,
                    )

                async def in_flight() -> None:
                    answers.append(await trio.to_thread.run_sync(post_in_flight))

                nursery.start_soon(in_flight)
                await entered.wait()
                os.kill(os.getpid(), signal.SIGTERM)
                await trio.sleep(0.1)
                # Draining: the listener stays open, readiness fails, new work is refused.
                ready = await client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["draining"] is True
                refused = await client.post(
                    "/api/v1/classify", files={"image": ("b.jpg", b"too late")}
                )
                assert refused.status_code == 503
                assert refused.json()["error_code"] == "draining"
                assert int(refused.headers["Retry-After"]) >= 1
                gate.set()
                os.kill(os.getpid(), signal.SIGTERM)  # a second signal ends the delay
    assert answers[0].status_code == 200
    assert answers[0].json()["success"] is True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server not ready in time")


def _photo() -> bytes:
    skimage_data = pytest.importorskip("skimage.data")
    buf = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("workers", [0, 2])
def test_readme_command_serves_real_model(tmp_path: Path, workers: int) -> None:
    """``xintu serve`` on embedded defaults classifies a real photo; SIGTERM exits 0."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XINTU_")}
    env["XINTU_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xintu",
            "serve",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc)
        photo = _photo()
        resp = httpx.post(
            f"{base}/api/v1/classify", files={"image": ("cat.jpg", photo)}, timeout=30
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["data"]["category"] == "pets"
        assert body["data"]["source"] == "local"
        # Workers share the store, not their LRUs: once the writer has flushed
        # (store.writer_flush_ms), every worker answers from the cache.
        image_hash = body["data"]["image_hash"]
        deadline = time.monotonic() + 10
        while True:
            check = httpx.post(
                f"{base}/api/v1/classify/check-cache", json={"image_hash": image_hash}, timeout=5
            ).json()
            if check["cached"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert check["cached"] is True
        assert check["data"]["category"] == "pets"
        again = httpx.post(
            f"{base}/api/v1/classify", files={"image": ("cat.jpg", photo)}, timeout=30
        )
        assert again.json()["from_cache"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr, stderr.decode()[-2000:]
    # Each serving process froze what its start-up made (create_app(freeze_gc=True)).
    assert stderr.count(b"gc_frozen") == max(1, workers), stderr.decode()[-2000:]
