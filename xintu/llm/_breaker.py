"""A circuit breaker per provider: closed, open, half-open.

::

              failures/calls >= ratio, calls >= min_calls (over window_s),
              or consecutive_failures calls in a row failed
    CLOSED ─────────────────────────────────────────────────────────▶ OPEN
      ▲                                                             │  ▲
      │ a probe succeeds                          open_s has passed │  │ a probe fails
      │                                                             ▼  │
      └──────────────────────────────────────────────────────── HALF_OPEN
                                              (at most half_open_probes calls at once)

Every call asks :meth:`Breaker.try_acquire` for a :class:`Permit` and reports its
outcome on it (``success``, ``failure``, or ``abandon`` when it ended without a
verdict: cancelled, or cut short by the caller's own deadline, which says nothing
about the upstream). ``failure(kind)`` names what went wrong (``unauthorized``,
``timeout``, …); the ``breaker_opened`` log event carries the last one, so a wrong
key does not open the breaker silently. While open, ``try_acquire`` answers ``None`` at once: no
upstream call is made at all.

It is a plain object, not a task with an inbox: it never waits and never does
I/O, and Trio runs one task at a time, so every method is atomic; an actor would
only add a channel hop to every call. Time is ``trio.current_time()``, so tests
drive it with ``autojump_clock``. Outcomes of calls that started before the last
transition (a slow call admitted while closed that ends after the breaker opened)
are ignored: only the current state's own calls move it.

Why both rules: the ratio over a window is steady under mixed traffic but slow
when the window still holds the successes from before an outage (at 50 % over 30 s,
a hard outage takes ~15 s to open it); a run of consecutive failures says at once
that the upstream is down, and one success in between resets it, so sporadic
errors never open the breaker that way.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

import structlog
import trio

__all__ = ["Breaker", "BreakerState", "BreakerStatistics", "Permit"]

log = structlog.get_logger("xintu.breaker")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A snapshot of one breaker. ``*_in_window`` count the closed state's window."""

    name: str
    state: BreakerState
    successes_in_window: int
    failures_in_window: int
    consecutive_failures: int
    failure_ratio: float
    probes_in_flight: int
    max_probes: int
    opened_total: int
    rejected_total: int
    open_until: float | None
    last_transition_at: float | None


