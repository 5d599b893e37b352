"""The LLM pool on the autojump clock, with a scripted upstream behind httpx.MockTransport.

Retries (exact attempt counts, Retry-After), deadlines, the retry budget, the
breaker seen through the pool, the provider chain, the inbox bound, background
rechecks and key hygiene. Real-HTTP tests against the fake upstream are in
``test_llm_fake.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import outcome
import pytest
import trio
import trio.testing
from PIL import Image
from structlog.testing import capture_logs

from xintu import Category, Classification, Source
from xintu.actors import ClassifyRequest
from xintu.llm import (
    BadAnswer,
    BreakerState,
    ImageNotUploadable,
    LlmConfig,
    LlmError,
    LlmPool,
    LlmUnavailable,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
    llm_config_from,
)
from xintu.llm._errors import CallAbandoned

KEY = "sk-test-SECRET-9999"
OPENAI = "https://openai.example/v1"
ANTHROPIC = "https://anthropic.example"

Action = Callable[[httpx.Request], Awaitable[httpx.Response]]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def photo(n: int = 0) -> tuple[bytes, str]:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (n * 37 % 256, n * 91 % 256, 80)).save(out, "JPEG")
    data = out.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def answer(category: str = "pets", confidence: float = 0.9) -> str:
    return json.dumps({"category": category, "confidence": confidence, "description": "d"})


def ok(text: str | None = None) -> Action:
    async def act(request: httpx.Request) -> httpx.Response:
        body = text if text is not None else answer()
        if request.url.path.endswith("/messages"):
            return httpx.Response(200, json={"content": [{"type": "text", "text": body}]})
        return httpx.Response(200, json={"choices": [{"message": {"content": body}}]})

    return act


def status(code: int, retry_after: str | None = None) -> Action:
    async def act(request: httpx.Request) -> httpx.Response:
        headers = {"retry-after": retry_after} if retry_after else {}
        return httpx.Response(code, headers=headers, json={"error": f"upstream says {KEY}"})

    return act


def hang() -> Action:
    async def act(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    return act


class Upstream:
    """Scripted answers per host: a queue of actions, then the default action."""

    def __init__(self, default: Action | None = None) -> None:
        self.default = default or ok()
        self.script: dict[str, deque[Action]] = {}
        self.defaults: dict[str, Action] = {}
        self.calls: list[tuple[float, str]] = []  # (time, host)
        self.gate: trio.Event | None = None

    def then(self, host: str, *actions: Action) -> Upstream:
        self.script.setdefault(host, deque()).extend(actions)
        return self

    def count(self, host: str | None = None) -> int:
        return sum(1 for _, h in self.calls if host is None or h == host)

    def times(self) -> list[float]:
        return [t for t, _ in self.calls]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.calls.append((trio.current_time(), host))
        if self.gate is not None:
            await self.gate.wait()
        queue = self.script.get(host)
        action = queue.popleft() if queue else self.defaults.get(host, self.default)
        return await action(request)


def config(providers: str = "openai", **llm: Any) -> LlmConfig:
    env = {
        "XINTU_LLM_PROVIDERS": providers,
        "XINTU_LLM_OPENAI_BASE_URL": OPENAI,
        "XINTU_LLM_OPENAI_API_KEY": KEY,
        "XINTU_LLM_ANTHROPIC_BASE_URL": ANTHROPIC,
        "XINTU_LLM_ANTHROPIC_API_KEY": KEY,
    }
    raw: dict[str, Any] = {
        "workers": 4,
        "inbox_size": 8,
        "fallback_reserve_s": 1.5,
        "timeout_s": 5.0,
        "retry_initial_s": 0.2,
        "retry_max_s": 2.0,
        "retry_budget_min": 100,
        "breaker_min_calls": 1000,
        "breaker_consecutive_failures": 0,
    }
    raw.update(llm)
    return llm_config_from(raw, env)


@asynccontextmanager
async def running(
    cfg: LlmConfig,
    upstream: Upstream,
    on_recheck: Callable[[str, Classification], Awaitable[None]] | None = None,
) -> AsyncIterator[LlmPool]:
    import random

    pool = LlmPool(
        cfg,
        on_recheck=on_recheck,
        transport=httpx.MockTransport(upstream),
        rng=random.Random(7),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
        finally:
            pool.close()


async def classify(pool: LlmPool, n: int = 0, *, within_s: float = 10.0) -> Classification:
    data, h = photo(n)
    return await pool.classify(ClassifyRequest(data, h, "r"), trio.current_time() + within_s)


async def fails(pool: LlmPool, n: int = 0, *, within_s: float = 10.0) -> LlmError:
    with pytest.raises(LlmError) as info:
        await classify(pool, n, within_s=within_s)
    return info.value


# --- success and the chain -----------------------------------------------------------


async def test_success(clock: trio.testing.MockClock) -> None:
    upstream = Upstream(ok(answer("foods", 0.75)))
    with trio.fail_after(30):
        async with running(config(), upstream) as pool:
            result = await classify(pool)
    assert result == Classification(
        category=Category.FOODS,
        confidence=0.75,
        source=Source.LLM,
        model="gpt-4o-mini",
        description="d",
        provider="openai",
    )
    assert upstream.count() == 1
    s = pool.statistics()
    assert (s.submitted, s.succeeded, s.failed) == (1, 1, 0)
    assert s.providers[0].breaker.state is BreakerState.CLOSED


async def test_chain_falls_to_the_second_provider(clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    upstream.defaults["openai.example"] = status(503)
    with trio.fail_after(30):
        async with running(config("openai,anthropic", retry_max_attempts=2), upstream) as pool:
            result = await classify(pool)
    assert (result.provider, result.model) == ("anthropic", "claude-haiku-4-5")
    assert (upstream.count("openai.example"), upstream.count("anthropic.example")) == (2, 1)


async def test_malformed_answer_fails_without_retry(clock: trio.testing.MockClock) -> None:
    upstream = Upstream(ok("I cannot tell."))
    with trio.fail_after(30):
        async with running(config(), upstream) as pool:
            err = await fails(pool)
            upstream.default = ok(answer("cats"))
            err2 = await fails(pool)
            upstream.default = ok(answer("pets", 2.0))
            err3 = await fails(pool)
    assert isinstance(err, BadAnswer)
    assert str(err) == "openai: the answer holds no JSON object with a category"
    assert str(err2) == "openai: the answer's category 'cats' is not one of the eight keys"
    assert str(err3) == "openai: the answer's confidence 2.0 is outside 0..1"
    assert upstream.count() == 3


async def test_bad_image_makes_no_call_and_is_not_the_upstreams_fault(
    clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream()
    with trio.fail_after(30):
        async with running(config(breaker_min_calls=1), upstream) as pool:
            request = ClassifyRequest(b"garbage", "0" * 64, "r")
            with pytest.raises(ImageNotUploadable):
                await pool.classify(request, trio.current_time() + 10)
            assert pool.statistics().providers[0].breaker.state is BreakerState.CLOSED
    assert upstream.count() == 0


# --- retries -------------------------------------------------------------------------


async def test_retries_5xx_with_exact_attempts(clock: trio.testing.MockClock) -> None:
    upstream = Upstream().then("openai.example", status(500), status(502))
    with trio.fail_after(30):
        async with running(config(retry_max_attempts=3), upstream) as pool:
            assert (await classify(pool)).category is Category.PETS
            stats = pool.statistics().providers[0]
    assert upstream.count() == 3
    assert (stats.attempts, stats.failures, stats.successes, stats.retries) == (3, 2, 1, 2)
    t = upstream.times()
    assert 0 <= t[1] - t[0] <= 0.2  # full jitter: 0..retry_initial_s
    assert 0 <= t[2] - t[1] <= 0.4  # then 0..2 x retry_initial_s


async def test_gives_up_after_max_attempts(clock: trio.testing.MockClock) -> None:
    upstream = Upstream(status(500))
    with trio.fail_after(30):
        async with running(config(retry_max_attempts=3), upstream) as pool:
            err = await fails(pool)
    assert isinstance(err, UpstreamServerError)
    assert str(err) == "openai: server error (500)"
    assert upstream.count() == 3


async def test_429_honours_retry_after(clock: trio.testing.MockClock) -> None:
    upstream = Upstream().then("openai.example", status(429, "3"))
    with trio.fail_after(30):
        async with running(config(), upstream) as pool:
            await classify(pool)
    t = upstream.times()
    assert len(t) == 2
    assert t[1] - t[0] == pytest.approx(3.0)  # longer than retry_max_s, still honoured


async def test_retry_after_http_date(clock: trio.testing.MockClock) -> None:
    upstream = Upstream().then(
        "openai.example",
        status(503, "Wed, 21 Oct 2015 07:28:00 GMT"),  # in the past
    )
    with trio.fail_after(30):
        async with running(config(), upstream) as pool:
            await classify(pool)
    assert upstream.count() == 2


async def test_retry_after_beyond_the_deadline_is_not_waited(
    clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(status(429, "60"))
    with trio.fail_after(30):
        async with running(config(), upstream) as pool:
            start = trio.current_time()
            await fails(pool, within_s=10)
            assert trio.current_time() - start < 0.01
    assert upstream.count() == 1


@pytest.mark.parametrize("code", [400, 401, 403, 404, 422])
async def test_no_retry_on_client_errors(clock: trio.testing.MockClock, code: int) -> None:
    upstream = Upstream(status(code))
    with trio.fail_after(30):
        async with running(config(), upstream) as pool:
            err = await fails(pool)
    assert isinstance(err, UpstreamRejected)
    assert str(err) == f"openai: request rejected ({code})"
    assert upstream.count() == 1


def refused(message: str, param: str) -> Action:
    """A 400 as OpenAI answers a parameter the model does not take."""

    async def act(request: httpx.Request) -> httpx.Response:
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": "unsupported_parameter",
        }
        return httpx.Response(400, json={"error": error})

    return act


async def test_a_refused_parameter_is_logged_not_retried_and_counts_against_the_breaker(
    clock: trio.testing.MockClock,
) -> None:
    message = (
        "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead."
    )
    upstream = Upstream(refused(f"{message} Your key: {KEY}", "max_tokens"))
    cfg = config(retry_max_attempts=3, breaker_consecutive_failures=3)
    with trio.fail_after(30), capture_logs() as logs:
        async with running(cfg, upstream) as pool:
            for i in range(3):
                err = await fails(pool, i)
                assert type(err) is UpstreamRejected
                assert str(err) == "openai: request rejected (400)"
            assert pool.statistics().providers[0].breaker.state is BreakerState.OPEN
            assert isinstance(await fails(pool, 3), LlmUnavailable)
    assert upstream.count() == 3  # never retried; none while the breaker is open
    failed = [e for e in logs if e["event"] == "llm_provider_failed"]
    assert failed == 3 * [
        {
            "event": "llm_provider_failed",
            "log_level": "warning",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "error": "llm_upstream_rejected",
            "status": 400,
            "upstream_message": f"{message} Your key: *** (param: max_tokens, code: "
            "unsupported_parameter)",
        }
    ]
    assert KEY not in repr(logs)


async def test_retryable_failures_stay_info_with_the_upstream_message(
    clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(status(503))
    with trio.fail_after(30), capture_logs() as logs:
        async with running(config(retry_max_attempts=1), upstream) as pool:
            await fails(pool)
    (failed,) = [e for e in logs if e["event"] == "llm_provider_failed"]
    assert failed["log_level"] == "info"
    assert failed["upstream_message"] == "upstream says ***"


def text_parts(body: dict[str, Any]) -> list[str]:
    """Every text part of a request body's messages (either wire format)."""
    return [
        part["text"]
        for message in body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "text"
    ]


