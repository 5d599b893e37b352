"""The store over SQL, once for every backend: :class:`SqlStore`.

Batch apply, in-flight claims, idempotency records, alias lookups, the request
log, album stats and pruning are written here once, as operations on a
:class:`Connection`, with the SQL spelled by the backend's
:class:`~._dialect.Dialect`. A backend (:mod:`._sqlite`, :mod:`._mysql`)
subclasses :class:`SqlStore` and supplies how an operation runs
(:meth:`SqlStore._session`: which connection, in which thread, bounded how, retried
when, its errors translated into :class:`~xintu.errors.StoreError`), runs the
schema migration (:mod:`._migrate`, shared too, with the backend's schema lock),
and says the columns its tables really have (:attr:`SqlStore._layout`, what
every written row is fitted to; empty for a schema Xintu made).

How the operations keep their promises:

- :meth:`SqlStore.apply` runs one transaction that starts by recording the batch
  id in ``applied_batches`` (a batch seen before is rolled back and answered
  ``False``), then writes results (the first answer wins, except that an ``llm``
  answer replaces a ``local`` one), deletes those hashes' in-flight claims, adds
  hits, request-log rows and aliases (after the results: an alias may name one),
  and last adds what it changed to the stats counters (:mod:`._stats`). To know
  what changed it first reads, with the dialect's row lock, the cache rows of the
  hashes it writes and the request ids it logs, and applies the store's rules to
  them (:class:`_Counted`). Rows are written in key order, so concurrent writers
  lock rows in one order (cache rows, then log rows, then counters).
- Pruning (after an apply, every ``prune_interval_s``) deletes old applied batches,
  expired idempotency keys, lapsed claims and, past ``request_log_retention_days``,
  old ``request_log`` rows: in chunks of :data:`LOG_PRUNE_CHUNK`, each its own
  statement, for at most :data:`LOG_PRUNE_BUDGET_S` a time; a backlog (the first
  prune of a large old log) is worked off every :data:`LOG_PRUNE_AGAIN_S`.
- :meth:`SqlStore.claim` runs statements that each commit on their own, so no
  lock outlives a statement: a conditional ``UPDATE`` takes over an expired claim
  (or renews the owner's own), else an insert takes a free one; if the key exists
  after all, the claim is the owner's only if the row says so.
- :meth:`SqlStore.idempotency_begin` inserts first (a new key takes no gap lock,
  and a concurrent claim of the same key waits for it and then sees it); a key
  that exists is read without a lock (the common case, a live record), and only
  an expired one is read again with the dialect's row lock before it is replaced.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar, Protocol, TypeVar

import structlog
import trio

from ..errors import StoreError
from ._base import (
    CACHE_SELECT,
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
    parse_time,
    prepare_batch,
    resolve_lookup,
    to_utc,
)
from ._dialect import Dialect, Ref, Upsert
from ._layout import EMPTY_LAYOUT, Layout
from ._pool import PoolStatistics
from ._stats import (
    AlbumStats,
    CacheKey,
    RequestKey,
    assemble_stats,
    stats_queries,
)

__all__ = [
    "BATCH_RETENTION",
    "CLAIM_RETENTION",
    "Connection",
    "Op",
    "Run",
    "SqlStore",
]

T = TypeVar("T")

_log = structlog.get_logger("xintu.store")

# Pruning keeps applied_batches rows and expired idempotency keys this long, and
# claims that lapsed (their owners died or could not release them) this long past
# expiry: a margin for clock skew between processes.
BATCH_RETENTION = timedelta(days=1)
CLAIM_RETENTION = timedelta(minutes=1)
# request_log retention: rows deleted per statement, seconds of deleting per prune,
# and how soon a prune that left old rows behind runs again.
LOG_PRUNE_CHUNK = 5000
LOG_PRUNE_BUDGET_S = 2.0
LOG_PRUNE_AGAIN_S = 30.0


class Connection(Protocol):
    """What the shared operations need of a backend's connection.

    Statements come in the dialect's own form (:meth:`Dialect.named`); ``args`` is
    a mapping of named parameters. The connection counts each statement it sends.
    """

    async def execute(self, sql: str, args: Any = None) -> int:
        """Run one statement; the number of rows it affected."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Any]) -> int:
        """Run one statement once for each row of parameters, in one call."""
        ...

    async def fetchall(self, sql: str, args: Any = None) -> Sequence[Sequence[Any]]:
        """Run a query; all its rows."""
        ...

    async def insert_new(self, sql: str, args: Any) -> bool:
        """Run a plain ``INSERT`` of one row; ``False`` (and no error) if a row with
        the same key exists."""
        ...

    async def begin(self) -> None:
        """Start a transaction that will write (it may lock the store at once)."""
        ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


