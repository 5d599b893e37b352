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
  (:meth:`Chain.cached_hit`).
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
from ..store import CachedEntry
from ._envelope import ClassifyRequest

__all__ = ["Chain", "ChainStatistics", "Classifier", "Fallback", "Primary"]

log = structlog.get_logger("xintu.chain")


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


class Chain:
    """The LLM pool (*llm*; ``None``: local only) and the *local* pool as one
    :class:`Classifier`; see the module docstring."""

    def __init__(self, local: Fallback, *, llm: Primary | None = None) -> None:
        self._local = local
        self._llm = llm
        self._fallbacks: Counter[str] = Counter()
        self._shed_for_deadline = 0
        self._draining = False

    def statistics(self) -> ChainStatistics:
        return ChainStatistics(
            fallbacks=dict(self._fallbacks), shed_for_deadline=self._shed_for_deadline
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
        if llm is not None:
            try:
                return await llm.classify(request, deadline)
            except LlmError as exc:
                reason = exc.reason if isinstance(exc, LlmUnavailable) else "llm_failed"
                self._fallbacks[reason] += 1
                log.info(
                    "llm_fallback",
                    reason=reason,
                    image_hash=request.image_hash[:12],
                    error=str(exc),
                )
                if exc.queued:
                    # The caller has already waited for the LLM: its fallback goes
                    # ahead of new work, which can still be refused at the door.
                    return await self._local.classify_now(request)
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
