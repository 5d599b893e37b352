"""Test helpers: the request path with the fake upstream, on Trio's clock.

Shared by ``test_hedge`` and ``test_request_path``: the fake OpenAI-compatible
upstream (:mod:`xintu.testing.fakellm`) behind ``httpx.ASGITransport`` (its
latency and its hangs are Trio time, so the tests run on the autojump clock), an
LLM pool on it, a Trio-native local pool that answers after a set time, and
:func:`service`: the dispatcher, chain, cache and writer wired as the runtime wires
them, where an LLM answer that comes after a local one (a hedge's late answer, or
a recheck) replaces it in the LRU and the store, as ``Runtime._recheck_done`` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from PIL import Image

from xintu import Classification, Source
from xintu.actors import Answer, Cache, Chain, ClassifyRequest, Dispatcher, Envelope, Writer
from xintu.actors._envelope import open_reply, wait_reply
from xintu.llm import LlmConfig, LlmPool, llm_config_from
from xintu.store import Lru, ResultWrite
from xintu.testing.fakellm import Behaviour, FakeLlm

from .fakes import FakePool, MemoryStore, fake_category

__all__ = [
    "LocalModel",
    "Service",
    "ask",
    "fake_env",
    "fake_upstream",
    "llm_config",
    "llm_pool",
    "photo",
    "running",
    "service",
]


def fake_env(
    base_url: str, *, model: str = "fake-vl", api_key: str | None = None
) -> dict[str, str]:
    """The environment that makes the fake upstream at *base_url* the one LLM provider
    ``fake`` (for ``load_config(env=...)``)."""
    env = {
        "XINTU_LLM_PROVIDERS": "fake",
        "XINTU_LLM_FAKE_BASE_URL": base_url,
        "XINTU_LLM_FAKE_MODEL": model,
    }
    if api_key is not None:
        env["XINTU_LLM_FAKE_API_KEY"] = api_key
    return env


def photo(n: int) -> tuple[bytes, str]:
    """A small JPEG (distinct for each *n*) and its SHA-256."""
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (n * 37 % 256, n * 91 % 256, 80)).save(out, "JPEG")
    data = out.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def llm_config(key: str, **llm: Any) -> LlmConfig:
    """The shipped defaults but for *llm*, with one provider ``fake`` keyed *key*."""
    env = {
        "XINTU_LLM_PROVIDERS": "fake",
        "XINTU_LLM_FAKE_BASE_URL": "http://fake.example/v1",
        "XINTU_LLM_FAKE_API_KEY": key,
        "XINTU_LLM_FAKE_MODEL": "fake-vl",
    }
    return llm_config_from(llm, env)


def fake_upstream(latency_s: float = 0.0, *, key: str, hang: bool = False) -> FakeLlm:
    """The fake upstream, answering after *latency_s* (or never, *hang*) to *key*."""
    behaviour = Behaviour(latency_median_ms=latency_s * 1000, api_key=key)
    if hang:
        behaviour.error_rate, behaviour.error_mode = 1.0, "hang"
    return FakeLlm(behaviour, seed=1)


def llm_pool(cfg: LlmConfig, fake: FakeLlm, **kw: Any) -> LlmPool:
    return LlmPool(cfg, transport=httpx.ASGITransport(app=fake), rng=random.Random(7), **kw)


@asynccontextmanager
async def running(pool: LlmPool) -> AsyncIterator[LlmPool]:
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
        finally:
            pool.close()


class LocalModel(FakePool):
    """The local pool: answers after *answer_s*, by the bytes' hash; counts its calls
    and those that ran to their answer."""

    def __init__(self, answer_s: float) -> None:
        super().__init__()
        self.answer_s = answer_s
        self.calls = 0
        self.answered = 0  # calls that ran to their answer (not cancelled)

    async def answer(self, data: bytes, image_hash: str, deadline: float) -> Classification:
        self.calls += 1
        await trio.sleep(self.answer_s)
        self.answered += 1
        return Classification(
            category=fake_category(data), confidence=0.5, source=Source.LOCAL, model="local"
        )


@dataclasses.dataclass
class Service:
    dispatcher: Dispatcher
    chain: Chain
    pool: LlmPool
    local: LocalModel
    writer: Writer
    cache: Cache
    store: MemoryStore
    replaced: trio.Event  # set when an LLM answer replaced a local one


@asynccontextmanager
async def service(
    fake: FakeLlm,
    cfg: LlmConfig,
    *,
    local_s: float,
    hedging: bool,
    rechecks: bool | None = None,
    latency_target_s: float = math.inf,
) -> AsyncIterator[Service]:
    """Dispatcher, chain (LLM pool, then the local pool), cache and writer.

    *hedging*: the chain runs (its nursery holds hedged calls) and a late LLM answer
    replaces the local one (``on_late``); else the chain is not run (no hedge).
    *rechecks* (default: without hedging): the LLM pool's rechecks replace rushed
    local answers (``on_recheck``). *latency_target_s*: the chain's admission aim.
    """
    store = MemoryStore()
    writer = Writer(store, inbox_size=1000, max_batch=50, flush_ms=5)
    cache = Cache(store, Lru(1000), writer)
    replaced = trio.Event()

    async def replace(image_hash: str, classification: Classification) -> None:
        old = cache.lru.get(image_hash)
        if old is not None:
            cache.remember(dataclasses.replace(old, classification=classification))
        await writer.put(ResultWrite(image_hash, classification, None))
        replaced.set()

    if rechecks is None:
        rechecks = not hedging
    pool = llm_pool(cfg, fake, **({"on_recheck": replace} if rechecks else {}))
    local = LocalModel(local_s)
    chain = Chain(
        local, llm=pool, on_late=replace if hedging else None, latency_target_s=latency_target_s
    )
    dispatcher = Dispatcher(
        cache=cache,
        writer=writer,
        chain=chain,
        inbox_size=64,
        max_in_flight=64,
        flight_grace_s=10.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as inner:
            await inner.start(pool.run)
            if hedging:
                await inner.start(chain.run)
            await inner.start(dispatcher.run)
            yield Service(dispatcher, chain, pool, local, writer, cache, store, replaced)
            dispatcher.close()
            chain.close()
            pool.close()
        writer.close()


async def ask(
    dispatcher: Dispatcher, data: bytes, within_s: float = 10.0, *, age_s: float = 0.0
) -> Answer:
    """Submit *data* to *dispatcher* with a deadline *within_s* from now; its answer.
    *age_s*: how long ago its request arrived (``ClassifyRequest.received_at``)."""
    now = trio.current_time()
    image_hash = hashlib.sha256(data).hexdigest()
    request = ClassifyRequest(data, image_hash, "r", received_at=now - age_s)
    send, receive = open_reply(Answer)
    deadline = now + within_s
    dispatcher.submit(Envelope(request, deadline, send))
    return await wait_reply(receive, deadline)
