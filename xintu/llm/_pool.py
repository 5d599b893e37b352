"""The LLM pool: a fixed set of workers behind a bounded inbox, and the provider chain.

::

    classify() ──send_nowait──▶ inbox (inbox_size) ──▶ workers (N)
       │ refused at once (LlmUnavailable):               │ prepare upload (thread)
       │ no provider · every breaker open ·              ▼
       │ inbox full · deadline under the reserve     provider chain, in order:
       ▼                                               breaker permit? ── no ──▶ next provider
    the caller falls back to the local pool            attempt ▸ retry (backoff, Retry-After,
                                                        deadline, budget) ▸ next provider
    offer_recheck() ──▶ recheck queue ──▶ 1 background worker (only when a worker is idle)
                                             ──▶ on_recheck(image_hash, classification)

The pool is a :class:`~xintu.actors.Classifier` (the chain's primary):
:meth:`LlmPool.classify` puts an envelope (the actors' one reply protocol: the
request, the LLM call's deadline and a reply channel of buffer 1) into the inbox
with ``send_nowait`` and waits for the one answer; :meth:`LlmPool.would_take`
answers the chain's admission question without queueing anything.

Every call gets the request's deadline less ``fallback_reserve_s``: the LLM never
eats the time the local model needs. Admission may aim earlier than that deadline:
``admit_by`` (the chain's latency target) is when the caller should have its
answer, and work that would wait in the queue past it is refused at once
(``queue_too_long``); a call that is made still runs until the deadline less the
reserve.

Hedging (the chain's, :mod:`xintu.actors._chain`) asks :meth:`LlmPool.hedge_after_s`
how long a call may run before the local model is started alongside it: the
``hedge_quantile`` of the last successful calls' times (from a worker taking the
job to its answer), between ``hedge_min_s`` and ``hedge_after_s``; only successes
count, so a hung upstream does not teach the pool to wait longer for it.

A caller never sees an upstream body; all failures reach it as
:class:`~xintu.llm.LlmError`, which the classifier chain (:mod:`xintu.actors._chain`)
turns into a fallback.

Whose fault, for the breaker every caller shares: only the upstream's own failures
count against it (an error answer, a bad answer, a connect error, no answer within
its own ``timeout_s``). An attempt cut short because the *caller's* deadline less
the reserve came first says nothing about the upstream: it ends with
:class:`~xintu.llm._errors.CallAbandoned`, counts neither as a success nor as a
failure (``ProviderStatistics.abandoned``; the metric
``xintu_llm_calls_total{outcome="abandoned"}``), so five hurried clients cannot
open the breaker of a slow but healthy upstream for everyone. Background
rechecks have no caller: only the upstream's own timeouts bound them.

A hung upstream is the exception: its calls would all end as abandoned at the
callers' deadlines, before ``timeout_s``, and never open the breaker while each
holds a worker. So, like resilience4j's slow-call threshold, an attempt still
unanswered after ``breaker_slow_call_s`` is reported to the breaker as a failure
of kind ``slow`` at that moment (by one watcher task for the pool), and that is
its one outcome however it ends afterwards (an answer, the upstream's timeout,
the caller's deadline): five hung calls open the breaker ``breaker_slow_call_s``
into the hang instead of never. A caller's short deadline cuts its call before
that threshold (which is set above the healthy upstream's slowest answers), so
hurried callers still count neither way. ``ProviderStatistics.slow`` counts
them (they are in ``failures``, not in ``successes`` or ``abandoned``).

Per provider the pool keeps the kind of its last failure and when
(``ProviderStatistics.last_failure`` / ``last_failure_at``, a
:data:`~xintu.llm._errors.FailureKind` such as ``unauthorized`` for a wrong key),
which readiness, ``/api/v1/health`` and the metrics report.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import httpx
import outcome
import structlog
import trio

from .._rate import ServiceTime
from .._types import Classification, Source
from ..errors import DeadlineExceeded
from ._breaker import Breaker, BreakerState, BreakerStatistics, Permit
from ._config import LlmConfig, ProviderConfig
from ._errors import (
    CallAbandoned,
    FailureKind,
    LlmError,
    LlmUnavailable,
    UnavailableReason,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    failure_kind,
)
from ._image import UploadImage, prepare_upload
from ._parse import ParsedAnswer
from ._providers import ProviderClient
from ._retry import BackoffPolicy, RetryBudget, RetryBudgetStatistics

if TYPE_CHECKING:
    # Imported where used: xintu._config imports this package (for LlmConfig) and the
    # actor package imports the config, so the pool's module cannot import the actors'.
    from ..actors._envelope import ClassifyRequest, Envelope

__all__ = ["LlmPool", "LlmPoolStatistics", "ProviderStatistics", "QueuedCall", "RecheckCallback"]

log = structlog.get_logger("xintu.llm")

#: ``on_recheck(image_hash, classification)``: an LLM answer for a photo whose
#: cached answer came from the local model; the runtime replaces the cache entry.
RecheckCallback = Callable[[str, Classification], Awaitable[None]]

# Below this size an image is prepared inline: the thread hop costs about as much.
_INLINE_MAX_BYTES = 4096
# How much longer than the LLM call's deadline a caller waits for the worker's reply
# (the worker answers at its deadline; this only orders the two wake-ups).
_REPLY_GRACE_S = 0.05
# Successful calls' times kept for the hedge budget's quantile.
_CALL_TIMES_KEPT = 200
# Below this many of them the quantile is not trusted: hedge_after_s is the budget.
_CALL_TIMES_MIN = 20


@dataclass(frozen=True, slots=True)
class ProviderStatistics:
    """One provider: HTTP attempts and their outcomes, its breaker and retry budget.

    ``abandoned``: attempts cut short by the caller's deadline (neither a success
    nor a failure); ``last_failure``: the kind of the last failed attempt, and
    ``last_failure_at`` when (UTC), ``None`` before any.
    """

    name: str
    kind: str
    model: str
    attempts: int
    successes: int
    failures: int
    retries: int
    breaker: BreakerStatistics
    retry_budget: RetryBudgetStatistics
    abandoned: int = 0
    last_failure: FailureKind | None = None
    last_failure_at: datetime | None = None
    # Attempts still unanswered after breaker_slow_call_s (counted in failures too).
    slow: int = 0


@dataclass(frozen=True, slots=True)
class LlmPoolStatistics:
    """A snapshot of the pool (``refused_*``: refused at once, by reason)."""

    enabled: bool
    workers: int
    busy: int
    queued: int
    max_queued: int
    submitted: int
    succeeded: int
    failed: int
    refused_no_provider: int
    refused_breaker_open: int
    refused_inbox_full: int
    refused_no_time: int
    refused_queue_too_long: int
    refused_closed: int
    recheck_queued: int
    recheck_max_queued: int
    recheck_accepted: int
    recheck_dropped: int
    recheck_succeeded: int
    recheck_failed: int
    providers: tuple[ProviderStatistics, ...]
    # How long a call runs now before the chain hedges it (None: hedging is off).
    hedge_after_s: float | None = None


@dataclass(slots=True)
class _Attempt:
    """An attempt under way, watched for the slow-call threshold."""

    provider: _Provider
    permit: Permit
    slow_at: float  # when it counts as slow if still unanswered
    slow: bool = False  # counted as slow (its one outcome, a failure)


class QueuedCall:
    """A caller's hold on its job while the job waits in the pool's queue.

    :meth:`withdraw` takes the job back if no worker has taken it yet: no upstream
    call is then made for it. The hedge's local answer uses it (the chain,
    :mod:`xintu.actors._chain`): a call still queued after its caller was answered
    would otherwise be made at normal priority, ahead of callers still waiting.
    Plain object: Trio runs one task at a time, so a worker's start and a
    withdrawal cannot interleave.
    """

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state: Literal["queued", "started", "withdrawn"] = "queued"

    def withdraw(self) -> bool:
        """Take the job back; False once a worker has started it."""
        if self._state == "started":
            return False
        self._state = "withdrawn"
        return True

    def _start(self) -> bool:
        """A worker takes the job; False when it was withdrawn."""
        if self._state == "withdrawn":
            return False
        self._state = "started"
        return True


@dataclass(frozen=True, slots=True)
class _Job:
    # Its deadline is the LLM work's: the request's deadline less the reserve.
    envelope: Envelope[Classification]
    # A worker was free when it was admitted: a probe, made whatever the estimate
    # says (the estimate only learns from calls that are made).
    probe: bool = False
    # The caller's hold on it while it waits in the queue (QueuedCall).
    queued: QueuedCall | None = None


class _Provider:
    """A provider's runtime state: client (while running), breaker, budget, counters."""

    def __init__(self, cfg: ProviderConfig, config: LlmConfig) -> None:
        self.cfg = cfg
        self.client: ProviderClient | None = None
        self.breaker = Breaker(
            cfg.name,
            window_s=config.breaker_window_s,
            min_calls=config.breaker_min_calls,
            consecutive_failures=config.breaker_consecutive_failures,
            failure_ratio=config.breaker_failure_ratio,
            open_s=config.breaker_open_s,
            half_open_probes=config.breaker_half_open_probes,
        )
        self.budget = RetryBudget(
            ratio=config.retry_budget_ratio,
            min_retries=config.retry_budget_min,
            window_s=config.retry_budget_window_s,
        )
        self.attempts = 0
        self.successes = 0
        self.failures = 0
        self.retries = 0
        self.abandoned = 0
        self.slow = 0  # attempts counted as slow (in failures too)
        self.last_failure: FailureKind | None = None
        self.last_failure_at: datetime | None = None

    def failed(self, exc: LlmError | None) -> FailureKind:
        """Count a failed attempt (the upstream's fault) and remember its kind;
        ``None``: an attempt past the slow-call threshold (kind ``slow``)."""
        kind: FailureKind = "slow" if exc is None else failure_kind(exc)
        self.failures += 1
        self.last_failure = kind
        self.last_failure_at = datetime.now(UTC)
        return kind

    def statistics(self) -> ProviderStatistics:
        return ProviderStatistics(
            name=self.cfg.name,
            kind=self.cfg.kind,
            model=self.cfg.model,
            attempts=self.attempts,
            successes=self.successes,
            failures=self.failures,
            retries=self.retries,
            breaker=self.breaker.statistics(),
            retry_budget=self.budget.statistics(),
            abandoned=self.abandoned,
            last_failure=self.last_failure,
            last_failure_at=self.last_failure_at,
            slow=self.slow,
        )


