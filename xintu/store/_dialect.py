"""How each SQL database spells what the shared store (:mod:`._sql`) says.

The store writes its statements once, with named parameters in SQLite's form
(``:name``), and asks its :class:`Dialect` for everything the databases spell
differently:

=====================  ===========================  ====================================
                       :class:`SQLiteDialect`       :class:`MySQLDialect`
=====================  ===========================  ====================================
parameters             ``:name``                    ``%(name)s`` (trio-mysql's pyformat)
a list of values       ``(:h0, :h1, ...)``          ``%(h)s`` bound to a tuple
timestamps             fixed-width UTC text         naive UTC ``datetime`` (DATETIME(6))
days                   ``'YYYY-MM-DD'`` text        ``date`` (DATE)
upsert                 ``ON CONFLICT ... DO UPDATE  ``ON DUPLICATE KEY UPDATE c =
                       ... WHERE``                  IF(cond, new, c)``
insert unless present  ``ON CONFLICT DO NOTHING``   ``ON DUPLICATE KEY UPDATE k = k``
locking read           (the write lock is taken     ``SELECT ... FOR UPDATE``
                       by ``BEGIN IMMEDIATE``)
tables, column types   ``Table.sqlite`` (_schema)   ``Table.mysql`` (_schema)
what exists            ``sqlite_master`` and        ``information_schema``
                       ``pragma_*`` functions
=====================  ===========================  ====================================

A dialect is SQL text and value encoding only: it runs nothing. What a backend
does with connections (SQLite's writer and reader connections in threads, the
MySQL pool, ``BEGIN IMMEDIATE``, inserting a row unless its key exists, error
translation) is its module's, behind :class:`._sql.Connection`; the schema
migration (:mod:`._migrate`) is shared, over the dialect's schema SQL.

Adding a dialect (PostgreSQL, say): subclass :class:`Dialect` here (the defaults
are the standard ``ON CONFLICT`` forms PostgreSQL shares with SQLite, so it would
override little more than :meth:`Dialect.named`, :meth:`Dialect.time` and
:attr:`Dialect.lock_rows`, and give the schema SQL: the tables' definitions in
:mod:`._schema` and the three queries of what exists), then write one backend
module with a connection that satisfies :class:`._sql.Connection` and a
:class:`._sql.SqlStore` subclass that runs operations (the migration among them)
on it, and name its URL scheme in :func:`xintu.store.open_store`.
"""

from __future__ import annotations

import abc
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, ClassVar

from ._base import naive_utc, time_text
from ._schema import AddedColumn, Table

__all__ = ["Dialect", "Expr", "MySQLDialect", "Ref", "SQLiteDialect", "Upsert"]

# Names a column in an upsert: of the stored row (``old``) or of the row offered (``new``).
Ref = Callable[[str], str]
# An SQL expression over the stored and the offered row: ``lambda old, new: ...``.
Expr = Callable[[Ref, Ref], str]


@dataclass(frozen=True, slots=True)
class Upsert:
    """Insert a row of *columns*; if its *key* exists, set each column of *updates*
    to its expression (``None``: the offered value), but only where *when* holds."""

    table: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    updates: Mapping[str, Expr | None]
    when: Expr

    def value(self, column: str, old: Ref, new: Ref) -> str:
        """The value *column* is set to when the condition holds."""
        expr = self.updates[column]
        return new(column) if expr is None else expr(old, new)


