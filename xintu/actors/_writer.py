"""The writer: the only actor that writes to the store.

Producers hand it :class:`~xintu.store.ResultWrite`, :class:`~xintu.store.HitIncrement`,
:class:`~xintu.store.RequestLogRow` and :class:`~xintu.store.AliasWrite` operations
through a bounded inbox. The
writer gathers up to ``writer_batch`` operations or ``writer_flush_ms`` of them,
whichever comes first, folds hit increments per image, and applies the lot as one
:class:`~xintu.store.WriteBatch` in one transaction.

A batch keeps its ``batch_id`` across retries, and the store applies a batch id at
most once, so a retry after an ambiguous failure (the commit may have happened)
never counts a hit twice. While the store is down the batch is retried with
exponential backoff; new operations wait in the bounded inbox meanwhile, and with a
journal, a task of the writer's moves them to the journal (in batches of their own)
whenever the inbox is half full, also while a commit attempt is still running, so
nothing is dropped however long the outage lasts (unless the journal itself cannot
be written). The first commit after the outage replays those journal files, exactly
once and before newer work.

Result writes are sent with ``await`` by the classification flights (off the
response path: the callers were answered first); hit increments and log rows are
sent with ``send_nowait`` and counted as dropped if the inbox is full, so a slow
store never delays a cache hit.

With a journal directory (``journal_dir``, normally ``<data dir>/journal``), nothing
the writer holds is lost to a store outage at shutdown: once :meth:`Writer.close`
has been called, a batch the store refuses is not retried any more; that batch
(with its id) and everything still queued go to the journal (:mod:`._journal`) and
the writer returns. The same happens if the writer is cancelled with writes in hand,
and for a result :meth:`Writer.put` after the close. At start, before it takes new
work, the writer replays the journal files it finds, each batch under its original
id, so each is applied exactly once, and deletes each file once all of it committed.
While the store is failing, :attr:`WriterStatistics.store_healthy` is false: the
readiness check reports the degraded store from it.

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
        self._retries = 0
        self._pending = 0
        self._store_healthy = True
        self._journaled_ops = 0
        self._journal_files = 0
        self._replayed_batches = 0
        self._replaying = False
        # Operations were journaled during an outage: replay them once it is over.
        self._spilled = False
        # Set by producers when the inbox passes half full while the store fails.
        self._overflow = trio.Event()
        # Held while a spill writes its file, so a replay never misses a file that is
        # being written.
        self._spill_lock = trio.Lock()
        self._closing = trio.Event()
        # Operations taken from the inbox, and the batch made of them being committed:
        # what the journal must keep if the writer has to stop now.
        self._taken: list[WriteOp] = []
        self._in_hand: WriteBatch | None = None
        self._idle = trio.Event()
        self._idle.set()
        # Operations accepted into the inbox, and operations the writer has taken out
        # of it. They differ for a moment after a send handed an operation straight to
        # the waiting writer task (it never sat in the buffer): wait_idle counts it.
        self._accepted = 0
        self._received = 0
        self._stopped = False

    # --- producers -----------------------------------------------------------------

    def offer(self, op: WriteOp) -> bool:
        """Queue *op* without waiting; False (and counted) if the inbox is full or closed."""
        try:
            self._send.send_nowait(op)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._ops_dropped += 1
            return False
        self._accepted += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._watch_overflow()
        return True

    async def put(self, op: WriteOp) -> None:
        """Queue *op*, waiting for room: for results, which must not be lost.

        After :meth:`close` the operation goes to the journal, if there is one.
        """
        try:
            await self._send.send(op)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if self._journal is not None:
                with trio.CancelScope(shield=True):
                    await self._spill(None, [op])
                return
            self._ops_dropped += 1
            log.error("write_after_close", op=type(op).__name__)
            return
        self._accepted += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._watch_overflow()

    def close(self) -> None:
        """No more operations: the writer flushes what it has and returns.

        With a journal, a store that still refuses writes is not waited for: what
        is left is journaled (see the module docstring).
        """
        self._closing.set()
        self._send.close()

    async def wait_idle(self) -> None:
        """Wait until everything queued so far (and any journal replay) is committed."""
        while not self._stopped and (
            self._received < self._accepted
            or self._receive.statistics().current_buffer_used
            or self._pending
            or self._replaying
        ):
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
        )

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
                        loose = [] if self._in_hand is not None else self._taken
                        with trio.CancelScope(shield=True):
                            await self._spill(self._in_hand, [*loose, *self._drain_inbox()])
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
            try:
                first = await self._receive.receive()
            except trio.EndOfChannel:
                return
            self._received += 1
            ops = [first]
            self._taken = ops
            self._pending = 1
            with trio.move_on_after(self._flush_s):
                while len(ops) < self._max_batch:
                    try:
                        ops.append(await self._receive.receive())
                    except trio.EndOfChannel:
                        break
                    self._received += 1
                    self._pending = len(ops)
            # Take whatever else is already queued, without waiting.
            while len(ops) < self._max_batch:
                try:
                    ops.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self._received += 1
            self._pending = len(ops)
            batch = _fold(self._new_batch_id(), ops)
            self._in_hand = batch
            set_aside = self._poisoned_ops
            if await self._commit(batch):
                self._ops_applied += max(0, len(ops) - (self._poisoned_ops - set_aside))
            else:
                # Closing and the store is down: journal this batch and the rest.
                with trio.CancelScope(shield=True):
                    await self._spill(batch, self._drain_inbox())
                self._in_hand = None
                self._taken = []
                self._pending = 0
                return
            self._in_hand = None
            self._taken = []
            self._pending = 0
            while self._spilled:  # the store is back: commit what the outage journaled
                self._spilled = False
                self._replaying = True
                await self._replay()
            if not self._receive.statistics().current_buffer_used:
                self._idle.set()

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
                            await self._spill(rest, [])
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
            self._overflow.set()

    async def _overflow_guard(self) -> None:
        """While the store fails, move the inbox to the journal whenever it is half full
        (a long outage then drops no hit count or log row and holds up no result)."""
        while True:
            await self._overflow.wait()
            self._overflow = trio.Event()
            if self._store_healthy:
                continue
            with trio.CancelScope(shield=True):  # drained operations must reach the file
                async with self._spill_lock:
                    ops = self._drain_inbox()
                    if ops:
                        self._spilled = True
                        await self._spill(None, ops)

    def _drain_inbox(self) -> list[WriteOp]:
        ops: list[WriteOp] = []
        while True:
            try:
                ops.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return ops
            self._received += 1

    async def _spill(self, batch: WriteBatch | None, ops: Sequence[WriteOp]) -> None:
        """Write *batch* (keeping its id) and *ops* (in new batches) to the journal.

        Without a journal, or if the journal cannot be written, they are dropped and
        counted (and logged as an error).
        """
        batches = [_stamped(batch)] if batch is not None else []
        for i in range(0, len(ops), self._max_batch):
            chunk = list(ops[i : i + self._max_batch])
            batches.append(_fold(self._new_batch_id(), chunk, stamp=True))
        if not batches:
            return
        count = sum(_size(b) for b in batches)
        journal = self._journal
        if journal is None:
            self._ops_dropped += count
            log.error("store_writes_lost", operations=count)
            return
        try:
            path = await trio.to_thread.run_sync(journal.write, batches)
        except OSError as exc:
            self._ops_dropped += count
            log.error("journal_write_failed", operations=count, error=str(exc))
            return
        self._journaled_ops += count
        self._journal_files += 1
        log.warning(
            "store_writes_journaled",
            operations=count,
            batches=len(batches),
            file=path.name if path is not None else None,
        )

    async def _replay(self, *, poisoned: bool = False) -> None:
        """Commit every journaled batch under its own id; delete each file once done.

        *poisoned* (at start): then try the poison journal's batches once each."""
        journal = self._journal
        assert journal is not None
        async with self._spill_lock:  # a file being spilled is claimed once written
            files = await trio.to_thread.run_sync(
                lambda: list(journal.claim()), abandon_on_cancel=False
            )
        try:
            while files:
                claimed = files[0]
                for batch in claimed.batches:
                    if not await self._commit(batch):
                        log.warning("journal_replay_interrupted", file=claimed.path.name)
                        return
                    self._replayed_batches += 1
                await trio.to_thread.run_sync(claimed.done)
                files.pop(0)
                log.info(
                    "journal_replayed",
                    file=claimed.path.name,
                    batches=len(claimed.batches),
                    skipped_lines=claimed.skipped_lines,
                )
            if poisoned:
                await self._replay_poisoned()
        finally:
            for claimed in files:
                claimed.release()
            self._replaying = False
            if not self._receive.statistics().current_buffer_used and not self._pending:
                self._idle.set()


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


def _fold(batch_id: str, ops: list[WriteOp], *, stamp: bool = False) -> WriteBatch:
    """One batch: results in order, hit increments summed per image, log rows,
    aliases in order (the store writes them after the results).

    *stamp* gives results and aliases without a time the current one (for the
    journal: one replayed later keeps the time it was produced).
    """
    results: list[ResultWrite] = []
    hits: dict[str, tuple[int, datetime]] = {}
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