def recording(bodies: list[dict[str, Any]], action: Action) -> Action:
    async def act(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return await action(request)

    return act


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("language", "asked", "not_asked"),
    [
        # The original backend's wording, with its full-width punctuation.
        (None, '"description": "<简短描述图片内容（中文，30字以内）>"', "at most 15 words"),  # noqa: RUF001
        ("en", '"description": "<what the photo shows, at most 15 words>"', "中文"),
    ],
)
async def test_the_prompt_asks_the_configured_description_language(
    clock: trio.testing.MockClock, kind: str, language: str | None, asked: str, not_asked: str
) -> None:
    bodies: list[dict[str, Any]] = []
    upstream = Upstream(recording(bodies, ok()))
    settings = {} if language is None else {"description_language": language}
    with trio.fail_after(30):
        async with running(config(kind, **settings), upstream) as pool:
            await classify(pool)
    (body,) = bodies
    (prompt,) = text_parts(body)
    assert asked in prompt
    assert not_asked not in prompt


@pytest.mark.parametrize(
    ("language", "description", "kept"),
    [
        (
            None,
            "一只橘色的猫趴在窗台上晒太阳。窗外是一片绿色的草地和几棵高大的树木",
            "一只橘色的猫趴在窗台上晒太阳。窗外是一片绿色的草地和几棵高…",
        ),
        ("en", " ".join(["word"] * 20), " ".join(["word"] * 15) + "…"),
    ],
)
async def test_a_long_description_is_clipped(
    clock: trio.testing.MockClock, language: str | None, description: str, kept: str
) -> None:
    text = json.dumps({"category": "pets", "confidence": 0.9, "description": description})
    settings = {} if language is None else {"description_language": language}
    with trio.fail_after(30):
        async with running(config(**settings), Upstream(ok(text))) as pool:
            result = await classify(pool)
    assert result.description == kept


