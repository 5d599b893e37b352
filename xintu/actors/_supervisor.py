"""Restart-with-backoff for actor workers, and the crash record readiness reads.

A worker that raises is logged, counted and restarted after an exponential
backoff. Too many crashes inside ``window_s`` mark the supervisor unhealthy, which
fails ``/readyz`` until the window passes without another crash.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
import trio

__all__ = ["CrashRecord", "SupervisorStatistics"]

log = structlog.get_logger("xintu.supervisor")


@dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    crashes_total: int
    recent_crashes: int
    healthy: bool


class CrashRecord:
    """Counts crashes of supervised workers; ``healthy`` is what readiness checks."""

    def __init__(
        self,
        *,
        max_recent: int = 5,
        window_s: float = 60.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._max_recent = max_recent
        self._window_s = window_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._recent: deque[float] = deque()
        self.crashes_total = 0

    def _prune(self) -> None:
        cutoff = trio.current_time() - self._window_s
        while self._recent and self._recent[0] < cutoff:
            self._recent.popleft()

    @property
    def healthy(self) -> bool:
        self._prune()
        return len(self._recent) < self._max_recent

    def statistics(self) -> SupervisorStatistics:
        self._prune()
        return SupervisorStatistics(self.crashes_total, len(self._recent), self.healthy)

    async def supervise(self, name: str, worker: Callable[[], Awaitable[None]]) -> None:
        """Run *worker* until it returns; restart it with backoff whenever it raises."""
        backoff = self._backoff_initial_s
        while True:
            try:
                await worker()
                return
            except trio.Cancelled:
                raise
            except Exception:
                self.crashes_total += 1
                self._recent.append(trio.current_time())
                log.exception("worker_crashed", worker=name, restart_in_s=backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max_s)
