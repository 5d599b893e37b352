"""The dispatcher: admission, singleflight and routing of classification work.

It is the single owner of the in-flight table. The first envelope for an image
hash starts a *flight*; later envelopes for the same hash attach to it and receive
the same answer. A flight looks the hash up in the cache (LRU, then the shared
store) and, only on a miss, hands the image to the classifier chain
(:class:`~._chain.Chain`: the LLM pool, then the local pool). A cache hit never
reaches a classifier; a hit on a local answer is told to the chain, which may
queue an LLM re-classification. A miss that no classifier could take before its
deadline is refused (:meth:`~._chain.Chain.refusal`) before it is claimed.
Submitted work that has not reached the chain yet (in the inbox, or a flight
still looking the cache up) is :meth:`Dispatcher.before_chain`: the admission of
new uploads counts it as queued ahead of them, with the uploads' tickets
(:mod:`._admission`), which also count against ``max_in_flight``.

Shared work outlives its callers: a caller whose deadline passes, or who
disconnects, stops waiting, but the flight still completes, answers whoever is
left and writes the result, so the next request is a hit.

A flight classifies within its first caller's deadline, so a hurried first caller
(a short ``X-Deadline-Ms``) may leave the LLM no room and get the local model's
answer, which every waiter then shares. That answer is not the permanent one: the
chain marks such a rushed answer for upgrade and the LLM's re-classification
replaces it in the LRU and the store (:mod:`._chain`, which says why this beats
stretching the flight to its most patient waiter).

Across processes (replicas, ``--workers N``) flights coalesce through the shared
store, with an in-flight claim per hash (:meth:`~xintu.store.Store.claim`), never a
held connection or lock. After a store miss a flight claims the hash as
``<process id>/<flight number>``, valid for ``claim_ttl_s``:

- won: it reads the store once more (a result written between its miss and its
  claim is answered from there), then classifies; the writer's batch that stores
  the answer deletes the claim in the same transaction, so when the claim is gone
  the answer is visible. If classification fails the claim is released, so a
  waiter takes over at once instead of after the TTL.
- lost (another process is classifying it): it polls the store with a backoff
  (20 ms doubling to 200 ms, on Trio's clock) and trying the claim again, until
  the answer appears (answered ``from_cache``, counted as a hit), or it wins the
  claim (the owner failed and released it, or died and the claim expired), or half
  the time to the deadline has passed: then it classifies itself with the half
  that is left.

Failure modes, availability first: a store error while claiming means classifying
without a claim (two processes may then both call a classifier); an owner that dies
holds its waiters until the claim expires or their wait budget runs out; a classification
slower than ``claim_ttl_s`` lets a waiter start a second one; a claim whose release
failed lapses at its expiry (and is pruned later). Claim times are the processes'
wall clocks, so their skew must stay well below ``claim_ttl_s``.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import outcome
import structlog
import trio

from .._rate import DrainRate
from .._types import Classification
from ..errors import (
    ClassifierError,
    DeadlineExceeded,
    Draining,
    Overloaded,
    StoreError,
    XintuError,
)
from ..store import CachedEntry, ResultWrite
from ._cache import Cache
from ._chain import Chain
from ._envelope import Answer, ClassifyRequest, Envelope, Reply, send_reply
from ._writer import Writer

__all__ = ["Dispatcher", "DispatcherStatistics", "process_owner"]

log = structlog.get_logger("xintu.dispatcher")

# Waiting for another process's answer: the first poll after this, doubling to the max.
POLL_MIN_S = 0.02
POLL_MAX_S = 0.2
# A flight cancelled (shutdown) still tries this long to release its claim.
RELEASE_ON_CANCEL_S = 1.0
# Room for "/<flight number>" in a claim owner (the column holds 64 characters).
_MAX_PROCESS_OWNER = 44


def process_owner() -> str:
    """A fresh id for this process's claims: host, pid and a random part."""
    return f"{socket.gethostname()[:24]}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class DispatcherStatistics:
    queued: int
    max_queued: int
    in_flight: int
    max_in_flight: int
    admitted: int
    refused: int
    coalesced: int
    flights: int
    cache_hits: int
    classified: int
    failed: int
    drain_rate_per_s: float
    # Coalescing across processes (in-flight claims in the shared store), in flights:
    # claims_won: classified holding the claim (takeovers included); claims_lost:
    # found another process's live claim and waited; claim_errors: the store failed
    # while claiming (classified without a claim); takeovers: waited, then won the
    # claim (its owner failed or died); waited_hits: waited, then answered from the
    # other process's stored result; wait_timeouts: waited half the time to the
    # deadline, then classified without the claim.
    claims_won: int = 0
    claims_lost: int = 0
    claim_errors: int = 0
    takeovers: int = 0
    waited_hits: int = 0
    wait_timeouts: int = 0