async def test_request_parameters_reach_the_body(clock: trio.testing.MockClock) -> None:
    bodies: list[dict[str, Any]] = []
    upstream = Upstream(recording(bodies, ok()))
    reasoning = {
        "token_limit_param": "max_completion_tokens",
        "temperature": "default",
        "extra_body": {"reasoning_effort": "low"},
    }
    with trio.fail_after(30):
        async with running(config(provider={"openai": reasoning}), upstream) as pool:
            await classify(pool, 1)
        async with running(config(), upstream) as pool:
            await classify(pool, 2)
    configured, default = bodies
    assert configured["max_completion_tokens"] == 300
    assert configured["reasoning_effort"] == "low"
    assert "max_tokens" not in configured
    assert "temperature" not in configured
    assert (default["max_tokens"], default["temperature"]) == (300, 0)
    assert "max_completion_tokens" not in default
    assert "reasoning_effort" not in default


async def test_retry_budget_caps_retries_under_a_burst(clock: trio.testing.MockClock) -> None:
    upstream = Upstream(status(500))
    cfg = config(
        workers=20,
        inbox_size=20,
        retry_max_attempts=3,
        retry_budget_ratio=0.2,
        retry_budget_min=0,
    )
    with trio.fail_after(30):
        async with running(cfg, upstream) as pool, trio.open_nursery() as burst:
            for i in range(20):
                burst.start_soon(fails, pool, i)
    # 20 calls, each allowed 2 retries: the budget allows 0 + 0.2 * 20 = 4 of the 40.
    assert upstream.count() == 24
    stats = pool.statistics().providers[0]
    assert stats.retries == 4
    assert stats.retry_budget.exhausted_total == 20  # 16 first retries, 4 second ones


