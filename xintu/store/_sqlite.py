"""The embedded backend: one SQLite file under the data directory.

Each store owns TWO ``sqlite3`` connections: one for writes (and the
transactions that read then write: claims, idempotency) and a read-only one for
the hot reads (cache lookups, request-log and album-stats reads, the readiness
ping). The file is in WAL mode, where readers never wait for the writer, so a
cache lookup does not queue behind a batch of hit counts. Every call runs in a
worker thread (``trio.to_thread.run_sync``) while holding its connection's
:class:`trio.Lock`, so a connection is never used by two threads at once. WAL
mode comes with ``synchronous=NORMAL`` and a busy timeout, and every write
transaction starts with ``BEGIN IMMEDIATE``, so several processes on one machine
can share the file.

Bounding a call: the thread cannot be cancelled, so the call is not abandoned on
cancellation (the connection would be left mid-transaction); instead a progress
handler aborts the running statement once the query deadline has passed, and the
busy timeout (equal to the query timeout) bounds waiting for another process's lock.

In-flight claims: :meth:`SQLiteStore.claim` is one upsert (insert, or take over a
claim that expired or is already the owner's), atomic under SQLite's write lock,
so processes sharing the file (``--workers N``) coalesce through it as replicas do
through MySQL.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio

from ..errors import StoreError, StoreRejected, StoreUnavailable
from ._base import (
    LOG_COLUMNS,
    SHARED_SCOPE,
    CachedEntry,
    Counters,
    IdempotencyRecord,
    PreparedBatch,
    RequestLogRow,
    Store,
    StoreStatistics,
    WriteBatch,
    check_claim,
    check_idempotency_key,
    clip,
    decode_log_row,
    log_params,
    lookup_scope,
    lookup_sql,
    merge_statistics,
    parse_time,
    prepare_batch,
    resolve_lookup,
    time_text,
    to_utc,
)
from ._schema import ADDED_COLUMNS, INDEXES, SCHEMA_VERSION, SCHEMA_VERSION_TABLE, TABLES
from ._stats import AlbumStats, assemble_stats, stats_queries

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_log = structlog.get_logger("xintu.store")

# Run the progress handler every this many virtual-machine instructions.
_PROGRESS_EVERY = 10_000
# Hashes per lookup: each is bound twice (entries, aliases), plus two scopes; below
# SQLite's historical 999-variable limit.
_CHUNK = 400
# Pruning of old applied_batches rows, long-expired idempotency keys and in-flight
# claims that lapsed (their owners died or could not release them).
PRUNE_INTERVAL_S = 3600.0
BATCH_RETENTION = timedelta(days=1)
CLAIM_RETENTION = timedelta(minutes=1)  # past expiry: a margin for clock skew
# Schema migration may build indexes on a large table: it gets longer than a query.
MIGRATION_TIMEOUT_S = 300.0

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

_UPSERT = """
    INSERT INTO image_classification_cache (
        image_hash, category, confidence, description, model_used, model_response,
        source, image_size, hit_count, created_at, last_hit_at
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, NULL)
    ON CONFLICT (image_hash) DO UPDATE SET
        category = excluded.category,
        confidence = excluded.confidence,
        description = excluded.description,
        model_used = excluded.model_used,
        model_response = excluded.model_response,
        image_size = COALESCE(image_classification_cache.image_size, excluded.image_size),
        source = excluded.source
    WHERE image_classification_cache.source = 'local' AND excluded.source = 'llm'
"""

_HIT = """
    UPDATE image_classification_cache SET
        hit_count = hit_count + ?,
        last_hit_at = CASE
            WHEN last_hit_at IS NULL OR last_hit_at < ? THEN ? ELSE last_hit_at END
    WHERE image_hash = ?
"""

# The latest upload wins: an older alias (a journal replayed late) changes nothing.
_ALIAS = """
    INSERT INTO image_hash_aliases (scope, alias_hash, image_hash, created_at)
    VALUES (?, ?, ?, ?)
    ON CONFLICT (scope, alias_hash) DO UPDATE SET
        image_hash = excluded.image_hash,
        created_at = excluded.created_at
    WHERE excluded.created_at >= image_hash_aliases.created_at
