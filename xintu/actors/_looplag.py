"""Event-loop lag: how late the process's Trio loop runs a task whose time has come.

::

    LoopLag.run:  sleep_until(due) ──woken at now──▶ lag = now - due ──▶ histogram
                  (every interval_s)

One task sleeps :data:`INTERVAL_S` at a time and records, at each wake, how long
after its due time it was woken (``trio.current_time()``). On an idle loop that
is the timer's granularity (under a millisecond); on a busy one it is how long
the loop took to come back to the scheduler: every task step in the current pass
that does not yield (CPU work, a long synchronous call, a big JSON encode) delays
it. Nothing in the service measured this before (issue 14: "an LLM answer that
has arrived is read in time (a starved loop must never count as an upstream
failure). Measure it").

Why this lag bounds how late an arrived upstream answer is read: every pass of
Trio's scheduler (``trio._core._run.unrolled_run``) first asks the kernel which
sockets are ready (epoll, without waiting when tasks are runnable), then expires
the timers that are due, then runs the batch of tasks those two made runnable.
Socket readiness and timers are checked at the same point of the same pass. So
an LLM answer that reaches the service's socket at time *t* wakes its reader in
the first pass that starts after *t*, exactly as a timer due at *t* is fired in
that pass: the monitor's lag is a sample of that delay, taken at a time that has
nothing to do with the load (its own schedule). If the lag's P99 is small next to
the LLM call's timeout, a starved loop cannot have turned an answer that arrived
into a timeout; if it is not, the histogram says by how much. (The answer's
reader then runs in that pass's batch, behind at most the other tasks of that
batch; the same holds for the monitor.)

What the numbers mean: each wake is one observation, so on an idle loop the
histogram counts 1/:data:`INTERVAL_S` observations a second; on a starved loop
fewer (a stall of *S* seconds is one observation of about *S*, not *S* /
interval of them): its quantiles are over wakes, not over time, and understate a
stall's share of time. ``rate(xintu_event_loop_lag_seconds_sum)`` is the seconds
of lateness per second of wall time, which counts stalls by their length.

Cost: one wake every :data:`INTERVAL_S` (100 ms), a subtraction, a bisect and a
few additions, in every worker process. A busy loop is awake anyway, and a wake
is one more task step (microseconds). An idle one is woken for it: on the 2-core
VM of BENCHMARKS.md an idle ``xintu serve`` used 30-40 ms of CPU per 20 s without
the monitor, 100 ms with it (0.3 % of a core; a wake from idle costs ~300 µs of
CPU there, mostly the VM's timer and scheduler round trip), and 150-170 ms with a
50 ms interval, which is why the interval is not shorter. 100 ms still gives
~100 samples in a 10 s burst and thousands between two scrapes.

The counts are kept per bucket of :data:`LAG_BUCKETS_S` (Prometheus ``le``
semantics: a lag equal to a bound counts in that bound's bucket) with the lag
seconds summed per bucket, so that :mod:`xintu._metrics` exports them as a
Prometheus histogram with the exact sum (``Metrics.sample_loop_lag``), sampled
like every other actor's statistics.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import structlog
import trio

__all__ = ["INTERVAL_S", "LAG_BUCKETS_S", "STALL_LOG_S", "LoopLag", "LoopLagStatistics"]

log = structlog.get_logger("xintu.looplag")

#: How long the monitor sleeps between two wakes (its cost on an idle loop: above).
INTERVAL_S = 0.1
#: Upper bounds (seconds) of the lag histogram's buckets, 1 ms to 5 s in 1-2-5
#: steps; lags over the last bound count in a last, open bucket (``+Inf``).
LAG_BUCKETS_S = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
#: A lag at least this long is also logged (``event_loop_stalled``, a warning):
#: every socket that became ready meanwhile was read that late.
STALL_LOG_S = 1.0


@dataclass(frozen=True, slots=True)
class LoopLagStatistics:
    """The lags recorded since the monitor started.

    ``counts[i]`` and ``sums[i]`` are the wakes whose lag fell in bucket *i* (at most
    ``LAG_BUCKETS_S[i]`` and over the bound before it) and their lags summed, in
    seconds; the last element of each is the open bucket over the largest bound.
    """

    interval_s: float
    wakes: int
    total_s: float  # every lag summed
    max_s: float  # the largest lag since the start
    last_s: float  # the lag of the last wake
    counts: tuple[int, ...]
    sums: tuple[float, ...]


class LoopLag:
    """Samples the event loop's lag every *interval_s* until :meth:`close`."""

    def __init__(self, *, interval_s: float = INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self._counts = [0] * (len(LAG_BUCKETS_S) + 1)
        self._sums = [0.0] * (len(LAG_BUCKETS_S) + 1)
        self._wakes = 0
        self._total_s = 0.0
        self._max_s = 0.0
        self._last_s = 0.0
        self._closed = False
        self._scope: trio.CancelScope | None = None

    def statistics(self) -> LoopLagStatistics:
        return LoopLagStatistics(
            interval_s=self.interval_s,
            wakes=self._wakes,
            total_s=self._total_s,
            max_s=self._max_s,
            last_s=self._last_s,
            counts=tuple(self._counts),
            sums=tuple(self._sums),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sleep, record how late the wake was, again, until :meth:`close`."""
        with trio.CancelScope() as scope:
            self._scope = scope
            if self._closed:
                scope.cancel()
            task_status.started()
            while True:
                # Each sleep is due one interval after the last wake: a late wake
                # does not make the next ones look late too.
                due = trio.current_time() + self.interval_s
                await trio.sleep_until(due)
                self.record(trio.current_time() - due)

    def close(self) -> None:
        """Stop :meth:`run` (at once; before it started, as soon as it starts)."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    def record(self, lag_s: float) -> None:
        """Count one wake *lag_s* seconds late (a negative lag counts as 0)."""
        lag_s = max(lag_s, 0.0)
        i = bisect.bisect_left(LAG_BUCKETS_S, lag_s)
        self._counts[i] += 1
        self._sums[i] += lag_s
        self._wakes += 1
        self._total_s += lag_s
        self._last_s = lag_s
        if lag_s > self._max_s:
            self._max_s = lag_s
        if lag_s >= STALL_LOG_S:
            log.warning("event_loop_stalled", lag_ms=round(lag_s * 1000.0, 1))
