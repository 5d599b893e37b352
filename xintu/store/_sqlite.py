"""The embedded backend: one SQLite file under the data directory.

The operations are the shared ones (:class:`._sql.SqlStore`) in the SQLite
dialect (:class:`._dialect.SQLiteDialect`); this module runs them.

Each store owns THREE ``sqlite3`` connections: one for writes (and the
transactions that read then write: claims, idempotency), a read-only one for
the hot reads (cache lookups, request-log reads, the readiness ping) and a
read-only one for the slow reads (``Run.slow``: album stats, admin listings), so
that a stats query never holds the connection a cache lookup waits for. The file
is in WAL mode, where readers never wait for the writer, so a cache lookup does
not queue behind a batch of hit counts either. Every statement runs
in a worker thread (``trio.to_thread.run_sync``) while the operation holds its
connection's :class:`trio.Lock`, so a connection is never used by two threads at
once. WAL mode comes with ``synchronous=NORMAL`` and a busy timeout, and every
write transaction starts with ``BEGIN IMMEDIATE``, so several processes on one
machine can share the file.

Bounding an operation: a thread cannot be cancelled, and an operation left
half-way would leave the connection mid-transaction; so an operation runs to its
end, shielded, and a cancellation is delivered after it. Instead a progress
handler aborts the running statement once the operation's deadline has passed,
and the busy timeout (equal to the query timeout) bounds waiting for another
process's lock. A failed operation's transaction is rolled back.

In-flight claims: the shared claim's statements each commit on their own under
SQLite's write lock, so processes sharing the file (``--workers N``) coalesce
through it as replicas do through MySQL.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio

from ..errors import StoreError, StoreRejected, StoreUnavailable
from ._base import Counters
from ._dialect import SQLiteDialect
from ._migrate import MIGRATION_TIMEOUT_S, Migration
from ._pool import PoolStatistics
from ._sql import Op, Run, SqlStore

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_log = structlog.get_logger("xintu.store")

# Run the progress handler every this many virtual-machine instructions.
_PROGRESS_EVERY = 10_000
# How often old applied batches, idempotency keys and lapsed claims are deleted.
PRUNE_INTERVAL_S = 3600.0

# Error names (``sqlite3.Error.sqlite_errorname``) that mean "cannot use the file now".
_UNAVAILABLE = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_CANTOPEN",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_READONLY",
    "SQLITE_INTERRUPT",
    "SQLITE_PROTOCOL",
    "SQLITE_NOTADB",
    "SQLITE_CORRUPT",
)

# Schema errors (``OperationalError``) that no retry can fix; constraint failures
# (``IntegrityError``: NOT NULL, CHECK, UNIQUE, FOREIGN KEY) cannot either.
_REJECTED_PHRASES = (
    "no such column",
    "has no column named",
    "no such table",
    "values were supplied",
)


def _translate(exc: sqlite3.Error, run: Run, *, timed_out: bool) -> StoreError:
    what = run.what
    if timed_out:
        return StoreUnavailable(f"sqlite store: {what} timed out after {run.limit_s:g}s")
    name = getattr(exc, "sqlite_errorname", "")
    if isinstance(name, str) and name.startswith(_UNAVAILABLE):
        return StoreUnavailable(f"sqlite store: {what} failed: {exc}")
    if isinstance(exc, sqlite3.IntegrityError) or (
        isinstance(exc, sqlite3.OperationalError)
        and any(phrase in str(exc) for phrase in _REJECTED_PHRASES)
    ):
        return StoreRejected(f"sqlite store: {what} failed: {exc}")
    return StoreError(f"sqlite store: {what} failed: {exc}")


class _Lane:
    """One ``sqlite3`` connection and what serialises its use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn: sqlite3.Connection | None = None
        self.lock = trio.Lock()
        # The lock admits one call at a time, so this limiter never makes one wait; it
        # keeps the store off Trio's default thread limiter, which others may fill.
        self.threads = trio.CapacityLimiter(1)
        self.deadline = math.inf  # read by the progress handler, in the worker thread

    def progress(self) -> int:
        return 1 if time.monotonic() > self.deadline else 0


class _SQLiteConnection:
    """A lane's connection for one operation (:class:`._sql.Connection`): each
    statement in the lane's thread, its errors translated for *run*."""

    def __init__(self, lane: _Lane, conn: sqlite3.Connection, counters: Counters, run: Run) -> None:
        self._lane = lane
        self._conn = conn
        self._counters = counters
        self._run = run

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._counters.queries += 1
        return await trio.to_thread.run_sync(self._in_thread, fn, limiter=self._lane.threads)

    def _in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn)
        except sqlite3.Error as exc:
            timed_out = time.monotonic() >= self._lane.deadline
            raise _translate(exc, self._run, timed_out=timed_out) from exc

    async def execute(self, sql: str, args: Any = None) -> int:
        return await self._call(lambda c: c.execute(sql, args or ()).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Any]) -> int:
        return await self._call(lambda c: c.executemany(sql, rows).rowcount)

    async def fetchall(self, sql: str, args: Any = None) -> list[Any]:
        return await self._call(lambda c: c.execute(sql, args or ()).fetchall())

    async def insert_new(self, sql: str, args: Any) -> bool:
        return await self.execute(sql + " ON CONFLICT DO NOTHING", args) > 0

    async def begin(self) -> None:
        # Take the write lock now, not at the first write: a transaction that reads
        # before it writes (idempotency keys) must not see a row change under it.
        await self.execute("BEGIN IMMEDIATE")

    async def commit(self) -> None:
        await self.execute("COMMIT")

    async def rollback(self) -> None:
        await self.execute("ROLLBACK")

    async def abort(self) -> None:
        """Roll back a transaction a failed operation left open."""

        def run(conn: sqlite3.Connection) -> None:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()

        await trio.to_thread.run_sync(run, self._conn, limiter=self._lane.threads)


