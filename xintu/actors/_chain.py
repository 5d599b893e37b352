"""The classifier chain: the LLM providers first, the local model behind them.

::

    Dispatcher ──refusal(deadline)?──▶ Overloaded before the claim
        │
        └──classify(request, deadline)──▶ LlmPool ──any LlmError──▶ LocalPool
                                             │ queued, then failed:   ▲ priority lane
                                             └────────────────────────┘ (classify_now)

Every pool is a :class:`Classifier`: ``classify(request, deadline)`` answers one
envelope (the one reply protocol, :mod:`._envelope`), ``would_take(deadline)``
says without side effects whether work for *deadline* would be taken now, and
``statistics()`` is a frozen snapshot. The chain is one too, and holds the rules
between the pools:

- any LLM failure or refusal (:class:`~xintu.llm.LlmError`) falls to the local
  pool, counted by reason (``fallbacks``); the caller never sees the LLM's error;
- work the LLM pool had queued, and that then failed or ran out of time, takes the
  local pool's priority lane: the caller has already waited, and only new work is
  refused at the door;
- admission aims at a latency target (``server.latency_target_s``), not at the
  deadline: new work is taken only by a classifier expected to answer it by
  ``min(deadline, now + target)`` (*admit_by*). Work the local pool could not
  answer by then (its queue's expected wait) is refused at once with
  :class:`~xintu.errors.Overloaded` (``shed_for_deadline``), and so is a miss that
  no classifier could take by then (:meth:`Chain.refusal`, asked by the HTTP layer
  before it reads an upload and by the dispatcher before it claims a miss across
  replicas). Asked from an upload's headers, it counts the work on its way that
  no pool has queued yet as queued ahead (*ahead*: admission tickets, flights
  still looking the cache up; :mod:`._admission`), the LLM pool's share first
  (:meth:`~xintu.llm.LlmPool.room`), the rest in the local pool's queue. The
  local pool's queue also counts the LLM calls whose hedge falls due before the
  target (:meth:`Chain._hedges_before`): their hedges will take its priority lane
  first. Admitted work still has the whole deadline to run;
- a *hedge*: an LLM call that has not answered within the LLM pool's hedge budget
  (:meth:`~xintu.llm.LlmPool.hedge_after_s`: its recent P95 call time, clamped by
  ``llm.hedge_min_s`` and ``llm.hedge_after_s``), or by the latency target less
  the local pool's priority lane (:meth:`Fallback.urgent_wait_s`) if that comes
  first, gets the local model started beside it in the local pool's priority
  lane (the caller has waited already; behind the queue of new work a hedge came
  too late, BENCHMARKS.md "Round 4"). The caller gets whichever answers first (the
  LLM's if both are ready at once). An LLM answer that comes after the local one
  was given replaces it (``on_late``: the runtime replaces it in the LRU and the
  store, as a recheck's); an LLM call still queued in the LLM pool when the local
  answer was given is withdrawn instead (:class:`~xintu.llm.QueuedCall`,
  ``hedges_withdrawn``) and its re-classification queued at background priority
  (``upgrades_queued``). A local call nobody waits for any more is cancelled. So
  no caller waits for a hung upstream's timeout, only for the budget plus the
  local model. The two calls run as tasks of the chain's own nursery
  (:meth:`Chain.run`), so the caller's wait can end (or be cancelled) while the
  LLM call carries on; an LLM failure after the hedge started leaves the caller
  to the local answer, a local failure to the LLM's;
- a cache hit on a local answer, while some LLM provider is healthy, queues a
  low-priority LLM re-classification whose answer replaces the local one
  (:meth:`Chain.cached_hit`; with *upgrades*, through their budget:
  :mod:`._upgrades`), and every local answer's bytes are handed to the upgrades'
  spool, so that a later check-cache hit on it can be upgraded too;
- a *rushed* local answer, made only because the caller's deadline left the LLM
  no room (fallback reasons ``no_time``, ``queue_too_long`` and ``deadline``: the
  call was cut short by the caller's deadline) while some LLM provider was
  healthy, is marked for upgrade at once: the same re-classification is queued
  (``LlmPool.offer_recheck``; counted in ``upgrades_queued``) and its answer
  replaces the local one in the LRU and the store. So one hurried caller's
  ``X-Deadline-Ms`` decides only its own answer, not the permanent one that
  everyone sharing the photo gets from the cache.

Why an upgrade, not a longer flight: the flight (:mod:`._dispatcher`) keeps its
first caller's deadline. Stretching it to the most patient waiter's would answer
the hurried caller 504 where it now gets a local answer in time, and an LLM call
already under way cannot be given more time anyway. The upgrade keeps every
caller's answer in time and makes the cached answer the LLM's, at the cost of one
background LLM call per rushed photo (bounded and droppable: ``llm.recheck_queue``,
run only while an LLM worker is idle; a dropped one is offered again by the next
hit on the local answer).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import outcome
import structlog
import trio

from .._rate import ServiceTime
from .._types import Classification, Source
from ..errors import Overloaded
from ..llm import LlmError, LlmUnavailable, QueuedCall
from ..llm._errors import CallAbandoned
from ..store import CachedEntry
from ._envelope import ClassifyRequest

__all__ = ["Chain", "ChainStatistics", "Classifier", "Fallback", "LateAnswer", "Primary"]

log = structlog.get_logger("xintu.chain")

# While an LLM call waits for its hedge, the hedge's time is looked at again this
# often (the priority lane's expected time changes as other hedges start).
HEDGE_LOOK_S = 0.05

# Fallback reasons that are the caller's deadline, not the LLM's health: the local
# answer they lead to is rushed, and is upgraded by an LLM re-classification.
_RUSHED = frozenset({"no_time", "queue_too_long", "deadline"})

#: ``on_late(image_hash, classification)``: an LLM answer that came after a hedge's
#: local answer was given; the runtime replaces the cached local answer with it.
LateAnswer = Callable[[str, Classification], Awaitable[None]]

# What a hedge's two calls report: which one ("llm" or "local") and its outcome.
_Report = tuple[str, outcome.Outcome[Classification]]


class Classifier(Protocol):
    """A classifier pool: :class:`~xintu.llm.LlmPool`, :class:`LocalPool`, the chain."""

    async def classify(self, request: ClassifyRequest, deadline: float) -> Classification:
        """Answer *request* before *deadline*, or raise a :class:`~xintu.errors.XintuError`."""
        ...

    def would_take(self, deadline: float) -> bool:
        """Whether work for *deadline* sent now would be taken (queues nothing)."""
        ...

    def statistics(self) -> object:
        """A frozen snapshot of the pool."""
        ...


class Primary(Protocol):
    """The classifier asked first (the LLM pool): it may be switched off, it admits
    against a wanted-by time as well as the deadline, tells how long a call may run
    before it is hedged, and re-classifies cached local answers in the background."""

    @property
    def enabled(self) -> bool: ...

    async def classify(
        self,
        request: ClassifyRequest,
        deadline: float,
        *,
        admit_by: float | None = None,
        queued: QueuedCall | None = None,
    ) -> Classification: ...

    def would_take(self, deadline: float, *, admit_by: float | None = None) -> bool: ...

    def room(self, deadline: float, *, admit_by: float | None = None, most: int) -> int: ...

    def statistics(self) -> object: ...

    def healthy(self) -> bool: ...

    def hedge_after_s(self) -> float | None: ...

    def offer_recheck(self, data: bytes, image_hash: str) -> bool: ...


class Upgrader(Protocol):
    """Where local answers go to be upgraded (:class:`~._upgrades.Upgrades`)."""

    def local_answered(self, image_hash: str, data: bytes) -> None: ...

    def offer(self, image_hash: str, data: bytes | None = None) -> bool: ...


class Fallback(Classifier, Protocol):
    """The classifier that answers when the primary does not (the local pool).
    *ahead*: jobs on their way that will be queued before this one."""

    def would_take(self, deadline: float, ahead: int = 0) -> bool: ...

    def expected_wait_s(self, ahead: int = 0) -> float: ...

    def urgent_wait_s(self, ahead: int = 0) -> float: ...

    async def classify_now(self, request: ClassifyRequest) -> Classification: ...


@dataclass(frozen=True, slots=True)
class ChainStatistics:
    fallbacks: Mapping[str, int]  # LLM work answered by the local pool, by reason
    # Refused at once because no classifier was expected to answer by the target.
    shed_for_deadline: int
    # Rushed local answers queued for an LLM re-classification that replaces them.
    upgrades_queued: int = 0
    # Hedges: LLM calls past the budget that got the local model started beside
    # them, and which answered the caller; replaced: the LLM's late answer replaced
    # the local one given; withdrawn: the local answer won while the LLM call was
    # still queued, which was withdrawn for a background re-classification.
    hedges_started: int = 0
    hedges_local_won: int = 0
    hedges_llm_won: int = 0
    hedges_replaced: int = 0
    hedges_withdrawn: int = 0


class Chain:
    """The LLM pool (*llm*; ``None``: local only) and the *local* pool as one
    :class:`Classifier`; see the module docstring.

    *latency_target_s*: admission's aim (``server.latency_target_s``; default none:
    the deadline). *on_late*: where an LLM answer that lost a hedge goes. Hedging
    needs :meth:`run` (the chain's nursery); a chain that is not running never hedges.
    """

    def __init__(
        self,
        local: Fallback,
        *,
        llm: Primary | None = None,
        latency_target_s: float = math.inf,
        on_late: LateAnswer | None = None,
        upgrades: Upgrader | None = None,
    ) -> None:
        if not latency_target_s > 0:
            raise ValueError(f"latency_target_s must be > 0, got {latency_target_s!r}")
        self._local = local
        self._llm = llm
        self._latency_target_s = latency_target_s
        self._on_late = on_late
        self._upgrades = upgrades
        self._fallbacks: Counter[str] = Counter()
        self._shed_for_deadline = 0
        self._upgrades_queued = 0
        self._hedges: Counter[str] = Counter()
        # From a request's arrival to the chain (lead_s).
        self._lead = ServiceTime()
        # Calls waiting for their hedge: key -> when it is due (_until_hedge).
        self._hedges_due: dict[int, float] = {}
        self._hedge_keys = itertools.count()
        self._draining = False
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()

    def statistics(self) -> ChainStatistics:
        return ChainStatistics(
            fallbacks=dict(self._fallbacks),
            shed_for_deadline=self._shed_for_deadline,
            upgrades_queued=self._upgrades_queued,
            hedges_started=self._hedges["started"],
            hedges_local_won=self._hedges["local_won"],
            hedges_llm_won=self._hedges["llm_won"],
            hedges_replaced=self._hedges["replaced"],
            hedges_withdrawn=self._hedges["withdrawn"],
        )

    # --- lifetime -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery of hedged calls until :meth:`close`, then let them finish
        (each is bounded by its request's deadline)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._closed.wait()
            self._nursery = None

    def close(self) -> None:
        """Hedge no more; :meth:`run` returns once the hedged calls under way end."""
        self._draining = True
        self._closed.set()

    def begin_drain(self) -> None:
        """Queue no more background re-classifications."""
        self._draining = True

    def _llm_on(self) -> Primary | None:
        return self._llm if self._llm is not None and self._llm.enabled else None

    def admit_by(self, deadline: float, received_at: float | None = None) -> float:
        """When work for *deadline* admitted now should be answered: the latency
        target from *received_at* (its request's arrival; default now), never
        later than the deadline."""
        if math.isinf(self._latency_target_s):
            return deadline
        now = trio.current_time()
        since = now if received_at is None else min(received_at, now)
        return min(deadline, since + self._latency_target_s)

    # --- the classifier ---------------------------------------------------------------

    def would_take(
        self, deadline: float, ahead: int = 0, *, received_at: float | None = None
    ) -> bool:
        """Whether work for *deadline* sent now would be taken by some classifier by
        the latency target, behind *ahead* more jobs on their way that have not
        reached a pool yet (admission tickets, flights before the chain). Those go
        where a miss goes: to the LLM pool while it takes them, the rest to the
        local pool.

        *received_at*: the request's arrival, for work about to be classified (the
        dispatcher's question after a store miss: the same target the chain will
        hold it to). Without it the work has not been read yet (the question from
        an upload's headers), and it must be answered by the target less the time
        a request takes from its arrival to the chain (:meth:`lead_s`): its body,
        hash and lookup come first. Else work that passes at the headers would be
        refused after its body was read (a late refusal) as the target drew near.
        """
        if received_at is None:
            admit_by = self.admit_by(deadline) - self.lead_s()
        else:
            admit_by = self.admit_by(deadline, received_at)
        llm = self._llm_on()
        if not ahead:
            return (
                llm is not None and llm.would_take(deadline, admit_by=admit_by)
            ) or self._local_takes(admit_by, 0)
        to_llm = 0 if llm is None else llm.room(deadline, admit_by=admit_by, most=ahead + 1)
        if to_llm > ahead:
            return True
        return self._local_takes(admit_by, ahead - to_llm)

    def _local_takes(self, admit_by: float, ahead: int) -> bool:
        """Whether the local pool would answer work sent now by *admit_by*, behind
        *ahead* jobs on their way and the hedges due before then
        (:meth:`_hedges_before`)."""
        return self._local.would_take(admit_by, ahead + self._hedges_before(admit_by))

    def _hedges_before(self, at: float) -> int:
        """LLM calls whose hedge falls due by *at*: each takes the local pool's
        priority lane, ahead of work queued now. Counted in full (cautious): a
        call that answers in time gives its place back."""
        return sum(1 for due in self._hedges_due.values() if due <= at)

    def refusal(
        self, deadline: float, ahead: int = 0, *, received_at: float | None = None
    ) -> Overloaded | None:
        """A refusal when no classifier would answer work for *deadline* by the
        latency target (:meth:`admit_by`), behind *ahead* jobs on their way (see
        :meth:`would_take`, and *received_at* there), else ``None``. Asked by the
        HTTP layer before it reads an upload (with the tickets ahead), and by the
        dispatcher after a store miss (with the request's arrival)."""
        if self.would_take(deadline, ahead, received_at=received_at):
            return None
        self._shed_for_deadline += 1
        return Overloaded(
            "no classifier can answer before the deadline",
            retry_after_s=self._local.expected_wait_s(),
        )

    async def classify(self, request: ClassifyRequest, deadline: float) -> Classification:
        """The LLM chain first (hedged by the local model when it is slow); on any
        LLM failure or refusal, the local model. A local answer's bytes go to the
        upgrades' spool."""
        classification = await self._classify(request, deadline)
        if classification.source is Source.LOCAL and self._upgrades is not None:
            self._upgrades.local_answered(request.image_hash, request.data)
        return classification

    def lead_s(self) -> float:
        """How long a request takes from its arrival to the chain (its body, hash,
        the dispatcher and the store's lookup): the recent mean plus two mean
        deviations, 0 before any was measured."""
        return self._lead.expected_wait_s(0, 1, cautious=True)

    async def _classify(self, request: ClassifyRequest, deadline: float) -> Classification:
        if request.received_at is not None:
            self._lead.record(trio.current_time() - request.received_at)
        admit_by = self.admit_by(deadline, request.received_at)
        llm = self._llm_on()
        if llm is None:
            return await self._classify_local(request, deadline, admit_by)
        hedge_s = llm.hedge_after_s()
        try:
            if hedge_s is None or self._nursery is None:
                return await llm.classify(request, deadline, admit_by=admit_by)
            return await self._hedged(llm, request, deadline, admit_by, hedge_s, self._nursery)
        except LlmError as exc:
            rushed = self._fell_back(llm, request, exc)
            if exc.queued:
                # The caller has already waited for the LLM: its fallback goes
                # ahead of new work, which can still be refused at the door.
                classification = await self._local.classify_now(request)
            else:
                classification = await self._classify_local(request, deadline, admit_by)
        if rushed:
            self._queue_upgrade(llm, request)
        return classification

    def _queue_upgrade(self, llm: Primary, request: ClassifyRequest) -> None:
        """Queue the LLM re-classification that replaces a local answer given in a
        hurry (dropped when the queue is full: the next hit offers it again)."""
        if not self._draining and llm.offer_recheck(request.data, request.image_hash):
            self._upgrades_queued += 1
            log.info("llm_upgrade_queued", image_hash=request.image_hash[:12])

    def _fell_back(self, llm: Primary, request: ClassifyRequest, exc: LlmError) -> bool:
        """Count and log a fallback; whether its local answer is a rushed one (the
        LLM was healthy when the caller's time ran out)."""
        reason = _fallback_reason(exc)
        self._fallbacks[reason] += 1
        log.info(
            "llm_fallback",
            reason=reason,
            image_hash=request.image_hash[:12],
            error=str(exc),
        )
        return reason in _RUSHED and llm.healthy()

    async def _classify_local(
        self, request: ClassifyRequest, deadline: float, admit_by: float
    ) -> Classification:
        wait_s = self._local.expected_wait_s(self._hedges_before(admit_by))
        if trio.current_time() + wait_s > admit_by:
            # It would only answer late, or time out in the queue: refuse now, with
            # an honest Retry-After.
            self._shed_for_deadline += 1
            raise Overloaded(
                "the local classifier cannot answer before the deadline", retry_after_s=wait_s
            )
        return await self._local.classify(request, deadline)

    # --- hedging ------------------------------------------------------------------------

    async def _until_hedge(
        self,
        key: int,
        receive: trio.MemoryReceiveChannel[_Report],
        budget_at: float,
        admit_by: float,
    ) -> _Report | None:
        """The LLM call's report if it comes before its hedge is due, else ``None``
        once it is due (:meth:`_hedge_at`, looked at again every
        :data:`HEDGE_LOOK_S`: other hedges falling due change it). The call is
        counted in ``_hedges_due`` from here until its local call has joined the
        priority lane (:meth:`_hedge_local`) or :meth:`_hedged` ends."""
        while (hedge_at := self._hedge_at(key, budget_at, admit_by)) > trio.current_time():
            self._hedges_due[key] = hedge_at
            with trio.move_on_at(min(hedge_at, trio.current_time() + HEDGE_LOOK_S)):
                return await receive.receive()
        self._hedges_due[key] = trio.current_time()
        return None

    async def _hedge_local(self, key: int, request: ClassifyRequest) -> Classification:
        """The hedge's local call: from here the priority lane counts it, no longer
        ``_hedges_due`` (no checkpoint between the two)."""
        self._hedges_due.pop(key, None)
        return await self._local.classify_now(request)

    def _hedge_at(self, key: int, budget_at: float, admit_by: float) -> float:
        """When the hedge of call *key* is due: at the end of the LLM pool's hedge
        budget (*budget_at*), or before *admit_by* by the priority lane's expected
        time (:meth:`Fallback.urgent_wait_s`) if that comes first, so that the
        latency target holds even when the budget is close to it (a provider whose
        P95 nears the target, a call that waited in the LLM queue). The lane counts
        the other calls' hedges due before this one: calls admitted together in a
        burst fall due together, and the lane takes them one preparation at a
        time, so the later ones must start earlier."""
        mine = self._hedges_due.get(key, budget_at)
        before = sum(1 for k, due in self._hedges_due.items() if due <= mine and k != key)
        return min(budget_at, admit_by - self._local.urgent_wait_s(before))

    async def _hedged(
        self,
        llm: Primary,
        request: ClassifyRequest,
        deadline: float,
        admit_by: float,
        hedge_s: float,
        nursery: trio.Nursery,
    ) -> Classification:
        """The LLM call, with the local model started beside it at :meth:`_hedge_at`.

        Raises the LLM's error when it fails before the hedge starts (the caller
        falls back as without hedging). The calls run in the chain's *nursery*, so
        leaving this wait (an answer, a cancellation) leaves the LLM call running:
        an LLM answer that lost replaces the local one (``on_late``). The local call
        takes the local pool's priority lane (the caller has waited already) and is
        cancelled once nobody waits for it. A local answer that wins while the LLM
        call is still queued in the LLM pool withdraws that call and queues an
        LLM re-classification in its place (background priority, only while an LLM
        worker is idle): a queued call made at normal priority after its caller
        was answered would take a worker from callers still waiting.
        """
        send, receive = trio.open_memory_channel[_Report](2)
        key = next(self._hedge_keys)
        queued = QueuedCall()
        llm_scope, local_scope = trio.CancelScope(), trio.CancelScope()
        try:
            with receive:
                with send:
                    ask_llm = functools.partial(
                        llm.classify, request, deadline, admit_by=admit_by, queued=queued
                    )
                    nursery.start_soon(
                        self._report, "llm", ask_llm, request, send.clone(), llm_scope
                    )
                    report = await self._until_hedge(
                        key, receive, trio.current_time() + hedge_s, admit_by
                    )
                    if report is not None:
                        return report[1].unwrap()  # before the hedge: as without one
                    self._hedges["started"] += 1
                    log.info("llm_hedged", image_hash=request.image_hash[:12])
                    ask_local = functools.partial(self._hedge_local, key, request)
                    nursery.start_soon(
                        self._report, "local", ask_local, request, send.clone(), local_scope
                    )
                failed: dict[str, BaseException] = {}
                while len(failed) < 2:
                    name, result = await receive.receive()
                    if name == "local" and isinstance(result, outcome.Value):
                        # Both ready at once: the LLM's answer is the better one.
                        try:
                            other, llm_result = receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            pass
                        else:
                            if isinstance(llm_result, outcome.Value):
                                name, result = other, llm_result
                    if isinstance(result, outcome.Value):
                        self._hedges[f"{name}_won"] += 1
                        if name == "local" and "llm" not in failed and queued.withdraw():
                            llm_scope.cancel()
                            self._hedges["withdrawn"] += 1
                            self._queue_upgrade(llm, request)
                        answer: Classification = result.unwrap()
                        return answer
                    assert isinstance(result, outcome.Error)
                    failed[name] = result.error
                    if name == "llm" and isinstance(result.error, LlmError):
                        self._fell_back(llm, request, result.error)  # the local call answers
            # Both failed: the local model's error is the answer (a bad image, draining).
            raise failed["local"]
        finally:
            self._hedges_due.pop(key, None)
            local_scope.cancel()

    async def _report(
        self,
        name: str,
        call: Callable[[], Awaitable[Classification]],
        request: ClassifyRequest,
        send: trio.MemorySendChannel[_Report],
        scope: trio.CancelScope,
    ) -> None:
        """Run one of a hedge's calls under *scope* and report its outcome; an LLM
        answer that nobody waits for any more replaces the local one given. A call
        whose *scope* was cancelled (nobody wants it) reports nothing."""
        with send:
            result: outcome.Outcome[Classification] | None = None
            with scope:
                try:
                    result = outcome.Value(await call())
                except trio.Cancelled:
                    raise
                except Exception as exc:  # reported to the waiting caller, which raises it
                    result = outcome.Error(exc)
            if result is None:
                return
            try:
                send.send_nowait((name, result))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the caller has its answer (or has left)
        if name == "llm" and isinstance(result, outcome.Value):
            await self._late(request.image_hash, result.unwrap())

    async def _late(self, image_hash: str, classification: Classification) -> None:
        """An LLM answer after the local one was given: it replaces the local one."""
        if self._on_late is None or classification.source is not Source.LLM:
            return
        try:
            await self._on_late(image_hash, classification)
        except trio.Cancelled:
            raise
        except Exception as exc:
            log.warning("llm_late_answer_failed", image_hash=image_hash[:12], error=repr(exc))
            return
        self._hedges["replaced"] += 1
        log.info("llm_late_answer_replaced", image_hash=image_hash[:12])

    # --- cache hits -------------------------------------------------------------------

    def cached_hit(self, entry: CachedEntry, data: bytes) -> None:
        """A hit on a local answer with the bytes in hand: queue an LLM answer for it
        (through the upgrades' budget when there are upgrades)."""
        if self._upgrades is not None:
            if entry.classification.source is Source.LOCAL and not self._draining:
                self._upgrades.offer(entry.image_hash, data or None)
            return
        llm = self._llm_on()
        if (
            data
            and entry.classification.source is Source.LOCAL
            and llm is not None
            and not self._draining
            and llm.healthy()
        ):
            llm.offer_recheck(data, entry.image_hash)


def _fallback_reason(exc: LlmError) -> str:
    """The fallback's reason: the refusal's, ``deadline`` when the caller's deadline
    cut the call short, else ``llm_failed``."""
    if isinstance(exc, LlmUnavailable):
        return exc.reason
    if isinstance(exc, CallAbandoned):
        return "deadline"
    return "llm_failed"