# --- deadlines -------------------------------------------------------------------------


async def test_no_call_when_it_would_not_fit(clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    with trio.fail_after(30):
        async with running(config(fallback_reserve_s=1.5), upstream) as pool:
            start = trio.current_time()
            err = await fails(pool, within_s=1.5)
            assert trio.current_time() == start
    assert isinstance(err, LlmUnavailable)
    assert (err.reason, str(err)) == ("no_time", "not enough time left for an LLM call")
    assert upstream.count() == 0
    assert pool.statistics().refused_no_time == 1


def slow_ok(seconds: float) -> Action:
    async def act(request: httpx.Request) -> httpx.Response:
        await trio.sleep(seconds)
        return await ok()(request)

    return act


async def test_slow_calls_do_not_switch_the_llm_off(clock: trio.testing.MockClock) -> None:
    """A call that ran to its deadline makes the estimate say "no time"; with a worker
    free the next call is made anyway (a probe), so the estimate can learn again."""
    upstream = Upstream().then("openai.example", hang())
    with trio.fail_after(60):
        async with running(config(workers=2, timeout_s=60.0), upstream) as pool:
            err = await fails(pool, 0, within_s=10)  # runs to 10 - 1.5 s
            assert isinstance(err, CallAbandoned)  # the caller's deadline, not timeout_s
            answers = [await classify(pool, n, within_s=10) for n in (1, 2, 3)]
    assert [a.category for a in answers] == ["pets"] * 3
    assert upstream.count() == 4
    assert pool.statistics().refused_queue_too_long == 0


async def test_a_call_that_queued_too_long_is_not_made(clock: trio.testing.MockClock) -> None:
    """Admitted on the estimate, then the job ahead ran long: when a worker takes it,
    less time is left than a call usually takes, so no call is made and the caller
    falls back at once; that refusal does not count as a (zero) service time."""
    upstream = Upstream().then("openai.example", slow_ok(2.0), slow_ok(3.0))
    with trio.fail_after(30):
        async with running(config(workers=1), upstream) as pool:
            await classify(pool, 0)  # measures 2 s per call
            results: dict[str, Any] = {}

            async def one(name: str, n: int, within_s: float) -> None:
                results[name] = await outcome.acapture(classify, pool, n, within_s=within_s)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "a", 1, 10.0)
                await trio.testing.wait_all_tasks_blocked()
                # One round ahead (the running call) and its own: 4 s <= 5.5 - 1.5.
                nursery.start_soon(one, "b", 2, 5.5)
            mean_after = pool._service.mean_s
    assert results["a"].unwrap().category == "pets"
    err = results["b"].error
    assert isinstance(err, LlmUnavailable)
    assert err.reason == "no_time"
    assert upstream.count() == 2  # b's call was never made: 1 s left, calls take 2+
    assert mean_after == pytest.approx(2.2)  # 2 s, then 3 s; b's refusal not counted


