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
- work the local pool could not answer before its deadline (its queue's expected
  wait) is refused at once with :class:`~xintu.errors.Overloaded`
  (``shed_for_deadline``), and so is a miss that no classifier could take before
  its deadline (:meth:`Chain.refusal`, asked by the dispatcher before it claims the
  miss across replicas);
- a cache hit on a local answer, while some LLM provider is healthy, queues a
  low-priority LLM re-classification whose answer replaces the local one
  (:meth:`Chain.cached_hit`);
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

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog
import trio

from .._types import Classification, Source
from ..errors import Overloaded
from ..llm import LlmError, LlmUnavailable
from ..llm._errors import CallAbandoned
from ..store import CachedEntry
from ._envelope import ClassifyRequest

__all__ = ["Chain", "ChainStatistics", "Classifier", "Fallback", "Primary"]

log = structlog.get_logger("xintu.chain")

# Fallback reasons that are the caller's deadline, not the LLM's health: the local
# answer they lead to is rushed, and is upgraded by an LLM re-classification.
_RUSHED = frozenset({"no_time", "queue_too_long", "deadline"})


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


class Primary(Classifier, Protocol):
    """The classifier asked first (the LLM pool): it may be switched off, and it
    re-classifies cached local answers in the background."""

    @property
    def enabled(self) -> bool: ...

    def healthy(self) -> bool: ...

    def offer_recheck(self, data: bytes, image_hash: str) -> bool: ...


class Fallback(Classifier, Protocol):
    """The classifier that answers when the primary does not (the local pool)."""

    def expected_wait_s(self) -> float: ...

    async def classify_now(self, request: ClassifyRequest) -> Classification: ...


@dataclass(frozen=True, slots=True)
class ChainStatistics:
    fallbacks: Mapping[str, int]  # LLM work answered by the local pool, by reason
    # Refused at once because the local queue would outlast the request's deadline.
    shed_for_deadline: int
    # Rushed local answers queued for an LLM re-classification that replaces them.
    upgrades_queued: int = 0


class Chain:
    """The LLM pool (*llm*; ``None``: local only) and the *local* pool as one
    :class:`Classifier`; see the module docstring."""

    def __init__(self, local: Fallback, *, llm: Primary | None = None) -> None:
        self._local = local
        self._llm = llm
        self._fallbacks: Counter[str] = Counter()
        self._shed_for_deadline = 0
        self._upgrades_queued = 0
        self._draining = False

    def statistics(self) -> ChainStatistics:
        return ChainStatistics(
            fallbacks=dict(self._fallbacks),
            shed_for_deadline=self._shed_for_deadline,
            upgrades_queued=self._upgrades_queued,
        )

    def begin_drain(self) -> None:
        """Queue no more background re-classifications."""
        self._draining = True

    def _llm_on(self) -> Primary | None:
        return self._llm if self._llm is not None and self._llm.enabled else None

    # --- the classifier ---------------------------------------------------------------

    def would_take(self, deadline: float) -> bool:
        llm = self._llm_on()
        return (llm is not None and llm.would_take(deadline)) or self._local.would_take(deadline)

    def refusal(self, deadline: float) -> Overloaded | None:
        """A refusal when no classifier would take work for *deadline* now (the
        dispatcher asks after a store miss, before it claims it), else ``None``."""
        if self.would_take(deadline):
            return None
        self._shed_for_deadline += 1
        return Overloaded(
            "no classifier can answer before the deadline",
            retry_after_s=self._local.expected_wait_s(),
        )

    async def classify(self, request: ClassifyRequest, deadline: float) -> Classification:
        """The LLM chain first; on any LLM failure or refusal, the local model."""
        llm = self._llm_on()
        if llm is None:
            return await self._classify_local(request, deadline)
        try:
            return await llm.classify(request, deadline)
        except LlmError as exc:
            reason = _fallback_reason(exc)
            self._fallbacks[reason] += 1
            log.info(
                "llm_fallback",
                reason=reason,
                image_hash=request.image_hash[:12],
                error=str(exc),
            )
            # Decided now: whether the LLM was healthy when the caller's time ran out.
            rushed = reason in _RUSHED and llm.healthy()
            if exc.queued:
                # The caller has already waited for the LLM: its fallback goes
                # ahead of new work, which can still be refused at the door.
                classification = await self._local.classify_now(request)
            else:
                classification = await self._classify_local(request, deadline)
        if rushed and not self._draining and llm.offer_recheck(request.data, request.image_hash):
            self._upgrades_queued += 1
            log.info("llm_upgrade_queued", image_hash=request.image_hash[:12])
        return classification

    async def _classify_local(self, request: ClassifyRequest, deadline: float) -> Classification:
        if trio.current_time() + self._local.expected_wait_s() > deadline:
            # It would only time out in the queue: refuse now, with an honest Retry-After.
            self._shed_for_deadline += 1
            raise Overloaded(
                "the local classifier cannot answer before the deadline",
                retry_after_s=self._local.expected_wait_s(),
            )
        return await self._local.classify(request, deadline)

    # --- cache hits -------------------------------------------------------------------

    def cached_hit(self, entry: CachedEntry, data: bytes) -> None:
        """A hit on a local answer with the bytes in hand: queue an LLM answer for it."""
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
