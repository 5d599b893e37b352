"""Upgrades: local answers served from the cache get the LLM's answer, at a budget.

::

    local model answered ──local_answered()──▶ spool (bytes on disk, by hash)
    hit on a local answer ──offer()──▶ budget? ──▶ queue ──▶ worker ──▶ LlmPool.offer_recheck
      (check-cache, batch,              │ no: dropped     (bounded)   │ bytes from the spool
       an upload of a known photo)      ▼ (dropped_budget)            │ (none: no_bytes)
                                                                      ▼
    the LLM's answer ──upgraded()──▶ replaces the local one (runtime), spool file deleted

The album checks first and never uploads a photo it has sent before, so a local
answer served by check-cache or batch-check-cache would stay local for ever. Each
hit on a local answer, while some LLM provider is healthy, offers the photo for an
upgrade. The bytes come from the spool (:mod:`._spool`), written when the local
model answered; an upload of a known photo brings its own.

The LLM must not be flooded: an album that syncs 10,000 local answers makes 10,000
offers in a minute. So an offer is taken only with a token of the budget
(``store.upgrades_per_minute``: a bucket of that many, refilled over a minute;
none left: ``dropped_budget``), into a bounded queue (``store.upgrade_queue``;
full: ``dropped_full``), and a hash already queued is not queued twice. Every
drop is harmless: the next hit on the answer offers it again. One worker takes
the queue in order, reads the bytes (none: ``no_bytes``, the token is given
back), waits while the LLM pool's own recheck queue is full or no provider is
healthy (looked at every :data:`POLL_S`), and hands the photo to
:meth:`~xintu.llm.LlmPool.offer_recheck` (``sent``; refused: ``dropped_llm``).
The LLM pool runs it when a worker of its own is idle, and its answer comes back
through the runtime (:meth:`Upgrades.upgraded`), which replaces the local answer
in the LRU and the store (``upgraded``) and deletes the spooled bytes.

An operator's re-classification (:meth:`Upgrades.reclassify`, ``/admin/reclassify``)
uses the same worker and the same budget, waiting for tokens instead of being
dropped: its hashes go to a queue of their own (same bound) behind the hits' ones,
and their answers replace whatever is stored, an LLM answer included
(``ResultWrite.replace``). Only the LLM pool's public methods are used.

Nothing is spooled or queued unless the upgrades are :attr:`~Upgrades.enabled`: an
LLM provider whose pool takes rechecks (``llm.recheck_queue`` > 0) and a budget
(``store.upgrades_per_minute`` > 0); the spool's directory is made only then.

A purge (:meth:`Upgrades.purged`) sticks: for :data:`PURGED_TTL_S` after it (at most
:data:`PURGED_KEPT` hashes remembered) the photo is not offered nor sent again, a
recheck's answer for it is dropped (:meth:`Upgrades.recently_purged`, asked by the
runtime), and bytes handed to the spooler before the purge are not kept (not
written, or deleted once written).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
import trio

from ..llm import LlmPoolStatistics
from ._spool import Spool, SpoolStatistics

__all__ = [
    "MAX_HELD_BYTES",
    "POLL_S",
    "PURGED_KEPT",
    "PURGED_TTL_S",
    "ReclassifyReport",
    "Upgrades",
    "UpgradesStatistics",
]

log = structlog.get_logger("xintu.upgrades")

#: How often the worker looks again at an LLM pool that cannot take a recheck now.
POLL_S = 0.5
# Photos offered for spooling at once, waiting for their file to be written.
_SPOOL_INBOX = 16
#: Bytes of photos the queue holds in memory (an upload of a known photo brings its
#: own); past it, an offer's photo goes to the spool and the queue keeps its hash.
MAX_HELD_BYTES = 64 * 1024 * 1024
#: Seconds a purge is remembered: an LLM answer for the photo arriving meanwhile
#: (a recheck sent, queued in the LLM pool, or under way at the purge) is dropped.
PURGED_TTL_S = 600.0
#: Most purged hashes remembered (the oldest are forgotten first).
PURGED_KEPT = 10_000


class UpgradeTarget(Protocol):
    """What the upgrades need of the LLM pool (its public methods only)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def rechecks_enabled(self) -> bool: ...

    def healthy(self) -> bool: ...

    def offer_recheck(self, data: bytes, image_hash: str) -> bool: ...

    def statistics(self) -> LlmPoolStatistics: ...