async def test_the_queue_is_held_against_the_latency_target(
    clock: trio.testing.MockClock,
) -> None:
    """With its one worker busy, a call expected in 4 s (one 2 s call ahead, then
    its own) fits a 10 s deadline but not an answer wanted within 3 s (admit_by):
    refused at once as queue_too_long, no call made."""
    upstream = Upstream().then("openai.example", slow_ok(2.0), slow_ok(2.0))
    with trio.fail_after(30):
        async with running(config(workers=1), upstream) as pool:
            await classify(pool, 0)  # measures 2 s per call
            async with trio.open_nursery() as nursery:
                nursery.start_soon(classify, pool, 1)
                await trio.testing.wait_all_tasks_blocked()
                now = trio.current_time()
                assert pool.would_take(now + 10)
                assert not pool.would_take(now + 10, admit_by=now + 3)
                data, h = photo(2)
                with pytest.raises(LlmUnavailable) as info:
                    await pool.classify(ClassifyRequest(data, h, "r"), now + 10, admit_by=now + 3)
    assert info.value.reason == "queue_too_long"
    assert upstream.count() == 2
    assert pool.statistics().refused_queue_too_long == 1


async def test_calls_under_way_show_a_slowdown_before_the_mean_does(
    clock: trio.testing.MockClock,
) -> None:
    """Calls measured at 0.1 s, then the upstream hangs: after 2 s the running call
    says a round takes at least 2 s, so work wanted within 3 s is refused at once
    (one round ahead and its own: >= 4 s), though the mean still says 0.2 s."""
    upstream = Upstream().then("openai.example", slow_ok(0.1), hang())
    with trio.fail_after(30):
        async with running(config(workers=1), upstream) as pool:
            await classify(pool, 0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fails, pool, 1)
                await trio.sleep(0.5)
                now = trio.current_time()
                assert pool.would_take(now + 10, admit_by=now + 3)  # 2 x 0.5 s
                await trio.sleep(1.5)
                now = trio.current_time()
                assert not pool.would_take(now + 10, admit_by=now + 3)  # 2 x 2 s
                assert pool._service.mean_s == pytest.approx(0.1)
                nursery.cancel_scope.cancel()


async def test_hang_is_abandoned_at_the_deadline(clock: trio.testing.MockClock) -> None:
    """The caller's deadline (less the reserve) comes before the provider's own
    timeout: the call is abandoned, which (the slow-call rule off) is no verdict
    on the upstream."""
    upstream = Upstream(hang())
    with trio.fail_after(30):
        async with running(config(timeout_s=60.0, breaker_slow_call_s=0), upstream) as pool:
            start = trio.current_time()
            err = await fails(pool, within_s=10)
            elapsed = trio.current_time() - start
    assert isinstance(err, CallAbandoned)
    assert str(err) == "openai: the caller's deadline ran out first"
    assert elapsed == pytest.approx(8.5)  # the deadline less the reserve
    assert upstream.count() == 1  # no time was left for a retry
    p = pool.statistics().providers[0]
    assert (p.successes, p.failures, p.abandoned, p.last_failure) == (0, 0, 1, None)
    assert p.breaker.failures_in_window == 0


async def test_a_hung_call_counts_as_slow_once_past_the_threshold(
    clock: trio.testing.MockClock,
) -> None:
    """The same hang with breaker_slow_call_s = 3: at 3 s the call counts as a
    failure of kind slow, while it still runs; its abandonment at 8.5 s adds
    nothing (one outcome per attempt)."""
    upstream = Upstream(hang())
    with trio.fail_after(30), capture_logs() as logs:
        async with running(config(timeout_s=60.0, breaker_slow_call_s=3.0), upstream) as pool:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fails, pool)
                await trio.sleep(2.9)
                assert pool.statistics().providers[0].breaker.failures_in_window == 0
                await trio.sleep(0.2)
                p = pool.statistics().providers[0]
                assert (p.failures, p.slow, p.last_failure) == (1, 1, "slow")
                assert p.breaker.failures_in_window == 1
            elapsed = trio.current_time()
    p = pool.statistics().providers[0]
    assert elapsed == pytest.approx(8.5)  # the caller still waits to its deadline
    assert (p.successes, p.failures, p.abandoned, p.slow) == (0, 1, 0, 1)
    assert [e["after_s"] for e in logs if e["event"] == "llm_call_slow"] == [3.0]