"""

_LOG = f"""
    INSERT INTO request_log ({LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (request_id) DO NOTHING
"""

# Insert a claim, or take over one that expired or that the owner holds already;
# a live claim of another owner is left as it is (no row changes).
_CLAIM = """
    INSERT INTO inflight_claims (image_hash, owner, expires_at) VALUES (?, ?, ?)
    ON CONFLICT (image_hash) DO UPDATE SET
        owner = excluded.owner,
        expires_at = excluded.expires_at
    WHERE inflight_claims.owner = excluded.owner OR inflight_claims.expires_at <= ?
"""

_IDEM_SELECT = """
    SELECT fingerprint, state, status, body, content_type, created_at, expires_at
    FROM idempotency_keys WHERE scope = ? AND idem_key = ?
"""


def _record(scope: str, key: str, row: Sequence[Any]) -> IdempotencyRecord:
    fingerprint, state, status, body, content_type, created_at, expires_at = row
    return IdempotencyRecord(
        scope=scope,
        key=key,
        fingerprint=fingerprint,
        state="completed" if state == "completed" else "in_flight",
        status=status,
        body=None if body is None else bytes(body),
        content_type=content_type,
        created_at=parse_time(created_at),
        expires_at=parse_time(expires_at),
    )


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


class SQLiteStore(Store):
    """The store on one SQLite file. Build it with :meth:`open`."""

    backend = "sqlite"

    def __init__(self, path: Path, *, query_timeout_s: float) -> None:
        self._path = path
        self._timeout_s = query_timeout_s
        self._writer = _Lane("write")
        self._reader = _Lane("read")
        self._counters = Counters()
        self._connections_opened = 0
        self._closed = False
        self._last_prune = -math.inf

    @classmethod
    async def open(cls, path: Path, *, query_timeout_s: float) -> SQLiteStore:
        """Open (creating the file and its directory) and migrate the schema."""
        store = cls(path, query_timeout_s=query_timeout_s)
        ok = False
        try:
            await store._open()
            ok = True
        finally:
            if not ok:
                await store.aclose()
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
            if lane is self._reader:
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
        await self._call("migrate", self._migrate_sync, timeout_s=MIGRATION_TIMEOUT_S)
        # After the migration: the reader sees the tables it reads.
        r = self._reader
        r.conn = await trio.to_thread.run_sync(self._connect_sync, r, limiter=r.threads)
        self._connections_opened += 1

    def _translate(
        self, exc: sqlite3.Error, what: str, *, timed_out: bool, limit: float
    ) -> StoreError:
        if timed_out:
            return StoreUnavailable(f"sqlite store: {what} timed out after {limit:g}s")
        name = getattr(exc, "sqlite_errorname", "")
        if isinstance(name, str) and name.startswith(_UNAVAILABLE):
            return StoreUnavailable(f"sqlite store: {what} failed: {exc}")
        if isinstance(exc, sqlite3.IntegrityError) or (
            isinstance(exc, sqlite3.OperationalError)
            and any(phrase in str(exc) for phrase in _REJECTED_PHRASES)
        ):
            return StoreRejected(f"sqlite store: {what} failed: {exc}")
        return StoreError(f"sqlite store: {what} failed: {exc}")

    def _in_thread(
        self,
        lane: _Lane,
        conn: sqlite3.Connection,
        fn: Callable[[sqlite3.Connection], T],
        what: str,
        limit: float,
    ) -> T:
        deadline = time.monotonic() + limit
        lane.deadline = deadline
        ok = False
        try:
            result = fn(conn)
            ok = True
            return result
        except sqlite3.Error as exc:
            timed_out = time.monotonic() >= deadline
            raise self._translate(exc, what, timed_out=timed_out, limit=limit) from exc
        finally:
            lane.deadline = math.inf
            if not ok and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()

    async def _call(
        self,
        what: str,
        fn: Callable[[sqlite3.Connection], T],
        *,
        timeout_s: float | None = None,
        read_only: bool = False,
    ) -> T:
        """Run *fn* on a connection in a worker thread, bounded and translated.

        *read_only* calls use the reader connection, which never waits for writes.
        """
        if self._closed:
            raise trio.ClosedResourceError("the store is closed")
        lane = self._reader if read_only else self._writer
        limit = self._timeout_s if timeout_s is None else timeout_s
        try:
            with trio.fail_after(limit):
                await lane.lock.acquire()
        except trio.TooSlowError as exc:
            self._counters.errors += 1
            raise StoreUnavailable(
                f"sqlite store: {what} waited over {limit:g}s for the connection"
            ) from exc
        try:
            conn = lane.conn
            if conn is None:
                raise trio.ClosedResourceError("the store is closed")
            return await trio.to_thread.run_sync(
                self._in_thread, lane, conn, fn, what, limit, limiter=lane.threads
            )
        except StoreError:
            self._counters.errors += 1
            raise
        finally:
            lane.lock.release()

    def _execute(
        self, conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()
    ) -> sqlite3.Cursor:
        self._counters.queries += 1
        return conn.execute(sql, params)

    def _executemany(
        self, conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]
    ) -> sqlite3.Cursor:
        self._counters.queries += 1
        return conn.executemany(sql, rows)

    # --- schema ------------------------------------------------------------------

    def _migrate_sync(self, conn: sqlite3.Connection) -> None:
        self._execute(conn, "BEGIN IMMEDIATE")
        self._execute(conn, SCHEMA_VERSION_TABLE.sqlite_create())
        row = self._execute(conn, "SELECT version FROM schema_version WHERE id = 1").fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"sqlite store: schema version {version} is newer than this Xintu's "
                f"({SCHEMA_VERSION}); upgrade Xintu"
            )
        if version < SCHEMA_VERSION:
            for table in TABLES:
                self._execute(conn, table.sqlite_create())
            for col in ADDED_COLUMNS:
                have = {r[1] for r in self._execute(conn, f"PRAGMA table_info({col.table})")}
                if col.name not in have:
                    self._execute(
                        conn, f"ALTER TABLE {col.table} ADD COLUMN {col.name} {col.sqlite}"
                    )
            for index in INDEXES:
                self._execute(conn, index.create(if_not_exists=True))
            self._execute(
                conn,
                "INSERT INTO schema_version (id, version, updated_at) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET version = excluded.version, "
                "updated_at = excluded.updated_at",
                (SCHEMA_VERSION, time_text(datetime.now(UTC))),
            )
        self._execute(conn, "COMMIT")

    # --- reads -------------------------------------------------------------------

    async def get(self, image_hash: str, *, scope: str | None = None) -> CachedEntry | None:
        found = await self.get_many([image_hash], scope=scope)
        return found.get(image_hash)

    async def get_many(
        self, hashes: Sequence[str], *, scope: str | None = None
    ) -> dict[str, CachedEntry]:
        wanted = list(dict.fromkeys(hashes))
        if not wanted:
            return {}
        scopes = (lookup_scope(scope), SHARED_SCOPE)

        def run(conn: sqlite3.Connection) -> dict[str, CachedEntry]:
            out: dict[str, CachedEntry] = {}
            for i in range(0, len(wanted), _CHUNK):
                chunk = wanted[i : i + _CHUNK]
                sql = lookup_sql(f"({', '.join('?' * len(chunk))})", "?")
                rows = self._execute(conn, sql, (*chunk, *chunk, *scopes)).fetchall()
                resolve_lookup(rows, chunk, out)
            return out

        return await self._call("get", run, read_only=True)

    async def get_request_log(self, request_id: str) -> RequestLogRow | None:
        def run(conn: sqlite3.Connection) -> RequestLogRow | None:
            row = self._execute(
                conn, f"SELECT {LOG_COLUMNS} FROM request_log WHERE request_id = ?", (request_id,)
            ).fetchone()
            return None if row is None else decode_log_row(row)

        return await self._call("get_request_log", run, read_only=True)

    async def album_stats(self, now: datetime) -> AlbumStats:
        queries = stats_queries(now, placeholder="?", encode_time=time_text)

        def run(conn: sqlite3.Connection) -> dict[str, list[Any]]:
            return {
                name: self._execute(conn, sql, params).fetchall()
                for name, (sql, params) in queries.items()
            }

        return assemble_stats(now, await self._call("album_stats", run, read_only=True))

    async def ping(self) -> None:
        def run(conn: sqlite3.Connection) -> None:
            self._execute(conn, "SELECT 1").fetchone()

        await self._call("ping", run, read_only=True)

    # --- writes ------------------------------------------------------------------

    async def apply(self, batch: WriteBatch) -> bool:
        prepared = prepare_batch(batch, now=datetime.now(UTC))
        applied = await self._call("apply", lambda conn: self._apply_sync(conn, prepared))
        if applied:
            self._counters.batches_applied += 1
        else:
            self._counters.batches_duplicate += 1
        await self._maybe_prune()
        return applied

    def _apply_sync(self, conn: sqlite3.Connection, p: PreparedBatch) -> bool:
        self._execute(conn, "BEGIN IMMEDIATE")
        cur = self._execute(
            conn,
            "INSERT INTO applied_batches (batch_id, applied_at) VALUES (?, ?) "
            "ON CONFLICT (batch_id) DO NOTHING",
            (p.batch_id, time_text(p.applied_at)),
        )
        if cur.rowcount == 0:
            self._execute(conn, "ROLLBACK")
            return False
        if p.results:
            result_rows = [
                (
                    r.image_hash,
                    r.category,
                    r.confidence,
                    clip(r.description, "description"),
                    r.model_used,
                    r.model_response,
                    r.source,
                    r.image_size,
                    time_text(r.created_at),
                )
                for r in p.results
            ]
            self._executemany(conn, _UPSERT, result_rows)
            # The answers are visible once this commits: their claims go with it.
            claimed = sorted({r.image_hash for r in p.results})
            self._executemany(
                conn,
                "DELETE FROM inflight_claims WHERE image_hash = ?",
                [(h,) for h in claimed],
            )
        if p.hits:
            hit_rows = []
            for h in p.hits:
                at = time_text(h.last_hit_at)
                hit_rows.append((h.count, at, at, h.image_hash))
            self._executemany(conn, _HIT, hit_rows)
        if p.logs:
            log_rows = []
            for log in p.logs:
                params = log_params(log)
                log_rows.append((*params[:-1], time_text(params[-1])))
            self._executemany(conn, _LOG, log_rows)
        if p.aliases:  # after the results: an alias may name one of this batch
            alias_rows = [
                (a.scope, a.alias_hash, a.image_hash, time_text(a.created_at)) for a in p.aliases
            ]
            self._executemany(conn, _ALIAS, alias_rows)
        self._execute(conn, "COMMIT")
        return True

    async def _maybe_prune(self) -> None:
        now_s = trio.current_time()
        if now_s - self._last_prune < PRUNE_INTERVAL_S:
            return
        self._last_prune = now_s
        now = datetime.now(UTC)
        cutoff = time_text(now - BATCH_RETENTION)
        lapsed = time_text(now - CLAIM_RETENTION)

        def run(conn: sqlite3.Connection) -> tuple[int, int, int]:
            batches = self._execute(
                conn, "DELETE FROM applied_batches WHERE applied_at < ?", (cutoff,)
            ).rowcount
            keys = self._execute(
                conn, "DELETE FROM idempotency_keys WHERE expires_at < ?", (cutoff,)
            ).rowcount
            claims = self._execute(
                conn, "DELETE FROM inflight_claims WHERE expires_at < ?", (lapsed,)
            ).rowcount
            return batches, keys, claims

        try:
            batches, keys, claims = await self._call("prune", run)
        except StoreError as exc:
            _log.warning("store_prune_failed", backend=self.backend, error=str(exc))
        else:
            if batches or keys or claims:
                _log.info(
                    "store_pruned",
                    backend=self.backend,
                    batches=batches,
                    idempotency_keys=keys,
                    claims=claims,
                )

    # --- in-flight claims ---------------------------------------------------------

    async def claim(self, image_hash: str, owner: str, *, now: datetime, ttl_s: float) -> bool:
        check_claim(image_hash, owner, ttl_s)
        at = to_utc(now)
        params = (image_hash, owner, time_text(at + timedelta(seconds=ttl_s)), time_text(at))

        def run(conn: sqlite3.Connection) -> bool:
            # One statement, so one atomic transaction under the file's write lock.
            return self._execute(conn, _CLAIM, params).rowcount > 0

        return await self._call("claim", run)

    async def release_claim(self, image_hash: str, owner: str) -> None:
        check_claim(image_hash, owner, 1.0)

        def run(conn: sqlite3.Connection) -> None:
            self._execute(
                conn,
                "DELETE FROM inflight_claims WHERE image_hash = ? AND owner = ?",
                (image_hash, owner),
            )

        await self._call("release_claim", run)

    # --- idempotency keys --------------------------------------------------------

    async def idempotency_begin(
        self, scope: str, key: str, fingerprint: str, *, now: datetime, ttl_s: float
    ) -> IdempotencyRecord | None:
        check_idempotency_key(scope, key)
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        created = to_utc(now)
        expires = created + timedelta(seconds=ttl_s)

        def run(conn: sqlite3.Connection) -> IdempotencyRecord | None:
            self._execute(conn, "BEGIN IMMEDIATE")
            row = self._execute(conn, _IDEM_SELECT, (scope, key)).fetchone()
            if row is not None:
                record = _record(scope, key, row)
                if record.expires_at > created:
                    self._execute(conn, "ROLLBACK")
                    return record
                self._execute(
                    conn,
                    "UPDATE idempotency_keys SET fingerprint = ?, state = 'in_flight', "
                    "status = NULL, body = NULL, content_type = NULL, created_at = ?, "
                    "expires_at = ? WHERE scope = ? AND idem_key = ?",
                    (fingerprint, time_text(created), time_text(expires), scope, key),
                )
            else:
                self._execute(
                    conn,
                    "INSERT INTO idempotency_keys (scope, idem_key, fingerprint, state, "
                    "created_at, expires_at) VALUES (?, ?, ?, 'in_flight', ?, ?)",
                    (scope, key, fingerprint, time_text(created), time_text(expires)),
                )
            self._execute(conn, "COMMIT")
            return None

        return await self._call("idempotency_begin", run)

    async def idempotency_complete(
        self, scope: str, key: str, status: int, body: bytes, content_type: str
    ) -> None:
        check_idempotency_key(scope, key)

        def run(conn: sqlite3.Connection) -> None:
            self._execute(
                conn,
                "UPDATE idempotency_keys SET state = 'completed', status = ?, body = ?, "
                "content_type = ? WHERE scope = ? AND idem_key = ? AND state = 'in_flight'",
                (status, bytes(body), clip(content_type, "content_type"), scope, key),
            )

        await self._call("idempotency_complete", run)

    async def idempotency_release(self, scope: str, key: str) -> None:
        check_idempotency_key(scope, key)

        def run(conn: sqlite3.Connection) -> None:
            self._execute(
                conn,
                "DELETE FROM idempotency_keys WHERE scope = ? AND idem_key = ? "
                "AND state = 'in_flight'",
                (scope, key),
            )

        await self._call("idempotency_release", run)

    # --- lifetime ----------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The reader first, then the writer (which runs PRAGMA optimize).
        for lane in (self._reader, self._writer):
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

    def statistics(self) -> StoreStatistics:
        lanes = (self._writer, self._reader)
        live = [lane for lane in lanes if lane.conn is not None]
        in_use = sum(1 for lane in live if lane.lock.locked())
        created = self._connections_opened
        return merge_statistics(
            self.backend,
            self._counters,
            pool_size=len(lanes),
            pool_in_use=in_use,
            pool_idle=len(live) - in_use,
            pool_waiting=sum(lane.lock.statistics().tasks_waiting for lane in lanes),
            pool_created=created,
            pool_discarded=created if self._closed else 0,
        )