class Dialect(abc.ABC):
    """The standard spelling (PostgreSQL's and SQLite's); a dialect overrides what differs."""

    name = "sql"
    # Most values in one ``IN (...)`` list.
    max_in_list = 500
    # Appended to a SELECT that must lock the rows it reads until the transaction ends.
    lock_rows = ""
    # What exists, for the migration (:mod:`._migrate`), with ``:name`` parameters: how
    # many tables named ``:table``; how many columns ``:column`` of ``:table``; each
    # (index name, column name) of the indexes of ``:table``, index by index, in order.
    table_exists_sql: ClassVar[str]
    column_exists_sql: ClassVar[str]
    index_columns_sql: ClassVar[str]

    @abc.abstractmethod
    def create_table(self, table: Table) -> str:
        """``CREATE TABLE IF NOT EXISTS`` *table*."""

    @abc.abstractmethod
    def column_type(self, column: AddedColumn) -> str:
        """The type (and nullability) of *column* in ``ALTER TABLE ... ADD COLUMN``."""

    def named(self, sql: str) -> str:
        """*sql*, written with ``:name`` parameters, in this dialect's parameter style."""
        return sql

    def time(self, value: datetime) -> Any:
        """*value* (aware) as this dialect stores a timestamp."""
        return naive_utc(value)

    def date(self, value: date) -> Any:
        """*value* as this dialect stores a day."""
        return value

    def day(self, column: str) -> str:
        """SQL for the UTC day of the timestamp *column*, as :meth:`date` stores it."""
        return f"CAST({column} AS DATE)"

    def delete_oldest(self, table: str, column: str, limit: int) -> str:
        """Delete at most *limit* rows of *table* whose *column* is below ``:cutoff``."""
        return self.named(
            f"DELETE FROM {table} WHERE {column} < :cutoff ORDER BY {column} LIMIT {int(limit)}"
        )

    def in_list(self, name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
        """``(:name0, :name1, ...)`` for *values*, and the parameters it binds."""
        marks = [f"{name}{i}" for i in range(len(values))]
        return "(" + ", ".join(f":{m}" for m in marks) + ")", dict(zip(marks, values, strict=True))

    def _insert(self, table: str, columns: Sequence[str]) -> str:
        marks = ", ".join(f":{c}" for c in columns)
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"

    def upsert(self, u: Upsert) -> str:
        """The statement of *u*."""

        def old(c: str) -> str:
            return f"{u.table}.{c}"

        def new(c: str) -> str:
            return f"excluded.{c}"

        sets = ", ".join(f"{c} = {u.value(c, old, new)}" for c in u.updates)
        return self.named(
            f"{self._insert(u.table, u.columns)} ON CONFLICT ({', '.join(u.key)}) "
            f"DO UPDATE SET {sets} WHERE {u.when(old, new)}"
        )

    def insert_ignore(self, table: str, columns: Sequence[str], key: Sequence[str]) -> str:
        """Insert a row of *columns* unless one with the same *key* exists (no warning)."""
        return self.named(
            f"{self._insert(table, columns)} ON CONFLICT ({', '.join(key)}) DO NOTHING"
        )


class SQLiteDialect(Dialect):
    """SQLite 3.24+: the standard forms; timestamps as text that sorts like time."""

    name = "sqlite"
    # Below SQLite's historical 999-variable limit.
    max_in_list = 400
    table_exists_sql = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = :table"
    column_exists_sql = "SELECT COUNT(*) FROM pragma_table_info(:table) WHERE name = :column"
    index_columns_sql = (
        "SELECT il.name, ii.name FROM pragma_index_list(:table) AS il, "
        "pragma_index_info(il.name) AS ii ORDER BY il.name, ii.seqno"
    )

    def create_table(self, table: Table) -> str:
        return table.sqlite_create()

    def column_type(self, column: AddedColumn) -> str:
        return column.sqlite

    def time(self, value: datetime) -> Any:
        return time_text(value)

    def date(self, value: date) -> Any:
        return value.isoformat()

    def day(self, column: str) -> str:
        return f"substr({column}, 1, 10)"  # the date part of the fixed-width text

    def delete_oldest(self, table: str, column: str, limit: int) -> str:
        # DELETE ... LIMIT needs a compile-time option; a rowid subquery does not.
        return (
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
            f"WHERE {column} < :cutoff ORDER BY {column} LIMIT {int(limit)})"
        )


_NAMED = re.compile(r"(?<![\w:]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def _pyformat(sql: str) -> str:
    return _NAMED.sub(r"%(\1)s", sql)


class MySQLDialect(Dialect):
    """MySQL 5.7+ / MariaDB 10.3+ through trio-mysql (the session time zone is UTC)."""

    name = "mysql"
    max_in_list = 500
    lock_rows = " FOR UPDATE"
    table_exists_sql = (
        "SELECT COUNT(*) FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_name = :table"
    )
    column_exists_sql = (
        "SELECT COUNT(*) FROM information_schema.columns "
        "WHERE table_schema = DATABASE() AND table_name = :table AND column_name = :column"
    )
    index_columns_sql = (
        "SELECT index_name, column_name FROM information_schema.statistics "
        "WHERE table_schema = DATABASE() AND table_name = :table ORDER BY index_name, seq_in_index"
    )

    def create_table(self, table: Table) -> str:
        return table.mysql_create()

    def column_type(self, column: AddedColumn) -> str:
        return column.mysql

    def named(self, sql: str) -> str:
        return _pyformat(sql)

    def day(self, column: str) -> str:
        return f"DATE({column})"

    def in_list(self, name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
        # trio-mysql writes a tuple as a parenthesised list of literals.
        return f":{name}", {name: tuple(values)}

    def upsert(self, u: Upsert) -> str:
        # No WHERE on ON DUPLICATE KEY UPDATE: each assignment keeps the stored value
        # unless the condition holds. MySQL assigns left to right, and a later
        # assignment sees the earlier ones, so the columns the condition reads go last.
        read: list[str] = []

        def old(c: str) -> str:
            return c

        def reading(c: str) -> str:
            read.append(c)
            return c

        def new(c: str) -> str:
            return f":{c}"

        cond = u.when(reading, new)
        order = sorted(u.updates, key=lambda c: c in read)  # stable: the rest keep their order
        sets = ", ".join(f"{c} = IF({cond}, {u.value(c, old, new)}, {c})" for c in order)
        return self.named(f"{self._insert(u.table, u.columns)} ON DUPLICATE KEY UPDATE {sets}")

    def insert_ignore(self, table: str, columns: Sequence[str], key: Sequence[str]) -> str:
        # Not INSERT IGNORE: that turns every error into a warning, and a duplicate
        # into a warning too.
        return self.named(
            f"{self._insert(table, columns)} ON DUPLICATE KEY UPDATE {key[0]} = {key[0]}"
        )