async def test_hung_calls_open_the_breaker_at_the_slow_call_threshold(
    clock: trio.testing.MockClock,
) -> None:
    """Five hung calls at once (five in a row open the breaker): it opens 5 s into
    the hang (the default threshold), not never; from then on new work is refused
    at once and no upstream call is made."""
    upstream = Upstream(hang())
    cfg = config(workers=8, timeout_s=20.0, breaker_consecutive_failures=5)
    assert cfg.breaker_slow_call_s == 5.0  # the default
    with trio.fail_after(60), capture_logs() as logs:
        async with running(cfg, upstream) as pool:
            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(fails, pool, n)
                await trio.sleep(4.9)
                assert pool.healthy()
                await trio.sleep(0.2)
                assert not pool.healthy()
                err = await fails(pool, 9)
                assert isinstance(err, LlmUnavailable)
                assert err.reason == "breaker_open"
    p = pool.statistics().providers[0]
    assert p.breaker.opened_total == 1
    assert (p.failures, p.slow, p.abandoned) == (5, 5, 0)
    assert upstream.count() == 5
    opened = [e for e in logs if e["event"] == "breaker_opened"]
    assert [(e["reason"], e["last_failure"]) for e in opened] == [("consecutive_failures", "slow")]


async def test_a_slow_answer_is_used_but_counted_as_slow(clock: trio.testing.MockClock) -> None:
    """An answer after the threshold still answers the caller; for the breaker the
    attempt was a failure (slow), not a success."""
    upstream = Upstream(slow_ok(4.0))
    with trio.fail_after(30):
        async with running(config(timeout_s=10.0, breaker_slow_call_s=3.0), upstream) as pool:
            result = await classify(pool)
    assert result.source is Source.LLM
    p = pool.statistics().providers[0]
    assert (p.successes, p.failures, p.slow) == (0, 1, 1)
    assert (p.breaker.successes_in_window, p.breaker.failures_in_window) == (0, 1)


async def test_calls_under_the_threshold_are_not_slow(clock: trio.testing.MockClock) -> None:
    """Answers just under the threshold count as successes, and a watcher that
    slept towards an earlier call's threshold does not count a later call early."""
    upstream = Upstream(slow_ok(2.9))
    with trio.fail_after(30):
        async with running(config(timeout_s=10.0, breaker_slow_call_s=3.0), upstream) as pool:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(classify, pool, 0)
                await trio.sleep(1.0)
                nursery.start_soon(classify, pool, 1)
    p = pool.statistics().providers[0]
    assert (p.successes, p.failures, p.slow) == (2, 0, 0)


async def test_the_providers_own_timeout_is_its_failure(clock: trio.testing.MockClock) -> None:
    upstream = Upstream(hang())
    with trio.fail_after(30):
        async with running(config(timeout_s=2.0, retry_max_attempts=1), upstream) as pool:
            err = await fails(pool, within_s=10)
    assert isinstance(err, UpstreamTimeout)
    p = pool.statistics().providers[0]
    assert (p.failures, p.abandoned, p.last_failure) == (1, 0, "timeout")
    assert p.last_failure_at is not None
    assert p.breaker.failures_in_window == 1


async def test_attempt_timeout_then_retry(clock: trio.testing.MockClock) -> None:
    upstream = Upstream().then("openai.example", hang())
    with trio.fail_after(30):
        async with running(config(timeout_s=2.0), upstream) as pool:
            start = trio.current_time()
            await classify(pool, within_s=10)
            elapsed = trio.current_time() - start
    assert upstream.count() == 2
    assert 2.0 <= elapsed <= 2.2


# --- the breaker through the pool ------------------------------------------------------