class Permit:
    """Leave to make one call; report how it went exactly once (later reports are no-ops)."""

    __slots__ = ("_breaker", "_done", "_generation", "_probe")

    def __init__(self, breaker: Breaker, generation: int, *, probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._probe = probe
        self._done = False

    @property
    def probe(self) -> bool:
        """True for a half-open probe."""
        return self._probe

    def success(self) -> None:
        if not self._done:
            self._done = True
            self._breaker._record(self._generation, ok=True, probe=self._probe)

    def failure(self, kind: str | None = None) -> None:
        """The upstream failed; *kind* names how (logged when the breaker opens)."""
        if not self._done:
            self._done = True
            self._breaker._record(self._generation, ok=False, probe=self._probe, kind=kind)

    def abandon(self) -> None:
        """The call ended with no verdict on the upstream (cancelled, or the caller's
        deadline ran out first): free a probe slot, count nothing."""
        if not self._done:
            self._done = True
            self._breaker._release(self._generation, probe=self._probe)


class Breaker:
    """One provider's circuit breaker. See the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        window_s: float,
        min_calls: int,
        failure_ratio: float,
        consecutive_failures: int = 0,
        open_s: float,
        half_open_probes: int,
    ) -> None:
        self.name = name
        self._window_s = window_s
        self._min_calls = min_calls
        self._consecutive_limit = consecutive_failures
        self._streak = 0  # failures in a row, closed state only
        self._failure_ratio = failure_ratio
        self._open_s = open_s
        self._max_probes = half_open_probes
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, ok), closed state only
        self._failures = 0
        self._probes = 0
        self._open_until = 0.0
        self._opened_total = 0
        self._rejected_total = 0
        self._last_transition_at: float | None = None
        self._last_failure: str | None = None  # the kind of the last failure reported

    # --- asking --------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The state now (an expired open period turns into half-open on reading)."""
        self._tick()
        return self._state

    def would_allow(self) -> bool:
        """Whether :meth:`try_acquire` would give a permit now (it takes none)."""
        self._tick()
        if self._state is BreakerState.OPEN:
            return False
        return self._state is BreakerState.CLOSED or self._probes < self._max_probes

    def try_acquire(self) -> Permit | None:
        """A permit for one call, or None (rejected: open, or half-open probes all out)."""
        self._tick()
        if self._state is BreakerState.CLOSED:
            return Permit(self, self._generation, probe=False)
        if self._state is BreakerState.HALF_OPEN and self._probes < self._max_probes:
            self._probes += 1
            return Permit(self, self._generation, probe=True)
        self._rejected_total += 1
        return None

    def statistics(self) -> BreakerStatistics:
        self._tick()
        self._prune(trio.current_time())
        total = len(self._outcomes)
        return BreakerStatistics(
            name=self.name,
            state=self._state,
            successes_in_window=total - self._failures,
            failures_in_window=self._failures,
            consecutive_failures=self._streak,
            failure_ratio=self._failures / total if total else 0.0,
            probes_in_flight=self._probes,
            max_probes=self._max_probes,
            opened_total=self._opened_total,
            rejected_total=self._rejected_total,
            open_until=self._open_until if self._state is BreakerState.OPEN else None,
            last_transition_at=self._last_transition_at,
        )

    # --- outcomes (through Permit) --------------------------------------------------

    def _record(self, generation: int, *, ok: bool, probe: bool, kind: str | None = None) -> None:
        if generation != self._generation:
            return  # a call from before the last transition: stale
        if not ok:
            self._last_failure = kind
        now = trio.current_time()
        if probe:
            self._probes -= 1
            if ok:
                self._transition(BreakerState.CLOSED, now, reason="probe_succeeded")
            else:
                self._open(now, reason="probe_failed")
            return
        self._outcomes.append((now, ok))
        if ok:
            self._streak = 0
        else:
            self._failures += 1
            self._streak += 1
        self._prune(now)
        total = len(self._outcomes)
        if not ok and total >= self._min_calls and self._failures >= self._failure_ratio * total:
            self._open(now, reason="failure_ratio", failures=self._failures, calls=total)
        elif not ok and 0 < self._consecutive_limit <= self._streak:
            self._open(now, reason="consecutive_failures", failures=self._streak)

    def _release(self, generation: int, *, probe: bool) -> None:
        if probe and generation == self._generation:
            self._probes -= 1

    # --- state ---------------------------------------------------------------------

    def _tick(self) -> None:
        if self._state is BreakerState.OPEN:
            now = trio.current_time()
            if now >= self._open_until:
                self._transition(BreakerState.HALF_OPEN, now, reason="open_period_over")

    def _prune(self, now: float) -> None:
        cutoff = now - self._window_s
        while self._outcomes and self._outcomes[0][0] <= cutoff:
            _, ok = self._outcomes.popleft()
            if not ok:
                self._failures -= 1

    def _open(self, now: float, *, reason: str, **details: int) -> None:
        self._open_until = now + self._open_s
        self._opened_total += 1
        self._transition(
            BreakerState.OPEN,
            now,
            reason=reason,
            open_s=self._open_s,
            last_failure=self._last_failure,
            **details,
        )

    def _transition(
        self, state: BreakerState, now: float, *, reason: str, **details: float | str | None
    ) -> None:
        previous = self._state
        self._state = state
        self._generation += 1
        self._outcomes.clear()
        self._failures = 0
        self._streak = 0
        self._probes = 0
        self._last_transition_at = now
        event = "breaker_opened" if state is BreakerState.OPEN else f"breaker_{state.value}"
        emit = log.warning if state is BreakerState.OPEN else log.info
        emit(event, provider=self.name, previous=previous.value, reason=reason, **details)
