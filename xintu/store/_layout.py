"""The columns a table really has, and how a row is fitted to them before it is written.

Xintu creates its tables itself, but it also runs on the original system's MySQL
database in place (DESIGN §5), whose columns are narrower and stricter than
Xintu's: ``model_used VARCHAR(50) NOT NULL``, ``request_log.category`` and
``image_hash`` NOT NULL without a default, ``confidence DECIMAL(5,4)``,
``processing_time_ms INT UNSIGNED``, ``last_hit_at DATETIME NOT NULL``. Under
MySQL's strict mode a value that does not fit fails the whole batch, and it would
fail again on every retry. So the MySQL store reads the columns of the tables it
writes when it opens (:func:`read_mysql_layout`), and every value it writes goes
through :meth:`Column.fit` first:

- ``None`` for a NOT NULL column becomes a neutral value of the column's type (``''``,
  ``0``, the time of the write): writing NULL explicitly fails even where the column
  has a default;
- text is cut to the column's length (in characters; for ``TEXT`` types, the bytes a
  4-byte character may take);
- a number is rounded to the column's scale (``DECIMAL``) or to an integer, and a
  negative one becomes 0 in an ``UNSIGNED`` column;
- a boolean becomes 0 or 1.

A table the layout does not know, or a column it lacks, passes values unchanged:
what the store then cannot write is the writer's to set aside (``StoreRejected``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

__all__ = ["Column", "Layout", "read_mysql_layout"]

_CHAR = frozenset({"char", "varchar"})
_TEXT = frozenset({"tinytext", "text", "mediumtext", "longtext"})
_INTEGER = frozenset({"tinyint", "smallint", "mediumint", "int", "integer", "bigint", "bit"})
_DECIMAL = frozenset({"decimal", "numeric"})
_FLOAT = frozenset({"float", "double", "real"})
_TIME = frozenset({"datetime", "timestamp", "date"})


@dataclass(frozen=True, slots=True)
class Column:
    """One column as ``information_schema.columns`` describes it."""

    name: str
    data_type: str  # lower case: varchar, decimal, int, datetime ...
    nullable: bool
    max_chars: int | None = None  # characters a value may have (text types)
    scale: int | None = None  # digits after the point (DECIMAL)
    unsigned: bool = False

    def fit(self, value: Any, *, now: datetime) -> Any:
        """*value* as this column can take it (see the module docstring)."""
        if value is None:
            return None if self.nullable else self._neutral(now)
        t = self.data_type
        if isinstance(value, str):
            if self.max_chars is not None and (t in _CHAR or t in _TEXT):
                return value[: self.max_chars]
            return value
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int | float) and (t in _INTEGER or t in _DECIMAL):
            number = float(value)
            if not math.isfinite(number):
                number = 0.0
            if self.unsigned and number < 0:
                number = 0.0
            if t in _INTEGER:
                return round(number)
            return round(number, self.scale or 0)
        return value

    def _neutral(self, now: datetime) -> Any:
        t = self.data_type
        if t in _INTEGER or t in _DECIMAL or t in _FLOAT:
            return 0
        if t in _TIME:
            return now
        return ""


@dataclass(frozen=True, slots=True)
class Layout:
    """The columns of the tables a store writes, by table and column name."""

    tables: Mapping[str, Mapping[str, Column]]

    def has(self, table: str, column: str) -> bool:
        return column in self.tables.get(table, {})

    def fit(self, table: str, column: str, value: Any, *, now: datetime) -> Any:
        """:meth:`Column.fit` for *table*.*column*; unchanged if it is not known."""
        col = self.tables.get(table, {}).get(column)
        return value if col is None else col.fit(value, now=now)

    def fit_row(self, table: str, row: Mapping[str, Any], *, now: datetime) -> dict[str, Any]:
        """Every value of *row* (column name -> value) fitted to *table*."""
        return {name: self.fit(table, name, value, now=now) for name, value in row.items()}


EMPTY_LAYOUT = Layout({})


class _Fetcher(Protocol):
    async def fetchall(self, sql: str, args: Any = None) -> Sequence[Sequence[Any]]: ...


_COLUMNS_SQL = """
    SELECT column_name, data_type, is_nullable, character_maximum_length,
           character_octet_length, numeric_scale, column_type
    FROM information_schema.columns
    WHERE table_schema = DATABASE() AND table_name = %s
"""


async def read_mysql_layout(conn: _Fetcher, tables: tuple[str, ...]) -> Layout:
    """The columns of *tables* in the connection's database (absent tables: none)."""
    found: dict[str, dict[str, Column]] = {}
    for table in tables:
        columns: dict[str, Column] = {}
        for name, data_type, nullable, max_chars, octets, scale, column_type in await conn.fetchall(
            _COLUMNS_SQL, (table,)
        ):
            kind = str(data_type).lower()
            limit: int | None = None
            if kind in _CHAR and max_chars is not None:
                limit = int(max_chars)
            elif kind in _TEXT and octets is not None:
                limit = int(octets) // 4  # utf8mb4: up to 4 bytes a character
            columns[str(name)] = Column(
                name=str(name),
                data_type=kind,
                nullable=str(nullable).upper() == "YES",
                max_chars=limit,
                scale=None if scale is None else int(scale),
                unsigned="unsigned" in str(column_type).lower(),
            )
        found[table] = columns
    return Layout(found)