@dataclass(frozen=True, slots=True)
class UpgradesStatistics:
    queued: int  # offers taken into the queue (hits and operators' hashes)
    queue_depth: int  # waiting in the queues now
    max_queued: int
    dropped_budget: int  # offers refused: the budget had no token left
    dropped_full: int  # offers refused: the queue was full
    dropped_llm: int  # the LLM pool refused the recheck (its queue full, unhealthy)
    no_bytes: int  # no spooled bytes for the photo: cannot be upgraded
    sent: int  # handed to the LLM pool
    upgraded: int  # LLM answers that replaced a local one (or an operator's choice)
    per_minute: int
    spool: SpoolStatistics | None = None
    spool_dropped: int = 0  # photos not spooled: the spool's inbox was full


@dataclass(frozen=True, slots=True)
class ReclassifyReport:
    """What an operator's re-classification did with the hashes it was given."""

    matched: int  # hashes asked for (or found by the query)
    queued: int  # queued for the LLM
    no_bytes: int  # no spooled bytes: cannot be re-classified here
    dropped: int  # the operators' queue was full
    already_queued: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "matched": self.matched,
            "queued": self.queued,
            "no_bytes": self.no_bytes,
            "dropped": self.dropped,
            "already_queued": self.already_queued,
        }


class _Budget:
    """A token bucket: *per_minute* tokens, refilled evenly over a minute."""

    def __init__(self, per_minute: int) -> None:
        self.size = float(per_minute)
        self._rate = per_minute / 60.0
        self._tokens = float(per_minute)
        self._at: float | None = None

    def _refill(self) -> None:
        now = trio.current_time()
        if self._at is not None:
            self._tokens = min(self.size, self._tokens + (now - self._at) * self._rate)
        self._at = now

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        self._tokens = min(self.size, self._tokens + 1.0)

    def wait_s(self) -> float:
        """Seconds until a token is there."""
        self._refill()
        if self._tokens >= 1.0:
            return 0.0
        return math.inf if self._rate == 0 else (1.0 - self._tokens) / self._rate


