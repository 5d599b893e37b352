"""The production backend: MySQL / MariaDB, with a bounded pool of trio-mysql
connections (:mod:`._mysql_conn`) to the server its URL names (:mod:`._mysql_settings`).

The operations are the shared ones (:class:`._sql.SqlStore`) in the MySQL dialect
(:class:`._dialect.MySQLDialect`); this module pools connections, retries,
translates errors, runs the shared migration (:mod:`._migrate`) under a named lock
with what the original system's database needs, and reads the columns the tables
really have, to which every row written is fitted (:mod:`._layout`).

In-flight claims are how replicas coalesce: the claim's statements each commit on
their own, so no lock outlives a statement and no connection is held while the
photo is classified; ``apply`` deletes the claims of the hashes it writes in the
transaction that writes them: a claim that succeeds after that commit (a claimer
blocked on the row lock waits for it) comes after the result is visible, which the
claimer sees by reading the store once more.

``parse_mysql_url``, ``MySQLSettings``, ``TlsSettings``, ``MySQLConnection`` and
``connect`` are re-exported here.
"""

from __future__ import annotations

from typing import TypeVar

import structlog
import trio
import trio_mysql

from ..errors import StoreError, StoreRejected, StoreUnavailable
from ._dialect import Dialect, MySQLDialect
from ._layout import read_mysql_layout
from ._migrate import MIGRATION_TIMEOUT_S, Migration
from ._mysql_conn import (
    DEADLOCK,
    DUPLICATE_KEY,
    LOST,
    MySQLConnection,
    connect,
    describe_error,
    error_code,
    is_lost_connection,
)
from ._mysql_settings import MySQLSettings, TlsSettings, parse_mysql_url
from ._pool import Pool, PoolStatistics
from ._sql import FITTED_TABLES, Connection, Op, Run, SqlStore

__all__ = [
    "MySQLConnection",
    "MySQLSettings",
    "MySQLStore",
    "TlsSettings",
    "connect",
    "parse_mysql_url",
]

T = TypeVar("T")

_log = structlog.get_logger("xintu.store")

# How often old applied batches, idempotency keys and lapsed claims are deleted.
PRUNE_INTERVAL_S = 600.0

# Codes that mean the store cannot be used now (StoreUnavailable, not StoreError).
_UNAVAILABLE = LOST | frozenset(
    {
        1040,  # too many connections
        1044,  # access denied to the database
        1045,  # access denied (bad user or password)
        1049,  # unknown database
        1205,  # lock wait timeout
        DEADLOCK,
        2002,  # cannot connect (socket)
        2003,  # cannot connect (TCP)
        2005,  # unknown host
    }
)


# Codes that no retry can fix: the schema or a constraint refuses the write
# (StoreRejected). 1048 column cannot be null, 1054 unknown column, 1062 duplicate
# key (on a key other than the one the statement handles), 1136 column count,
# 1146 no such table, 1264 out of range, 1265 data truncated, 1292 incorrect
# datetime, 1364 no default, 1366 incorrect value, 1406 data too long, 1451/1452
# foreign key, 3819 (MySQL) / 4025 (MariaDB) check constraint.
_REJECTED = frozenset(
    {1048, 1054, 1062, 1136, 1146, 1264, 1265, 1292, 1364, 1366, 1406, 1451, 1452, 3819, 4025}
)


