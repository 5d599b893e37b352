"""Retry timing: exponential backoff with full jitter, and a retry budget.

Why not stamina (which does support Trio): a retry here must (1) wait at least
the upstream's ``Retry-After``, (2) not start when its wait would pass the call's
deadline, (3) spend from a budget shared by all calls to that provider, and (4)
ask the breaker for a permit per attempt. Stamina can express (1) by returning a
float from its ``on`` hook, and (2)-(4) only by putting all the decisions into
that same hook, at which point it contributes just the loop and the sleep. Its
``timeout`` runs on the wall clock rather than ``trio.current_time()`` (so
``autojump_clock`` cannot drive it), and its jitter is additive rather than
full. So the loop is the few lines in :meth:`xintu.llm.LlmPool._call_provider`,
and the decisions are here, each unit-tested.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import trio

__all__ = ["BackoffPolicy", "RetryBudget", "RetryBudgetStatistics"]


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """``max_attempts`` in all; waits drawn uniformly from 0..min(max_s, initial_s·2^(n-1))."""

    max_attempts: int
    initial_s: float
    max_s: float

    def delay_s(self, attempt: int, rng: random.Random, *, retry_after_s: float | None) -> float:
        """The wait after failed attempt number *attempt* (1-based), before the next one.

        Full jitter spreads a burst of failed calls over the whole interval instead
        of retrying them in lockstep; ``Retry-After`` is a floor, never cut short.
        """
        ceiling = min(self.max_s, self.initial_s * 2 ** (attempt - 1))
        delay = rng.uniform(0.0, ceiling)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return delay


@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    calls_in_window: int
    retries_in_window: int
    retries_allowed: int
    exhausted_total: int


class RetryBudget:
    """Retries over the last ``window_s`` stay ≤ ``min_retries + ratio * calls``.

    ``calls`` are first attempts. A burst of failing calls therefore gets at most
    a fraction of extra load, however many attempts each call is allowed; the
    ``min_retries`` floor lets a quiet service still retry its occasional failure.
    """

    def __init__(self, *, ratio: float, min_retries: int, window_s: float) -> None:
        self._ratio = ratio
        self._min = min_retries
        self._window_s = window_s
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._exhausted = 0

    def _prune(self, now: float) -> None:
        cutoff = now - self._window_s
        for q in (self._calls, self._retries):
            while q and q[0] <= cutoff:
                q.popleft()

    def _allowed(self) -> int:
        return self._min + int(self._ratio * len(self._calls))

    def record_call(self) -> None:
        """A first attempt is being made."""
        now = trio.current_time()
        self._prune(now)
        self._calls.append(now)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and counted) if there is none left."""
        now = trio.current_time()
        self._prune(now)
        if len(self._retries) + 1 > self._allowed():
            self._exhausted += 1
            return False
        self._retries.append(now)
        return True

    def statistics(self) -> RetryBudgetStatistics:
        self._prune(trio.current_time())
        return RetryBudgetStatistics(
            calls_in_window=len(self._calls),
            retries_in_window=len(self._retries),
            retries_allowed=self._allowed(),
            exhausted_total=self._exhausted,
        )
