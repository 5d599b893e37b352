"""Admission tickets: the work an upload brings, reserved from its headers.

::

    headers ──Runtime.reserve──▶ refusal?  (counts tickets + work before the chain)
       │ no: a Ticket, held by the request
       ▼
    body read, hashed ──Runtime.classify──▶ ticket released, envelope submitted
       └─ error, disconnect, cancellation ──▶ ticket released (the request's end)

An upload is refused from its headers when no classifier could take it
(:meth:`~._runtime.Runtime.refusal`). Without a reservation, a burst of uploads
all pass that check while capacity still looks free, read their bodies, and are
refused after their bodies arrived, by the flight or the pools: late refusals,
waiting behind the reading and hashing of every body. So passing the check takes
a :class:`Ticket`, and the check counts the live tickets as work queued ahead of
the classifiers (the chain's ``would_take(deadline, ahead=...)``: the LLM pool's
queue first, the local pool's with the rest; and as flights of the dispatcher).
Once the tickets fill the capacity, the next upload is refused at its headers.

A ticket counts the photos its upload is expected to bring (one for a single
upload; a batch's estimate from its ``Content-Length``: :meth:`~._runtime.Runtime.reserve`).
Each photo it counts stops counting once, by whichever comes first:

- the request submits that photo's work (:meth:`~._runtime.Runtime.classify`
  releases one photo of the ticket the request holds, with no checkpoint before
  the envelope is queued, so the work is never counted twice nor not at all);
- the request ends without submitting (an error, a client that disconnects, a
  cancellation): the task that took the ticket (the request's) has ended, which
  the count sees (:meth:`Reservations.__len__` drops such tickets), or a caller
  holding the ticket as a context manager leaves the block. So no path can leave
  a ticket counting after its request: every task ends;
- its ``ttl_s`` (the latency target) passes: past it the work could no longer be
  answered by the target anyway (an upload whose body takes longer than that
  stops being counted ahead).

A request holds its ticket in a context variable (:func:`held`), set by
:meth:`Reservations.take` in the request's task; tasks the request starts (a
batch's items) see the same ticket, and each item submitted releases one photo
of it. A batch with fewer photos than its ticket counts leaves the rest to its
request's end; one with more counts the extra photos from their submission on.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
from dataclasses import dataclass
from types import TracebackType

import trio

__all__ = ["AdmissionStatistics", "Reservations", "Ticket", "held"]

# photos_in's mean photo size before any photo was seen (a phone photo resized for
# upload), and the weight of each new photo in the running mean.
_PHOTO_BYTES_PRIOR = 256.0 * 1024
_PHOTO_BYTES_WEIGHT = 0.05

_held: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "xintu_admission_ticket", default=None
)


@dataclass(frozen=True, slots=True)
class AdmissionStatistics:
    """The photos the live tickets count (``live``) and, since start, the tickets
    taken, those that expired at their ``ttl_s`` and those whose request ended
    without submitting."""

    live: int
    taken: int
    expired: int
    ended: int


def held() -> Ticket | None:
    """The ticket the current request holds, if any (released or not)."""
    return _held.get()


class Ticket:
    """One reservation; :meth:`release` exactly once (later calls are no-ops).

    A context manager: leaving the block releases it, however the block ends.
    """

    __slots__ = ("_id", "_owner", "expires_at")

    def __init__(self, owner: Reservations, ticket_id: int, expires_at: float) -> None:
        self._owner = owner
        self._id = ticket_id
        self.expires_at = expires_at

    @property
    def released(self) -> bool:
        """Whether it no longer counts (released, or expired or its task ended,
        and pruned)."""
        return self._id not in self._owner._live

    @property
    def photos(self) -> int:
        """The photos it still counts (0 once released)."""
        live = self._owner._live.get(self._id)
        return 0 if live is None else live[2]

    def release(self) -> None:
        """Stop counting every photo it counts."""
        self._owner._live.pop(self._id, None)

    def release_one(self) -> None:
        """Stop counting one photo (a photo's work was submitted)."""
        live = self._owner._live.get(self._id)
        if live is None:
            return
        expires_at, task, photos = live
        if photos <= 1:
            del self._owner._live[self._id]
        else:
            self._owner._live[self._id] = (expires_at, task, photos - 1)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Reservations:
    """The live tickets of one process; ``len()`` counts the photos of those not
    yet released nor expired. Plain object: Trio runs one task at a time, so every
    method is atomic (like the breaker)."""

    def __init__(self, *, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        self._ttl_s = ttl_s
        # ticket id -> (expiry, the task that took it, the photos it still counts).
        self._live: dict[int, tuple[float, trio.lowlevel.Task, int]] = {}
        self._ids = itertools.count()
        self._taken = 0
        self._expired = 0
        self._ended = 0
        # Running mean of uploaded photos' sizes (saw_photo), from a prior.
        self._photo_bytes = _PHOTO_BYTES_PRIOR

    def __len__(self) -> int:
        self._prune(trio.current_time())
        return sum(photos for _, _, photos in self._live.values())

    @property
    def taken(self) -> int:
        """Tickets taken since start."""
        return self._taken

    @property
    def expired(self) -> int:
        """Tickets that stopped counting at their ttl, never released (a body
        that took longer than the latency target to arrive)."""
        return self._expired

    @property
    def ended(self) -> int:
        """Tickets that stopped counting because the task that took them ended
        without releasing them (a request that failed or was cancelled before it
        submitted its work)."""
        return self._ended

    def statistics(self) -> AdmissionStatistics:
        live = len(self)  # prunes first, so expired and ended are up to date
        return AdmissionStatistics(live, self._taken, self._expired, self._ended)

    def saw_photo(self, size: int) -> None:
        """An uploaded photo of *size* bytes reached the runtime: the running mean
        that :meth:`photos_in` divides by."""
        self._photo_bytes += _PHOTO_BYTES_WEIGHT * (size - self._photo_bytes)

    def photos_in(self, body_bytes: int, most: int) -> int:
        """How many photos an upload of *body_bytes* (its ``Content-Length``) is
        expected to bring: its size over the mean photo's, between 1 and *most*.
        A batch's ticket counts that many (:meth:`take`)."""
        return max(1, min(most, round(body_bytes / max(self._photo_bytes, 1.0))))

    def take(self, photos: int = 1) -> Ticket:
        """A new ticket for *photos* photos, held by the current request (:func:`held`)."""
        if photos < 1:
            raise ValueError(f"photos must be >= 1, got {photos!r}")
        now = trio.current_time()
        self._prune(now)
        ticket = Ticket(self, next(self._ids), now + self._ttl_s)
        self._live[ticket._id] = (ticket.expires_at, trio.lowlevel.current_task(), photos)
        self._taken += 1
        _held.set(ticket)
        return ticket

    def release_held(self) -> None:
        """Release one photo of the current request's ticket, if it holds one."""
        ticket = _held.get()
        if ticket is not None:
            ticket.release_one()

    def _prune(self, now: float) -> None:
        gone = [
            (i, expires_at <= now)
            for i, (expires_at, task, _) in self._live.items()
            if expires_at <= now or _ended(task)
        ]
        for i, expired in gone:
            del self._live[i]
            if expired:
                self._expired += 1
            else:
                self._ended += 1


def _ended(task: trio.lowlevel.Task) -> bool:
    """Whether *task* has finished (its coroutine has returned or raised)."""
    return inspect.getcoroutinestate(task.coro) == inspect.CORO_CLOSED