class MySQLStore(SqlStore):
    """The store on a MySQL/MariaDB database. Build it with :meth:`open`."""

    backend = "mysql"
    prune_interval_s = PRUNE_INTERVAL_S

    def __init__(
        self,
        settings: MySQLSettings,
        *,
        pool_size: int,
        query_timeout_s: float,
        request_log_retention_days: int = 0,
    ) -> None:
        super().__init__(
            MySQLDialect(),
            query_timeout_s=query_timeout_s,
            request_log_retention_days=request_log_retention_days,
        )
        self._settings = settings
        # Built once (it reads the CA file): every pooled connection shares it.
        self._tls_context = None if settings.tls is None else settings.tls.context()
        self._pool: Pool[MySQLConnection] = Pool(self._connect, size=pool_size)

    @classmethod
    async def open(
        cls,
        settings: MySQLSettings,
        *,
        pool_size: int,
        query_timeout_s: float,
        request_log_retention_days: int = 0,
    ) -> MySQLStore:
        """Connect and migrate the schema; ``StoreUnavailable`` if unreachable."""
        store = cls(
            settings,
            pool_size=pool_size,
            query_timeout_s=query_timeout_s,
            request_log_retention_days=request_log_retention_days,
        )
        await store._open_or_close()
        return store

    @property
    def pool(self) -> Pool[MySQLConnection]:
        """The connection pool (for diagnostics and tests)."""
        return self._pool

    @property
    def settings(self) -> MySQLSettings:
        return self._settings

    async def _connect(self) -> MySQLConnection:
        return await connect(
            self._settings,
            timeout_s=self._timeout_s,
            counters=self._counters,
            tls_context=self._tls_context,
        )

    def _translate(self, exc: BaseException, what: str) -> StoreError:
        message = f"mysql store {self._settings.url}: {what} failed: {describe_error(exc)}"
        if isinstance(exc, OSError) or error_code(exc) in _UNAVAILABLE or is_lost_connection(exc):
            return StoreUnavailable(message)
        if error_code(exc) in _REJECTED:
            return StoreRejected(message)
        return StoreError(message)

    async def _session(self, op: Op[T], run: Run) -> T:
        """Run *op* on a pooled connection within ``run.limit_s``.

        A lost connection (stale after a restart, killed) or a deadlock re-runs *op*
        once on a fresh connection, unless *op* is not idempotent and had started
        to commit (then the first attempt may have taken effect).
        """
        for attempt_no in (1, 2):
            committing = False
            try:
                with trio.fail_after(run.limit_s):
                    async with self._pool.acquire(fresh=attempt_no > 1) as conn:
                        commits = conn.commits
                        try:
                            return await op(conn)
                        finally:
                            committing = conn.commits > commits
            except trio.TooSlowError as exc:
                raise StoreUnavailable(
                    f"mysql store {self._settings.url}: {run.what} timed out after {run.limit_s:g}s"
                ) from exc
            except (trio_mysql.MySQLError, OSError) as exc:
                retry = is_lost_connection(exc) or error_code(exc) == DEADLOCK
                if retry and attempt_no == 1 and (run.idempotent or not committing):
                    self._counters.retries += 1
                    _log.info(
                        "store_retry",
                        backend=self.backend,
                        operation=run.what,
                        error=describe_error(exc),
                    )
                    continue
                raise self._translate(exc, run.what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # --- schema ------------------------------------------------------------------

    async def _open(self) -> None:
        migration = _MySQLMigration(self._dialect, self._settings.database)

        async def op(conn: Connection) -> None:
            await migration.run(conn)
            # The columns the tables really have: what is written is fitted to them.
            self._set_layout(await read_mysql_layout(conn, FITTED_TABLES))

        await self._run("open", op, timeout_s=max(self._timeout_s, MIGRATION_TIMEOUT_S))

    # --- lifetime ----------------------------------------------------------------

    async def aclose(self) -> None:
        await self._pool.aclose()

    def _pool_statistics(self) -> PoolStatistics:
        return self._pool.statistics()


class _MySQLMigration(Migration):
    """The shared migration (:mod:`._migrate`) under a named lock, with what the
    original system's database needs."""

    def __init__(self, dialect: Dialect, database: str) -> None:
        super().__init__(dialect)
        self._lock_name = f"xintu.schema.{database}"

    async def lock(self, conn: Connection) -> None:
        # DDL commits on its own, so no transaction: replicas starting together take
        # turns on a named lock, which dies with the connection if the migration fails.
        (got,) = (await conn.fetchall("SELECT GET_LOCK(%s, %s)", (self._lock_name, 60)))[0]
        if got != 1:
            raise StoreUnavailable(f"mysql store: could not take the schema lock {self._lock_name}")

    async def unlock(self, conn: Connection) -> None:
        await conn.fetchall("SELECT RELEASE_LOCK(%s)", (self._lock_name,))

    async def fit_original(self, conn: Connection) -> None:
        """Give ``request_log`` a unique key on ``request_id`` if it has no index on it
        (the original's has none): a retried row is then written once, and
        ``get_request_log`` is an index read. Rows that already repeat a request id
        get a plain index instead."""
        if await self.has_index(conn, "request_log", "uk_request_id", ("request_id",)):
            return
        try:
            await conn.execute("ALTER TABLE request_log ADD UNIQUE KEY uk_request_id (request_id)")
        except trio_mysql.IntegrityError as exc:
            if error_code(exc) != DUPLICATE_KEY:
                raise
            _log.warning(
                "store_request_ids_repeat", table="request_log", index="idx_log_request_id"
            )
            await conn.execute("CREATE INDEX idx_log_request_id ON request_log (request_id)")