@dataclass(slots=True)
class _Flight:
    request: ClassifyRequest  # the first envelope's
    deadline: float
    waiters: list[trio.MemorySendChannel[Reply]] = field(default_factory=list)
    owner: str = ""  # this flight's claim owner
    claimed: bool = False  # whether it holds the claim in the store
    looking_up: bool = True  # not handed to the chain yet (Dispatcher._looking_up)

    @property
    def image_hash(self) -> str:
        return self.request.image_hash

    @property
    def data(self) -> bytes:
        return self.request.data


class Dispatcher:
    """The dispatcher actor; see the module docstring.

    ``claim_ttl_s`` bounds how long other processes wait for this one's answer
    if it dies (it must cover a slow classification); ``owner`` names this
    process in its claims (default :func:`process_owner`); ``wall_clock`` gives
    the claim times (default ``datetime.now(UTC)``; tests derive it from Trio's
    clock). *chain* classifies the misses.
    """

    def __init__(
        self,
        *,
        cache: Cache,
        writer: Writer,
        chain: Chain,
        inbox_size: int,
        max_in_flight: int,
        flight_grace_s: float,
        claim_ttl_s: float = 30.0,
        owner: str | None = None,
        wall_clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not claim_ttl_s > 0:
            raise ValueError(f"claim_ttl_s must be > 0, got {claim_ttl_s!r}")
        self._owner = (owner or process_owner())[:_MAX_PROCESS_OWNER]
        self._claim_ttl_s = claim_ttl_s
        self._wall_clock = wall_clock or _utc_now
        self._cache = cache
        self._writer = writer
        self._chain = chain
        self._max_in_flight = max_in_flight
        self._flight_grace_s = flight_grace_s
        self._send, self._receive = trio.open_memory_channel[Envelope[Answer]](inbox_size)
        self._max_queued = inbox_size
        self._flights: dict[str, _Flight] = {}
        self._looking_up = 0  # flights not handed to the chain yet (before_chain)
        self._rate = DrainRate()
        self._closed = False
        self._admitted = 0
        self._refused = 0
        self._coalesced = 0
        self._flight_count = 0
        self._cache_hits = 0
        self._classified = 0
        self._failed = 0
        self._claims_won = 0
        self._claims_lost = 0
        self._claim_errors = 0
        self._takeovers = 0
        self._waited_hits = 0
        self._wait_timeouts = 0

    @property
    def owner(self) -> str:
        """This process's part of its claim owners (``<owner>/<flight number>``)."""
        return self._owner

    # --- the front door ------------------------------------------------------------

    def retry_after_s(self) -> float:
        """Seconds until the queue ahead of a new request should have drained."""
        depth = self._receive.statistics().current_buffer_used + len(self._flights)
        return self._rate.retry_after_s(depth)

    def refusal(self, ahead: int = 0) -> Overloaded | None:
        """The refusal :meth:`submit` or the flight would give new work now for lack
        of room (inbox full, ``max_in_flight`` flights, counting *ahead* more on
        their way: admission tickets), else ``None``; counted when given. Asked
        from an upload's headers (:meth:`Runtime.refusal`)."""
        inbox_full = self._receive.statistics().current_buffer_used >= self._max_queued
        if not inbox_full and len(self._flights) + ahead < self._max_in_flight:
            return None
        self._refused += 1
        return Overloaded("the service is over capacity", retry_after_s=self.retry_after_s())

    def before_chain(self) -> int:
        """Submitted work that no classifier has been handed yet: envelopes in the
        inbox and flights still looking the cache up (or waiting on another
        process's claim). Admission counts them as queued ahead of new work."""
        return self._receive.statistics().current_buffer_used + self._looking_up

    def submit(self, envelope: Envelope[Answer]) -> None:
        """Admit *envelope* or raise at once: :class:`Overloaded` / :class:`Draining`."""
        if self._closed:
            self._refused += 1
            raise Draining("the service is shutting down", retry_after_s=self.retry_after_s())
        try:
            self._send.send_nowait(envelope)
        except trio.WouldBlock:
            self._refused += 1
            raise Overloaded(
                "the service is over capacity", retry_after_s=self.retry_after_s()
            ) from None
        self._admitted += 1

    def close(self) -> None:
        """Admit nothing more; queued envelopes and flights still complete."""
        self._closed = True
        self._send.close()

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(
            queued=self._receive.statistics().current_buffer_used,
            max_queued=self._max_queued,
            in_flight=len(self._flights),
            max_in_flight=self._max_in_flight,
            admitted=self._admitted,
            refused=self._refused,
            coalesced=self._coalesced,
            flights=self._flight_count,
            cache_hits=self._cache_hits,
            classified=self._classified,
            failed=self._failed,
            drain_rate_per_s=self._rate.per_second,
            claims_won=self._claims_won,
            claims_lost=self._claims_lost,
            claim_errors=self._claim_errors,
            takeovers=self._takeovers,
            waited_hits=self._waited_hits,
            wait_timeouts=self._wait_timeouts,
        )

    # --- the actor -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as flights:
            task_status.started()
            async with self._receive:
                async for envelope in self._receive:
                    self._route(envelope, flights)

    def _route(self, envelope: Envelope[Answer], flights: trio.Nursery) -> None:
        h = envelope.request.image_hash
        flight = self._flights.get(h)
        if flight is not None:
            self._coalesced += 1
            flight.waiters.append(envelope.reply)
            return
        if trio.current_time() >= envelope.deadline:
            send_reply(envelope.reply, outcome.Error(DeadlineExceeded("deadline passed in queue")))
            return
        if len(self._flights) >= self._max_in_flight:
            self._refused += 1
            send_reply(
                envelope.reply,
                outcome.Error(
                    Overloaded("too much work in flight", retry_after_s=self.retry_after_s())
                ),
            )
            return
        self._flight_count += 1
        flight = _Flight(
            envelope.request,
            envelope.deadline,
            [envelope.reply],
            owner=f"{self._owner}/{self._flight_count}",
        )
        self._flights[h] = flight
        self._looking_up += 1
        flights.start_soon(self._fly, flight)

    async def _fly(self, flight: _Flight) -> None:
        result: outcome.Outcome[tuple[CachedEntry | None, Classification | None]]
        try:
            with trio.fail_after(
                max(flight.deadline - trio.current_time(), 0) + self._flight_grace_s
            ):
                entry = await self._cache.lookup(flight.image_hash)
                if entry is None:
                    # Not known anywhere: refuse now if no classifier could take it,
                    # before claiming it across replicas for work that cannot happen.
                    refusal = self._chain.refusal(
                        flight.deadline, received_at=flight.request.received_at
                    )
                    if refusal is not None:
                        raise refusal
                    entry = await self._coordinate(flight)
                classification = None
                if entry is None:
                    # No checkpoint between this and the chain queueing the work.
                    self._handed_over(flight)
                    classification = await self._chain.classify(flight.request, flight.deadline)
            result = outcome.Value((entry, classification))
        except trio.Cancelled:
            del self._flights[flight.image_hash]
            self._handed_over(flight)
            for waiter in flight.waiters:
                send_reply(waiter, outcome.Error(Draining("the service is shutting down")))
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_ON_CANCEL_S):
                await self._release(flight)
            raise
        except trio.TooSlowError:
            result = outcome.Error(DeadlineExceeded("no classifier answered in time"))
        except XintuError as exc:
            result = outcome.Error(exc)
        except Exception as exc:
            log.exception("flight_failed", image_hash=flight.image_hash[:12])
            result = outcome.Error(ClassifierError(f"classification failed: {type(exc).__name__}"))

        # From here to the answers there is no checkpoint: a request arriving now
        # either joined this flight or will find the result in the LRU.
        del self._flights[flight.image_hash]
        self._handed_over(flight)
        self._rate.record()
        if isinstance(result, outcome.Error):
            self._failed += 1
            for waiter in flight.waiters:
                # A fresh Outcome each: an Outcome can be unwrapped only once.
                send_reply(waiter, outcome.Error(result.error))
            # Let a process waiting on our claim take over now rather than at expiry.
            await self._release(flight)
            return
        entry, classification = result.unwrap()
        if entry is not None:
            self._cache_hits += 1
            hit = Answer(entry.classification, flight.image_hash, from_cache=True)
            self._cache.record_hit(flight.image_hash, len(flight.waiters))
            self._chain.cached_hit(entry, flight.data)
            for waiter in flight.waiters:
                send_reply(waiter, outcome.Value(hit))
            return
        assert classification is not None
        self._classified += 1
        now = datetime.now(UTC)
        self._cache.remember(CachedEntry(flight.image_hash, classification, 0, now, None))
        answer = Answer(classification, flight.image_hash, from_cache=False)
        for waiter in flight.waiters:
            send_reply(waiter, outcome.Value(answer))
        await self._writer.put(ResultWrite(flight.image_hash, classification, len(flight.data)))

    def _handed_over(self, flight: _Flight) -> None:
        """The flight no longer waits before the chain (handed to it, or ended)."""
        if flight.looking_up:
            flight.looking_up = False
            self._looking_up -= 1

    # --- coalescing across processes -------------------------------------------------

    async def _coordinate(self, flight: _Flight) -> CachedEntry | None:
        """After a store miss: another process's answer, or ``None`` to classify here.

        Runs inside the flight's ``fail_after``; ``flight.claimed`` tells whether
        this flight holds the claim when it returns.
        """
        won = await self._claim(flight)
        if won is None:
            return None  # the store failed: availability first
        if won:
            return await self._own(flight, takeover=False)
        self._claims_lost += 1
        log.debug("claim_lost", image_hash=flight.image_hash[:12])
        start = trio.current_time()
        give_up_at = start + max(flight.deadline - start, 0.0) / 2
        delay = POLL_MIN_S
        while True:
            await trio.sleep_until(min(trio.current_time() + delay, give_up_at))
            delay = min(delay * 2, POLL_MAX_S)
            entry = await self._read_store(flight)
            if entry is not None:
                self._waited_hits += 1
                return entry
            if trio.current_time() >= give_up_at:
                self._wait_timeouts += 1
                log.info(
                    "claim_wait_timeout",
                    image_hash=flight.image_hash[:12],
                    waited_s=round(trio.current_time() - start, 3),
                )
                return None
            won = await self._claim(flight)
            if won is None:
                return None
            if won:
                return await self._own(flight, takeover=True)

    async def _claim(self, flight: _Flight) -> bool | None:
        """Try the store claim: won, lost, or ``None`` when the store failed."""
        try:
            won = await self._cache.store.claim(
                flight.image_hash,
                flight.owner,
                now=self._wall_clock(),
                ttl_s=self._claim_ttl_s,
            )
        except StoreError as exc:
            self._claim_errors += 1
            log.warning("claim_failed", image_hash=flight.image_hash[:12], error=str(exc))
            return None
        flight.claimed = won
        return won

    async def _own(self, flight: _Flight, *, takeover: bool) -> CachedEntry | None:
        """Claim won: read the store once more, as the owner's answer (or any) may
        have been stored between our last read and our claim; else classify here."""
        entry = await self._read_store(flight)
        if entry is not None:
            await self._release(flight)
            if takeover:
                self._waited_hits += 1
            return entry
        self._claims_won += 1
        if takeover:
            self._takeovers += 1
            log.info("claim_taken_over", image_hash=flight.image_hash[:12])
        return None

    async def _read_store(self, flight: _Flight) -> CachedEntry | None:
        """The store's answer for the flight (into the LRU), or ``None``; a store
        error counts as not there yet."""
        try:
            entry = await self._cache.store.get(flight.image_hash)
        except StoreError as exc:
            log.info("claim_poll_failed", image_hash=flight.image_hash[:12], error=str(exc))
            return None
        if entry is not None:
            self._cache.remember(entry)
        return entry

    async def _release(self, flight: _Flight) -> None:
        """Give the flight's claim back, if it holds one; best effort."""
        if not flight.claimed:
            return
        flight.claimed = False
        try:
            await self._cache.store.release_claim(flight.image_hash, flight.owner)
        except StoreError as exc:
            log.warning("claim_release_failed", image_hash=flight.image_hash[:12], error=str(exc))


def _utc_now() -> datetime:
    return datetime.now(UTC)
