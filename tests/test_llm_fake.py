"""The pool against the fake upstream over real loopback HTTP, and the fake itself.

Real clock here (real sockets and the autojump clock do not mix); latencies are
milliseconds. Clock-driven behaviour is covered in ``test_llm_pool.py``.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from PIL import Image
from structlog.testing import capture_logs

from xintu import Category, Classification, Source
from xintu.actors import ClassifyRequest
from xintu.llm import (
    BadAnswer,
    LlmConfig,
    LlmPool,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
    llm_config_from,
)
from xintu.llm._image import prepare_upload
from xintu.llm._providers import ProviderClient
from xintu.testing.fakellm import Behaviour, FakeLlm, fake_answer, main, run_fake_llm


async def ask(pool: LlmPool, data: bytes, image_hash: str, deadline: float) -> Classification:
    """The pool's classify for one photo's bytes and hash."""
    return await pool.classify(ClassifyRequest(data, image_hash, "req"), deadline)


KEY = "sk-fake-SECRET-0000"


def photo(n: int, size: tuple[int, int] = (48, 32)) -> tuple[bytes, str]:
    out = io.BytesIO()
    Image.new("RGB", size, (n * 53 % 256, n * 17 % 256, 200)).save(out, "JPEG")
    data = out.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def expected(data: bytes, cfg: LlmConfig) -> tuple[str, float]:
    up = prepare_upload(data, max_side_px=cfg.max_image_side_px, quality=cfg.jpeg_quality)
    return fake_answer(up.jpeg)


def config(fake: FakeLlm, providers: str = "openai", **llm: Any) -> LlmConfig:
    raw: dict[str, Any] = {"workers": 4, "retry_initial_s": 0.01, "retry_max_s": 0.05}
    raw.update(llm)
    return llm_config_from(
        raw,
        {
            "XINTU_LLM_PROVIDERS": providers,
            "XINTU_LLM_OPENAI_BASE_URL": fake.openai_base_url,
            "XINTU_LLM_OPENAI_API_KEY": KEY,
            "XINTU_LLM_ANTHROPIC_BASE_URL": fake.anthropic_base_url,
            "XINTU_LLM_ANTHROPIC_API_KEY": KEY,
        },
    )


@asynccontextmanager
async def running(cfg: LlmConfig) -> AsyncIterator[LlmPool]:
    pool = LlmPool(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
        finally:
            pool.close()


@pytest.mark.parametrize("providers", ["openai", "anthropic"])
@pytest.mark.parametrize("style", ["plain", "fenced", "prose"])
async def test_classifies_through_both_wire_formats(providers: str, style: str) -> None:
    with trio.fail_after(10):
        async with run_fake_llm(latency_median_ms=1, answer_style=style, api_key=KEY) as fake:
            cfg = config(fake, providers)
            async with running(cfg) as pool:
                results = []
                for n in range(3):
                    data, h = photo(n)
                    results.append((data, await ask(pool, data, h, trio.current_time() + 5)))
            stats = fake.stats()
    for data, c in results:
        category, confidence = expected(data, cfg)
        assert (c.category.value, c.confidence, c.source, c.provider) == (
            category,
            confidence,
            Source.LLM,
            providers,
        )
    assert stats["calls"] == 3
    assert stats["by_api"] == {providers: 3}
    assert stats["distinct_images"] == 3
    assert stats["bad_requests"] == 0


@pytest.mark.parametrize("providers", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("language", "descriptions"),
    [
        (None, ("一张模拟的宠物照片", "一张模拟的美食照片")),
        ("en", ("a fake pets photo", "a fake foods photo")),
    ],
)
async def test_the_fake_describes_in_the_language_asked(
    providers: str, language: str | None, descriptions: tuple[str, str]
) -> None:
    settings = {} if language is None else {"description_language": language}
    with trio.fail_after(10):
        async with run_fake_llm(answer="pets") as fake:
            async with running(config(fake, providers, **settings)) as pool:
                pets = await ask(pool, *photo(1), trio.current_time() + 5)
                fake.behaviour.answer = "foods"
                foods = await ask(pool, *photo(2), trio.current_time() + 5)
    assert (pets.description, foods.description) == descriptions


async def test_the_fake_as_a_reasoning_model() -> None:
    """A model that refuses max_tokens and temperature: logged, then configured around."""
    with trio.fail_after(10), capture_logs() as logs:
        async with run_fake_llm(reasoning_model=True) as fake:
            async with running(config(fake, retry_max_attempts=3)) as pool:
                with pytest.raises(UpstreamRejected):
                    await ask(pool, *photo(1), trio.current_time() + 5)
            reasoning = {"token_limit_param": "max_completion_tokens", "temperature": 0}
            async with running(config(fake, provider={"openai": reasoning})) as pool:
                with pytest.raises(UpstreamRejected):
                    await ask(pool, *photo(2), trio.current_time() + 5)
            reasoning["temperature"] = "default"
            async with running(config(fake, provider={"openai": reasoning})) as pool:
                c = await ask(pool, *photo(3), trio.current_time() + 5)
            stats = fake.stats()
    assert c.source is Source.LLM
    assert stats["by_status"] == {"200": 1, "400": 2}  # the 400s were not retried
    assert [e["upstream_message"] for e in logs if e["event"] == "llm_provider_failed"] == [
        "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
        "'max_completion_tokens' instead. (param: max_tokens, code: unsupported_parameter)",
        "Unsupported value: 'temperature' does not support 0.0 with this model. Only the "
        "default (1) value is supported. (param: temperature, code: unsupported_value)",
    ]


async def test_large_photo_is_downscaled_before_upload() -> None:
    with trio.fail_after(10):
        async with run_fake_llm() as fake:
            cfg = config(fake, max_image_side_px=256)
            async with running(cfg) as pool:
                data, h = photo(1, size=(1600, 1200))
                assert len(data) > 4096  # prepared in a worker thread
                c = await ask(pool, data, h, trio.current_time() + 5)
            (uploaded,) = fake.images
    up = prepare_upload(data, max_side_px=256, quality=85)
    assert uploaded == hashlib.sha256(up.jpeg).hexdigest()
    assert (up.width, up.height) == (256, 192)
    assert c.category.value == fake_answer(up.jpeg)[0]


async def test_429_retry_after_then_success() -> None:
    with trio.fail_after(10):
        async with run_fake_llm(fail_next=1, error_status=429, retry_after="0") as fake:
            async with running(config(fake)) as pool:
                data, h = photo(1)
                c = await ask(pool, data, h, trio.current_time() + 5)
            stats = fake.stats()
    assert c.category in Category
    assert stats["calls"] == 2
    assert stats["by_status"] == {"200": 1, "429": 1}
    assert stats["max_calls_per_image"] == 2


async def test_500s_exhaust_attempts() -> None:
    with trio.fail_after(10):
        async with run_fake_llm(error_rate=1.0) as fake:
            async with running(config(fake, retry_max_attempts=3)) as pool:
                data, h = photo(1)
                with pytest.raises(UpstreamServerError):
                    await ask(pool, data, h, trio.current_time() + 5)
            assert fake.stats()["calls"] == 3


async def test_wrong_key_is_not_retried() -> None:
    with trio.fail_after(10):
        async with run_fake_llm(api_key="another-key") as fake:
            async with running(config(fake)) as pool:
                data, h = photo(1)
                with pytest.raises(UpstreamRejected) as info:
                    await ask(pool, data, h, trio.current_time() + 5)
            assert fake.stats()["by_status"] == {"401": 1}
    assert str(info.value) == "openai: request rejected (401)"


async def test_hang_times_out_and_falls_to_the_next_provider() -> None:
    with trio.fail_after(10):
        async with run_fake_llm(error_mode="hang", fail_next=1) as fake:
            cfg = config(fake, "openai,anthropic", timeout_s=0.2, retry_max_attempts=1)
            async with running(cfg) as pool:
                data, h = photo(1)
                start = trio.current_time()
                c = await ask(pool, data, h, trio.current_time() + 5)
                elapsed = trio.current_time() - start
    assert c.provider == "anthropic"
    assert 0.2 <= elapsed < 3.0  # after the 0.2 s attempt timeout, long before the deadline


async def test_hang_gives_up_within_the_deadline() -> None:
    with trio.fail_after(10):
        async with run_fake_llm(error_mode="hang", error_rate=1.0) as fake:
            async with running(config(fake, fallback_reserve_s=0.5)) as pool:
                data, h = photo(1)
                start = trio.current_time()
                with pytest.raises(UpstreamTimeout):
                    await ask(pool, data, h, start + 0.8)
                elapsed = trio.current_time() - start
    # Gave up at the deadline (0.8) less the 0.5 reserve: before the deadline itself.
    assert 0.3 <= elapsed < 0.8


@pytest.mark.parametrize("mode", ["malformed", "off_schema"])
async def test_bad_answers_fail_the_call(mode: str) -> None:
    with trio.fail_after(10):
        async with run_fake_llm(error_mode=mode, error_rate=1.0) as fake:
            async with running(config(fake)) as pool:
                data, h = photo(1)
                with pytest.raises(BadAnswer):
                    await ask(pool, data, h, trio.current_time() + 5)
            assert fake.stats()["calls"] == 1


async def test_control_stats_reset_and_outage() -> None:
    with trio.fail_after(10):
        async with run_fake_llm() as fake, httpx.AsyncClient(base_url=fake.base_url) as http:
            r = await http.post("/_fake/control", json={"answer": "pets", "api_key": "k"})
            assert r.status_code == 200
            assert (r.json()["answer"], r.json()["api_key"]) == ("pets", "***")
            assert (await http.post("/_fake/control", json={"answer": "cats"})).status_code == 400
            assert (await http.post("/_fake/control", json={"nope": 1})).status_code == 400
            assert (await http.post("/_fake/control", json=[1])).status_code == 400
            await http.post("/_fake/control", json={"api_key": None})

            async with running(config(fake, retry_max_attempts=1)) as pool:
                data, h = photo(1)
                c = await ask(pool, data, h, trio.current_time() + 5)
                assert c.category is Category.PETS

                r = await http.post(
                    "/_fake/control", json={"outage_start_s": 0, "outage_duration_s": 60}
                )
                assert r.status_code == 200
                assert fake.in_outage()
                with pytest.raises(UpstreamServerError):
                    await ask(pool, data, h, trio.current_time() + 5)
                fake.set_outage(None, 0)
                await ask(pool, data, h, trio.current_time() + 5)

            stats = (await http.get("/_fake/stats")).json()
            assert "images" not in stats
            images = (await http.get("/_fake/stats?images=1")).json()["images"]
            assert list(images.values()) == [3]
            assert (stats["calls"], stats["failed"], stats["by_status"]) == (
                3,
                1,
                {"200": 2, "500": 1},
            )
            assert (await http.post("/_fake/reset")).json()["calls"] == 0
            assert (await http.get("/_fake/nothing")).status_code == 404
            bad = await http.post("/v1/chat/completions", json={"model": "m"})
            assert bad.status_code == 400
            assert (await http.get("/v1/chat/completions")).status_code == 405


async def test_outage_schedule_from_start() -> None:
    with trio.fail_after(10):
        async with run_fake_llm(Behaviour(outage_start_s=0.0, outage_duration_s=0.2)) as fake:
            assert fake.in_outage()
            await trio.sleep(0.25)
            assert not fake.in_outage()


def test_behaviour_is_checked() -> None:
    with pytest.raises(ValueError, match="error_mode must be one of"):
        FakeLlm(Behaviour(error_mode="explode"))
    with pytest.raises(ValueError, match=r"error_rate must be within 0\.\.1"):
        FakeLlm(Behaviour(error_rate=2))


def test_cli_refuses_non_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--host", "0.0.0.0", "--port", "0"]) == 2
    assert "loopback addresses only" in capsys.readouterr().err


async def test_cli_serves() -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "xintu.testing.fakellm", "--port", "0", "--answer", "foods"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(15):
            assert proc.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "the fake exited early"
                line += chunk
            base_url = line.decode().split(" on ", 1)[1].strip()
            assert base_url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=base_url) as http:
                assert (await http.get("/_fake/stats")).json()["calls"] == 0
    finally:
        proc.terminate()
        with trio.fail_after(10):
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


async def test_every_caller_gets_a_connection() -> None:
    """20 callers on one provider: 3 clients of at most 8 connections, none waits."""
    with trio.fail_after(10):
        async with run_fake_llm(latency_median_ms=250) as fake:
            client = ProviderClient(config(fake).providers[0], language="zh", callers=20)
            up = prepare_upload(photo(1)[0], max_side_px=64, quality=85)
            try:
                async with trio.open_nursery() as nursery:
                    for lane in range(20):
                        nursery.start_soon(partial(client.attempt, up, lane=lane))
            finally:
                await client.aclose()
            stats = fake.stats()
    assert (stats["calls"], stats["max_in_flight"]) == (20, 20)
