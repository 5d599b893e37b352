"""A drain-rate meter: how fast an inbox empties, for an honest ``Retry-After``."""

from __future__ import annotations

import math

import trio

__all__ = ["DrainRate", "ServiceTime"]


class DrainRate:
    """Exponentially weighted completions per second.

    ``retry_after_s(depth)`` estimates how long a queue of *depth* items takes to
    drain at the observed rate, clamped to ``[min_s, max_s]`` and rounded up to
    whole seconds (the header carries integers).
    """

    def __init__(self, *, half_life_s: float = 5.0, min_s: float = 1.0, max_s: float = 60.0):
        self._half_life_s = half_life_s
        self._min_s = min_s
        self._max_s = max_s
        self._rate = 0.0
        self._last = trio.current_time()

    def record(self, n: int = 1) -> None:
        now = trio.current_time()
        dt = max(now - self._last, 1e-3)
        decay = 0.5 ** (dt / self._half_life_s)
        self._rate = self._rate * decay + (n / dt) * (1.0 - decay)
        self._last = now

    @property
    def per_second(self) -> float:
        return self._rate

    def retry_after_s(self, depth: int) -> float:
        if self._rate <= 0.0:
            return self._max_s if depth else self._min_s
        return float(min(self._max_s, max(self._min_s, math.ceil(depth / self._rate))))


class ServiceTime:
    """How long one item takes once a worker has it, and so how long a queue waits.

    An exponentially weighted mean of observed service times (not of waits, which
    would feed on themselves). :meth:`expected_wait_s` answers "if I queue now
    behind *ahead* items served by *parallel* workers, when am I done?" so that a
    pool can refuse at once work that could not finish before its deadline,
    instead of queueing it to time out (a late 503 or a 504).
    """

    def __init__(self, *, weight: float = 0.2) -> None:
        self._weight = weight
        self._mean_s: float | None = None
        self._deviation_s = 0.0

    def record(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        if self._mean_s is None:
            self._mean_s = seconds
            return
        error = seconds - self._mean_s
        self._mean_s += self._weight * error
        self._deviation_s += self._weight * (abs(error) - self._deviation_s)

    @property
    def mean_s(self) -> float | None:
        return self._mean_s

    @property
    def deviation_s(self) -> float:
        return self._deviation_s

    def expected_wait_s(self, ahead: int, parallel: int, *, cautious: bool = False) -> float:
        """Time until a new item is done: the queue ahead, then its own service.

        *cautious* adds a margin for the spread of service times, for work with a
        long tail (LLM calls): two mean deviations per round, summed like independent
        errors (so ``2 * deviation * sqrt(rounds + 1)``). Admitting on the mean alone
        puts the last admitted items right at their deadline, where half of them run
        out of time after they were queued: late refusals instead of fast ones.
        """
        if self._mean_s is None:
            return 0.0
        rounds = ahead // max(parallel, 1)
        expected = (rounds + 1) * self._mean_s
        if cautious:
            expected += 2.0 * self._deviation_s * math.sqrt(rounds + 1)
        return expected

    def likely_within(self, seconds: float) -> bool:
        """Whether one item, started now, is more likely than not done in *seconds*."""
        return self._mean_s is None or seconds >= self._mean_s
