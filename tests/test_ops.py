"""Operations: /metrics, /api/v1/stats, /readyz reasons, request logs, worker metrics."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from quart.typing import TestClientProtocol as Client
from werkzeug.datastructures import FileStorage

from xintu import load_config
from xintu._config import LogConfig
from xintu._log import configure_logging
from xintu.http import XintuApp, create_app

from .fakes import FakeModel
from .test_serve import _free_port, _photo, _wait_ready

V1 = "/api/v1/classify"


@pytest.fixture
async def app(tmp_path: Path, store_url: str) -> AsyncIterator[XintuApp]:
    config = load_config(
        env={}, data={"dir": str(tmp_path)}, store={"url": store_url, "writer_flush_ms": 1}
    )
    app = create_app(config, model_factory=lambda _c: FakeModel())
    async with app.test_app():
        yield app


async def classify(client: Client, data: bytes) -> int:
    resp = await client.post(V1, files={"image": FileStorage(io.BytesIO(data), filename="x")})
    return resp.status_code


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no sample {name} {labels}")


async def test_metrics_count_requests_hits_and_queues(app: XintuApp) -> None:
    client = app.test_client()
    assert await classify(client, b"m1") == 200
    assert await classify(client, b"m1") == 200
    assert await classify(client, b"bad") == 400
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/plain")
    text = (await resp.get_data()).decode()
    route = "/api/v1/classify"
    assert metric(text, "xintu_http_requests_total", route=route, status="200") == 2
    assert metric(text, "xintu_http_requests_total", route=route, status="400") == 1
    assert (
        metric(text, "xintu_http_request_duration_seconds_count", route=route, source="local") == 1
    )
    assert (
        metric(text, "xintu_http_request_duration_seconds_count", route=route, source="cache") == 1
    )
    assert metric(text, "xintu_cache_lookups_total", result="hit") == 1
    assert metric(text, "xintu_classifications_total", source="local") == 1
    assert metric(text, "xintu_inbox_capacity", actor="dispatcher") == 256
    assert metric(text, "xintu_inbox_depth", actor="writer") >= 0
    assert metric(text, "xintu_ready") == 1
    assert metric(text, "xintu_lru_entries") == 1


async def test_stats_from_the_store(app: XintuApp) -> None:
    client = app.test_client()
    for data in (b"s1", b"s2", b"s1", b"s1"):
        assert await classify(client, data) == 200
    await app.runtime.writer.wait_idle()
    resp = await client.get("/api/v1/stats")
    body = await resp.get_json()
    assert resp.status_code == 200
    assert body["totals"] == {"requests": 4, "from_cache": 2, "cached_images": 2, "cache_hits": 2}
    assert body["today"] == {"requests": 4, "from_cache": 2}
    assert body["cache_hit_rate"] == 0.5
    assert body["sources"] == {"local": 2, "cache": 2}
    assert sum(body["categories"].values()) == 2
    assert body["llm_calls_saved"] == 0  # no LLM answers to save calls on
    assert set(body["latency_ms"]) == {"local", "cache"}
    assert body["latency_ms"]["local"]["count"] == 2
    assert body["service"]["queues"]["dispatcher"]["capacity"] == 256
    assert body["service"]["breakers"] == {}


async def test_readyz_lists_its_reasons(app: XintuApp) -> None:
    body = await (await app.test_client().get("/readyz")).get_json()
    assert body == {
        "ready": True,
        "checks": {
            "draining": False,
            "actors_running": True,
            "actors_healthy": True,
            "model_loaded": True,
            "breakers": {},
            "writer": "ok",
            "store": "ok",
        },
    }


async def test_one_log_event_per_request(app: XintuApp) -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(level="info", format="json"), stream)
    client = app.test_client()
    await client.post(
        V1,
        files={"image": FileStorage(io.BytesIO(b"logme"), filename="x")},
        headers={"X-User-ID": "alice"},
    )
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [e for e in events if e["event"] == "request"]
    assert len(requests) == 1
    event = requests[0]
    assert event["user_id"] == "alice"
    assert event["route"] == "/api/v1/classify"
    assert event["status"] == 200
    assert event["source"] == "local"
    assert event["image_hash"] == hashlib.sha256(b"logme").hexdigest()[:12]
    assert event["latency_ms"] >= 0
    assert len(event["request_id"]) == 32
    assert event["logger"] == "xintu.http"


def test_workers_share_one_metrics_view(tmp_path: Path, store_url: str) -> None:
    """--workers 2 (SQLite and MariaDB): /metrics on any worker sums every worker's
    counters, and /api/v1/stats counts every worker's requests."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XINTU_", "PROMETHEUS_"))}
    env["XINTU_DATA_DIR"] = str(tmp_path / "data")
    env["XINTU_STORE_URL"] = store_url
    env["XINTU_STORE_WRITER_FLUSH_MS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xintu", "serve", "--bind", f"127.0.0.1:{port}", "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc)
        photo = _photo()
        n = 12
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(n):
                # A new connection each time, so both workers take requests.
                resp = httpx.post(
                    f"{base}/api/v1/classify/check-cache",
                    json={"image_hash": "0" * 64},
                    timeout=10,
                )
                assert resp.status_code == 200
            first = client.post("/api/v1/classify", files={"image": ("a.jpg", photo)})
            assert first.status_code == 200
            image_hash = first.json()["data"]["image_hash"]
            hits = 0
            deadline = time.monotonic() + 10
            while hits < 3 and time.monotonic() < deadline:
                check = httpx.post(
                    f"{base}/api/v1/classify/check-cache",
                    json={"image_hash": image_hash},
                    timeout=10,
                ).json()
                hits += 1 if check["cached"] else 0
            assert hits == 3
            # Sampled metrics (classifications, queues) reach the shared files within
            # a sampling interval (1 s) on every worker; request counters at once.
            time.sleep(1.5)
            texts = [httpx.get(f"{base}/metrics", timeout=10).text for _ in range(4)]
            # The writers commit within milliseconds; /api/v1/stats is reused for 2 s.
            deadline = time.monotonic() + 15
            while True:
                stats = httpx.get(f"{base}/api/v1/stats", timeout=10).json()
                if stats["totals"]["requests"] >= 4 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    route = "/api/v1/classify/check-cache"
    for text in texts:
        assert metric(text, "xintu_http_requests_total", route=route, status="200") >= n + 3
        assert metric(text, "xintu_classifications_total", source="local") == 1
    # Every request that was answered is in the store, whichever worker served it:
    # the classification plus the three check-cache hits (misses are not logged).
    assert stats["totals"]["requests"] == 4
    assert stats["totals"]["from_cache"] == 3
    assert stats["totals"]["cached_images"] == 1
    assert stats["totals"]["cache_hits"] == 3
    assert stats["categories"] == {"pets": 1}
    # Both workers are live and ready: the summed gauge says so.
    assert max(metric(t, "xintu_ready") for t in texts) == 2
