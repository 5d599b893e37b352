"""The LLM in the service: primary classifier, silent fallback, breaker, rechecks.

Real app, real SQLite store, the fake upstream over real loopback HTTP, and the
fake local model (so which classifier answered is exact).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from PIL import Image
from werkzeug.datastructures import FileStorage

from xintu import load_config
from xintu.http import XintuApp, create_app
from xintu.testing.fakellm import FakeLlm, run_fake_llm

from .fakes import FakeModel
from .llm_service import fake_env

V1 = "/api/v1/classify"


def photo(seed: int) -> bytes:
    """A small real JPEG, distinct per seed (the LLM path re-encodes it)."""
    img = Image.new("RGB", (64, 48), (seed % 256, (seed * 7) % 256, (seed * 13) % 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
async def fake() -> AsyncIterator[FakeLlm]:
    async with run_fake_llm() as fake:
        yield fake


def llm_app(tmp_path: Path, fake: FakeLlm, **llm: Any) -> XintuApp:
    config = load_config(
        env=fake_env(fake.openai_base_url),
        data={"dir": str(tmp_path)},
        store={"writer_flush_ms": 1},
        llm={"retry_initial_s": 0.01, "retry_max_s": 0.02, **llm},
    )
    return create_app(config, model_factory=lambda _c: FakeModel())


async def post(app: XintuApp, data: bytes) -> dict[str, Any]:
    client = app.test_client()
    resp = await client.post(V1, files={"image": FileStorage(io.BytesIO(data), filename="p.jpg")})
    assert resp.status_code == 200, await resp.get_data()
    body: dict[str, Any] = await resp.get_json()
    return body


async def test_llm_answers_first(tmp_path: Path, fake: FakeLlm) -> None:
    app = llm_app(tmp_path, fake)
    data = photo(1)
    async with app.test_app():
        body = await post(app, data)
        assert body["data"]["source"] == "llm"
        assert body["data"]["provider"] == "fake"
        assert body["data"]["model"] == "fake-vl"
        assert body["data"]["local_inference_result"] is None
        again = await post(app, data)
        assert again["from_cache"] is True
    assert fake.stats()["calls"] == 1


@pytest.mark.parametrize("mode", ["malformed", "off_schema", "status"])
async def test_llm_failure_falls_back_to_local_silently(
    tmp_path: Path, fake: FakeLlm, mode: str
) -> None:
    fake.behaviour.error_rate = 1.0
    fake.behaviour.error_mode = mode
    app = llm_app(tmp_path, fake)
    async with app.test_app():
        body = await post(app, photo(2))
        stats = app.runtime.statistics()
    assert body["success"] is True
    assert body["data"]["source"] == "local"
    assert body["data"]["model"] == "fake-model"
    assert sum(stats.fallbacks.values()) == 1


async def test_open_breaker_sends_work_local_without_upstream_calls(
    tmp_path: Path, fake: FakeLlm
) -> None:
    fake.behaviour.error_rate = 1.0
    app = llm_app(
        tmp_path,
        fake,
        breaker_min_calls=3,
        breaker_failure_ratio=0.5,
        breaker_open_s=60.0,
        retry_max_attempts=1,
    )
    async with app.test_app():
        for i in range(3):
            assert (await post(app, photo(10 + i)))["data"]["source"] == "local"
        calls_when_open = fake.stats()["calls"]
        for i in range(5):
            assert (await post(app, photo(20 + i)))["data"]["source"] == "local"
        stats = app.runtime.statistics()
    assert fake.stats()["calls"] == calls_when_open == 3
    assert stats.llm.providers[0].breaker.state == "open"
    assert stats.fallbacks["breaker_open"] == 5
    # The three failed calls were queued work (priority lane); the five refused at
    # the door were not.
    assert stats.local.urgent == 3


async def test_concurrent_requests_make_one_upstream_call(tmp_path: Path, fake: FakeLlm) -> None:
    fake.behaviour.latency_median_ms = 50
    app = llm_app(tmp_path, fake)
    data = photo(3)
    answers: list[dict[str, Any]] = []
    async with app.test_app():

        async def one() -> None:
            answers.append(await post(app, data))

        async with trio.open_nursery() as nursery:
            for _ in range(15):
                nursery.start_soon(one)
    assert fake.stats()["calls"] == 1
    assert len(answers) == 15
    assert len({a["data"]["category"] for a in answers}) == 1
    assert all(a["data"]["source"] in {"llm", "cache"} for a in answers)


async def test_local_answer_is_upgraded_in_the_background(tmp_path: Path, fake: FakeLlm) -> None:
    fake.behaviour.fail_next = 1
    app = llm_app(tmp_path, fake, retry_max_attempts=1)
    data = photo(4)
    h = hashlib.sha256(data).hexdigest()
    async with app.test_app():
        first = await post(app, data)
        assert first["data"]["source"] == "local"
        # The hit is answered at once with the local answer, and queues an LLM recheck.
        hit = await post(app, data)
        assert hit["from_cache"] is True
        assert hit["data"]["category"] == first["data"]["category"]
        with trio.fail_after(5):
            # The recheck runs in the background: wait for the LLM pool to finish it.
            while app.runtime.llm.statistics().recheck_succeeded == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
            await app.runtime.writer.wait_idle()
        assert app.runtime.cache.peek(h).classification.source == "llm"  # type: ignore[union-attr]
        stored = await app.store.get(h)
    assert stored is not None
    assert stored.classification.source == "llm"
    assert stored.classification.provider == "fake"
    assert stored.hit_count == 1
    assert fake.stats()["calls"] == 2  # the failed first call and the recheck


async def test_api_key_never_logged(
    tmp_path: Path, fake: FakeLlm, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.behaviour.error_rate = 1.0
    config = load_config(
        env=fake_env(fake.openai_base_url, model="m", api_key="sk-very-secret-123"),
        data={"dir": str(tmp_path)},
        llm={"retry_max_attempts": 1},
    )
    app = create_app(config, model_factory=lambda _c: FakeModel())
    async with app.test_app():
        await post(app, photo(5))
    out = capsys.readouterr()
    assert "sk-very-secret-123" not in out.out + out.err
    assert "sk-very-secret-123" not in repr(config)


async def test_hanging_upstream_falls_back_within_the_deadline(
    tmp_path: Path, fake: FakeLlm
) -> None:
    fake.behaviour.error_rate = 1.0
    fake.behaviour.error_mode = "hang"
    config = load_config(
        env=fake_env(fake.openai_base_url, model="m"),
        data={"dir": str(tmp_path)},
        server={"request_deadline_s": 1.5},
        llm={"fallback_reserve_s": 0.7, "retry_max_attempts": 1},
    )
    app = create_app(config, model_factory=lambda _c: FakeModel())
    async with app.test_app():
        started = trio.current_time()
        body = await post(app, photo(6))
        elapsed = trio.current_time() - started
        stats = app.runtime.statistics()
    assert body["data"]["source"] == "local"
    # The LLM call got the deadline less the reserve, then the local model answered.
    assert 0.7 <= elapsed < 1.5
    assert sum(stats.fallbacks.values()) == 1
    assert stats.local.urgent == 1  # the caller had waited: the priority lane