async def test_outage_opens_breaker_then_zero_calls_then_recovers(
    clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(status(500))
    cfg = config(
        retry_max_attempts=1,
        breaker_min_calls=4,
        breaker_failure_ratio=0.5,
        breaker_open_s=15.0,
        breaker_half_open_probes=2,
    )
    with trio.fail_after(60), capture_logs() as logs:
        async with running(cfg, upstream) as pool:
            for i in range(4):
                await fails(pool, i)
            assert pool.statistics().providers[0].breaker.state is BreakerState.OPEN
            assert not pool.healthy()

            # Open: refused at once, no upstream call.
            start = trio.current_time()
            for i in range(50):
                err = await fails(pool, i)
                assert isinstance(err, LlmUnavailable)
                assert err.reason == "breaker_open"
            assert trio.current_time() == start
            assert upstream.count() == 4
            assert pool.statistics().refused_breaker_open == 50

            # Half-open: at most two probes at once.
            await trio.sleep(15)
            upstream.default = ok()
            upstream.gate = trio.Event()
            async with trio.open_nursery() as probes:
                for i in range(2):
                    probes.start_soon(classify, pool, i)
                await trio.testing.wait_all_tasks_blocked()
                err = await fails(pool, 9)
                assert isinstance(err, LlmUnavailable)
                assert err.reason == "breaker_open"
                assert upstream.count() == 6
                upstream.gate.set()
            assert pool.statistics().providers[0].breaker.state is BreakerState.CLOSED
            upstream.gate = None
            await classify(pool)
    assert [e["event"] for e in logs if e["event"].startswith("breaker_")] == [
        "breaker_opened",
        "breaker_half_open",
        "breaker_closed",
    ]


async def test_open_breaker_skips_to_the_next_provider(clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    upstream.defaults["openai.example"] = status(500)
    cfg = config("openai,anthropic", retry_max_attempts=1, breaker_min_calls=2)
    with trio.fail_after(30):
        async with running(cfg, upstream) as pool:
            await classify(pool, 1)
            await classify(pool, 2)
            assert upstream.count("openai.example") == 2
            for i in range(5):
                assert (await classify(pool, i)).provider == "anthropic"
    assert upstream.count("openai.example") == 2
    assert upstream.count("anthropic.example") == 7


# --- the inbox and the front door --------------------------------------------------------


async def test_inbox_full_refuses_at_once(clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    upstream.gate = trio.Event()
    with trio.fail_after(30):
        async with running(config(workers=1, inbox_size=1), upstream) as pool:
            async with trio.open_nursery() as callers:
                callers.start_soon(classify, pool, 1)
                await trio.testing.wait_all_tasks_blocked()
                callers.start_soon(classify, pool, 2)
                await trio.testing.wait_all_tasks_blocked()
                s = pool.statistics()
                assert (s.busy, s.queued, s.max_queued) == (1, 1, 1)
                # A long deadline: the unmeasured calls' wait (the prior) fits in it.
                err = await fails(pool, 3, within_s=60)
                assert isinstance(err, LlmUnavailable)
                assert err.reason == "inbox_full"
                upstream.gate.set()
    assert pool.statistics().refused_inbox_full == 1
    assert upstream.count() == 2


async def test_a_cold_pool_takes_a_call_to_last_the_hedge_ceiling(
    clock: trio.testing.MockClock,
) -> None:
    """Before any call has been measured, a job behind busy workers is expected to
    wait a call of ``hedge_after_s`` (3 s) per round: with the call deadline 8.5 s
    away (10 s less the reserve) one round behind the worker fits (6 s), a second
    does not (9 s). Before, an unmeasured pool expected no wait at all, and a burst
    filled its inbox with work that could only be answered late."""
    upstream = Upstream()
    upstream.gate = trio.Event()
    with trio.fail_after(30):
        async with running(config(workers=1, inbox_size=8, hedge_after_s=3.0), upstream) as pool:
            async with trio.open_nursery() as callers:
                callers.start_soon(classify, pool, 1)
                await trio.testing.wait_all_tasks_blocked()
                callers.start_soon(classify, pool, 2)
                await trio.testing.wait_all_tasks_blocked()
                err = await fails(pool, 3)
                upstream.gate.set()
    assert isinstance(err, LlmUnavailable)
    assert err.reason == "queue_too_long"
    assert upstream.count() == 2


async def test_no_provider_refuses_at_once(clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    with trio.fail_after(30):
        async with running(llm_config_from({}, {}), upstream) as pool:
            err = await fails(pool)
            assert not pool.offer_recheck(b"x", "0" * 64)
    assert isinstance(err, LlmUnavailable)
    assert err.reason == "no_provider"
    assert str(err) == "no LLM provider is configured"
    assert not pool.enabled


async def test_closed_pool_refuses(clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    with trio.fail_after(30):
        async with running(config(), upstream) as pool:
            pool.close()
            err = await fails(pool)
    assert isinstance(err, LlmUnavailable)
    assert err.reason == "closed"


async def test_a_caller_that_left_costs_no_call(clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    upstream.gate = trio.Event()
    with trio.fail_after(30):
        async with running(config(workers=1, inbox_size=4), upstream) as pool:
            async with trio.open_nursery() as callers:
                callers.start_soon(classify, pool, 1)
                await trio.testing.wait_all_tasks_blocked()
                with trio.move_on_after(0.5):
                    await classify(pool, 2)  # queued behind the first, then gives up
                upstream.gate.set()
            await trio.testing.wait_all_tasks_blocked()
    assert upstream.count() == 1


# --- background rechecks ----------------------------------------------------------------


async def test_recheck_upgrades_in_the_background(clock: trio.testing.MockClock) -> None:
    upstream = Upstream(ok(answer("travel_scenery", 0.8)))
    upgraded: list[tuple[str, Classification]] = []
    done = trio.Event()

    async def on_recheck(image_hash: str, c: Classification) -> None:
        upgraded.append((image_hash, c))
        done.set()

    data, h = photo(5)
    with trio.fail_after(30):
        async with running(config(recheck_queue=2), upstream, on_recheck) as pool:
            assert pool.offer_recheck(data, h)
            assert not pool.offer_recheck(data, h)  # already queued
            await done.wait()
            s = pool.statistics()
    ((got_hash, c),) = upgraded
    assert got_hash == h
    assert (c.source, c.category, c.provider) == (Source.LLM, Category.TRAVEL_SCENERY, "openai")
    assert (s.recheck_accepted, s.recheck_succeeded, s.recheck_queued) == (1, 1, 0)


async def test_recheck_is_bounded_droppable_and_waits_for_idle_workers(
    clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream()
    upstream.gate = trio.Event()
    seen: list[str] = []
    two_seen = trio.Event()

    async def on_recheck(image_hash: str, c: Classification) -> None:
        seen.append(image_hash)
        if len(seen) == 2:
            two_seen.set()

    with trio.fail_after(30):
        async with running(config(workers=1, recheck_queue=2), upstream, on_recheck) as pool:
            async with trio.open_nursery() as callers:
                callers.start_soon(classify, pool, 0)  # the only worker is busy
                await trio.testing.wait_all_tasks_blocked()
                offers = [pool.offer_recheck(*photo(i)) for i in range(1, 5)]
                await trio.testing.wait_all_tasks_blocked()
                assert upstream.count() == 1  # rechecks wait for an idle worker
                upstream.gate.set()
            await two_seen.wait()
            s = pool.statistics()
    # One is taken by the recheck worker at once (then parks), two fit the queue.
    assert offers == [True, True, True, False]
    assert len(seen) >= 2
    assert s.recheck_dropped >= 1


async def test_no_recheck_while_the_breaker_is_open(clock: trio.testing.MockClock) -> None:
    upstream = Upstream(status(500))

    async def on_recheck(image_hash: str, c: Classification) -> None:
        raise AssertionError("not called")

    cfg = config(retry_max_attempts=1, breaker_min_calls=1)
    with trio.fail_after(30):
        async with running(cfg, upstream, on_recheck) as pool:
            await fails(pool)
            assert not pool.offer_recheck(*photo(1))
            assert pool.statistics().recheck_dropped == 1


async def test_recheck_callback_failure_is_contained(clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    called = [trio.Event(), trio.Event()]

    async def on_recheck(image_hash: str, c: Classification) -> None:
        next(e for e in called if not e.is_set()).set()
        raise RuntimeError("store down")

    with trio.fail_after(30), capture_logs() as logs:
        async with running(config(), upstream, on_recheck) as pool:
            assert pool.offer_recheck(*photo(1))
            await called[0].wait()
            assert pool.offer_recheck(*photo(2))
            await called[1].wait()
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().recheck_failed == 2
    assert [e["event"] for e in logs].count("llm_recheck_callback_failed") == 2


# --- secrets -----------------------------------------------------------------------------


async def test_api_key_never_in_logs_reprs_or_errors(clock: trio.testing.MockClock) -> None:
    upstream = Upstream(status(401))
    upstream.defaults["anthropic.example"] = status(500)
    cfg = config("openai,anthropic", retry_max_attempts=2, breaker_min_calls=1)
    errors: list[LlmError] = []
    with trio.fail_after(30), capture_logs() as logs:
        async with running(cfg, upstream) as pool:
            errors.append(await fails(pool, 1))
            errors.append(await fails(pool, 2))
            shown = [repr(pool.statistics()), repr(cfg), repr(pool.config.providers)]
    assert upstream.count() > 0
    for err in errors:
        chain: BaseException | None = err
        while chain is not None:
            shown.append(str(chain))
            shown.append(repr(chain))
            chain = chain.__cause__ or chain.__context__
    shown.extend(repr(event) for event in logs)
    assert logs
    for text in shown:
        assert KEY not in text
