"""Bringing a database up to :data:`._schema.SCHEMA_VERSION`, once for every backend.

:class:`Migration` is the procedure; the SQL it needs is the dialect's
(:class:`._dialect.Dialect`: ``CREATE TABLE``, column types, what tables, columns
and indexes exist, the version upsert), and a backend overrides a few hooks. Under
the backend's schema lock (:meth:`Migration.lock`) it:

1. creates ``schema_version`` if it is missing and reads the version; a version
   newer than this Xintu's is refused (:class:`~xintu.errors.StoreError`);
2. if the version is older: creates the missing tables, adds the missing columns
   (:data:`._schema.ADDED_COLUMNS`) and indexes (:data:`._schema.INDEXES`; an
   index on the same leading columns under another name, the original system's,
   counts), fits what the original system left (:meth:`Migration.fit_original`),
   fills the stats counters if the version is below
   :data:`._schema.STATS_VERSION`, records the version and logs ``store_migrated``
   (both backends; ``from_version`` 0 for a new database);
3. releases the lock (:meth:`Migration.unlock`).

Every step checks before it changes anything, so running it again changes
nothing. The default lock is a transaction (:meth:`Connection.begin` and
``commit``): on SQLite, ``BEGIN IMMEDIATE`` takes the write lock and the whole
migration is one transaction, rolled back if it fails. MySQL commits each DDL
statement on its own, so its store overrides the lock with a named lock and adds
the original's specifics (:mod:`._mysql`).
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from ..errors import StoreError
from ._dialect import Dialect, Ref, Upsert
from ._schema import (
    ADDED_COLUMNS,
    INDEXES,
    SCHEMA_VERSION,
    SCHEMA_VERSION_TABLE,
    STATS_VERSION,
    TABLES,
)
from ._sql import Connection
from ._stats import backfill_statements

__all__ = ["MIGRATION_TIMEOUT_S", "Migration", "fill_stats"]


# Migration may build indexes on a large table: it gets longer than a query.
MIGRATION_TIMEOUT_S = 300.0


def _always(old: Ref, new: Ref) -> str:
    return "1 = 1"


_VERSION = Upsert(
    SCHEMA_VERSION_TABLE.name,
    ("id", "version", "updated_at"),
    ("id",),
    {"version": None, "updated_at": None},
    _always,
)


async def fill_stats(conn: Connection, dialect: Dialect) -> None:
    """Fill the stats counters from the tables' rows (the migration that adds them)."""
    for sql in backfill_statements(dialect.day):
        await conn.execute(dialect.named(sql))


class Migration:
    """The schema migration in *dialect*; :meth:`run` it on a connection."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect

    # --- hooks ---------------------------------------------------------------------

    async def lock(self, conn: Connection) -> None:
        """Take the schema lock: processes starting together migrate in turn."""
        await conn.begin()

    async def unlock(self, conn: Connection) -> None:
        """Release the schema lock (only after a migration that succeeded: a failed
        one's lock is the backend's to drop, with its transaction or connection)."""
        await conn.commit()

    async def fit_original(self, conn: Connection) -> None:
        """Adapt what the original system's tables lack beyond columns and indexes
        (called after those are added; nothing by default)."""

    # --- what exists -----------------------------------------------------------------

    async def _count(self, conn: Connection, sql: str, args: dict[str, str]) -> bool:
        rows = await conn.fetchall(self.dialect.named(sql), args)
        return bool(rows[0][0])

    async def has_table(self, conn: Connection, table: str) -> bool:
        return await self._count(conn, self.dialect.table_exists_sql, {"table": table})

    async def has_column(self, conn: Connection, table: str, column: str) -> bool:
        args = {"table": table, "column": column}
        return await self._count(conn, self.dialect.column_exists_sql, args)

    async def has_index(
        self, conn: Connection, table: str, index: str, columns: tuple[str, ...]
    ) -> bool:
        """Whether *table* has the index *index*, or another that starts with *columns*
        (the original's tables have their own names for some of Xintu's indexes)."""
        rows = await conn.fetchall(
            self.dialect.named(self.dialect.index_columns_sql), {"table": table}
        )
        indexes: dict[str, list[str]] = {}
        for name, column in rows:
            indexes.setdefault(str(name), []).append(str(column).lower())
        if index in indexes:
            return True
        wanted = [c.lower() for c in columns]
        return any(cols[: len(wanted)] == wanted for cols in indexes.values())

    # --- the procedure ---------------------------------------------------------------

    async def run(self, conn: Connection) -> None:
        """Bring the schema up to :data:`SCHEMA_VERSION` (see the module docstring)."""
        d = self.dialect
        await self.lock(conn)
        if not await self.has_table(conn, SCHEMA_VERSION_TABLE.name):
            await conn.execute(d.create_table(SCHEMA_VERSION_TABLE))
        rows = await conn.fetchall("SELECT version FROM schema_version WHERE id = 1")
        version = int(rows[0][0]) if rows else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{d.name} store: schema version {version} is newer than this Xintu's "
                f"({SCHEMA_VERSION}); upgrade Xintu"
            )
        if version < SCHEMA_VERSION:
            for table in TABLES:
                if not await self.has_table(conn, table.name):
                    await conn.execute(d.create_table(table))
            for col in ADDED_COLUMNS:
                if not await self.has_column(conn, col.table, col.name):
                    await conn.execute(
                        f"ALTER TABLE {col.table} ADD COLUMN {col.name} {d.column_type(col)}"
                    )
            for index in INDEXES:
                if not await self.has_index(conn, index.table, index.name, index.columns):
                    await conn.execute(index.create())
            await self.fit_original(conn)
            if version < STATS_VERSION:
                await fill_stats(conn, d)
            now = d.time(datetime.now(UTC))
            await conn.execute(
                d.upsert(_VERSION), {"id": 1, "version": SCHEMA_VERSION, "updated_at": now}
            )
            # Looked up here, not cached at import: a migration is rare, and a logger
            # cached before the logging configuration changed would miss it.
            structlog.get_logger("xintu.store").info(
                "store_migrated", backend=d.name, version=SCHEMA_VERSION, from_version=version
            )
        await self.unlock(conn)