def _log_failure(cfg: ProviderConfig, exc: LlmError) -> None:
    """Log a provider's failed call; a refused request (4xx) as a warning.

    A refusal (a bad key, a model name or a parameter the model does not take) fails
    every call the same way until the configuration changes, and the breaker then
    hides it behind the local model: the upstream's own message says why.
    """
    fields: dict[str, object] = {
        "provider": cfg.name,
        "error": exc.error_code,
        "status": getattr(exc, "status", None),
    }
    if isinstance(exc, UpstreamError) and exc.upstream_message is not None:
        fields["upstream_message"] = exc.upstream_message
    if isinstance(exc, UpstreamRejected):
        log.warning("llm_provider_failed", model=cfg.model, **fields)
    else:
        log.info("llm_provider_failed", **fields)


class LlmPool:
    """The LLM classifier actor. See the module docstring.

    *transport* replaces the network for every provider's client (tests pass an
    ``httpx.MockTransport``); *rng* drives the backoff jitter.
    """

    def __init__(
        self,
        config: LlmConfig,
        *,
        on_recheck: RecheckCallback | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._providers = [_Provider(p, config) for p in config.providers]
        self._on_recheck = on_recheck
        self._transport = transport
        self._rng = rng or random.Random()
        self._backoff = BackoffPolicy(
            config.retry_max_attempts, config.retry_initial_s, config.retry_max_s
        )
        self._reserve_s = config.fallback_reserve_s
        # What a call is taken to last until one has been measured (_expected_wait_s).
        self._prior_call_s = config.hedge_after_s or config.breaker_slow_call_s
        self._workers = config.workers
        self._send, self._receive = trio.open_memory_channel[_Job](config.inbox_size)
        self._image_limiter = trio.CapacityLimiter(config.workers)
        self._rechecks = on_recheck is not None and config.recheck_queue > 0 and self.enabled
        self._recheck_send, self._recheck_receive = trio.open_memory_channel[tuple[bytes, str]](
            max(config.recheck_queue, 1)
        )
        self._recheck_pending: set[str] = set()
        self._recheck_scope = trio.CancelScope()
        self._idle = trio.lowlevel.ParkingLot()
        # Attempts under way by lane, for the slow-call watcher (woken by a new one).
        self._attempts: dict[int, _Attempt] = {}
        self._attempt_started = trio.lowlevel.ParkingLot()
        self._closed = False
        self._busy = 0
        # When each busy worker's job started, by lane: how old the calls under way are.
        self._job_started: dict[int, float] = {}
        self._service = ServiceTime()
        self._call_times: deque[float] = deque(maxlen=_CALL_TIMES_KEPT)
        self._hedge_after_s: float | None = None  # cached; None: to be computed
        self._submitted = 0
        self._succeeded = 0
        self._failed = 0
        self._refused: dict[UnavailableReason, int] = {
            "no_provider": 0,
            "breaker_open": 0,
            "inbox_full": 0,
            "no_time": 0,
            "queue_too_long": 0,
            "closed": 0,
        }
        self._recheck_accepted = 0
        self._recheck_dropped = 0
        self._recheck_succeeded = 0
        self._recheck_failed = 0

    @property
    def enabled(self) -> bool:
        """False when no provider is configured (every call is refused at once)."""
        return bool(self._providers)

    @property
    def rechecks_enabled(self) -> bool:
        """Whether :meth:`offer_recheck` can ever take a photo (a provider, a
        recheck callback and ``recheck_queue`` > 0)."""
        return self._rechecks

    @property
    def provider_names(self) -> Sequence[str]:
        return tuple(p.cfg.name for p in self._providers)

    def healthy(self) -> bool:
        """Whether some provider's breaker is closed (the LLM is worth asking)."""
        return any(p.breaker.state is BreakerState.CLOSED for p in self._providers)

    def _probing(self) -> bool:
        """Whether a call made now would be a half-open breaker's probe: no
        provider's breaker is closed, and some half-open one takes a probe."""
        return not self.healthy() and any(p.breaker.would_allow() for p in self._providers)

    # --- the front door ------------------------------------------------------------

    def _refuse(self, reason: UnavailableReason, message: str) -> LlmUnavailable:
        self._refused[reason] += 1
        return LlmUnavailable(message, reason=reason)

    async def classify(
        self,
        request: ClassifyRequest,
        deadline: float,
        *,
        admit_by: float | None = None,
        queued: QueuedCall | None = None,
    ) -> Classification:
        """Classify *request* through the provider chain before *deadline* less the reserve.

        *queued*: the caller's hold on the job while it is queued (:class:`QueuedCall`).

        Raises :class:`~xintu.llm.LlmUnavailable` at once, with no upstream call, when
        no provider is configured, every breaker is open, the inbox is full, the
        remaining time is under ``fallback_reserve_s``, the queue would outlast
        *admit_by* (default: the deadline less the reserve) or the pool is closed;
        and another :class:`~xintu.llm.LlmError` when the chain failed. Either way
        the caller falls back; the error holds no upstream body and no key.
        """
        from ..actors._envelope import Envelope, open_reply, wait_reply

        await trio.lowlevel.checkpoint_if_cancelled()
        refusal = self._refusal(deadline, admit_by)
        if refusal is not None:
            raise self._refuse(*refusal)
        call_deadline = deadline - self._reserve_s
        probe = self._receive.statistics().current_buffer_used + self._busy < self._workers
        reply, receive = open_reply(Classification)
        try:
            self._send.send_nowait(_Job(Envelope(request, call_deadline, reply), probe, queued))
        except trio.WouldBlock:
            reply.close()
            receive.close()
            raise self._refuse("inbox_full", "the LLM pool is over capacity") from None
        except trio.ClosedResourceError:
            reply.close()
            receive.close()
            raise self._refuse("closed", "the LLM pool is shutting down") from None
        self._submitted += 1
        try:
            return await wait_reply(receive, call_deadline + _REPLY_GRACE_S)
        except LlmError as exc:
            exc.queued = True
            raise
        except DeadlineExceeded:
            # The caller's deadline, not an upstream's: no provider is blamed.
            abandoned = CallAbandoned("llm", "no LLM answer before the deadline")
            abandoned.queued = True
            raise abandoned from None

    def would_take(self, deadline: float, *, admit_by: float | None = None, ahead: int = 0) -> bool:
        """Whether :meth:`classify` would queue work for *deadline* (and *admit_by*)
        now, behind *ahead* more jobs on their way (admission tickets); it queues none."""
        return self.room(deadline, admit_by=admit_by, most=ahead + 1) > ahead

    def room(self, deadline: float, *, admit_by: float | None = None, most: int) -> int:
        """How many jobs for *deadline* (and *admit_by*) sent now one after another
        would be queued, up to *most* (the chain's admission with tickets ahead:
        those the LLM pool would not take go to the local pool)."""
        if most <= 0 or self._static_refusal(deadline) is not None:
            return 0
        used = self._receive.statistics().current_buffer_used
        # Idle workers take jobs before the inbox holds any.
        fits = max(0, self._workers - self._busy - used) + self.config.inbox_size - used
        wanted_by = self._wanted_by(deadline, admit_by)
        now = trio.current_time()
        median_age = self._median_age()
        taken = 0
        while taken < min(most, fits):
            ahead = used + self._busy + taken
            if ahead >= self._workers and now + self._expected_wait_s(ahead, median_age) > (
                wanted_by
            ):
                break
            taken += 1
        return taken

    def _wanted_by(self, deadline: float, admit_by: float | None) -> float:
        call_deadline = deadline - self._reserve_s
        return call_deadline if admit_by is None else min(call_deadline, admit_by)

    def _static_refusal(self, deadline: float) -> tuple[UnavailableReason, str] | None:
        """A refusal that does not depend on the queue: no provider, closed, no
        time left for a call, every breaker open."""
        if not self._providers:
            return "no_provider", "no LLM provider is configured"
        if self._closed:
            return "closed", "the LLM pool is shutting down"
        if deadline - self._reserve_s <= trio.current_time():
            return "no_time", "not enough time left for an LLM call"
        if not any(p.breaker.would_allow() for p in self._providers):
            return "breaker_open", "every LLM provider's circuit breaker is open"
        return None

    def _refusal(
        self, deadline: float, admit_by: float | None = None
    ) -> tuple[UnavailableReason, str] | None:
        """Why work for *deadline* would be refused at once, or None if it would queue.

        *admit_by*: when the answer is wanted (the chain's latency target); the
        queue's expected wait is held against it as well as against the deadline.
        """
        if (static := self._static_refusal(deadline)) is not None:
            return static
        ahead = self._receive.statistics().current_buffer_used + self._busy
        # With a worker free there is no queue to wait for, and the call is bounded
        # by its own deadline. Refusing it on the estimate alone could refuse every
        # call for good after a few slow ones: refusals teach the estimate nothing.
        wanted_by = self._wanted_by(deadline, admit_by)
        if (
            ahead >= self._workers
            and trio.current_time() + self._expected_wait_s(ahead, self._median_age()) > wanted_by
        ):
            # Queueing would only end in "no time left": fall back now, while there is.
            return "queue_too_long", "the LLM queue would outlast the deadline"
        return None

    def _median_age(self) -> float:
        """The median age of the calls under way (0 when none is)."""
        if not self._job_started:
            return 0.0
        now = trio.current_time()
        ages = sorted(now - t for t in self._job_started.values())
        return ages[len(ages) // 2]

    def _expected_wait_s(self, ahead: int, median_age: float) -> float:
        """When a job queued now behind *ahead* jobs should be answered.

        The measured call times (cautious), but never less than the calls under way
        say (*median_age*: :meth:`_median_age`): if the upstream has slowed down, the
        mean learns it only as slow calls end, while the median age of the calls
        running now already shows it (each round ahead takes at least that long). So
        a sudden slowdown (or a hang) does not fill the queue with work that can
        only run out of time. Before any call has been measured, a call is taken
        to last the hedge budget's ceiling (``hedge_after_s``; else
        ``breaker_slow_call_s``): a burst on a cold pool then queues what that
        allows instead of filling the inbox on an estimate of zero (every worker
        still takes a call, a probe, whatever the estimate).
        """
        rounds = ahead // max(self._workers, 1) + 1
        if self._service.mean_s is None:
            return rounds * max(self._prior_call_s, median_age)
        estimate = self._service.expected_wait_s(ahead, self._workers, cautious=True)
        return max(estimate, rounds * median_age)

    def offer_recheck(self, data: bytes, image_hash: str) -> bool:
        """Queue a background LLM re-classification; False if not taken (never waits).

        Taken only while some provider's breaker is closed, the queue has room and
        the hash is not queued already. A success calls ``on_recheck``.
        """
        if not self._rechecks or self._closed or image_hash in self._recheck_pending:
            return False
        if not self.healthy():
            self._recheck_dropped += 1
            return False
        try:
            self._recheck_send.send_nowait((data, image_hash))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._recheck_dropped += 1
            return False
        self._recheck_pending.add(image_hash)
        self._recheck_accepted += 1
        return True

    def hedge_after_s(self) -> float | None:
        """How long a call may run before the chain starts the local model beside
        it; ``None`` when hedging is off (``hedge_after_s = 0``).

        The ``hedge_quantile`` of the last successful calls' times (P95 by default)
        once at least a few were seen, clamped to [``hedge_min_s``,
        ``hedge_after_s``]; ``hedge_after_s`` until then. 0 while a call would be
        a half-open breaker's probe (no breaker closed): the probe goes into an
        upstream that was failing, and its caller has the local answer at once
        while it runs (a probe that succeeds closes the breaker, and its answer
        replaces the local one). While every breaker is open the call is refused
        at once anyway, and the caller falls back as without a hedge.
        """
        ceiling = self.config.hedge_after_s
        if ceiling <= 0:
            return None
        if self._probing():
            return 0.0  # no caller waits for a half-open breaker's probe
        if self._hedge_after_s is None:
            q = self.config.hedge_quantile
            if q <= 0 or len(self._call_times) < _CALL_TIMES_MIN:
                self._hedge_after_s = ceiling
            else:
                ordered = sorted(self._call_times)
                at = ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
                self._hedge_after_s = min(ceiling, max(self.config.hedge_min_s, at))
        return self._hedge_after_s

    def close(self) -> None:
        """Take nothing more: queued calls finish, queued rechecks are dropped."""
        self._closed = True
        self._send.close()
        self._recheck_send.close()
        self._recheck_scope.cancel()
        self._recheck_dropped += len(self._recheck_pending)
        self._recheck_pending.clear()

    def statistics(self) -> LlmPoolStatistics:
        return LlmPoolStatistics(
            enabled=self.enabled,
            workers=self._workers,
            busy=self._busy,
            queued=self._receive.statistics().current_buffer_used,
            max_queued=self.config.inbox_size,
            submitted=self._submitted,
            succeeded=self._succeeded,
            failed=self._failed,
            refused_no_provider=self._refused["no_provider"],
            refused_breaker_open=self._refused["breaker_open"],
            refused_inbox_full=self._refused["inbox_full"],
            refused_no_time=self._refused["no_time"],
            refused_queue_too_long=self._refused["queue_too_long"],
            refused_closed=self._refused["closed"],
            recheck_queued=len(self._recheck_pending),
            recheck_max_queued=self.config.recheck_queue if self._rechecks else 0,
            recheck_accepted=self._recheck_accepted,
            recheck_dropped=self._recheck_dropped,
            recheck_succeeded=self._recheck_succeeded,
            recheck_failed=self._recheck_failed,
            providers=tuple(p.statistics() for p in self._providers),
            hedge_after_s=self.hedge_after_s() if self.enabled else None,
        )

    # --- the actor -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the providers' clients, run the workers until :meth:`close`, close clients."""
        async with contextlib.AsyncExitStack() as clients:
            for p in self._providers:
                # Lanes: worker i is caller i, the recheck worker is caller `workers`.
                p.client = ProviderClient(
                    p.cfg,
                    language=self.config.description_language,
                    callers=self._workers + 1,
                    transport=self._transport,
                )
                clients.push_async_callback(p.client.aclose)
            async with trio.open_nursery() as watch:
                if self.config.breaker_slow_call_s > 0:
                    watch.start_soon(self._slow_watcher)
                async with trio.open_nursery() as nursery:
                    async with self._receive:
                        for lane in range(self._workers):
                            nursery.start_soon(self._worker, lane, self._receive.clone())
                    if self._rechecks:
                        nursery.start_soon(self._recheck_worker)
                    log.info("llm_pool_ready", providers=list(self.provider_names))
                    task_status.started()
                watch.cancel_scope.cancel()  # the workers are done: nothing to watch
            for p in self._providers:
                p.client = None

    async def _worker(self, lane: int, receive: trio.MemoryReceiveChannel[_Job]) -> None:
        from ..actors._envelope import send_reply

        async with receive:
            async for job in receive:
                reply = job.envelope.reply
                if reply.statistics().open_receive_channels == 0:
                    reply.close()  # the caller has left: nobody wants the answer
                    continue
                if job.queued is not None and not job.queued._start():
                    reply.close()  # withdrawn by its caller (see QueuedCall)
                    continue
                self._busy += 1
                started = trio.current_time()
                self._job_started[lane] = started
                # Only work that reached an upstream is a service time: counting the
                # instant refusals (no time, breakers open) would make the queue look
                # faster than it is and admit work that then runs out of time.
                measured = True
                try:
                    classification = await self._run_chain(
                        job.envelope.request.data,
                        job.envelope.deadline,
                        lane,
                        check_time=not job.probe,
                    )
                except trio.Cancelled:
                    measured = False
                    send_reply(
                        reply, outcome.Error(LlmUnavailable("shutting down", reason="closed"))
                    )
                    raise
                except LlmUnavailable as exc:
                    measured = False
                    self._failed += 1
                    send_reply(reply, outcome.Error(exc))
                except LlmError as exc:
                    self._failed += 1
                    send_reply(reply, outcome.Error(exc))
                except Exception as exc:  # a bug: answer the caller, keep the worker
                    self._failed += 1
                    log.error(
                        "llm_job_failed",
                        image_hash=job.envelope.request.image_hash[:12],
                        error=type(exc).__name__,
                    )
                    send_reply(reply, outcome.Error(LlmError("LLM classification failed")))
                else:
                    self._succeeded += 1
                    self._call_times.append(trio.current_time() - started)
                    self._hedge_after_s = None
                    send_reply(reply, outcome.Value(classification))
                finally:
                    if measured:
                        self._service.record(trio.current_time() - started)
                    self._busy -= 1
                    self._job_started.pop(lane, None)
                    self._idle.unpark_all()

    async def _recheck_worker(self) -> None:
        with self._recheck_scope:
            async with self._recheck_receive:
                async for data, image_hash in self._recheck_receive:
                    # Low priority: only while a worker is idle and nothing is queued.
                    while self._busy >= self._workers or (
                        self._receive.statistics().current_buffer_used > 0
                    ):
                        await self._idle.park()
                    self._recheck_pending.discard(image_hash)
                    await self._recheck(data, image_hash)

    async def _recheck(self, data: bytes, image_hash: str) -> None:
        assert self._on_recheck is not None
        if not self.healthy():
            self._recheck_dropped += 1
            return
        try:
            # No caller waits: only the upstream's own timeouts (which count) bound it.
            classification = await self._run_chain(data, math.inf, self._workers, check_time=False)
        except trio.Cancelled:
            raise
        except LlmError as exc:
            self._recheck_failed += 1
            log.info("llm_recheck_failed", image_hash=image_hash[:12], error=exc.error_code)
            return
        try:
            await self._on_recheck(image_hash, classification)
        except trio.Cancelled:
            raise
        except Exception as exc:
            self._recheck_failed += 1
            log.warning("llm_recheck_callback_failed", image_hash=image_hash[:12], error=repr(exc))
            return
        self._recheck_succeeded += 1

    # --- the chain -----------------------------------------------------------------

    async def _prepare(self, data: bytes) -> UploadImage:
        prepare = functools.partial(
            prepare_upload,
            data,
            max_side_px=self.config.max_image_side_px,
            quality=self.config.jpeg_quality,
        )
        if len(data) <= _INLINE_MAX_BYTES:
            return prepare()
        return await trio.to_thread.run_sync(prepare, limiter=self._image_limiter)

    async def _run_chain(
        self, data: bytes, deadline: float, lane: int, *, check_time: bool
    ) -> Classification:
        """Try each provider in order until one answers; *deadline* bounds it all.

        *check_time*: the job waited in the queue; if less time is left than a call
        usually takes, none is made.
        """
        left = deadline - trio.current_time()
        if left <= 0 or (check_time and not self._service.likely_within(left)):
            # Queued longer than admission expected: a call that would more likely
            # than not run out of time is not made; the caller falls back now, while
            # the local model may still have room, instead of at the deadline.
            raise LlmUnavailable("not enough time left for an LLM call", reason="no_time")
        image = await self._prepare(data)
        last: LlmError | None = None
        for p in self._providers:
            if trio.current_time() >= deadline:
                break
            try:
                answer = await self._call_provider(p, image, deadline, lane)
            except LlmUnavailable:
                continue  # breaker open: next provider, no call made
            except CallAbandoned as exc:
                last = exc  # the deadline has passed: the loop ends here
                log.debug("llm_call_abandoned", provider=p.cfg.name)
                continue
            except LlmError as exc:
                last = exc
                _log_failure(p.cfg, exc)
                continue
            return Classification(
                category=answer.category,
                confidence=answer.confidence,
                source=Source.LLM,
                model=p.cfg.model,
                description=answer.description,
                provider=p.cfg.name,
            )
        if last is not None:
            raise last
        if trio.current_time() >= deadline:
            raise LlmUnavailable("no time left for an LLM call", reason="no_time")
        raise LlmUnavailable("every LLM provider's circuit breaker is open", reason="breaker_open")

    async def _slow_watcher(self) -> None:
        """Count every attempt still unanswered ``breaker_slow_call_s`` after it
        started as a failure of kind ``slow``, at that moment (one task for the pool:
        attempts register by lane in ``_attempts`` while they run)."""
        while True:
            waiting = [a for a in self._attempts.values() if not a.slow]
            if not waiting:
                await self._attempt_started.park()
                continue
            # A later attempt is never due before an earlier one: sleep to the first.
            await trio.sleep_until(min(a.slow_at for a in waiting))
            now = trio.current_time()
            for a in self._attempts.values():
                if not a.slow and a.slow_at <= now:
                    a.slow = True
                    a.provider.slow += 1
                    a.permit.failure(a.provider.failed(None))
                    log.info(
                        "llm_call_slow",
                        provider=a.provider.cfg.name,
                        after_s=self.config.breaker_slow_call_s,
                    )

    async def _call_provider(
        self, p: _Provider, image: UploadImage, deadline: float, lane: int
    ) -> ParsedAnswer:
        """One provider, with retries of retryable faults while deadline and budget allow."""
        client = p.client
        if client is None:
            raise LlmUnavailable("the LLM pool is not running", reason="closed")
        attempt = 0
        last: LlmError | None = None
        while True:
            permit = p.breaker.try_acquire()
            if permit is None:
                if last is not None:
                    raise last  # the breaker opened while retrying
                raise LlmUnavailable(f"{p.cfg.name}: circuit breaker open", reason="breaker_open")
            attempt += 1
            p.attempts += 1
            if attempt == 1:
                p.budget.record_call()  # retries are budgeted against calls actually made
            now = trio.current_time()
            own_timeout_at = now + p.cfg.timeout_s
            # Watched for the slow-call threshold while it runs; an attempt counted
            # as slow has had its one outcome (a failure) whatever happens next.
            watched = _Attempt(p, permit, now + self.config.breaker_slow_call_s)
            if 0 < self.config.breaker_slow_call_s and watched.slow_at < own_timeout_at:
                self._attempts[lane] = watched
                self._attempt_started.unpark_all()
            try:
                with trio.move_on_at(min(deadline, own_timeout_at)):
                    answer = await client.attempt(image, lane=lane)
                    if not watched.slow:
                        permit.success()
                        p.successes += 1
                    return answer
                if deadline < own_timeout_at:
                    # The caller's deadline came first: no verdict on the upstream.
                    raise CallAbandoned(p.cfg.name, "the caller's deadline ran out first")
                raise UpstreamTimeout(p.cfg.name, "no answer in time")
            except CallAbandoned:
                if not watched.slow:
                    permit.abandon()
                    p.abandoned += 1
                raise
            except LlmError as exc:
                if not watched.slow:
                    permit.failure(p.failed(exc))
                last = exc
            finally:
                self._attempts.pop(lane, None)
                permit.abandon()  # cancelled or a bug: no verdict (a no-op after one)
            if not (isinstance(last, UpstreamError) and last.retryable):
                raise last
            if attempt >= self._backoff.max_attempts:
                raise last
            delay = self._backoff.delay_s(attempt, self._rng, retry_after_s=last.retry_after_s)
            if trio.current_time() + delay >= deadline:
                raise last  # the retry would not fit in the deadline
            if not p.budget.try_spend():
                log.debug("llm_retry_budget_exhausted", provider=p.cfg.name)
                raise last
            p.retries += 1
            await trio.sleep(delay)