class Upgrades:
    """The upgrade actor; see the module docstring. *llm*: the LLM pool."""

    def __init__(
        self,
        llm: UpgradeTarget,
        spool: Spool,
        *,
        per_minute: int,
        queue_size: int,
        max_held_bytes: int = MAX_HELD_BYTES,
    ) -> None:
        if per_minute < 0 or queue_size < 1:
            raise ValueError(f"need per_minute >= 0, queue_size >= 1: {per_minute}, {queue_size}")
        self._llm = llm
        self.spool = spool
        self._per_minute = per_minute
        self._queue_size = queue_size
        self._budget = _Budget(per_minute)
        # Hashes waiting: (hash, bytes if the caller had them). Hits first.
        self._hits: OrderedDict[str, bytes | None] = OrderedDict()
        self._asked: OrderedDict[str, None] = OrderedDict()  # an operator's
        # An operator's, sent: their answer replaces any (bounded: a recheck that
        # failed leaves its hash here until it is pushed out).
        self._forced: OrderedDict[str, None] = OrderedDict()
        self._held_bytes = 0  # photo bytes in self._hits
        self._max_held_bytes = max_held_bytes
        # Photos handed to the spooler and not written yet: the worker waits for them.
        self._spooling: dict[str, trio.Event] = {}
        self._wake = trio.Event()
        # (hash, bytes, the purge count when it was handed over).
        self._spool_send, self._spool_receive = trio.open_memory_channel[tuple[str, bytes, int]](
            _SPOOL_INBOX
        )
        # Purged recently: hash -> (the purge count then, when), oldest first.
        self._purges = 0
        self._purged: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._closed = False
        self._queued = 0
        self._dropped_budget = 0
        self._dropped_full = 0
        self._dropped_llm = 0
        self._no_bytes = 0
        self._sent = 0
        self._upgraded = 0
        self._spool_dropped = 0

    @property
    def enabled(self) -> bool:
        """Whether local answers can be upgraded at all: an LLM whose pool takes
        rechecks (``llm.recheck_queue`` > 0), a budget, and not closed."""
        return (
            self._llm.enabled
            and self._llm.rechecks_enabled
            and self._per_minute > 0
            and not self._closed
        )

    def statistics(self) -> UpgradesStatistics:
        return UpgradesStatistics(
            queued=self._queued,
            queue_depth=len(self._hits) + len(self._asked),
            max_queued=self._queue_size,
            dropped_budget=self._dropped_budget,
            dropped_full=self._dropped_full,
            dropped_llm=self._dropped_llm,
            no_bytes=self._no_bytes,
            sent=self._sent,
            upgraded=self._upgraded,
            per_minute=self._per_minute,
            spool=self.spool.statistics(),
            spool_dropped=self._spool_dropped,
        )

    # --- lifetime ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Index the spool, then spool photos and send upgrades until :meth:`close`.
        The spool (its directory) is opened only when upgrades are enabled."""
        if self.enabled and self.spool.enabled:
            await self.spool.open()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._spooler)
            task_status.started()
            await self._work()
            nursery.cancel_scope.cancel()

    def close(self) -> None:
        """Take nothing more; what is queued is dropped (offered again after a restart
        by the next hit)."""
        self._closed = True
        self._spool_send.close()
        self._wake.set()

    # --- the producers ---------------------------------------------------------------

    def local_answered(self, image_hash: str, data: bytes) -> None:
        """The local model answered *image_hash*: keep its bytes for an upgrade
        (never waits; a full spool inbox drops the photo, counted)."""
        if not self.enabled or not self.spool.enabled or not data:
            return
        if image_hash in self._spooling:
            return
        try:
            self._spool_send.send_nowait((image_hash, data, self._purges))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._spool_dropped += 1
        else:
            self._spooling[image_hash] = trio.Event()

    def offer(self, image_hash: str, data: bytes | None = None) -> bool:
        """A hit on a local answer: queue its upgrade if the budget and the queue
        allow (never waits). *data*: the photo's bytes when the caller has them."""
        if not self.enabled or not self._llm.healthy() or self.recently_purged(image_hash):
            return False
        if image_hash in self._hits or image_hash in self._asked:
            return True
        if len(self._hits) >= self._queue_size:
            self._dropped_full += 1
            return False
        if not self._budget.take():
            self._dropped_budget += 1
            return False
        if data and self._held_bytes + len(data) > self._max_held_bytes:
            self.local_answered(image_hash, data)  # the worker reads it from the spool
            data = None
        self._hits[image_hash] = data or None
        self._held_bytes += len(data or b"")
        self._queued += 1
        self._wake.set()
        return True

    async def reclassify(self, hashes: Sequence[str]) -> ReclassifyReport:
        """An operator's re-classification of *hashes*: those with spooled bytes are
        queued (paced by the budget, never dropped for it), their answers replacing
        whatever is stored."""
        wanted = list(dict.fromkeys(hashes))
        if not self.enabled:
            return ReclassifyReport(len(wanted), 0, 0, len(wanted))
        have = await self.spool.has(wanted) if self.spool.enabled else set()
        queued = dropped = already = 0
        for h in wanted:
            if h not in have:
                continue
            if h in self._asked:
                already += 1
                continue
            if len(self._asked) >= self._queue_size:
                dropped += 1
                continue
            self._asked[h] = None
            queued += 1
        self._queued += queued
        if queued:
            self._wake.set()
        no_bytes = len(wanted) - len(have)
        self._no_bytes += no_bytes
        return ReclassifyReport(len(wanted), queued, no_bytes, dropped, already)

    # --- the answers ---------------------------------------------------------------

    async def upgraded(self, image_hash: str) -> bool:
        """An LLM answer for *image_hash* replaces the cached one: delete its spooled
        bytes; ``True`` if an operator asked for it (the answer replaces any)."""
        forced = image_hash in self._forced
        self._forced.pop(image_hash, None)
        self._upgraded += 1
        await self.spool.delete(image_hash)
        return forced

    async def purged(self, image_hash: str) -> None:
        """The entry of *image_hash* was purged: forget it here too, and remember the
        purge for a while (:meth:`recently_purged`)."""
        self._purges += 1
        self._purged.pop(image_hash, None)
        self._purged[image_hash] = (self._purges, trio.current_time())
        self._forget_old_purges()
        data = self._hits.pop(image_hash, None)
        self._held_bytes -= len(data or b"")
        self._asked.pop(image_hash, None)
        self._forced.pop(image_hash, None)
        await self.spool.delete(image_hash)

    def recently_purged(self, image_hash: str) -> bool:
        """Whether *image_hash* was purged less than :data:`PURGED_TTL_S` ago: an LLM
        answer for it is then dropped."""
        self._forget_old_purges()
        return image_hash in self._purged

    def _purged_since(self, image_hash: str, purges: int) -> bool:
        """Whether *image_hash* was purged after the purge count was *purges*."""
        self._forget_old_purges()
        at = self._purged.get(image_hash)
        return at is not None and at[0] > purges

    def _forget_old_purges(self) -> None:
        now = trio.current_time()
        while self._purged:
            _, (_, at) = next(iter(self._purged.items()))
            if len(self._purged) <= PURGED_KEPT and now - at < PURGED_TTL_S:
                break
            self._purged.popitem(last=False)

    # --- the workers ---------------------------------------------------------------

    async def _spooler(self) -> None:
        async with self._spool_receive:
            async for image_hash, data, purges in self._spool_receive:
                try:
                    # Purged since it was handed over: not kept (deleted if the
                    # purge came while it was being written).
                    if not self._purged_since(image_hash, purges):
                        await self.spool.put(image_hash, data)
                        if self._purged_since(image_hash, purges):
                            await self.spool.delete(image_hash)
                finally:
                    self._spooling.pop(image_hash, trio.Event()).set()

    async def _work(self) -> None:
        while not self._closed:
            if not self._hits and not self._asked:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            if self._hits:
                image_hash, data = self._hits.popitem(last=False)
                self._held_bytes -= len(data or b"")
                forced = False
            else:
                # An operator's: paced by the budget, waiting for a token.
                wait_s = self._budget.wait_s()
                if wait_s > 0:
                    self._wake = trio.Event()
                    with trio.move_on_after(min(wait_s, 60.0)):
                        await self._wake.wait()  # a hit may come in meanwhile
                    continue
                if not self._budget.take():
                    continue
                image_hash, _ = self._asked.popitem(last=False)
                data, forced = None, True
            if data is None:
                if (writing := self._spooling.get(image_hash)) is not None:
                    await writing.wait()
                data = await self.spool.get(image_hash)
            if data is None:
                self._no_bytes += 1
                self._budget.give_back()
                continue
            await self._send(image_hash, data, forced=forced)

    async def _send(self, image_hash: str, data: bytes, *, forced: bool) -> None:
        """Hand the photo to the LLM pool once it can take a recheck."""
        while not self._closed and not self._llm_has_room():
            # The pool tells nobody when it has room: look again after a while
            # (close() wakes this at once).
            self._wake = trio.Event()
            with trio.move_on_after(POLL_S):
                await self._wake.wait()
        if self._closed or self.recently_purged(image_hash):
            return
        if forced:
            self._forced[image_hash] = None
            while len(self._forced) > 2 * self._queue_size:
                self._forced.popitem(last=False)
        if self._llm.offer_recheck(data, image_hash):
            self._sent += 1
            log.info("llm_upgrade_sent", image_hash=image_hash[:12], operator=forced)
        else:
            self._forced.pop(image_hash, None)
            self._dropped_llm += 1

    def _llm_has_room(self) -> bool:
        if not self._llm.healthy():
            return False
        stats = self._llm.statistics()
        return stats.recheck_queued < stats.recheck_max_queued
