"""The writer: the only actor that writes to the store.

Producers hand it :class:`~xintu.store.ResultWrite`, :class:`~xintu.store.HitIncrement`,
:class:`~xintu.store.RequestLogRow` and :class:`~xintu.store.AliasWrite` operations.
The writer gathers up to ``writer_batch`` operations or ``writer_flush_ms`` of them,
whichever comes first, and applies the lot as one :class:`~xintu.store.WriteBatch`
in one transaction. While it gathers, an operation offered does not wake it: it
wakes when the inbox holds the rest of a batch (or is half full), when closed or
when a spill took the queue, and takes what came when the window ends.

Hit increments are folded as they are offered: a table in memory keeps one count
per image (+1 ... +1 becomes +N), so a hit never takes a slot of the inbox, and the
writer takes the table into a batch. The table holds at most ``max_hit_hashes``
distinct images (default: the inbox size); a hit for a new image past that bound is
queued as an ordinary operation (into the inbox, or the journal past it). Hits are
taken from the table only into a batch that holds (or follows the commit of) every
operation accepted before them, so a hit never reaches the store before the result
it counts.

Nothing offered is dropped while the process lives, given a journal
(``journal_dir``, normally ``<data dir>/journal``): an operation that finds the bounded
inbox full goes to an overflow list, and a task of the writer's moves the inbox, that
list and the hit table to the journal (in batches of their own, in order), at once;
it does the same whenever the inbox is half full while the store is failing, also
while a commit attempt is still running. Before it takes newer work, the writer
replays those journal files, exactly once (see below). So :meth:`Writer.offer` and
:meth:`Writer.put` never wait for the store and never lose an operation; what load the
store cannot take waits on local disk. ``ops_dropped`` stays 0 except when the journal
itself cannot be written (the operations are then logged as ``journal_write_failed``
and counted), without a journal directory (operations past the full inbox are
dropped, counted and logged as ``store_writes_dropped``; :meth:`Writer.put` then
waits for room instead), and for an operation offered after the writer stopped
(``write_after_stop``).

A batch keeps its ``batch_id`` across retries, and the store applies a batch id at
most once, so a retry after an ambiguous failure (the commit may have happened)
never counts a hit twice. While the store is down the batch is retried with
exponential backoff. Journaled batches keep their ids too, so the replay is exactly
once.

With a journal, nothing the writer holds is lost to a store outage at shutdown:
once :meth:`Writer.close` has been called, a batch the store refuses is not retried
any more; that batch (with its id, in a file dated when it was taken, so that a
later start replays it before what was journaled after it) and everything still
queued or folded go to the journal (:mod:`._journal`) and the writer returns. The
same happens if the writer is cancelled with writes in hand, and for an operation
handed over after the writer stopped (:meth:`Writer.put` only). At start, before it
takes new work, the writer replays the journal files it finds, each batch under its
original id, so each is applied exactly once, and deletes each file once all of it
committed. While the store is failing, :attr:`WriterStatistics.store_healthy` is
false: the readiness check reports the degraded store from it.

Writes the store refuses for good (:class:`~xintu.errors.StoreRejected`: an unknown
column, a NOT NULL column without a default, a value too long, a constraint) are not
retried, since no retry can succeed until the schema changes, and they must not
stall the writes behind them. A refused batch that mixes the cache's writes
(results, aliases, hit counts) with request-log rows is split once: the cache's part
is tried again under the batch's own id, the log's under ``<id>/log``, so a broken
``request_log`` costs log rows only. What is still refused is logged
(``store_write_rejected``), counted (``poisoned_batches``) and set aside, with its
batch id, in the *poison journal* ``<journal_dir>/poison/`` (same file format), which
the ordinary replay never reads. Poisoned batches are tried again, each once, when a
writer next starts on the data directory (after the ordinary replay), or when
:meth:`Writer.replay_poisoned` is called (after the operator fixed the schema):
those that commit leave the poison journal, the others stay. Without a journal
directory a refused batch is dropped (counted in ``ops_dropped``, logged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
import trio

from ..errors import StoreError, StoreRejected
from ..store import AliasWrite, HitIncrement, RequestLogRow, ResultWrite, Store, WriteBatch
from ._journal import ClaimedFile, Journal

__all__ = ["WriteOp", "Writer", "WriterStatistics"]

log = structlog.get_logger("xintu.writer")

WriteOp = ResultWrite | HitIncrement | RequestLogRow | AliasWrite

# The poison journal: a subdirectory of the journal directory.
POISON_DIR = "poison"


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    queued: int
    max_queued: int
    batches_applied: int
    batches_duplicate: int
    ops_applied: int
    ops_dropped: int
    retries: int
    pending: int  # operations taken from the inbox but not yet committed
    store_healthy: bool  # false while store writes are failing (degraded)
    journaled_ops: int  # operations written to the journal instead of the store
    journal_files: int  # journal files this writer wrote
    replayed_batches: int  # journaled batches committed by this writer's replay
    replaying: bool  # a journal replay is still in progress
    poisoned_batches: int  # batches the store refused for good, set aside by this writer
    poisoned_ops: int  # operations in those batches
    poison_pending_ops: int  # operations in the poison journal on disk (last count)
    poison_replayed_batches: int  # poisoned batches that committed on a later try
    overflow_queued: int = 0  # operations past the full inbox, on their way to the journal
    overflowed_ops: int = 0  # operations that found the inbox full (all journaled or dropped)
    hit_hashes: int = 0  # distinct images in the hit fold table now
    max_hit_hashes: int = 0  # the table's bound
    hits_folded: int = 0  # hit increments taken into the table (none took an inbox slot)


class _Tally:
    """Hits folded for one image: their sum, the latest time, how many operations."""

    __slots__ = ("count", "last", "ops")

    def __init__(self, count: int, last: datetime) -> None:
        self.count = count
        self.last = last
        self.ops = 1


class Writer:
    """Batches store writes; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        inbox_size: int,
        max_batch: int,
        flush_ms: int,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
        batch_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        journal_dir: Path | None = None,
        max_hit_hashes: int | None = None,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._flush_s = flush_ms / 1000.0
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._new_batch_id = batch_id
        self._journal = Journal(journal_dir) if journal_dir is not None else None
        self._poison = Journal(journal_dir / POISON_DIR) if journal_dir is not None else None
        self._poison_lock = trio.Lock()  # one replay of the poison journal at a time
        self._poisoned_batches = 0
        self._poisoned_ops = 0
        self._poison_pending_ops = 0
        self._poison_replayed = 0
        self._send, self._receive = trio.open_memory_channel[WriteOp](inbox_size)
        self._max_queued = inbox_size
        self._batches_applied = 0
        self._batches_duplicate = 0
        self._ops_applied = 0
        self._ops_dropped = 0
        self._drop_logged = False  # the current run of drops has been logged
        self._retries = 0
        self._pending = 0
        self._store_healthy = True
        self._journaled_ops = 0
        self._journal_files = 0
        self._replayed_batches = 0
        self._replaying = False
        # Hit increments folded per image. A table taken while older operations were
        # still queued is *sealed*: it waits until the inbox has been taken up to
        # the mark (the inbox's count of accepted operations when it was sealed).
        self._max_hit_hashes = max(1, max_hit_hashes if max_hit_hashes is not None else inbox_size)
        self._hits: dict[str, _Tally] = {}
        self._sealed: dict[str, _Tally] | None = None
        self._seal_mark = 0
        self._hits_folded = 0
        # Operations that found the inbox full (only with a journal), oldest first;
        # while it holds any, new operations join it, so that order is kept.
        self._overflow: list[WriteOp] = []
        self._overflowed = 0
        # Operations were journaled while the writer ran: replay them before newer
        # work. The generation tells the batch being gathered that a spill took the
        # queue meanwhile: what it would take next is newer than that file.
        self._spilled = False
        self._spill_gen = 0
        # Wakes the overflow guard: the overflow list has operations, or the store is
        # failing and the inbox is half full.
        self._spill_wanted = trio.Event()
        # Held while a spill writes its file, so a replay never misses a file that is
        # being written.
        self._spill_lock = trio.Lock()
        self._closing = trio.Event()
        # Something for the writer to do (set by producers, the guard and close).
        self._work = trio.Event()
        # While the writer gathers a batch: the inbox depth that wakes it (0: any
        # operation does). See _gather.
        self._wake_at = 0
        # Operations taken from the inbox, and the batch made of them being committed
        # (and when it was made): what the journal must keep if the writer stops now.
        self._taken: list[WriteOp] = []
        self._in_hand: WriteBatch | None = None
        self._in_hand_at: datetime | None = None
        self._idle = trio.Event()
        self._idle.set()
        # Operations accepted into the inbox, and operations taken out of it (by the
        # writer or a spill); a sealed hit table waits for the second to reach its mark.
        self._accepted = 0
        self._received = 0
        self._stopped = False

    # --- producers -----------------------------------------------------------------

    def offer(self, op: WriteOp) -> bool:
        """Hand over *op* without waiting: a hit increment is folded, anything else
        queued (journaled past the full inbox). True if accepted; False only if it
        was dropped (counted): no journal and the inbox full, or the writer stopped.
        """
        if self._stopped:
            self._lose(1, "write_after_stop")
            return False
        if isinstance(op, HitIncrement) and self._fold_hit(op):
            return True
        return self._enqueue(op)

    async def put(self, op: WriteOp) -> None:
        """Hand over *op*: for results and aliases, which must not be lost.

        With a journal, as :meth:`offer` (never waits; after the writer stopped the
        operation is journaled here). Without one, waits for room in the inbox (a hit
        increment is folded as by :meth:`offer` while the table has room).
        """
        if isinstance(op, HitIncrement) and not self._stopped and self._fold_hit(op):
            await trio.lowlevel.checkpoint()
            return
        if self._journal is None:
            try:
                await self._send.send(op)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._lose(1, "write_after_close")
                return
            self._accepted += 1
            self._busy()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._stopped:
            with trio.CancelScope(shield=True):
                await self._spill(None, [op])
            return
        self._enqueue(op)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self) -> None:
        """No more operations: the writer flushes what it has and returns.

        With a journal, a store that still refuses writes is not waited for: what
        is left is journaled (see the module docstring).
        """
        self._closing.set()
        self._send.close()
        self._work.set()

    async def wait_idle(self) -> None:
        """Wait until everything handed over so far (and any journal replay) is
        committed, or the writer stopped."""
        while not self._stopped and self._has_work():
            if self._idle.is_set():  # set before this work came: wait for the next
                self._idle = trio.Event()
            await self._idle.wait()

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            queued=self._receive.statistics().current_buffer_used,
            max_queued=self._max_queued,
            batches_applied=self._batches_applied,
            batches_duplicate=self._batches_duplicate,
            ops_applied=self._ops_applied,
            ops_dropped=self._ops_dropped,
            retries=self._retries,
            pending=self._pending,
            store_healthy=self._store_healthy,
            journaled_ops=self._journaled_ops,
            journal_files=self._journal_files,
            replayed_batches=self._replayed_batches,
            replaying=self._replaying,
            poisoned_batches=self._poisoned_batches,
            poisoned_ops=self._poisoned_ops,
            poison_pending_ops=self._poison_pending_ops,
            poison_replayed_batches=self._poison_replayed,
            overflow_queued=len(self._overflow),
            overflowed_ops=self._overflowed,
            hit_hashes=len(self._hits) + len(self._sealed or ()),
            max_hit_hashes=self._max_hit_hashes,
            hits_folded=self._hits_folded,
        )

    def _fold_hit(self, op: HitIncrement) -> bool:
        """Fold *op* into the hit table; False if it is a new image and the table
        is full (the caller queues it as an ordinary operation)."""
        tally = self._hits.get(op.image_hash)
        if tally is None:
            if len(self._hits) + len(self._sealed or ()) >= self._max_hit_hashes:
                return False
            self._hits[op.image_hash] = _Tally(op.count, op.last_hit_at)
            self._busy()
        else:
            tally.count += op.count
            tally.ops += 1
            if op.last_hit_at > tally.last:
                tally.last = op.last_hit_at
        self._hits_folded += 1
        return True

    def _enqueue(self, op: WriteOp) -> bool:
        """Queue *op* in the inbox, or past it in the overflow list (journal only)."""
        if not self._overflow:
            try:
                self._send.send_nowait(op)
            except trio.WouldBlock:
                pass
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                if self._journal is None:
                    self._lose(1, "write_after_close")
                    return False
            else:
                self._accepted += 1
                self._drop_logged = False
                self._busy()
                self._watch_overflow()
                return True
        if self._journal is None:
            self._overflowed += 1
            self._lose(1, "store_writes_dropped")
            return False
        self._overflow.append(op)
        self._overflowed += 1
        self._busy()
        self._spill_wanted.set()
        return True

    def _lose(self, count: int, event: str) -> None:
        """Count *count* dropped operations; log the first of a run of drops."""
        self._ops_dropped += count
        if not self._drop_logged:
            self._drop_logged = True
            log.error(event, operations=count, dropped_total=self._ops_dropped)

    def _busy(self) -> None:
        if self._idle.is_set():
            self._idle = trio.Event()
        if not self._wake_at or self._accepted - self._received >= self._wake_at:
            self._work.set()

    def _has_work(self) -> bool:
        return bool(
            self._received < self._accepted
            or self._receive.statistics().current_buffer_used
            or self._overflow
            or self._hits
            or self._sealed
            or self._pending
            or self._replaying
            or self._spilled
        )

    def _settle(self) -> None:
        if not self._has_work():
            self._idle.set()

    # --- the actor -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replay the journal, then batch and commit operations until closed."""
        journal, poison = self._journal, self._poison
        if journal is not None and poison is not None:
            pending: list[Path] = await trio.to_thread.run_sync(journal.pending)
            poisoned: list[Path] = await trio.to_thread.run_sync(poison.pending)
            if pending or poisoned:
                self._replaying = True
                self._idle = trio.Event()
            if poisoned:
                self._poison_pending_ops = await trio.to_thread.run_sync(poison.count_operations)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if journal is not None:
                    nursery.start_soon(self._overflow_guard)
                try:
                    if self._replaying:
                        await self._replay(poisoned=True)
                    await self._loop()
                except trio.Cancelled:
                    # Cancelled with writes in hand (a shutdown that ran out of time):
                    # keep them.
                    if journal is not None:
                        with trio.CancelScope(shield=True):
                            await self._spill_rest(self._in_hand, self._pending)
                    raise
                nursery.cancel_scope.cancel()
        finally:
            self._in_hand = None
            self._taken = []
            self._pending = 0
            self._replaying = False
            self._stopped = True
            self._receive.close()
            self._idle.set()

    async def _loop(self) -> None:
        while True:
            while self._spilled:  # journaled while running: before newer work
                self._spilled = False
                self._replaying = True
                await self._replay()
            ops = await self._gather()
            hits = self._take_hits()
            if not ops and hits is None:
                if self._finished():
                    self._stopped = True  # from here on a late operation is refused
                    return
                continue
            count = len(ops) + (sum(t.ops for t in hits.values()) if hits else 0)
            self._pending = count
            batch = _fold(self._new_batch_id(), ops, hits)
            self._in_hand = batch
            self._in_hand_at = datetime.now(UTC)
            set_aside = self._poisoned_ops
            if not await self._commit(batch):
                # Closing and the store is down: journal this batch and the rest.
                with trio.CancelScope(shield=True):
                    await self._spill_rest(batch, count)
                self._in_hand = None
                self._taken = []
                self._pending = 0
                return
            self._ops_applied += max(0, count - (self._poisoned_ops - set_aside))
            self._in_hand = None
            self._taken = []
            self._pending = 0
            self._settle()

    async def _gather(self) -> list[WriteOp]:
        """Up to a batch of queued operations: wait for the first thing to do (an
        operation, or hits the table may give), then up to ``flush_ms`` for more.
        Stops early (the list may be empty) when a spill has journaled the queue
        meanwhile, since what comes next is newer than that file, and when closed
        with nothing left."""
        ops: list[WriteOp] = []
        self._taken = ops
        gen = self._spill_gen
        while not (self._take_queued(ops) or self._hits_ready()):
            if self._spilled or self._finished():
                return ops
            self._work = trio.Event()
            await self._work.wait()
            if self._spill_gen != gen:
                return ops
        with trio.move_on_after(self._flush_s):
            while len(ops) < self._max_batch and not self._closing.is_set():
                # Woken only once the inbox holds the rest of a batch (or is half
                # full), by a close or a spill: not by every operation offered
                # (one wake-up per request was most of the writer's cost on the
                # event loop under hits; issue 14). What came meanwhile is taken
                # when the window ends.
                self._wake_at = min(self._max_batch - len(ops), max(1, self._max_queued // 2))
                self._work = trio.Event()
                try:
                    await self._work.wait()
                finally:
                    self._wake_at = 0
                if self._spill_gen != gen:
                    return ops
                self._take_queued(ops)
        if self._spill_gen == gen:
            self._take_queued(ops)
        return ops

    def _take_queued(self, ops: list[WriteOp]) -> bool:
        """Move what the inbox holds into *ops*, up to a batch, without waiting."""
        took = 0
        while len(ops) < self._max_batch:
            try:
                ops.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            took += 1
        self._received += took
        self._pending = len(ops)
        return took > 0

    def _hits_ready(self) -> bool:
        return bool(self._hits or self._sealed) and not self._overflow and not self._spilled

    def _take_hits(self) -> dict[str, _Tally] | None:
        """The hits the batch being made may carry: only if every operation accepted
        before them is in that batch or committed (see the module docstring)."""
        if self._spilled or self._overflow:  # older operations on their way to the journal
            return None
        sealed = self._sealed
        if sealed is not None:
            if self._received < self._seal_mark:
                return None
            self._sealed, taken = self._split_hits(sealed)
            return taken
        if not self._hits:
            return None
        if self._receive.statistics().current_buffer_used:
            self._sealed, self._seal_mark = self._hits, self._accepted
            self._hits = {}
            return None
        rest, taken = self._split_hits(self._hits)
        self._hits = rest or {}
        return taken

    def _split_hits(
        self, table: dict[str, _Tally]
    ) -> tuple[dict[str, _Tally] | None, dict[str, _Tally]]:
        """(the rest, a batch's worth of *table*): at most ``writer_batch`` images per
        batch; the rest waits for a later one (a hit may reach the store later than
        it could, never earlier)."""
        if len(table) <= self._max_batch:
            return None, table
        items = iter(table.items())
        taken = dict(itertools.islice(items, self._max_batch))
        return dict(items), taken

    def _finished(self) -> bool:
        """Closed, and nothing is left anywhere."""
        return (
            self._closing.is_set()
            and not self._receive.statistics().current_buffer_used
            and not self._overflow
            and not self._hits
            and not self._sealed
            and not self._spilled
        )

    async def _commit(self, batch: WriteBatch, *, split: bool = True) -> bool:
        """Apply *batch*, retrying with backoff while the store fails.

        A batch the store refuses for good is set aside (split first, if *split*;
        see the module docstring) and counts as done. Returns ``False`` without
        applying it when the writer should stop trying: it is closing (and has a
        journal to fall back on) or the store was closed.
        """
        delay = self._retry_initial_s
        while True:
            try:
                applied = await self._store.apply(batch)
            except trio.Cancelled:
                raise
            except StoreRejected as exc:
                self._store_recovered()  # it answered: the store itself works
                return await self._rejected(batch, exc, split=split)
            except (StoreError, trio.ClosedResourceError) as exc:
                self._retries += 1
                if self._store_healthy:
                    log.warning("store_write_failed", error=str(exc), batch=batch.batch_id)
                self._store_healthy = False
                if isinstance(exc, trio.ClosedResourceError) or (
                    self._closing.is_set() and self._journal is not None
                ):
                    return False
                self._watch_overflow()
                if self._closing.is_set():  # closing, but nowhere else to put it
                    await trio.sleep(delay)
                else:  # back off, but wake at once for a close: then one last try
                    with trio.move_on_after(delay):
                        await self._closing.wait()
                delay = min(delay * 2, self._retry_max_s)
                continue
            break
        self._store_recovered()
        if applied:
            self._batches_applied += 1
        else:
            self._batches_duplicate += 1
        return True

    def _store_recovered(self) -> None:
        if not self._store_healthy:
            log.info("store_write_recovered", retries=self._retries)
        self._store_healthy = True

    # --- writes the store refuses for good ---------------------------------------------

    async def _rejected(self, batch: WriteBatch, exc: StoreRejected, *, split: bool) -> bool:
        """Split *batch* once and commit its parts, or set it aside (see the module
        docstring). Always ``True``: every operation is committed, set aside or
        (the writer stopping half-way) journaled."""
        parts = _split(batch) if split else [batch]
        if len(parts) > 1:
            log.warning("store_write_rejected_split", batch=batch.batch_id, error=str(exc))
            for i, part in enumerate(parts):
                if not await self._commit(part, split=False):
                    # Stopping: keep the parts not yet tried, under their own ids.
                    with trio.CancelScope(shield=True):
                        for rest in parts[i:]:
                            await self._spill(rest, [], at=self._in_hand_at)
                    break
            return True
        count = _size(batch)
        self._poisoned_batches += 1
        self._poisoned_ops += count
        log.error("store_write_rejected", batch=batch.batch_id, operations=count, error=str(exc))
        with trio.CancelScope(shield=True):  # the batch must reach the file
            await self._set_aside(batch, count)
        return True

    async def _set_aside(self, batch: WriteBatch, count: int) -> None:
        poison = self._poison
        if poison is None:
            self._ops_dropped += count
            log.error("store_writes_lost", operations=count, batch=batch.batch_id)
            return
        try:
            path = await trio.to_thread.run_sync(poison.write, [_stamped(batch)])
        except OSError as exc:
            self._ops_dropped += count
            log.error("journal_write_failed", operations=count, error=str(exc), poison=True)
            return
        self._poison_pending_ops += count
        log.warning(
            "store_writes_poisoned",
            operations=count,
            batch=batch.batch_id,
            file=path.name if path is not None else None,
        )

    async def replay_poisoned(self) -> int:
        """Try every batch of the poison journal once more (after the operator fixed
        the schema); the number that committed. Those still refused stay; a store
        that cannot be reached ends the attempt and leaves the rest for later."""
        return await self._replay_poisoned()

    async def _replay_poisoned(self) -> int:
        poison = self._poison
        if poison is None:
            return 0
        committed = 0
        async with self._poison_lock:
            files = await trio.to_thread.run_sync(
                lambda: list(poison.claim()), abandon_on_cancel=False
            )
            try:
                while files:
                    claimed = files.pop(0)
                    try:
                        done, reachable = await self._replay_poisoned_file(poison, claimed)
                    finally:
                        claimed.release()  # no-op once done() deleted it
                    committed += done
                    if not reachable:
                        break
            finally:
                for claimed in files:
                    claimed.release()
            self._poison_pending_ops = await trio.to_thread.run_sync(poison.count_operations)
        if committed:
            log.info("poison_replayed", batches=committed, pending=self._poison_pending_ops)
        return committed

    async def _replay_poisoned_file(
        self, poison: Journal, claimed: ClaimedFile
    ) -> tuple[int, bool]:
        """Try the batches of one poison file once each; rewrite it without those that
        committed. (batches committed, whether the store could be reached)"""
        keep: list[WriteBatch] = []
        committed = 0
        reachable = True
        for n, batch in enumerate(claimed.batches):
            try:
                await self._store.apply(batch)
            except trio.Cancelled:
                raise
            except StoreRejected:
                keep.append(batch)
                continue
            except (StoreError, trio.ClosedResourceError) as exc:
                log.warning("poison_replay_interrupted", file=claimed.path.name, error=str(exc))
                keep.extend(claimed.batches[n:])
                reachable = False
                break
            committed += 1
            self._poison_replayed += 1
        if committed:
            with trio.CancelScope(shield=True):  # the new file first, then the old one goes
                if keep:
                    await trio.to_thread.run_sync(poison.write, keep)
                await trio.to_thread.run_sync(claimed.done)
        return committed, reachable

    # --- the journal ---------------------------------------------------------------

    def _watch_overflow(self) -> None:
        """Wake the overflow guard if the store is failing and the inbox half full."""
        if (
            not self._store_healthy
            and self._journal is not None
            and self._receive.statistics().current_buffer_used >= max(self._max_queued // 2, 1)
        ):
            self._spill_wanted.set()

    async def _overflow_guard(self) -> None:
        """Move the queue (inbox, overflow list, hit table) to the journal whenever an
        operation found the inbox full, and while the store fails whenever the inbox
        is half full: no hit count or log row is dropped and no result held up."""
        while True:
            await self._spill_wanted.wait()
            self._spill_wanted = trio.Event()
            if self._store_healthy and not self._overflow:
                continue
            with trio.CancelScope(shield=True):  # drained operations must reach the file
                async with self._spill_lock:
                    ops = self._drain_queue()
                    hits = self._drain_hits()
                    if ops or hits:
                        self._spilled = True
                        self._spill_gen += 1
                        why = "store_failing" if not self._store_healthy else "inbox_full"
                        await self._spill(None, ops, hits, reason=why)
            self._work.set()  # the writer replays it before newer work

    def _drain_queue(self) -> list[WriteOp]:
        """Everything queued, oldest first: the inbox, then the overflow list."""
        ops: list[WriteOp] = []
        while True:
            try:
                ops.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            self._received += 1
        ops += self._overflow
        self._overflow = []
        return ops

    def _drain_hits(self) -> dict[str, _Tally] | None:
        """The hit table (a sealed one merged in), emptied."""
        hits, sealed = self._hits, self._sealed
        self._hits, self._sealed = {}, None
        if sealed:
            for image_hash, tally in hits.items():
                old = sealed.get(image_hash)
                if old is None:
                    sealed[image_hash] = tally
                else:
                    old.count += tally.count
                    old.ops += tally.ops
                    old.last = max(old.last, tally.last)
            hits = sealed
        return hits or None

    async def _spill_rest(self, batch: WriteBatch | None, count: int) -> None:
        """Stopping: journal *batch* (or the operations taken for it) and everything
        still queued or folded, until nothing is left; then refuse new operations."""
        if batch is not None:
            # A file of its own, dated when the batch was taken: it sorts before the
            # files the guard wrote meanwhile (newer operations).
            await self._spill(batch, [], count=count, at=self._in_hand_at)
            loose: list[WriteOp] = []
        else:
            loose = list(self._taken)
        self._taken = []
        while True:
            ops = loose + self._drain_queue()
            hits = self._drain_hits()
            loose = []
            if not ops and hits is None:
                self._stopped = True
                return
            await self._spill(None, ops, hits)

    async def _spill(
        self,
        batch: WriteBatch | None,
        ops: Sequence[WriteOp],
        hits: dict[str, _Tally] | None = None,
        *,
        count: int | None = None,
        at: datetime | None = None,
        reason: str = "stopping",
    ) -> None:
        """Write *batch* (keeping its id), *ops* and then *hits* (in new batches) to the
        journal, as one file (named by *at*, else now); *reason* is logged.

        Without a journal, or if the journal cannot be written, they are dropped and
        counted (and logged as an error). *count*: the operations *batch* stands for.
        """
        batches = [_stamped(batch)] if batch is not None else []
        for i in range(0, len(ops), self._max_batch):
            chunk = list(ops[i : i + self._max_batch])
            batches.append(_fold(self._new_batch_id(), chunk, stamp=True))
        hit_ops = 0
        if hits:
            hit_ops = sum(t.ops for t in hits.values())
            items = list(hits.items())
            for i in range(0, len(items), self._max_batch):
                chunk_hits = dict(items[i : i + self._max_batch])
                batches.append(_fold(self._new_batch_id(), [], chunk_hits))
        if not batches:
            return
        if count is None:
            count = _size(batch) if batch is not None else 0
        count += len(ops) + hit_ops
        journal = self._journal
        if journal is None:
            self._lose(count, "store_writes_lost")
            return
        try:
            path = await trio.to_thread.run_sync(lambda: journal.write(batches, at=at))
        except OSError as exc:
            self._ops_dropped += count
            log.error("journal_write_failed", operations=count, error=str(exc))
            return
        self._journaled_ops += count
        self._journal_files += 1
        log.warning(
            "store_writes_journaled",
            reason=reason,
            operations=count,
            batches=len(batches),
            file=path.name if path is not None else None,
        )

    async def _replay(self, *, poisoned: bool = False) -> None:
        """Commit every journaled batch under its own id; delete each file once done.
        Files are read one at a time, so a backlog on disk stays on disk.

        *poisoned* (at start): then try the poison journal's batches once each."""
        journal = self._journal
        assert journal is not None
        async with self._spill_lock:  # a file being spilled is listed once written
            paths = await trio.to_thread.run_sync(journal.pending)
        try:
            for path in paths:
                claimed = await trio.to_thread.run_sync(journal.claim_path, path)
                if claimed is None:  # replayed by another process meanwhile, or locked
                    continue
                try:
                    for batch in claimed.batches:
                        if not await self._commit(batch):
                            log.warning("journal_replay_interrupted", file=claimed.path.name)
                            return
                        self._replayed_batches += 1
                    await trio.to_thread.run_sync(claimed.done)
                finally:
                    claimed.release()  # no-op once done() deleted it
                log.info(
                    "journal_replayed",
                    file=claimed.path.name,
                    batches=len(claimed.batches),
                    skipped_lines=claimed.skipped_lines,
                )
            if poisoned:
                await self._replay_poisoned()
        finally:
            self._replaying = False
            self._settle()


def _stamped(batch: WriteBatch) -> WriteBatch:
    """*batch* (same id) with the current time on results and aliases that have none."""
    now = datetime.now(UTC)
    results = tuple(
        r if r.created_at is not None else dataclasses.replace(r, created_at=now)
        for r in batch.results
    )
    aliases = tuple(
        a if a.created_at is not None else dataclasses.replace(a, created_at=now)
        for a in batch.aliases
    )
    return dataclasses.replace(batch, results=results, aliases=aliases)


def _split(batch: WriteBatch) -> list[WriteBatch]:
    """The cache's part of *batch* (results, aliases, hit counts) under its own id and
    the request log's under ``<id>/log``; only the parts that hold something."""
    cache = dataclasses.replace(batch, logs=())
    log_id = f"{batch.batch_id}/log"
    if len(log_id) > 64:  # the column's bound: a stable stand-in of the same length
        log_id = hashlib.sha256(batch.batch_id.encode()).hexdigest()[:60] + "/log"
    logs = WriteBatch(log_id, logs=batch.logs)
    return [part for part in (cache, logs) if _size(part)]


def _size(batch: WriteBatch) -> int:
    """Operations in *batch* (hit increments counted once per image)."""
    return len(batch.results) + len(batch.hits) + len(batch.logs) + len(batch.aliases)


def _fold(
    batch_id: str,
    ops: list[WriteOp],
    folded: dict[str, _Tally] | None = None,
    *,
    stamp: bool = False,
) -> WriteBatch:
    """One batch: results in order, hit increments summed per image (those of
    *folded*, the hit table, included), log rows, aliases in order (the store writes
    them after the results).

    *stamp* gives results and aliases without a time the current one (for the
    journal: one replayed later keeps the time it was produced).
    """
    results: list[ResultWrite] = []
    hits: dict[str, tuple[int, datetime]] = {}
    if folded:
        hits = {h: (t.count, t.last) for h, t in folded.items()}
    logs: list[RequestLogRow] = []
    aliases: list[AliasWrite] = []
    now = datetime.now(UTC)
    for op in ops:
        if isinstance(op, ResultWrite):
            if stamp and op.created_at is None:
                op = dataclasses.replace(op, created_at=now)
            results.append(op)
        elif isinstance(op, HitIncrement):
            count, last = hits.get(op.image_hash, (0, op.last_hit_at))
            hits[op.image_hash] = (count + op.count, max(last, op.last_hit_at))
        elif isinstance(op, AliasWrite):
            if stamp and op.created_at is None:
                op = dataclasses.replace(op, created_at=now)
            aliases.append(op)
        else:
            logs.append(op)
    return WriteBatch(
        batch_id=batch_id,
        results=tuple(results),
        hits=tuple(HitIncrement(h, c, t) for h, (c, t) in hits.items()),
        logs=tuple(logs),
        aliases=tuple(aliases),
    )