class SQLiteStore(SqlStore):
    """The store on one SQLite file. Build it with :meth:`open`."""

    backend = "sqlite"
    prune_interval_s = PRUNE_INTERVAL_S

    def __init__(
        self, path: Path, *, query_timeout_s: float, request_log_retention_days: int = 0
    ) -> None:
        super().__init__(
            SQLiteDialect(),
            query_timeout_s=query_timeout_s,
            request_log_retention_days=request_log_retention_days,
        )
        self._path = path
        self._writer = _Lane("write")
        self._reader = _Lane("read")
        self._slow = _Lane("slow")
        self._connections_opened = 0
        self._closed = False

    @classmethod
    async def open(
        cls, path: Path, *, query_timeout_s: float, request_log_retention_days: int = 0
    ) -> SQLiteStore:
        """Open (creating the file and its directory) and migrate the schema."""
        store = cls(
            path,
            query_timeout_s=query_timeout_s,
            request_log_retention_days=request_log_retention_days,
        )
        await store._open_or_close()
        return store

    @property
    def path(self) -> Path:
        return self._path

    # --- plumbing ----------------------------------------------------------------

    def _connect_sync(self, lane: _Lane) -> sqlite3.Connection:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(
                f"sqlite store: cannot create {self._path.parent}: {exc}"
            ) from exc
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=self._timeout_s,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,  # used from worker threads, one at a time
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite store: cannot open {self._path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {max(1, int(self._timeout_s * 1000))}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if lane is not self._writer:
                conn.execute("PRAGMA query_only = ON")
            conn.set_progress_handler(lane.progress, _PROGRESS_EVERY)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(f"sqlite store: cannot set up {self._path}: {exc}") from exc
        return conn

    async def _open(self) -> None:
        w = self._writer
        w.conn = await trio.to_thread.run_sync(self._connect_sync, w, limiter=w.threads)
        self._connections_opened += 1
        # Under the default schema lock: one BEGIN IMMEDIATE transaction, rolled back
        # if it fails.
        migration = Migration(self._dialect)
        await self._run("migrate", migration.run, timeout_s=MIGRATION_TIMEOUT_S)
        # After the migration: the readers see the tables they read.
        for r in (self._reader, self._slow):
            r.conn = await trio.to_thread.run_sync(self._connect_sync, r, limiter=r.threads)
            self._connections_opened += 1

    async def _session(self, op: Op[T], run: Run) -> T:
        """Run *op* on a connection, its statements in a worker thread, bounded and
        translated. Read-only operations use a reader connection, which never
        waits for writes: the slow ones (``run.slow``) their own, so that no lookup
        waits behind them. Nothing is re-run, so ``run.idempotent`` does not matter.
        """
        if self._closed:
            raise trio.ClosedResourceError("the store is closed")
        if not run.read_only:
            lane = self._writer
        else:
            lane = self._slow if run.slow else self._reader
        try:
            with trio.fail_after(run.limit_s):
                await lane.lock.acquire()
        except trio.TooSlowError as exc:
            raise StoreUnavailable(
                f"sqlite store: {run.what} waited over {run.limit_s:g}s for the connection"
            ) from exc
        try:
            if lane.conn is None:
                raise trio.ClosedResourceError("the store is closed")
            conn = _SQLiteConnection(lane, lane.conn, self._counters, run)
            lane.deadline = time.monotonic() + run.limit_s
            ok = False
            with trio.CancelScope(shield=True):
                try:
                    result = await op(conn)
                    ok = True
                finally:
                    lane.deadline = math.inf
                    if not ok:
                        await conn.abort()
            await trio.lowlevel.checkpoint_if_cancelled()
            return result
        finally:
            lane.lock.release()

    # --- lifetime ----------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The readers first, then the writer (which runs PRAGMA optimize).
        for lane in (self._reader, self._slow, self._writer):
            await self._close_lane(lane)

    async def _close_lane(self, lane: _Lane) -> None:
        # Wait (bounded, even while cancelled) for a running call to finish first.
        with trio.CancelScope(shield=True), trio.move_on_after(self._timeout_s) as waited:
            await lane.lock.acquire()
        if waited.cancelled_caught:
            _log.warning(
                "store_close_busy", backend=self.backend, path=str(self._path), lane=lane.name
            )
            return
        try:
            conn, lane.conn = lane.conn, None
            if conn is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        self._close_sync, lane, conn, limiter=lane.threads
                    )
        finally:
            lane.lock.release()

    def _close_sync(self, lane: _Lane, conn: sqlite3.Connection) -> None:
        lane.deadline = time.monotonic() + self._timeout_s  # bounds PRAGMA optimize
        try:
            if lane is self._writer:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA optimize")
        finally:
            lane.deadline = math.inf
            conn.close()

    def _pool_statistics(self) -> PoolStatistics:
        lanes = (self._writer, self._reader, self._slow)
        live = [lane for lane in lanes if lane.conn is not None]
        in_use = sum(1 for lane in live if lane.lock.locked())
        created = self._connections_opened
        return PoolStatistics(
            size=len(lanes),
            in_use=in_use,
            idle=len(live) - in_use,
            waiting=sum(lane.lock.statistics().tasks_waiting for lane in lanes),
            created=created,
            discarded=created if self._closed else 0,
        )
