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
import trio
from PIL import Image
from quart.typing import TestClientProtocol as Client
from werkzeug.datastructures import FileStorage

from xintu import load_config
from xintu._config import LogConfig
from xintu._log import configure_logging
from xintu.http import XintuApp, create_app
from xintu.testing.fakellm import run_fake_llm

from .fakes import FakeModel
from .llm_service import fake_env
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


async def test_a_batch_check_is_one_log_row_counted_as_its_hits(app: XintuApp) -> None:
    """One request_log row per batch-check request, carrying its counts; the stats
    count its hits as requests served from the cache (as before, row per hit)."""
    client = app.test_client()
    for data in (b"k1", b"k2"):
        assert await classify(client, data) == 200
    asked = [hashlib.sha256(d).hexdigest() for d in (b"k1", b"k2", b"k1", b"none")]
    resp = await client.post(f"{V1}/batch-check-cache", json={"image_hashes": asked})
    body = await resp.get_json()
    assert body["cached_count"] == 3
    await app.runtime.writer.wait_idle()
    row = await app.store.get_request_log(body["request_id"])
    assert row is not None
    assert (row.hashes_asked, row.hashes_hit, row.from_cache, row.source) == (4, 3, True, "cache")
    assert await app.store.get_request_log(f"{body['request_id']}-0") is None
    stats = await (await client.get("/api/v1/stats")).get_json()
    assert stats["totals"]["requests"] == 5  # 2 uploads, 3 hits
    assert stats["sources"] == {"local": 2, "cache": 3}


async def test_readyz_lists_its_reasons(app: XintuApp) -> None:
    body = await (await app.test_client().get("/readyz")).get_json()
    assert body == {
        "ready": True,
        "degraded": False,
        "reasons": [],
        "checks": {
            "draining": False,
            "actors_running": True,
            "actors_healthy": True,
            "model_loaded": True,
            "breakers": {},
            "llm_last_failure": {},
            "writer": "ok",
            "store": "ok",
        },
    }


@pytest.mark.parametrize("ready_without_store", [True, False])
async def test_a_store_outage_is_degraded_or_not_ready_by_policy(
    tmp_path: Path, ready_without_store: bool
) -> None:
    """server.ready_without_store (default true): a store that does not answer keeps
    the process ready but degraded, with the reason; false: 503 as before."""
    config = load_config(
        env={},
        data={"dir": str(tmp_path)},
        server={"ready_without_store": ready_without_store},
    )
    app = create_app(config, model_factory=lambda _c: FakeModel())
    async with app.test_app():
        client = app.test_client()
        assert (await client.get("/readyz")).status_code == 200
        await app.store.aclose()
        resp = await client.get("/readyz")
        body = await resp.get_json()
    assert resp.status_code == (200 if ready_without_store else 503)
    assert body["ready"] is ready_without_store
    assert body["degraded"] is True
    assert body["checks"]["store"].startswith("unreachable")
    assert body["reasons"][0] == f"store {body['checks']['store']}"


async def test_a_wrong_llm_key_is_named_in_readiness_health_and_metrics(tmp_path: Path) -> None:
    """401s open the breaker; readiness stays 200 (the local model answers) but says
    degraded and why, and health and metrics name the failure kind."""
    async with run_fake_llm(api_key="sk-right") as fake:
        config = load_config(
            env=fake_env(fake.openai_base_url, api_key="sk-wrong"),
            data={"dir": str(tmp_path)},
            llm={"breaker_consecutive_failures": 3},
        )
        app = create_app(config, model_factory=lambda _c: FakeModel())
        async with app.test_app():
            client = app.test_client()
            for n in range(3):
                assert await classify(client, _photo_n(n)) == 200
            ready = await client.get("/readyz")
            ready_body = await ready.get_json()
            health = await (await client.get("/api/v1/health")).get_json()
            text = (await (await client.get("/metrics")).get_data()).decode()
    assert fake.stats()["by_status"] == {"401": 3}
    assert ready.status_code == 200
    assert ready_body["ready"] is True
    assert ready_body["degraded"] is True
    assert ready_body["reasons"] == ["llm provider fake: breaker open, last failure: unauthorized"]
    assert ready_body["checks"]["breakers"] == {"fake": "open"}
    assert ready_body["checks"]["llm_last_failure"]["fake"].startswith("unauthorized at ")
    provider = health["llm_providers"]["fake"]
    assert (provider["state"], provider["last_error"]) == ("open", "unauthorized")
    assert provider["last_error_at"].endswith("Z")
    assert health["status"] == "healthy"  # the local model answers
    assert metric(text, "xintu_llm_provider_up", provider="fake") == 0
    assert (
        metric(text, "xintu_llm_provider_last_failure", provider="fake", kind="unauthorized") == 1
    )
    assert metric(text, "xintu_llm_provider_last_failure", provider="fake", kind="timeout") == 0
    assert metric(text, "xintu_llm_provider_last_failure_timestamp_seconds", provider="fake") > 0
    assert metric(text, "xintu_llm_calls_total", provider="fake", outcome="failure") == 3


async def test_a_hurried_client_is_counted_apart_and_its_answer_upgraded(tmp_path: Path) -> None:
    """Over HTTP: X-Deadline-Ms 2000 against an upstream answering in 1 s. The call is
    abandoned at 0.5 s (2 s less the 1.5 s reserve) and counted as such, the client
    gets the local answer, and the LLM's answer then replaces it in the cache."""
    async with run_fake_llm(latency_median_ms=1000) as fake:
        config = load_config(
            env=fake_env(fake.openai_base_url),
            data={"dir": str(tmp_path)},
            store={"writer_flush_ms": 1},
        )
        app = create_app(config, model_factory=lambda _c: FakeModel())
        async with app.test_app():
            client = app.test_client()
            data = _photo_n(7)
            resp = await client.post(
                V1,
                files={"image": FileStorage(io.BytesIO(data), filename="p.jpg")},
                headers={"X-Deadline-Ms": "2000"},
            )
            first = await resp.get_json()
            with trio.fail_after(10):
                while app.runtime.llm.statistics().recheck_succeeded < 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            again = await (
                await client.post(
                    V1, files={"image": FileStorage(io.BytesIO(data), filename="p.jpg")}
                )
            ).get_json()
            text = (await (await client.get("/metrics")).get_data()).decode()
    assert resp.status_code == 200
    assert first["data"]["source"] == "local"
    assert (again["from_cache"], again["data"]["model"]) == (True, "fake-vl")  # the LLM's
    assert metric(text, "xintu_llm_calls_total", provider="fake", outcome="abandoned") == 1
    assert metric(text, "xintu_llm_calls_total", provider="fake", outcome="failure") == 0
    assert metric(text, "xintu_llm_fallbacks_total", reason="deadline") == 1
    assert metric(text, "xintu_llm_upgrades_queued_total") == 1
    assert metric(text, "xintu_llm_provider_up", provider="fake") == 1


def _photo_n(n: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (n * 60 % 256, 30, 90)).save(out, "JPEG")
    return out.getvalue()


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
