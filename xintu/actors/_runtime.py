"""The actor system of one process, wired together and supervised.

::

    HTTP handler ──admission──▶ Dispatcher ──miss──▶ LlmPool ──fail/open/full──▶ LocalPool
         ▲                          │ singleflight by image hash      (providers, breakers)
         └──── reply channel ◀──────┘
                     results, hits, request-log rows ──▶ Writer ──▶ Store

:meth:`Runtime.run` is the supervisor: it starts every actor with ``nursery.start``
(each reports ready), and its nested nurseries are the shutdown order. On
:meth:`Runtime.drain` the dispatcher admits nothing more and finishes its
flights; then the LLM pool and then the local pool finish their queues; then the writer
flushes; then ``run`` returns.

The fallback of work the LLM pool had queued (a failed or timed-out call) takes
the local pool's priority lane: the caller has already waited, and only new work
is refused at the door.

A miss that neither the LLM chain nor the local pool could take before its
deadline (their queues' expected waits) is refused with 503 as soon as the store
has said it is a miss, before the dispatcher claims it across replicas.

Classification goes to the LLM provider chain first. Any LLM failure, an open
breaker, a full LLM inbox or too little time left sends the image to the local
pool instead; the caller never sees the LLM's error. A cache hit on a local answer,
while some provider is healthy, queues a low-priority LLM re-classification whose
answer replaces the local one.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import outcome
import structlog
import trio

from .._config import Config
from .._types import Classification, Source
from ..errors import Draining, Overloaded
from ..llm import LlmError, LlmPool, LlmPoolStatistics, LlmUnavailable
from ..store import CachedEntry, Lru, ResultWrite, Store
from ._cache import Cache, CacheStatistics
from ._dispatcher import Dispatcher, DispatcherStatistics
from ._envelope import Answer, ClassifyRequest, Envelope, open_reply, wait_reply
from ._local_pool import LocalJob, LocalModel, LocalPool, LocalPoolStatistics, LocalResult
from ._supervisor import CrashRecord, SupervisorStatistics
from ._writer import Writer, WriterStatistics

__all__ = ["Runtime", "RuntimeStatistics"]

log = structlog.get_logger("xintu.runtime")


@dataclass(frozen=True, slots=True)
class RuntimeStatistics:
    ready: bool
    draining: bool
    dispatcher: DispatcherStatistics
    llm: LlmPoolStatistics
    fallbacks: Mapping[str, int]
    # Refused at once because the local queue would outlast the request's deadline.
    shed_for_deadline: int
    local: LocalPoolStatistics
    writer: WriterStatistics
    cache: CacheStatistics
    supervisor: SupervisorStatistics


class Runtime:
    """Owns the actors of one process; the HTTP layer talks only to this."""

    def __init__(self, config: Config, store: Store, model: LocalModel[Any]) -> None:
        self.config = config
        self.store = store
        self.crashes = CrashRecord()
        self.writer = Writer(
            store,
            inbox_size=config.store.writer_inbox,
            max_batch=config.store.writer_batch,
            flush_ms=config.store.writer_flush_ms,
            journal_dir=config.data_dir / "journal",
        )
        self.cache = Cache(store, Lru(config.store.lru_size), self.writer)
        self.local = LocalPool(
            model,
            inbox_size=config.model.inbox_size,
            decode_threads=config.model.decode_threads,
            inference_threads=config.model.inference_threads,
            max_batch=config.model.max_batch,
            max_wait_ms=config.model.max_wait_ms,
            crashes=self.crashes,
        )
        self.llm = LlmPool(config.llm, on_recheck=self._recheck_done)
        self._fallbacks: Counter[str] = Counter()
        self._local_refused_for_time = 0
        self.dispatcher = Dispatcher(
            cache=self.cache,
            writer=self.writer,
            classify=self._classify,
            on_cached_hit=self._maybe_recheck,
            precheck=self._no_classifier_can_take,
            inbox_size=config.dispatcher.inbox_size,
            max_in_flight=config.dispatcher.max_in_flight,
            flight_grace_s=config.server.request_deadline_s,
            claim_ttl_s=config.dispatcher.claim_ttl_s,
        )
        self._ready = False
        self._draining = False
        self._drain_requested = trio.Event()
        self._stopped = trio.Event()

    @property
    def ready(self) -> bool:
        return self._ready and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    def statistics(self) -> RuntimeStatistics:
        return RuntimeStatistics(
            ready=self.ready,
            draining=self._draining,
            dispatcher=self.dispatcher.statistics(),
            llm=self.llm.statistics(),
            fallbacks=dict(self._fallbacks),
            shed_for_deadline=self._local_refused_for_time,
            local=self.local.statistics(),
            writer=self.writer.statistics(),
            cache=self.cache.statistics(),
            supervisor=self.crashes.statistics(),
        )

    # --- lifetime ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every actor until :meth:`drain`; then shut them down in order."""
        try:
            async with trio.open_nursery() as writer_nursery:
                await writer_nursery.start(self.writer.run)
                async with trio.open_nursery() as local_nursery:
                    await local_nursery.start(self.local.run)
                    async with trio.open_nursery() as llm_nursery:
                        await llm_nursery.start(self.llm.run)
                        async with trio.open_nursery() as dispatch_nursery:
                            await dispatch_nursery.start(self.dispatcher.run)
                            self._ready = True
                            log.info(
                                "runtime_ready",
                                llm_providers=[p.name for p in self.config.llm.providers],
                            )
                            task_status.started()
                            await self._drain_requested.wait()
                            self.dispatcher.close()
                        self.llm.close()
                    self.local.close()
                self.writer.close()
            log.info("runtime_stopped", writer=self.writer.statistics())
        finally:
            self._ready = False
            self._stopped.set()

    def begin_drain(self) -> None:
        """Fail readiness and refuse new work from now on; queued work continues."""
        if not self._draining:
            log.info("draining")
        self._draining = True

    async def drain(self) -> None:
        """Refuse new work, finish what was admitted, flush the writer, then return."""
        self.begin_drain()
        self._drain_requested.set()
        await self._stopped.wait()

    # --- the front door ------------------------------------------------------------

    def retry_after_s(self) -> float:
        return self.dispatcher.retry_after_s()

    async def classify(self, request: ClassifyRequest, *, deadline: float) -> Answer:
        """Classify one image: LRU hit at once, else through the dispatcher.

        Raises :class:`Draining` / :class:`Overloaded` at once when refused, and
        :class:`~xintu.errors.DeadlineExceeded` when *deadline* passes first.
        Cancelling the caller cancels only its own wait.
        """
        if self._draining:
            raise Draining("the service is shutting down", retry_after_s=self.retry_after_s())
        entry = self.cache.peek(request.image_hash)
        if entry is not None:
            self.cache.record_hit(request.image_hash)
            self._maybe_recheck(entry, request.data)
            return Answer(entry.classification, request.image_hash, from_cache=True)
        send, receive = open_reply()
        self.dispatcher.submit(Envelope(request, deadline, send))
        return await wait_reply(receive, deadline)

    async def _classify(self, data: bytes, image_hash: str, deadline: float) -> Classification:
        """The LLM chain first; on any LLM failure or refusal, the local model."""
        if self.llm.enabled:
            try:
                return await self.llm.classify(data, image_hash, deadline)
            except LlmError as exc:
                reason = exc.reason if isinstance(exc, LlmUnavailable) else "llm_failed"
                self._fallbacks[reason] += 1
                log.info("llm_fallback", reason=reason, image_hash=image_hash[:12], error=str(exc))
                if exc.queued:
                    # The caller has already waited for the LLM: its fallback goes
                    # ahead of new work, which can still be refused at the door.
                    return await self.local.classify_now(data, image_hash)
        return await self._classify_local(data, image_hash, deadline)

    def _no_classifier_can_take(self, deadline: float) -> Overloaded | None:
        """A refusal when neither the LLM chain nor the local pool would take work
        for *deadline* now (the dispatcher asks before it claims a miss)."""
        if (self.llm.enabled and self.llm.would_take(deadline)) or self.local.would_take(deadline):
            return None
        self._local_refused_for_time += 1
        return Overloaded(
            "no classifier can answer before the deadline",
            retry_after_s=self.local.expected_wait_s(),
        )

    def _maybe_recheck(self, entry: CachedEntry, data: bytes) -> None:
        """A hit on a local answer with the bytes in hand: queue an LLM answer for it."""
        if (
            data
            and entry.classification.source is Source.LOCAL
            and self.llm.enabled
            and not self._draining
            and self.llm.healthy()
        ):
            self.llm.offer_recheck(data, entry.image_hash)

    async def _recheck_done(self, image_hash: str, classification: Classification) -> None:
        """The LLM re-classified a cached local answer: it replaces the local one."""
        old = self.cache.lru.get(image_hash)
        if old is not None:
            self.cache.remember(dataclasses.replace(old, classification=classification))
        await self.writer.put(ResultWrite(image_hash, classification, None))

    async def _classify_local(
        self, data: bytes, image_hash: str, deadline: float
    ) -> Classification:
        if trio.current_time() + self.local.expected_wait_s() > deadline:
            # It would only time out in the queue: refuse now, with an honest Retry-After.
            self._local_refused_for_time += 1
            raise Overloaded(
                "the local classifier cannot answer before the deadline",
                retry_after_s=self.local.expected_wait_s(),
            )
        send, receive = trio.open_memory_channel[LocalResult](1)
        try:
            self.local.inbox.send_nowait(LocalJob(data, image_hash, send))
        except trio.WouldBlock:
            send.close()
            raise Overloaded(
                "the local classifier is over capacity", retry_after_s=self.retry_after_s()
            ) from None
        except trio.ClosedResourceError:
            send.close()
            raise Draining("the service is shutting down") from None
        with receive:
            result: outcome.Outcome[Classification] = await receive.receive()
        return result.unwrap()
