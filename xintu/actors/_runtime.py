"""The actor system of one process: the supervisor that wires and starts the
actors, and the one facade the HTTP layer talks to.

::

    HTTP handler ──admission──▶ Dispatcher ──miss──▶ Chain: LlmPool ──fail/open/full──▶ LocalPool
         ▲                          │ singleflight by image hash   (providers, breakers)
         └──── reply channel ◀──────┘
                     results, hits, request-log rows ──▶ Writer ──▶ Store

:meth:`Runtime.run` is the supervisor: it starts every actor with ``nursery.start``
(each reports ready), and its nested nurseries are the shutdown order. The
event-loop lag monitor (:mod:`._looplag`) starts first and stops last, so the
lag is measured while the actors start and drain too. On
:meth:`Runtime.drain` the dispatcher admits nothing more and finishes its
flights; then the LLM pool and then the local pool finish their queues; then the writer
flushes; then ``run`` returns. The chain runs between the dispatcher and the pools
(its nursery holds hedged calls), and stops after the dispatcher.

The rules between the LLM pool and the local pool (fallbacks, the priority lane,
refusals for time, rechecks of cached local answers) are the classifier chain's
(:mod:`._chain`).

Readiness (:meth:`Runtime.readiness`, :class:`Readiness`) says what is wrong, not
only whether: each LLM provider's breaker state and the kind of its last failure
(``unauthorized`` for a wrong key, ``timeout``, …) and when, the store's ping and
the writer. An LLM provider's trouble never fails readiness (the local model
answers); it makes the process *degraded*, with a reason. A store that does not
answer fails readiness only when ``server.ready_without_store`` is false; by
default the process stays ready and degraded, since hits in memory and the local
model still answer and writes wait in the writer, so a store outage does not take
every replica out of the load balancer at once.

The facade: the HTTP layer asks only this object's methods (:meth:`~Runtime.refusal`,
:meth:`~Runtime.reserve`, :meth:`~Runtime.classify`,
:meth:`~Runtime.lookup`, :meth:`~Runtime.lookup_many`, :meth:`~Runtime.name_alias`,
:meth:`~Runtime.log_request`, :meth:`~Runtime.readiness`,
:meth:`~Runtime.album_stats`, :meth:`~Runtime.statistics`, the operators'
:meth:`~Runtime.find_hashes`, :meth:`~Runtime.reclassify` and :meth:`~Runtime.purge`,
:meth:`~Runtime.retry_after_s`, :attr:`~Runtime.draining`), never an actor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
import trio

from .._config import Config
from .._limits import MAX_BATCH_IMAGES
from .._types import Classification, Source
from ..errors import Draining, StoreError, Unavailable
from ..llm import LlmPool, LlmPoolStatistics
from ..llm._errors import FailureKind
from ..store import AlbumStats, CachedEntry, Lru, RequestLogRow, ResultWrite, Store
from ._admission import AdmissionStatistics, Reservations, Ticket
from ._cache import Cache, CacheStatistics
from ._chain import Chain
from ._dispatcher import Dispatcher, DispatcherStatistics
from ._envelope import Answer, ClassifyRequest, Envelope, open_reply, wait_reply
from ._local_pool import LocalModel, LocalPool, LocalPoolStatistics
from ._looplag import LoopLag, LoopLagStatistics
from ._procs import ProcessModel
from ._spool import Spool
from ._supervisor import CrashRecord, SupervisorStatistics
from ._upgrades import ReclassifyReport, Upgrades, UpgradesStatistics
from ._writer import Writer, WriterStatistics

__all__ = ["ProviderHealth", "Readiness", "Runtime", "RuntimeStatistics"]

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
    # Rushed local answers queued for an LLM upgrade (the chain's upgrades_queued).
    upgrades_queued: int = 0
    # Hedged LLM calls: started, answered by the local model / by the LLM, skipped
    # (the local pool could not answer in time), replaced (a late LLM answer).
    hedges: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # Upgrades of local answers served from the cache (:mod:`._upgrades`).
    upgrades: UpgradesStatistics | None = None
    # The local model's own counters (LocalPool.model_statistics(): faces, the text
    # path, time), summed over its worker processes; None when the model has none.
    local_model: Any = None
    # Admission tickets (:mod:`._admission`): live now, and taken/expired/ended.
    admission: AdmissionStatistics | None = None
    # How late this process's event loop wakes a task that is due (:mod:`._looplag`).
    loop_lag: LoopLagStatistics | None = None


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """One LLM provider as readiness and health report it."""

    state: str  # its breaker: closed / open / half_open
    last_failure: FailureKind | None  # the kind of its last failed call, if any
    last_failure_at: datetime | None  # when (UTC)

    @property
    def up(self) -> bool:
        return self.state == "closed"


@dataclass(frozen=True, slots=True)
class Readiness:
    """What ``/readyz`` and ``/api/v1/health`` report, taken at one moment."""

    running: bool  # every actor started, not draining
    draining: bool
    actors_healthy: bool  # no crash loop (the supervisor's crash record)
    model_loaded: bool
    providers: Mapping[str, ProviderHealth]  # by provider name, in chain order
    writer_healthy: bool  # the writer's last store write succeeded
    store: str  # "ok", or "unreachable[: why]" when a ping failed or was too slow
    # server.ready_without_store is false: a store that does not answer fails readiness.
    store_required: bool = False

    @property
    def breakers(self) -> dict[str, str]:
        """Provider name -> breaker state."""
        return {name: p.state for name, p in self.providers.items()}

    @property
    def ready(self) -> bool:
        return (
            self.running
            and not self.draining
            and self.actors_healthy
            and self.model_loaded
            and (self.store == "ok" or not self.store_required)
        )

    @property
    def reasons(self) -> list[str]:
        """Why the process is degraded (serving, with something wrong); empty if not."""
        reasons = []
        if self.store != "ok":
            reasons.append(f"store {self.store}")
        if not self.writer_healthy:
            reasons.append("store writes failing (held by the writer, retried)")
        for name, p in self.providers.items():
            if not p.up:
                why = f", last failure: {p.last_failure}" if p.last_failure else ""
                reasons.append(f"llm provider {name}: breaker {p.state}{why}")
        return reasons

    @property
    def degraded(self) -> bool:
        return bool(self.reasons)


class Runtime:
    """Owns the actors of one process; the HTTP layer talks only to this.

    The actors stay reachable as attributes (``writer``, ``cache``, ``chain``, …)
    for the tests and the benchmark; the HTTP layer uses the facade's methods.
    """

    def __init__(self, config: Config, store: Store, model: LocalModel[Any] | ProcessModel) -> None:
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
        self.cache = Cache(
            store,
            Lru(config.store.lru_size),
            self.writer,
            read_error_budget=config.store.read_error_budget,
        )
        self.local = LocalPool(
            model,
            inbox_size=config.model.inbox_size,
            decode_threads=config.model.decode_threads,
            inference_threads=config.model.inference_threads,
            max_batch=config.model.max_batch,
            max_wait_ms=config.model.max_wait_ms,
            crashes=self.crashes,
            retry_after_s=self.retry_after_s,
        )
        self.llm = LlmPool(config.llm, on_recheck=self._recheck_done)
        self.upgrades = Upgrades(
            self.llm,
            Spool(config.data_dir / "spool", max_bytes=config.store.spool_mb * 1024 * 1024),
            per_minute=config.store.upgrades_per_minute,
            queue_size=config.store.upgrade_queue,
        )
        self.chain = Chain(
            self.local,
            llm=self.llm,
            latency_target_s=config.server.latency_target_s,
            on_late=self._recheck_done,
            upgrades=self.upgrades,
        )
        self.dispatcher = Dispatcher(
            cache=self.cache,
            writer=self.writer,
            chain=self.chain,
            inbox_size=config.dispatcher.inbox_size,
            max_in_flight=config.dispatcher.max_in_flight,
            flight_grace_s=config.server.request_deadline_s,
            claim_ttl_s=config.dispatcher.claim_ttl_s,
        )
        # Uploads past the header check, not submitted yet (:mod:`._admission`).
        self.reservations = Reservations(ttl_s=config.server.latency_target_s)
        # The event loop's lag, sampled for as long as any actor runs.
        self.loop_lag = LoopLag()
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
        chain = self.chain.statistics()
        return RuntimeStatistics(
            ready=self.ready,
            draining=self._draining,
            dispatcher=self.dispatcher.statistics(),
            llm=self.llm.statistics(),
            fallbacks=chain.fallbacks,
            shed_for_deadline=chain.shed_for_deadline,
            local=self.local.statistics(),
            writer=self.writer.statistics(),
            cache=self.cache.statistics(),
            supervisor=self.crashes.statistics(),
            upgrades_queued=chain.upgrades_queued,
            hedges={
                "started": chain.hedges_started,
                "local_won": chain.hedges_local_won,
                "llm_won": chain.hedges_llm_won,
                "replaced": chain.hedges_replaced,
                "withdrawn": chain.hedges_withdrawn,
            },
            upgrades=self.upgrades.statistics(),
            local_model=self.local.model_statistics(),
            admission=self.reservations.statistics(),
            loop_lag=self.loop_lag.statistics(),
        )

    # --- lifetime ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every actor until :meth:`drain`; then shut them down in order."""
        try:
            async with trio.open_nursery() as lag_nursery:
                # First in, last out: the lag is measured while the actors drain too.
                await lag_nursery.start(self.loop_lag.run)
                await self._run_actors(task_status)
                self.loop_lag.close()
            log.info("runtime_stopped", writer=self.writer.statistics())
        finally:
            self._ready = False
            self._stopped.set()

    async def _run_actors(self, task_status: trio.TaskStatus[None]) -> None:
        """The writer, the pools, the upgrades and the front, in their shutdown order."""
        async with trio.open_nursery() as writer_nursery:
            await writer_nursery.start(self.writer.run)
            async with trio.open_nursery() as local_nursery:
                await local_nursery.start(self.local.run)
                async with trio.open_nursery() as llm_nursery:
                    await llm_nursery.start(self.llm.run)
                    async with trio.open_nursery() as upgrade_nursery:
                        await upgrade_nursery.start(self.upgrades.run)
                        await self._run_front(task_status)
                        self.upgrades.close()
                    self.llm.close()
                self.local.close()
            self.writer.close()

    async def _run_front(self, task_status: trio.TaskStatus[None]) -> None:
        """The chain and the dispatcher, until :meth:`drain`; then they stop."""
        async with trio.open_nursery() as chain_nursery:
            await chain_nursery.start(self.chain.run)
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
            self.chain.close()

    def begin_drain(self) -> None:
        """Fail readiness and refuse new work from now on; queued work continues."""
        if not self._draining:
            log.info("draining")
        self._draining = True
        self.chain.begin_drain()

    async def drain(self) -> None:
        """Refuse new work, finish what was admitted, flush the writer, then return."""
        self.begin_drain()
        self._drain_requested.set()
        await self._stopped.wait()

    # --- the front door ------------------------------------------------------------

    def retry_after_s(self) -> float:
        return self.dispatcher.retry_after_s()

    def refusal(self, deadline: float) -> Unavailable | None:
        """Why new work for *deadline* would be refused now, or ``None``: draining,
        the dispatcher full (its inbox, or ``dispatcher.max_in_flight`` flights), or
        no classifier expected to answer it by the latency target (the question the
        dispatcher asks after a store miss). The HTTP layer asks it from an
        upload's headers, before it reads and hashes the body; a photo the cache
        knows is refused with the rest then (a client asks check-cache first)."""
        if self._draining:
            return Draining("the service is shutting down", retry_after_s=self.retry_after_s())
        # Uploads that passed this check and have not submitted their work yet.
        reserved = len(self.reservations)
        return self.dispatcher.refusal(reserved) or self.chain.refusal(
            deadline, reserved + self.dispatcher.before_chain()
        )

    def only_deadline_too_short(self, deadline: float, standard: float) -> bool:
        """Whether work for *deadline* would not be taken now although work for the
        *standard* deadline would: the request's own short deadline (``X-Deadline-Ms``),
        not the service's capacity, stands in the way. Counts nothing.

        The HTTP layer then does not refuse from the headers: it reads and validates
        the body first, so a malformed upload is a 4xx whatever deadline it asked for,
        and a valid one is refused (or times out) as usual after that.
        """
        if self._draining:
            return False
        reserved = len(self.reservations)
        ahead = reserved + self.dispatcher.before_chain()
        return not self.chain.would_take(deadline, ahead) and self.chain.would_take(standard, ahead)

    def reserve(self, deadline: float, *, batch_bytes: int | None = None) -> Ticket:
        """:meth:`refusal`'s answer raised, else an admission ticket for the upload,
        held by the current request (:mod:`._admission`): it counts as work queued
        ahead of the next uploads' checks until :meth:`classify` submits the work,
        the ticket is released (the request's end), or the latency target passes.

        *batch_bytes*: a batch upload's ``Content-Length``; its ticket counts the
        photos that many bytes are expected to hold (the mean uploaded photo's
        size: :meth:`~._admission.Reservations.photos_in`), each released as its
        work is submitted. A batch is refused only when not even one photo could
        be taken."""
        refusal = self.refusal(deadline)
        if refusal is not None:
            raise refusal
        if batch_bytes is None:
            return self.reservations.take()
        return self.reservations.take(self.reservations.photos_in(batch_bytes, MAX_BATCH_IMAGES))

    async def classify(self, request: ClassifyRequest, *, deadline: float) -> Answer:
        """Classify one image: LRU hit at once, else through the dispatcher.

        Raises :class:`Draining` / :class:`Overloaded` at once when refused, and
        :class:`~xintu.errors.DeadlineExceeded` when *deadline* passes first.
        Cancelling the caller cancels only its own wait.
        """
        # The request's admission ticket, if it holds one, stops counting this photo
        # now: its work is counted by the dispatcher from here (no checkpoint in
        # between).
        self.reservations.release_held()
        self.reservations.saw_photo(len(request.data))
        if self._draining:
            raise Draining("the service is shutting down", retry_after_s=self.retry_after_s())
        entry = self.cache.peek(request.image_hash)
        if entry is not None:
            self.cache.record_hit(request.image_hash)
            self.chain.cached_hit(entry, request.data)
            return Answer(entry.classification, request.image_hash, from_cache=True)
        send, receive = open_reply(Answer)
        self.dispatcher.submit(Envelope(request, deadline, send))
        return await wait_reply(receive, deadline)

    async def lookup(self, image_hash: str, scope: str | None) -> Answer | None:
        """The cached answer for *image_hash* (or a client's alias of it visible in
        *scope*), counted as a hit served; ``None`` on a miss.

        An alias hit answers with (and counts the hit on) the verified entry.
        """
        entry = await self.cache.lookup(image_hash, scope)
        if entry is None:
            return None
        self.cache.record_hit(entry.image_hash)
        self._offer_upgrade(entry)
        return Answer(entry.classification, entry.image_hash, from_cache=True)

    async def lookup_many(self, hashes: Sequence[str], scope: str | None) -> dict[str, Answer]:
        """:meth:`lookup` for many hashes (one store round trip), keyed by the asked
        hash; a hash asked twice is two hits served."""
        found = await self.cache.lookup_many(list(dict.fromkeys(hashes)), scope)
        answers: dict[str, Answer] = {}
        for h in hashes:
            entry = found.get(h)
            if entry is not None:
                self.cache.record_hit(entry.image_hash)
                self._offer_upgrade(entry)
                answers[h] = Answer(entry.classification, entry.image_hash, from_cache=True)
        return answers

    def _offer_upgrade(self, entry: CachedEntry) -> None:
        """A hit served from the cache on a local answer: offer it for an LLM
        upgrade (within the upgrades' budget; its bytes come from the spool)."""
        if entry.classification.source is Source.LOCAL and not self._draining:
            self.upgrades.offer(entry.image_hash)

    async def name_alias(self, scope: str, alias_hash: str, image_hash: str) -> None:
        """Record a client's hash *alias_hash* for the verified *image_hash* in *scope*."""
        await self.cache.name_alias(scope, alias_hash, image_hash)

    def log_request(
        self,
        *,
        request_id: str,
        user_id: str | None,
        ip: str | None,
        image_hash: str | None,
        image_size: int | None,
        answer: Answer | None,
        processing_time_ms: float,
        hashes_asked: int | None = None,
        hashes_hit: int | None = None,
    ) -> None:
        """Offer one ``request_log`` row to the writer (folded or journaled, never
        waited for). A batch check's row gives *hashes_asked* and *hashes_hit*
        instead of an answer."""
        c = answer.classification if answer else None
        if hashes_hit is not None:
            self.writer.offer(
                RequestLogRow(
                    request_id=request_id,
                    user_id=user_id,
                    ip=ip,
                    image_hash=None,
                    image_size=None,
                    category=None,
                    confidence=None,
                    from_cache=hashes_hit > 0,
                    source="cache" if hashes_hit else None,
                    processing_time_ms=processing_time_ms,
                    created_at=datetime.now(UTC),
                    hashes_asked=hashes_asked,
                    hashes_hit=hashes_hit,
                )
            )
            return
        self.writer.offer(
            RequestLogRow(
                request_id=request_id,
                user_id=user_id,
                ip=ip,
                image_hash=image_hash,
                image_size=image_size,
                category=c.category.value if c else None,
                confidence=c.confidence if c else None,
                from_cache=bool(answer and answer.from_cache),
                source=("cache" if answer.from_cache else c.source.value) if answer and c else None,
                processing_time_ms=processing_time_ms,
                created_at=datetime.now(UTC),
            )
        )

    # --- operations ----------------------------------------------------------------

    async def readiness(self, *, store_timeout_s: float) -> Readiness:
        """A snapshot for readiness and health; pings the store (within *store_timeout_s*)."""
        store = "ok"
        try:
            with trio.fail_after(store_timeout_s):
                await self.store.ping()
        except (StoreError, trio.TooSlowError, trio.ClosedResourceError) as exc:
            store = f"unreachable: {exc}" if str(exc) else "unreachable"
        return Readiness(
            running=self.ready,
            draining=self._draining,
            actors_healthy=self.crashes.healthy,
            model_loaded=self.local.model is not None,
            providers={
                p.name: ProviderHealth(str(p.breaker.state), p.last_failure, p.last_failure_at)
                for p in self.llm.statistics().providers
            },
            writer_healthy=self.writer.statistics().store_healthy,
            store=store,
            store_required=not self.config.server.ready_without_store,
        )

    async def album_stats(self) -> AlbumStats:
        """Album totals and distributions, computed by the store."""
        return await self.store.album_stats(datetime.now(UTC))

    async def _recheck_done(self, image_hash: str, classification: Classification) -> None:
        """The LLM re-classified a cached local answer (a recheck, an upgrade, or a
        hedged call whose local answer came first): it replaces the local one (an
        operator's re-classification replaces any), and the spooled bytes go. The
        answer for an entry purged meanwhile is dropped: the purge sticks."""
        if self.upgrades.recently_purged(image_hash):
            log.info("llm_recheck_after_purge_dropped", image_hash=image_hash[:12])
            return
        forced = await self.upgrades.upgraded(image_hash)
        old = self.cache.lru.get(image_hash)
        if old is not None:
            self.cache.remember(dataclasses.replace(old, classification=classification))
        await self.writer.put(ResultWrite(image_hash, classification, None, replace=forced))

    # --- operators (/admin, xintu admin) ---------------------------------------------

    async def find_hashes(
        self,
        *,
        source: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int,
    ) -> list[str]:
        """Hashes of cached entries by source and date (oldest first), from the store."""
        return await self.store.find_hashes(source=source, since=since, until=until, limit=limit)

    async def reclassify(self, hashes: Sequence[str]) -> ReclassifyReport:
        """Queue an LLM re-classification of *hashes* that replaces their answers,
        paced by the upgrades' budget; those without spooled bytes are counted."""
        return await self.upgrades.reclassify(hashes)

    async def purge(self, image_hash: str) -> bool:
        """Delete the entry of *image_hash* (its row, its aliases, its spooled bytes)
        from the store and this process's LRU; whether the store had it. Other
        replicas' LRUs keep it until it is evicted there (or they restart)."""
        found = await self.store.purge(image_hash)
        self.cache.forget(image_hash)
        await self.upgrades.purged(image_hash)
        return found