# One operation: what runs on a connection.
Op = Callable[[Connection], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class Run:
    """How to run one operation (:meth:`SqlStore._session`).

    ``what`` names it in errors and logs; ``limit_s`` bounds it. ``read_only``: it
    writes nothing (a backend may run it beside the writes). ``idempotent``:
    running it twice does no harm, even after it committed (a backend may then
    re-run it after an ambiguous failure). ``slow``: a read that may take long
    (stats, admin listings): a backend keeps it off the connection the hot
    lookups use, so that no hit waits behind it.
    """

    what: str
    limit_s: float
    read_only: bool
    idempotent: bool
    slow: bool = False


# --- statements ------------------------------------------------------------------

_CACHE = "image_classification_cache"
_RESULT_COLUMNS = (
    "image_hash",
    "category",
    "confidence",
    "description",
    "model_used",
    "model_response",
    "source",
    "image_size",
    "hit_count",
    "created_at",
    "last_hit_at",
)
_LOG_NAMES = tuple(name.strip() for name in LOG_COLUMNS.split(","))
# request_log columns of the original system that the store fills too, from its own.
_LOG_EXTRAS = ("ip_address", "inference_method")
# The tables whose rows are fitted to their columns.
FITTED_TABLES = (_CACHE, "request_log")


def _llm_replaces_local(old: Ref, new: Ref) -> str:
    return f"{old('source')} = 'local' AND {new('source')} = 'llm'"


def _coalesce_size(old: Ref, new: Ref) -> str:
    return f"COALESCE({old('image_size')}, {new('image_size')})"


def _later_alias(old: Ref, new: Ref) -> str:
    # The latest upload wins: an older alias (a journal replayed late) changes nothing.
    return f"{new('created_at')} >= {old('created_at')}"


# The first answer for a hash wins, except that an llm answer replaces a local one.
_RESULT = Upsert(
    _CACHE,
    _RESULT_COLUMNS,
    ("image_hash",),
    {
        "category": None,
        "confidence": None,
        "description": None,
        "model_used": None,
        "model_response": None,
        "image_size": _coalesce_size,
        "source": None,
    },
    _llm_replaces_local,
)
# An operator's re-classification: the new answer replaces any stored one.
_RESULT_REPLACE = dataclasses.replace(_RESULT, when=lambda old, new: "1 = 1")
_ALIAS = Upsert(
    "image_hash_aliases",
    ("scope", "alias_hash", "image_hash", "created_at"),
    ("scope", "alias_hash"),
    {"image_hash": None, "created_at": None},
    _later_alias,
)


def _always(old: Ref, new: Ref) -> str:
    return "1 = 1"


def _add(column: str) -> Callable[[Ref, Ref], str]:
    def expr(old: Ref, new: Ref) -> str:
        return f"{old(column)} + {new(column)}"

    return expr


# The stats counters (see _stats): each write adds to them.
_STATS_REQUESTS = Upsert(
    "stats_requests",
    ("day", "category", "source", "requests", "from_cache"),
    ("day", "category", "source"),
    {"requests": _add("requests"), "from_cache": _add("from_cache")},
    _always,
)
_STATS_CACHE = Upsert(
    "stats_cache",
    ("category", "source", "entries", "hits"),
    ("category", "source"),
    {"entries": _add("entries"), "hits": _add("hits")},
    _always,
)


@dataclass(slots=True)
class _Counted:
    """What one batch adds to the stats counters, worked out from the rows it
    locked before writing (``cache``: hash -> (category, source, hit_count) of the
    stored rows) by the same rules the statements follow."""

    cache: dict[str, tuple[str, str | None, int | None]]
    # Request ids of the batch that request_log holds already (not logged again).
    logged_before: set[str] = field(default_factory=set)
    requests: dict[RequestKey, list[int]] = field(default_factory=dict)
    cached: dict[CacheKey, list[int]] = field(default_factory=dict)

    def _cache(self, category: str, source: str | None, entries: int, hits: int) -> None:
        counts = self.cached.setdefault((category, source or ""), [0, 0])
        counts[0] += entries
        counts[1] += hits

    def result(self, image_hash: str, category: str, source: str, *, replace: bool = False) -> None:
        old = self.cache.get(image_hash)
        if old is None:
            self.cache[image_hash] = (category, source, 0)
            self._cache(category, source, 1, 0)
        elif replace or (old[1] == "local" and source == "llm"):  # _llm_replaces_local
            hits = old[2] or 0
            self._cache(old[0], old[1], -1, -hits)
            self._cache(category, source, 1, hits)
            self.cache[image_hash] = (category, source, old[2])

    def hit(self, image_hash: str, count: int) -> None:
        row = self.cache.get(image_hash)
        if row is not None and row[2] is not None:  # NULL + n stays NULL (legacy rows)
            self.cache[image_hash] = (row[0], row[1], row[2] + count)
            self._cache(row[0], row[1], 0, count)

    def logged(
        self, day: date, category: str | None, source: str | None, from_cache: int, requests: int
    ) -> None:
        """A logged row that counts as *requests* requests (a batch check's hits, else
        1), *from_cache* of them served from the cache."""
        counts = self.requests.setdefault((day, category or "", source or "none"), [0, 0])
        counts[0] += requests
        counts[1] += from_cache


_HIT = (
    f"UPDATE {_CACHE} SET hit_count = hit_count + :count, "
    "last_hit_at = CASE WHEN last_hit_at IS NULL OR last_hit_at < :at THEN :at "
    "ELSE last_hit_at END WHERE image_hash = :image_hash"
)
_LOG_SELECT = f"SELECT {LOG_COLUMNS} FROM request_log WHERE request_id = :request_id"
_BATCH_INSERT = "INSERT INTO applied_batches (batch_id, applied_at) VALUES (:batch_id, :at)"
# Take over a claim that expired, or renew one the owner holds already.
_CLAIM_TAKE = (
    "UPDATE inflight_claims SET owner = :owner, expires_at = :expires_at "
    "WHERE image_hash = :image_hash AND (owner = :owner OR expires_at <= :now)"
)
_CLAIM_INSERT = (
    "INSERT INTO inflight_claims (image_hash, owner, expires_at) "
    "VALUES (:image_hash, :owner, :expires_at)"
)
_CLAIM_OWNER = "SELECT owner FROM inflight_claims WHERE image_hash = :image_hash"
_CLAIM_RELEASE = "DELETE FROM inflight_claims WHERE image_hash = :image_hash AND owner = :owner"
_IDEM_KEY = "scope = :scope AND idem_key = :key"
_IDEM_SELECT = (
    "SELECT fingerprint, state, status, body, content_type, created_at, expires_at "
    f"FROM idempotency_keys WHERE {_IDEM_KEY}"
)
_IDEM_INSERT = (
    "INSERT INTO idempotency_keys (scope, idem_key, fingerprint, state, created_at, "
    "expires_at) VALUES (:scope, :key, :fingerprint, 'in_flight', :created_at, :expires_at)"
)
_IDEM_RENEW = (
    "UPDATE idempotency_keys SET fingerprint = :fingerprint, state = 'in_flight', "
    "status = NULL, body = NULL, content_type = NULL, created_at = :created_at, "
    f"expires_at = :expires_at WHERE {_IDEM_KEY}"
)
_IDEM_COMPLETE = (
    "UPDATE idempotency_keys SET state = 'completed', status = :status, body = :body, "
    f"content_type = :content_type WHERE {_IDEM_KEY} AND state = 'in_flight'"
)
_IDEM_RELEASE = f"DELETE FROM idempotency_keys WHERE {_IDEM_KEY} AND state = 'in_flight'"
_PRUNE = {
    "batches": "DELETE FROM applied_batches WHERE applied_at < :cutoff",
    "keys": "DELETE FROM idempotency_keys WHERE expires_at < :cutoff",
    "claims": "DELETE FROM inflight_claims WHERE expires_at < :lapsed",
}


def lookup_sql(in_hashes: str) -> str:
    """One statement that finds each asked hash's verified entry and its aliases.

    Each row is ``(asked, priority, *CACHE_SELECT)``: priority 0 for the verified
    entry of that hash, 1 for an alias in the caller's scope, 2 for a shared alias
    (:func:`~._base.resolve_lookup` keeps the best per asked hash). *in_hashes* is
    the dialect's list of the asked hashes; ``:scope`` and ``:shared`` the scopes.
    """
    cols = ", ".join(f"c.{name.strip()}" for name in CACHE_SELECT.split(","))
    return (
        f"SELECT c.image_hash AS asked, 0 AS pri, {cols} "
        f"FROM {_CACHE} c WHERE c.image_hash IN {in_hashes} "
        "UNION ALL "
        f"SELECT a.alias_hash, CASE WHEN a.scope = '{SHARED_SCOPE}' THEN 2 ELSE 1 END, {cols} "
        "FROM image_hash_aliases a "
        f"JOIN {_CACHE} c ON c.image_hash = a.image_hash "
        f"WHERE a.alias_hash IN {in_hashes} AND a.scope IN (:scope, :shared)"
    )


def _record(scope: str, key: str, row: Sequence[Any]) -> IdempotencyRecord:
    fingerprint, state, status, body, content_type, created_at, expires_at = row
    return IdempotencyRecord(
        scope=scope,
        key=key,
        fingerprint=fingerprint,
        state="completed" if state == "completed" else "in_flight",
        status=None if status is None else int(status),
        body=None if body is None else bytes(body),
        content_type=content_type,
        created_at=parse_time(created_at),
        expires_at=parse_time(expires_at),
    )


def _log_values(row: RequestLogRow) -> dict[str, Any]:
    """A request-log row by column name, the original's columns included."""
    values = dict(zip(_LOG_NAMES, log_params(row), strict=True))
    values["ip_address"] = row.ip
    # The original's stats count requests by inference method.
    values["inference_method"] = "cache" if row.from_cache else row.source
    return values


class SqlStore(Store):
    """The :class:`~._base.Store` operations, over a backend's connections.

    A subclass sets :attr:`backend` and :attr:`prune_interval_s`, passes its
    dialect, and implements :meth:`_open`, :meth:`_session`,
    :meth:`_pool_statistics` and :meth:`aclose`.
    """

    # How often a store deletes old applied batches, idempotency keys and claims.
    prune_interval_s: ClassVar[float]

    def __init__(
        self, dialect: Dialect, *, query_timeout_s: float, request_log_retention_days: int = 0
    ) -> None:
        if request_log_retention_days < 0:
            raise ValueError(f"negative retention {request_log_retention_days!r}")
        self._dialect = dialect
        self._timeout_s = query_timeout_s
        self._log_retention = (
            timedelta(days=request_log_retention_days) if request_log_retention_days else None
        )
        self._counters = Counters()
        self._last_prune = -math.inf
        self._set_layout(EMPTY_LAYOUT)
        d = dialect
        self._upsert_sql = d.upsert(_RESULT)
        self._replace_sql = d.upsert(_RESULT_REPLACE)
        self._alias_sql = d.upsert(_ALIAS)
        self._hit_sql = d.named(_HIT)
        self._log_select_sql = d.named(_LOG_SELECT)
        self._batch_sql = d.named(_BATCH_INSERT)
        self._claim_take_sql = d.named(_CLAIM_TAKE)
        self._claim_insert_sql = d.named(_CLAIM_INSERT)
        self._claim_owner_sql = d.named(_CLAIM_OWNER)
        self._claim_release_sql = d.named(_CLAIM_RELEASE)
        self._idem_select_sql = d.named(_IDEM_SELECT)
        self._idem_lock_sql = d.named(_IDEM_SELECT + d.lock_rows)
        self._idem_insert_sql = d.named(_IDEM_INSERT)
        self._idem_renew_sql = d.named(_IDEM_RENEW)
        self._idem_complete_sql = d.named(_IDEM_COMPLETE)
        self._idem_release_sql = d.named(_IDEM_RELEASE)
        self._prune_sql = {name: d.named(sql) for name, sql in _PRUNE.items()}
        self._prune_log_sql = d.delete_oldest("request_log", "created_at", LOG_PRUNE_CHUNK)
        self._stats_requests_sql = d.upsert(_STATS_REQUESTS)
        self._stats_cache_sql = d.upsert(_STATS_CACHE)

    def _set_layout(self, layout: Layout) -> None:
        """Fit what is written to *layout* (the columns the tables really have)."""
        self._layout = layout
        names = _LOG_NAMES + tuple(n for n in _LOG_EXTRAS if layout.has("request_log", n))
        self._log_names = names
        self._log_sql = self._dialect.insert_ignore("request_log", names, ("request_id",))

    # --- what a backend provides -------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> None:
        """Connect and migrate the schema (:mod:`._migrate`)."""

    async def _open_or_close(self) -> None:
        """:meth:`_open`, closing the store again if that fails."""
        ok = False
        try:
            await self._open()
            ok = True
        finally:
            if not ok:
                await self.aclose()

    @abc.abstractmethod
    async def _session(self, op: Op[T], run: Run) -> T:
        """Run *op* on a connection as *run* says; any failure as a
        :class:`~xintu.errors.StoreError`."""

    async def _run(
        self,
        what: str,
        op: Op[T],
        *,
        read_only: bool = False,
        idempotent: bool = True,
        timeout_s: float | None = None,
        slow: bool = False,
    ) -> T:
        """Run *op* within the query timeout (or *timeout_s*), counting failures."""
        limit_s = self._timeout_s if timeout_s is None else timeout_s
        try:
            return await self._session(op, Run(what, limit_s, read_only, idempotent, slow))
        except StoreError:
            self._counters.errors += 1
            raise

    @abc.abstractmethod
    def _pool_statistics(self) -> PoolStatistics:
        """The backend's connections, as a pool."""

    def statistics(self) -> StoreStatistics:
        pool, c = self._pool_statistics(), self._counters
        return StoreStatistics(
            backend=self.backend,
            queries=c.queries,
            errors=c.errors,
            retries=c.retries,
            server_warnings=c.server_warnings,
            batches_applied=c.batches_applied,
            batches_duplicate=c.batches_duplicate,
            pool_size=pool.size,
            pool_in_use=pool.in_use,
            pool_idle=pool.idle,
            pool_waiting=pool.waiting,
            pool_created=pool.created,
            pool_discarded=pool.discarded,
        )

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
        d = self._dialect
        scopes = {"scope": lookup_scope(scope), "shared": SHARED_SCOPE}

        async def op(conn: Connection) -> dict[str, CachedEntry]:
            out: dict[str, CachedEntry] = {}
            for i in range(0, len(wanted), d.max_in_list):
                chunk = wanted[i : i + d.max_in_list]
                in_hashes, params = d.in_list("h", chunk)
                rows = await conn.fetchall(d.named(lookup_sql(in_hashes)), {**params, **scopes})
                resolve_lookup(rows, chunk, out)
            return out

        return await self._run("get", op, read_only=True)

    async def get_request_log(self, request_id: str) -> RequestLogRow | None:
        async def op(conn: Connection) -> RequestLogRow | None:
            rows = await conn.fetchall(self._log_select_sql, {"request_id": request_id})
            return decode_log_row(rows[0]) if rows else None

        return await self._run("get_request_log", op, read_only=True)

    async def album_stats(self, now: datetime) -> AlbumStats:
        d = self._dialect
        queries = stats_queries(now, encode_time=d.time, encode_date=d.date)

        async def op(conn: Connection) -> dict[str, Sequence[Sequence[Any]]]:
            return {
                name: await conn.fetchall(d.named(sql), params)
                for name, (sql, params) in queries.items()
            }

        rows = await self._run("album_stats", op, read_only=True, slow=True)
        return assemble_stats(now, rows)

    async def ping(self) -> None:
        async def op(conn: Connection) -> None:
            await conn.fetchall("SELECT 1")

        await self._run("ping", op, read_only=True)

    # --- operators ---------------------------------------------------------------

    async def find_hashes(
        self,
        *,
        source: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int,
    ) -> list[str]:
        if limit <= 0:
            return []
        d = self._dialect
        where, params = [], {}
        if source is not None:
            where.append("source = :source")
            params["source"] = source
        if since is not None:
            where.append("created_at >= :since")
            params["since"] = d.time(since)
        if until is not None:
            where.append("created_at < :until")
            params["until"] = d.time(until)
        sql = f"SELECT image_hash FROM {_CACHE}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at, image_hash LIMIT {int(limit)}"

        async def op(conn: Connection) -> list[str]:
            return [str(row[0]) for row in await conn.fetchall(d.named(sql), params)]

        return await self._run("find_hashes", op, read_only=True, slow=True)

    async def purge(self, image_hash: str) -> bool:
        check_claim(image_hash, "purge", 1.0)  # a well-formed hash
        d = self._dialect
        args = {"image_hash": image_hash}

        async def op(conn: Connection) -> bool:
            await conn.begin()
            rows = await conn.fetchall(
                d.named(
                    f"SELECT category, source, hit_count FROM {_CACHE} "
                    "WHERE image_hash = :image_hash" + d.lock_rows
                ),
                args,
            )
            await conn.execute(
                d.named(f"DELETE FROM {_CACHE} WHERE image_hash = :image_hash"), args
            )
            await conn.execute(
                d.named("DELETE FROM image_hash_aliases WHERE image_hash = :image_hash"), args
            )
            await conn.execute(
                d.named("DELETE FROM inflight_claims WHERE image_hash = :image_hash"), args
            )
            if rows:
                category, source, hits = rows[0]
                await conn.execute(
                    self._stats_cache_sql,
                    {
                        "category": str(category),
                        "source": "" if source is None else str(source),
                        "entries": -1,
                        "hits": -int(hits or 0),
                    },
                )
            await conn.commit()
            return bool(rows)

        # Not re-run after an ambiguous commit: the re-run would find nothing left and
        # answer "nothing to purge" for a purge that worked; the error lets the
        # operator ask again instead.
        return await self._run("purge", op, idempotent=False)

    # --- writes ------------------------------------------------------------------

    async def apply(self, batch: WriteBatch) -> bool:
        prepared = prepare_batch(batch, now=datetime.now(UTC))

        async def op(conn: Connection) -> bool:
            return await self._apply(conn, prepared)

        # Idempotent by batch id: running it again after an ambiguous commit is safe.
        applied = await self._run("apply", op)
        if applied:
            self._counters.batches_applied += 1
        else:
            self._counters.batches_duplicate += 1
        await self._maybe_prune()
        return applied

    async def _apply(self, conn: Connection, p: PreparedBatch) -> bool:
        d, layout = self._dialect, self._layout
        now = d.time(p.applied_at)
        await conn.begin()
        if not await conn.insert_new(self._batch_sql, {"batch_id": p.batch_id, "at": now}):
            await conn.rollback()
            return False
        counted = await self._lock_counted(conn, p)
        if p.results:
            rows = []
            for r in p.results:
                created = d.time(r.created_at)
                row = layout.fit_row(
                    _CACHE,
                    {
                        "image_hash": r.image_hash,
                        "category": r.category,
                        "confidence": r.confidence,
                        "description": clip(r.description, "description"),
                        "model_used": r.model_used,
                        "model_response": r.model_response,
                        "source": r.source,
                        "image_size": r.image_size,
                        "hit_count": 0,
                        "created_at": created,
                    },
                    now=now,
                )
                # Never hit yet: NULL, or (NOT NULL in the original) the time it was made.
                row["last_hit_at"] = layout.fit(_CACHE, "last_hit_at", None, now=created)
                rows.append(row)
                counted.result(r.image_hash, row["category"], row["source"], replace=r.replace)
            # In key order still: an operator's re-classification replaces any answer.
            for replace, sql in ((False, self._upsert_sql), (True, self._replace_sql)):
                chosen = [
                    row for row, r in zip(rows, p.results, strict=True) if r.replace is replace
                ]
                if chosen:
                    await conn.executemany(sql, chosen)
            # The answers are visible once this commits: their claims go with it.
            claimed = sorted({r.image_hash for r in p.results})
            for i in range(0, len(claimed), d.max_in_list):
                in_hashes, params = d.in_list("h", claimed[i : i + d.max_in_list])
                await conn.execute(
                    d.named(f"DELETE FROM inflight_claims WHERE image_hash IN {in_hashes}"), params
                )
        for h in p.hits:
            counted.hit(h.image_hash, h.count)
        if p.hits:
            await conn.executemany(
                self._hit_sql,
                [
                    {"count": h.count, "at": d.time(h.last_hit_at), "image_hash": h.image_hash}
                    for h in p.hits
                ],
            )
        if p.logs:
            log_rows = []
            for log in p.logs:
                values = _log_values(log)
                values["created_at"] = d.time(log.created_at)
                fitted = layout.fit_row("request_log", values, now=now)
                log_rows.append({name: fitted[name] for name in self._log_names})
                if log.request_id not in counted.logged_before:
                    from_cache = int(fitted["from_cache"] or 0)
                    counted.logged(
                        to_utc(log.created_at).date(),
                        fitted["category"],
                        fitted["source"],
                        from_cache if log.hashes_hit is None else log.hashes_hit,
                        log.requests,
                    )
            await conn.executemany(self._log_sql, log_rows)
        if p.aliases:  # after the results: an alias may name one of this batch
            await conn.executemany(
                self._alias_sql,
                [
                    {
                        "scope": a.scope,
                        "alias_hash": a.alias_hash,
                        "image_hash": a.image_hash,
                        "created_at": d.time(a.created_at),
                    }
                    for a in p.aliases
                ],
            )
        # Last: every writer's transactions meet on these few rows.
        if counted.requests:
            await conn.executemany(
                self._stats_requests_sql,
                [
                    {
                        "day": d.date(day),
                        "category": category,
                        "source": source,
                        "requests": n,
                        "from_cache": from_cache,
                    }
                    for (day, category, source), (n, from_cache) in sorted(counted.requests.items())
                ],
            )
        changed = {k: v for k, v in sorted(counted.cached.items()) if v != [0, 0]}
        if changed:
            await conn.executemany(
                self._stats_cache_sql,
                [
                    {"category": category, "source": source, "entries": n, "hits": hits}
                    for (category, source), (n, hits) in changed.items()
                ],
            )
        await conn.commit()
        return True

    async def _lock_counted(self, conn: Connection, p: PreparedBatch) -> _Counted:
        """Read (and lock, in key order) the cache rows *p* writes to and the request
        ids it logs that exist already: what the stats counters need."""
        d = self._dialect
        hashes = sorted({r.image_hash for r in p.results} | {h.image_hash for h in p.hits})
        cache: dict[str, tuple[str, str | None, int | None]] = {}
        for i in range(0, len(hashes), d.max_in_list):
            in_hashes, params = d.in_list("h", hashes[i : i + d.max_in_list])
            sql = (
                f"SELECT image_hash, category, source, hit_count FROM {_CACHE} "
                f"WHERE image_hash IN {in_hashes}" + d.lock_rows
            )
            for image_hash, category, source, hit_count in await conn.fetchall(
                d.named(sql), params
            ):
                cache[str(image_hash)] = (
                    str(category),
                    None if source is None else str(source),
                    None if hit_count is None else int(hit_count),
                )
        counted = _Counted(cache)
        ids = [clip(log.request_id, "request_id") for log in p.logs]
        for i in range(0, len(ids), d.max_in_list):
            in_ids, params = d.in_list("r", ids[i : i + d.max_in_list])
            sql = f"SELECT request_id FROM request_log WHERE request_id IN {in_ids}"
            counted.logged_before.update(
                str(row[0]) for row in await conn.fetchall(d.named(sql), params)
            )
        return counted

    async def _maybe_prune(self) -> None:
        now_s = trio.current_time()
        if now_s - self._last_prune < self.prune_interval_s:
            return
        self._last_prune = now_s
        now = datetime.now(UTC)
        if self._log_retention is not None and not await self._prune_log(now - self._log_retention):
            # Old rows left behind: come back soon rather than a whole interval later.
            self._last_prune = now_s - self.prune_interval_s + LOG_PRUNE_AGAIN_S
        params = {
            "cutoff": self._dialect.time(now - BATCH_RETENTION),
            "lapsed": self._dialect.time(now - CLAIM_RETENTION),
        }

        async def op(conn: Connection) -> dict[str, int]:
            return {name: await conn.execute(sql, params) for name, sql in self._prune_sql.items()}

        try:
            deleted = await self._run("prune", op)
        except StoreError as exc:
            _log.warning("store_prune_failed", backend=self.backend, error=str(exc))
        else:
            if any(deleted.values()):
                _log.info(
                    "store_pruned",
                    backend=self.backend,
                    batches=deleted["batches"],
                    idempotency_keys=deleted["keys"],
                    claims=deleted["claims"],
                )

    async def _prune_log(self, cutoff: datetime) -> bool:
        """Delete ``request_log`` rows older than *cutoff*, a chunk a statement, for
        at most :data:`LOG_PRUNE_BUDGET_S`; ``True`` if none is left."""
        params = {"cutoff": self._dialect.time(cutoff)}

        async def op(conn: Connection) -> int:
            return await conn.execute(self._prune_log_sql, params)

        deleted, done = 0, False
        until = trio.current_time() + LOG_PRUNE_BUDGET_S
        try:
            while trio.current_time() < until:
                n = await self._run("prune_request_log", op)
                deleted += n
                if n < LOG_PRUNE_CHUNK:
                    done = True
                    break
        except StoreError as exc:
            _log.warning("store_prune_failed", backend=self.backend, error=str(exc))
            done = True  # not a backlog: try again at the next interval
        if deleted:
            _log.info("store_pruned", backend=self.backend, request_log=deleted, done=done)
        return done

    # --- in-flight claims ---------------------------------------------------------

    async def claim(self, image_hash: str, owner: str, *, now: datetime, ttl_s: float) -> bool:
        check_claim(image_hash, owner, ttl_s)
        at = to_utc(now)
        params = {
            "image_hash": image_hash,
            "owner": owner,
            "expires_at": self._dialect.time(at + timedelta(seconds=ttl_s)),
            "now": self._dialect.time(at),
        }

        async def op(conn: Connection) -> bool:
            # Statements that commit on their own: each holds its locks only while it runs.
            if await conn.execute(self._claim_take_sql, params):
                return True
            if await conn.insert_new(self._claim_insert_sql, params):
                return True
            # A live claim: another owner's, or ours renewed to the same expiry (an
            # UPDATE may then count no row changed), or one inserted by a lost attempt.
            rows = await conn.fetchall(self._claim_owner_sql, {"image_hash": image_hash})
            return bool(rows) and rows[0][0] == owner

        # Idempotent: a re-run after an ambiguous failure finds the owner's own claim.
        return await self._run("claim", op)

    async def release_claim(self, image_hash: str, owner: str) -> None:
        check_claim(image_hash, owner, 1.0)

        async def op(conn: Connection) -> None:
            await conn.execute(self._claim_release_sql, {"image_hash": image_hash, "owner": owner})

        await self._run("release_claim", op)

    # --- idempotency keys --------------------------------------------------------

    async def idempotency_begin(
        self, scope: str, key: str, fingerprint: str, *, now: datetime, ttl_s: float
    ) -> IdempotencyRecord | None:
        check_idempotency_key(scope, key)
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        created = to_utc(now)
        ident = {"scope": scope, "key": key}
        claim = {
            **ident,
            "fingerprint": fingerprint,
            "created_at": self._dialect.time(created),
            "expires_at": self._dialect.time(created + timedelta(seconds=ttl_s)),
        }

        async def op(conn: Connection) -> IdempotencyRecord | None:
            await conn.begin()
            if not await conn.insert_new(self._idem_insert_sql, claim):
                # The common case, a live record, needs no lock: a plain read sees the
                # committed row the insert collided with (concurrent claims of one key
                # taking locks here would deadlock each other).
                rows = await conn.fetchall(self._idem_select_sql, ident)
                if rows and (record := _record(scope, key, rows[0])).expires_at > created:
                    await conn.rollback()
                    return record
                # Expired (or just released): lock the row and read it again.
                rows = await conn.fetchall(self._idem_lock_sql, ident)
                if not rows:
                    await conn.execute(self._idem_insert_sql, claim)
                else:
                    record = _record(scope, key, rows[0])
                    if record.expires_at > created:
                        await conn.rollback()
                        return record
                    await conn.execute(self._idem_renew_sql, claim)
            await conn.commit()
            return None

        # Not idempotent: after an ambiguous commit a re-run would find our own claim.
        return await self._run("idempotency_begin", op, idempotent=False)

    async def idempotency_complete(
        self, scope: str, key: str, status: int, body: bytes, content_type: str
    ) -> None:
        check_idempotency_key(scope, key)
        params = {
            "scope": scope,
            "key": key,
            "status": status,
            "body": bytes(body),
            "content_type": clip(content_type, "content_type"),
        }

        async def op(conn: Connection) -> None:
            await conn.execute(self._idem_complete_sql, params)

        await self._run("idempotency_complete", op)

    async def idempotency_release(self, scope: str, key: str) -> None:
        check_idempotency_key(scope, key)

        async def op(conn: Connection) -> None:
            await conn.execute(self._idem_release_sql, {"scope": scope, "key": key})

        await self._run("idempotency_release", op)
