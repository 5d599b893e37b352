"""The production backend: MySQL / MariaDB through trio-mysql, with a bounded pool.

Facts about trio-mysql 1.0.3 this module is built on (read from its source and
checked against MariaDB 10.11):

- Text comes back as ``bytes`` unless the connection has ``use_unicode=True``
  (and ``charset="utf8mb4"`` for anything beyond ASCII).
- Its ``Connection.close()`` (and the error paths that "force close") call
  ``close()`` on a :class:`trio.SocketStream`, which has none; the error is
  swallowed and the socket leaks. So this module opens the TCP stream itself,
  hands it to ``Connection.connect(sock=...)``, and closes the socket itself.
- Server warnings (a note for ``CREATE TABLE IF NOT EXISTS`` on an existing
  table, a duplicate key under ``INSERT IGNORE``) surface as Python warnings,
  which a process running with ``-W error`` turns into exceptions. The cursor
  class here defers them (``_defer_warnings``), and the store fetches and logs
  them instead; the SQL is written so that none arise (``ON DUPLICATE KEY
  UPDATE`` instead of ``INSERT IGNORE``, existence checks before DDL).
- Bytes are sent as plain string literals unless ``binary_prefix=True``; with it
  a ``LONGBLOB`` round-trips any bytes.
- ``DATETIME`` values are sent and read as naive datetimes: the store sends UTC
  and marks what it reads as UTC (and sets the session time zone to UTC).
- A connection cancelled mid-query is dead: the pool drops it. After a server
  restart or a ``KILL``, the next use of a pooled connection fails with 2013
  (lost connection) or 2006 (gone away); the store then re-runs the operation once
  on a fresh connection, if that cannot apply it twice.

In-flight claims (how replicas coalesce): :meth:`MySQLStore.claim` runs autocommit
statements only, so no lock outlives a statement and no connection is held while
the photo is classified: a conditional ``UPDATE`` takes over an expired claim (or
renews the owner's own), else an ``INSERT`` takes a free one; a duplicate key means
another owner's claim is live. :meth:`MySQLStore.apply` deletes the claims of the
hashes it writes in the transaction that writes them: a claim that succeeds after
that commit (a claimer blocked on the row lock waits for it) comes after the result
is visible, which the claimer sees by reading the store once more.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import structlog
import trio
import trio_mysql
import trio_mysql.connections
import trio_mysql.cursors

from .._redact import redact_url
from ..errors import ConfigError, StoreError, StoreRejected, StoreUnavailable
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
    naive_utc,
    parse_time,
    prepare_batch,
    resolve_lookup,
    to_utc,
)
from ._layout import EMPTY_LAYOUT, Layout, read_mysql_layout
from ._pool import Pool
from ._schema import ADDED_COLUMNS, INDEXES, SCHEMA_VERSION, SCHEMA_VERSION_TABLE, TABLES
from ._stats import AlbumStats, assemble_stats, stats_queries

__all__ = ["MySQLConnection", "MySQLSettings", "MySQLStore", "connect", "parse_mysql_url"]

T = TypeVar("T")

_log = structlog.get_logger("xintu.store")

_CHUNK = 500  # hashes per SELECT ... IN (...)
PRUNE_INTERVAL_S = 600.0
BATCH_RETENTION = timedelta(days=1)
CLAIM_RETENTION = timedelta(minutes=1)  # past expiry: a margin for clock skew
MIGRATION_TIMEOUT_S = 300.0

# Error codes meaning "this connection is gone": the operation may run again on a
# fresh one. 2006 gone away, 2013 lost during query, 2055 lost (system error),
# 1927 connection killed (MariaDB), 4031 disconnected for inactivity (MySQL 8),
# 1053 server shutdown in progress.
_LOST = frozenset({2006, 2013, 2055, 1927, 4031, 1053})
_DEADLOCK = 1213
_DUPLICATE_KEY = 1062
# Codes that mean the store cannot be used now (StoreUnavailable, not StoreError).
_UNAVAILABLE = _LOST | frozenset(
    {
        1040,  # too many connections
        1044,  # access denied to the database
        1045,  # access denied (bad user or password)
        1049,  # unknown database
        1205,  # lock wait timeout
        _DEADLOCK,
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


class _QuietCursor(trio_mysql.cursors.Cursor):  # type: ignore[misc]  # untyped library
    """Leaves server warnings for the store to fetch and log (see the module doc)."""

    _defer_warnings = True


def _code(exc: BaseException) -> int | None:
    args: tuple[Any, ...] = exc.args
    if args and isinstance(args[0], int):
        return args[0]
    return None


def _describe(exc: BaseException) -> str:
    args: tuple[Any, ...] = exc.args
    if len(args) == 2 and isinstance(args[0], int):
        return f"({args[0]}) {args[1]}"
    return str(exc) or type(exc).__name__


def _is_lost_connection(exc: BaseException) -> bool:
    code = _code(exc)
    if code in _LOST:
        return True
    # A closed connection, or a reply that does not belong to our request (what a
    # killed connection can look like) carries no code.
    return code is None and isinstance(exc, trio_mysql.InterfaceError | trio_mysql.InternalError)


# --- settings --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MySQLSettings:
    """Where the server is; ``repr`` and :attr:`url` never show the password."""

    host: str
    port: int
    user: str | None
    password: str = field(repr=False)
    database: str

    @property
    def url(self) -> str:
        """The URL with the password replaced by ``***``, for logs and messages."""
        creds = ""
        if self.user is not None:
            creds = self.user + (":***" if self.password else "") + "@"
        return f"mysql://{creds}{self.host}:{self.port}/{self.database}"

    def with_database(self, database: str) -> MySQLSettings:
        return MySQLSettings(self.host, self.port, self.user, self.password, database)


def parse_mysql_url(url: str, *, require_database: bool = True) -> MySQLSettings:
    """``mysql://user:pass@host:port/db`` (``mariadb://`` too) as settings.

    User and password may be percent-encoded. Raises :class:`ConfigError` for
    ``store.url``; the message never contains the password.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 3306
    except ValueError as exc:
        raise ConfigError("store.url", f"not a valid MySQL URL: {shown} ({exc})") from None
    if parts.scheme.lower() not in ("mysql", "mariadb"):
        raise ConfigError("store.url", f"not a MySQL URL: {shown}")
    if parts.query or parts.fragment:
        raise ConfigError("store.url", f"URL parameters are not supported: {shown}")
    if not parts.hostname:
        raise ConfigError("store.url", f"no host in {shown}")
    database = unquote(parts.path.lstrip("/"))
    if "/" in database or "`" in database:
        raise ConfigError("store.url", f"bad database name in {shown}")
    if require_database and not database:
        raise ConfigError("store.url", f"no database in {shown} (mysql://user:pass@host:port/db)")
    return MySQLSettings(
        host=parts.hostname,
        port=port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else "",
        database=database,
    )


# --- one connection ----------------------------------------------------------------


class MySQLConnection:
    """One trio-mysql connection and the socket under it, closed properly.

    Statements go through :meth:`execute`, :meth:`executemany` and :meth:`fetchall`
    (``%s`` placeholders, pyformat); each counts as a query and any server
    warnings it caused are fetched and logged, never raised.
    """

    def __init__(
        self,
        conn: Any,
        stream: trio.SocketStream,
        counters: Counters | None = None,
    ) -> None:
        self._conn = conn
        self._stream = stream
        self._counters = counters if counters is not None else Counters()

    @property
    def thread_id(self) -> int:
        """The server's id for this connection (what ``KILL`` takes)."""
        return int(self._conn.thread_id())

    @property
    def open(self) -> bool:
        return bool(self._conn.open)

    async def _run(self, sql: str, args: Any, *, many: bool) -> tuple[int, tuple[Any, ...]]:
        self._counters.queries += 1
        cur = self._conn.cursor()
        if many:
            affected = await cur.executemany(sql, args)
        else:
            affected = await cur.execute(sql, args)
        rows = tuple(await cur.fetchall())
        # trio-mysql keeps the warning count on the cursor's (private) result object.
        warning_count = getattr(getattr(cur, "_result", None), "warning_count", 0)
        if warning_count:
            await self._report_warnings(sql)
        return int(affected or 0), rows

    async def _report_warnings(self, sql: str) -> None:
        shown = await self._conn.show_warnings() or ()
        self._counters.server_warnings += len(shown)
        for level, code, message in shown:
            _log.warning(
                "store_server_warning",
                backend="mysql",
                level=level,
                code=code,
                message=message,
                sql=" ".join(sql.split())[:200],
            )

    async def execute(self, sql: str, args: Any = None) -> int:
        """Run one statement; the number of affected rows."""
        affected, _ = await self._run(sql, args, many=False)
        return affected

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run an ``INSERT ... VALUES (...)`` for many rows (as multi-row inserts)."""
        affected, _ = await self._run(sql, list(rows), many=True)
        return affected

    async def fetchall(self, sql: str, args: Any = None) -> tuple[tuple[Any, ...], ...]:
        """Run a query; all its rows."""
        _, rows = await self._run(sql, args, many=False)
        return rows

    async def begin(self) -> None:
        self._counters.queries += 1
        await self._conn.begin()

    async def commit(self) -> None:
        self._counters.queries += 1
        await self._conn.commit()

    async def rollback(self) -> None:
        self._counters.queries += 1
        await self._conn.rollback()

    async def aclose(self) -> None:
        """Say goodbye if the connection still works, and close the socket anyway."""
        try:
            if self._conn.open:
                with trio.move_on_after(1.0):
                    await self._conn.aclose()
        finally:
            # trio-mysql cannot close a trio stream itself (see the module doc).
            self._stream.socket.close()


async def connect(
    settings: MySQLSettings,
    *,
    timeout_s: float,
    counters: Counters | None = None,
) -> MySQLConnection:
    """A new connection (autocommit, utf8mb4, UTC session), within *timeout_s*.

    Raises ``OSError``, ``trio_mysql.MySQLError`` or :class:`trio.TooSlowError`;
    the store translates them.
    """
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(settings.host, settings.port)
        ok = False
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            raw = trio_mysql.connections.Connection(
                host=settings.host,
                port=settings.port,
                user=settings.user,
                password=settings.password,
                database=settings.database or None,
                charset="utf8mb4",
                use_unicode=True,
                autocommit=True,
                binary_prefix=True,
                cursorclass=_QuietCursor,
                program_name="xintu",
            )
            await raw.connect(sock=stream)
            conn = MySQLConnection(raw, stream, counters)
            # Server-side lock waits end no later than the client gives up.
            lock_wait_s = max(1, math.ceil(timeout_s))
            await conn.execute(
                "SET time_zone = '+00:00', innodb_lock_wait_timeout = %s", (lock_wait_s,)
            )
            ok = True
            return conn
        finally:
            if not ok:
                stream.socket.close()


# --- the store -----------------------------------------------------------------------


@dataclass(slots=True)
class _Attempt:
    """What an operation tells :meth:`MySQLStore._run` about how far it got."""

    committing: bool = False


_UPSERT = """
    INSERT INTO image_classification_cache (
        image_hash, category, confidence, description, model_used, model_response,
        source, image_size, hit_count, created_at, last_hit_at
    ) VALUES (
        %(image_hash)s, %(category)s, %(confidence)s, %(description)s, %(model_used)s,
        %(model_response)s, %(source)s, %(image_size)s, 0, %(created_at)s, %(last_hit_at)s
    )
    ON DUPLICATE KEY UPDATE
        category = IF(source <=> 'local' AND %(llm)s, %(category)s, category),
        confidence = IF(source <=> 'local' AND %(llm)s, %(confidence)s, confidence),
        description = IF(source <=> 'local' AND %(llm)s, %(description)s, description),
        model_used = IF(source <=> 'local' AND %(llm)s, %(model_used)s, model_used),
        model_response = IF(source <=> 'local' AND %(llm)s, %(model_response)s, model_response),
        image_size = IF(source <=> 'local' AND %(llm)s,
                        COALESCE(image_size, %(image_size)s), image_size),
        source = IF(source <=> 'local' AND %(llm)s, %(source)s, source)
"""
# ``source`` is assigned last: MySQL evaluates the assignments left to right, and
# the conditions above must see the stored source, not the new one.

_HIT = """
    UPDATE image_classification_cache SET
        hit_count = hit_count + %s,
        last_hit_at = GREATEST(COALESCE(last_hit_at, %s), %s)
    WHERE image_hash = %s
"""

# The latest upload wins: an older alias (a journal replayed late) changes nothing.
# ``image_hash`` is assigned first, while ``created_at`` is still the stored one.
_ALIAS = """
    INSERT INTO image_hash_aliases (scope, alias_hash, image_hash, created_at)
    VALUES (%(scope)s, %(alias_hash)s, %(image_hash)s, %(created_at)s)
    ON DUPLICATE KEY UPDATE
        image_hash = IF(%(created_at)s >= created_at, %(image_hash)s, image_hash),
        created_at = GREATEST(created_at, %(created_at)s)
"""

_LOOKUP = lookup_sql("%s", "%s")

# request_log columns of the original system that the store fills too, from its own.
_LOG_EXTRAS = ("ip_address", "inference_method")
# The tables whose rows are fitted to their columns.
_FITTED_TABLES = ("image_classification_cache", "request_log")
_LOG_NAMES = tuple(name.strip() for name in LOG_COLUMNS.split(","))


def _log_insert(layout: Layout) -> tuple[str, tuple[str, ...]]:
    """The request-log INSERT for *layout*, and the columns it writes, in order."""
    names = _LOG_NAMES + tuple(n for n in _LOG_EXTRAS if layout.has("request_log", n))
    marks = ", ".join(["%s"] * len(names))
    sql = (
        f"INSERT INTO request_log ({', '.join(names)}) VALUES ({marks}) "
        "ON DUPLICATE KEY UPDATE request_id = request_id"
    )
    return sql, names


def _log_values(row: RequestLogRow) -> dict[str, Any]:
    """A request-log row by column name, the original's columns included."""
    values = dict(zip(_LOG_NAMES, log_params(row), strict=True))
    values["ip_address"] = row.ip
    # The original's stats count requests by inference method.
    values["inference_method"] = "cache" if row.from_cache else row.source
    return values


_IDEM_SELECT = (
    "SELECT fingerprint, state, status, body, content_type, created_at, expires_at "
    "FROM idempotency_keys WHERE scope = %s AND idem_key = %s"
)

_IDEM_INSERT = (
    "INSERT INTO idempotency_keys (scope, idem_key, fingerprint, state, created_at, "
    "expires_at) VALUES (%s, %s, %s, 'in_flight', %s, %s)"
)


# Take over a claim that expired, or renew one the owner holds already.
_CLAIM_TAKE = (
    "UPDATE inflight_claims SET owner = %(owner)s, expires_at = %(expires_at)s "
    "WHERE image_hash = %(image_hash)s AND (owner = %(owner)s OR expires_at <= %(now)s)"
)
_CLAIM_INSERT = (
    "INSERT INTO inflight_claims (image_hash, owner, expires_at) "
    "VALUES (%(image_hash)s, %(owner)s, %(expires_at)s)"
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


class MySQLStore(Store):
    """The store on a MySQL/MariaDB database. Build it with :meth:`open`."""

    backend = "mysql"

    def __init__(self, settings: MySQLSettings, *, pool_size: int, query_timeout_s: float) -> None:
        self._settings = settings
        self._timeout_s = query_timeout_s
        self._counters = Counters()
        self._pool: Pool[MySQLConnection] = Pool(self._connect, size=pool_size)
        self._last_prune = -math.inf
        # The columns the tables really have (read at open): what is written is fitted.
        self._layout = EMPTY_LAYOUT
        self._log_sql, self._log_names = _log_insert(EMPTY_LAYOUT)

    @classmethod
    async def open(
        cls, settings: MySQLSettings, *, pool_size: int, query_timeout_s: float
    ) -> MySQLStore:
        """Connect and migrate the schema; ``StoreUnavailable`` if unreachable."""
        store = cls(settings, pool_size=pool_size, query_timeout_s=query_timeout_s)
        ok = False
        try:
            await store._migrate()
            ok = True
        finally:
            if not ok:
                await store.aclose()
        return store

    @property
    def pool(self) -> Pool[MySQLConnection]:
        """The connection pool (for diagnostics and tests)."""
        return self._pool

    @property
    def settings(self) -> MySQLSettings:
        return self._settings

    async def _connect(self) -> MySQLConnection:
        return await connect(self._settings, timeout_s=self._timeout_s, counters=self._counters)

    def _translate(self, exc: BaseException, what: str) -> StoreError:
        message = f"mysql store {self._settings.url}: {what} failed: {_describe(exc)}"
        if isinstance(exc, OSError) or _code(exc) in _UNAVAILABLE or _is_lost_connection(exc):
            return StoreUnavailable(message)
        if _code(exc) in _REJECTED:
            return StoreRejected(message)
        return StoreError(message)

    async def _run(
        self,
        what: str,
        op: Callable[[MySQLConnection, _Attempt], Awaitable[T]],
        *,
        idempotent: bool = True,
        timeout_s: float | None = None,
    ) -> T:
        """Run *op* on a pooled connection within the query timeout.

        A lost connection (stale after a restart, killed) or a deadlock re-runs *op*
        once on a fresh connection, unless *op* is not idempotent and had started
        to commit (then the first attempt may have taken effect).
        """
        limit = self._timeout_s if timeout_s is None else timeout_s
        for attempt_no in (1, 2):
            attempt = _Attempt()
            try:
                with trio.fail_after(limit):
                    async with self._pool.acquire(fresh=attempt_no > 1) as conn:
                        return await op(conn, attempt)
            except trio.TooSlowError as exc:
                self._counters.errors += 1
                raise StoreUnavailable(
                    f"mysql store {self._settings.url}: {what} timed out after {limit:g}s"
                ) from exc
            except StoreError:
                self._counters.errors += 1
                raise
            except (trio_mysql.MySQLError, OSError) as exc:
                retry = _is_lost_connection(exc) or _code(exc) == _DEADLOCK
                if retry and attempt_no == 1 and (idempotent or not attempt.committing):
                    self._counters.retries += 1
                    _log.info(
                        "store_retry",
                        backend=self.backend,
                        operation=what,
                        error=_describe(exc),
                    )
                    continue
                self._counters.errors += 1
                raise self._translate(exc, what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # --- schema ------------------------------------------------------------------

    async def _migrate(self) -> None:
        lock_name = f"xintu.schema.{self._settings.database}"

        async def op(conn: MySQLConnection, attempt: _Attempt) -> None:
            # Replicas starting together take turns; the lock dies with the connection.
            (got,) = (await conn.fetchall("SELECT GET_LOCK(%s, %s)", (lock_name, 60)))[0]
            if got != 1:
                raise StoreUnavailable(f"mysql store: could not take the schema lock {lock_name}")
            if not await _table_exists(conn, SCHEMA_VERSION_TABLE.name):
                await conn.execute(SCHEMA_VERSION_TABLE.mysql_create())
            rows = await conn.fetchall("SELECT version FROM schema_version WHERE id = 1")
            version = int(rows[0][0]) if rows else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"mysql store: schema version {version} is newer than this Xintu's "
                    f"({SCHEMA_VERSION}); upgrade Xintu"
                )
            if version < SCHEMA_VERSION:
                for table in TABLES:
                    if not await _table_exists(conn, table.name):
                        await conn.execute(table.mysql_create())
                for col in ADDED_COLUMNS:
                    if not await _column_exists(conn, col.table, col.name):
                        await conn.execute(
                            f"ALTER TABLE {col.table} ADD COLUMN {col.name} {col.mysql}"
                        )
                for index in INDEXES:
                    if not await _index_exists(conn, index.table, index.name, index.columns):
                        await conn.execute(index.create())
                await _key_request_ids(conn)
                await conn.execute(
                    "INSERT INTO schema_version (id, version, updated_at) VALUES (1, %s, %s) "
                    "ON DUPLICATE KEY UPDATE version = %s, updated_at = %s",
                    (SCHEMA_VERSION, _now(), SCHEMA_VERSION, _now()),
                )
                _log.info("store_migrated", backend=self.backend, version=SCHEMA_VERSION)
            await conn.fetchall("SELECT RELEASE_LOCK(%s)", (lock_name,))
            layout = await read_mysql_layout(conn, _FITTED_TABLES)
            self._layout = layout
            self._log_sql, self._log_names = _log_insert(layout)

        await self._run("open", op, timeout_s=max(self._timeout_s, MIGRATION_TIMEOUT_S))

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
        own = lookup_scope(scope)

        async def op(conn: MySQLConnection, attempt: _Attempt) -> dict[str, CachedEntry]:
            out: dict[str, CachedEntry] = {}
            for i in range(0, len(wanted), _CHUNK):
                chunk = tuple(wanted[i : i + _CHUNK])
                rows = await conn.fetchall(_LOOKUP, (chunk, chunk, own, SHARED_SCOPE))
                resolve_lookup(rows, chunk, out)
            return out

        return await self._run("get", op)

    async def get_request_log(self, request_id: str) -> RequestLogRow | None:
        async def op(conn: MySQLConnection, attempt: _Attempt) -> RequestLogRow | None:
            rows = await conn.fetchall(
                f"SELECT {LOG_COLUMNS} FROM request_log WHERE request_id = %s", (request_id,)
            )
            return decode_log_row(rows[0]) if rows else None

        return await self._run("get_request_log", op)

    async def album_stats(self, now: datetime) -> AlbumStats:
        queries = stats_queries(now, placeholder="%s", encode_time=naive_utc)

        async def op(conn: MySQLConnection, attempt: _Attempt) -> dict[str, Any]:
            return {
                name: await conn.fetchall(sql, params) for name, (sql, params) in queries.items()
            }

        return assemble_stats(now, await self._run("album_stats", op))

    async def ping(self) -> None:
        async def op(conn: MySQLConnection, attempt: _Attempt) -> None:
            await conn.fetchall("SELECT 1")

        await self._run("ping", op)

    # --- writes ------------------------------------------------------------------

    async def apply(self, batch: WriteBatch) -> bool:
        prepared = prepare_batch(batch, now=datetime.now(UTC))

        async def op(conn: MySQLConnection, attempt: _Attempt) -> bool:
            return await self._apply(conn, attempt, prepared)

        # Idempotent by batch id: running it again after an ambiguous commit is safe.
        applied = await self._run("apply", op, idempotent=True)
        if applied:
            self._counters.batches_applied += 1
        else:
            self._counters.batches_duplicate += 1
        await self._maybe_prune()
        return applied

    async def _apply(self, conn: MySQLConnection, attempt: _Attempt, p: PreparedBatch) -> bool:
        await conn.begin()
        try:
            await conn.execute(
                "INSERT INTO applied_batches (batch_id, applied_at) VALUES (%s, %s)",
                (p.batch_id, naive_utc(p.applied_at)),
            )
        except trio_mysql.IntegrityError as exc:
            if _code(exc) != _DUPLICATE_KEY:
                raise
            await conn.rollback()
            return False
        layout, now = self._layout, naive_utc(p.applied_at)
        for r in p.results:
            created = naive_utc(r.created_at)
            row = layout.fit_row(
                "image_classification_cache",
                {
                    "image_hash": r.image_hash,
                    "category": r.category,
                    "confidence": r.confidence,
                    "description": clip(r.description, "description"),
                    "model_used": r.model_used,
                    "model_response": r.model_response,
                    "source": r.source,
                    "image_size": r.image_size,
                    "created_at": created,
                },
                now=now,
            )
            # Never hit yet: NULL, or (NOT NULL in the original) the time it was made.
            last_hit = layout.fit("image_classification_cache", "last_hit_at", None, now=created)
            await conn.execute(_UPSERT, {**row, "last_hit_at": last_hit, "llm": r.source == "llm"})
        if p.results:
            # The answers are visible once this commits: their claims go with it.
            claimed = tuple(sorted({r.image_hash for r in p.results}))
            await conn.execute("DELETE FROM inflight_claims WHERE image_hash IN %s", (claimed,))
        for h in p.hits:
            at = naive_utc(h.last_hit_at)
            await conn.execute(_HIT, (h.count, at, at, h.image_hash))
        if p.logs:
            rows = []
            for log in p.logs:
                values = _log_values(log)
                values["created_at"] = naive_utc(log.created_at)
                fitted = layout.fit_row("request_log", values, now=now)
                rows.append(tuple(fitted[name] for name in self._log_names))
            await conn.executemany(self._log_sql, rows)
        for a in p.aliases:  # after the results: an alias may name one of this batch
            await conn.execute(
                _ALIAS,
                {
                    "scope": a.scope,
                    "alias_hash": a.alias_hash,
                    "image_hash": a.image_hash,
                    "created_at": naive_utc(a.created_at),
                },
            )
        attempt.committing = True
        await conn.commit()
        return True

    async def _maybe_prune(self) -> None:
        now_s = trio.current_time()
        if now_s - self._last_prune < PRUNE_INTERVAL_S:
            return
        self._last_prune = now_s
        now = datetime.now(UTC)
        cutoff = naive_utc(now - BATCH_RETENTION)
        lapsed = naive_utc(now - CLAIM_RETENTION)

        async def op(conn: MySQLConnection, attempt: _Attempt) -> tuple[int, int, int]:
            batches = await conn.execute(
                "DELETE FROM applied_batches WHERE applied_at < %s", (cutoff,)
            )
            keys = await conn.execute(
                "DELETE FROM idempotency_keys WHERE expires_at < %s", (cutoff,)
            )
            claims = await conn.execute(
                "DELETE FROM inflight_claims WHERE expires_at < %s", (lapsed,)
            )
            return batches, keys, claims

        try:
            batches, keys, claims = await self._run("prune", op)
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
        params = {
            "image_hash": image_hash,
            "owner": owner,
            "expires_at": naive_utc(at + timedelta(seconds=ttl_s)),
            "now": naive_utc(at),
        }

        async def op(conn: MySQLConnection, attempt: _Attempt) -> bool:
            # Autocommit statements: each holds its row lock only while it runs.
            if await conn.execute(_CLAIM_TAKE, params):
                return True
            try:
                await conn.execute(_CLAIM_INSERT, params)
            except trio_mysql.IntegrityError as exc:
                if _code(exc) != _DUPLICATE_KEY:
                    raise
            else:
                return True
            # A live claim: another owner's, or ours renewed to the same expiry (the
            # UPDATE then changes no row), or one inserted by a lost first attempt.
            rows = await conn.fetchall(
                "SELECT owner FROM inflight_claims WHERE image_hash = %s", (image_hash,)
            )
            return bool(rows) and rows[0][0] == owner

        # Idempotent: a re-run after an ambiguous failure finds the owner's own claim.
        return await self._run("claim", op)

    async def release_claim(self, image_hash: str, owner: str) -> None:
        check_claim(image_hash, owner, 1.0)

        async def op(conn: MySQLConnection, attempt: _Attempt) -> None:
            await conn.execute(
                "DELETE FROM inflight_claims WHERE image_hash = %s AND owner = %s",
                (image_hash, owner),
            )

        await self._run("release_claim", op)

    # --- idempotency keys --------------------------------------------------------

    async def idempotency_begin(
        self, scope: str, key: str, fingerprint: str, *, now: datetime, ttl_s: float
    ) -> IdempotencyRecord | None:
        check_idempotency_key(scope, key)
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        created = to_utc(now)
        expires = created + timedelta(seconds=ttl_s)
        claim = (fingerprint, naive_utc(created), naive_utc(expires))

        async def op(conn: MySQLConnection, attempt: _Attempt) -> IdempotencyRecord | None:
            await conn.begin()
            # Insert first: a new key takes no gap lock, and a concurrent claim of the
            # same key waits for ours and then sees it.
            try:
                await conn.execute(_IDEM_INSERT, (scope, key, *claim))
            except trio_mysql.IntegrityError as exc:
                if _code(exc) != _DUPLICATE_KEY:
                    raise
                # The common case, a live record, needs no lock: a plain read sees the
                # committed row our insert collided with (concurrent claims of one key
                # taking locks here would deadlock each other).
                rows = await conn.fetchall(_IDEM_SELECT, (scope, key))
                if rows and (record := _record(scope, key, rows[0])).expires_at > created:
                    await conn.rollback()
                    return record
                # Expired (or just released): take the row's lock and read it again.
                rows = await conn.fetchall(_IDEM_SELECT + " FOR UPDATE", (scope, key))
                if not rows:
                    await conn.execute(_IDEM_INSERT, (scope, key, *claim))
                else:
                    record = _record(scope, key, rows[0])
                    if record.expires_at > created:
                        await conn.rollback()
                        return record
                    await conn.execute(
                        "UPDATE idempotency_keys SET fingerprint = %s, state = 'in_flight', "
                        "status = NULL, body = NULL, content_type = NULL, created_at = %s, "
                        "expires_at = %s WHERE scope = %s AND idem_key = %s",
                        (*claim, scope, key),
                    )
            attempt.committing = True
            await conn.commit()
            return None

        # Not idempotent: after an ambiguous commit a re-run would find our own claim.
        return await self._run("idempotency_begin", op, idempotent=False)

    async def idempotency_complete(
        self, scope: str, key: str, status: int, body: bytes, content_type: str
    ) -> None:
        check_idempotency_key(scope, key)

        async def op(conn: MySQLConnection, attempt: _Attempt) -> None:
            await conn.execute(
                "UPDATE idempotency_keys SET state = 'completed', status = %s, body = %s, "
                "content_type = %s WHERE scope = %s AND idem_key = %s AND state = 'in_flight'",
                (status, bytes(body), clip(content_type, "content_type"), scope, key),
            )

        await self._run("idempotency_complete", op)

    async def idempotency_release(self, scope: str, key: str) -> None:
        check_idempotency_key(scope, key)

        async def op(conn: MySQLConnection, attempt: _Attempt) -> None:
            await conn.execute(
                "DELETE FROM idempotency_keys WHERE scope = %s AND idem_key = %s "
                "AND state = 'in_flight'",
                (scope, key),
            )

        await self._run("idempotency_release", op)

    # --- lifetime ----------------------------------------------------------------

    async def aclose(self) -> None:
        await self._pool.aclose()

    def statistics(self) -> StoreStatistics:
        pool = self._pool.statistics()
        return merge_statistics(
            self.backend,
            self._counters,
            pool_size=pool.size,
            pool_in_use=pool.in_use,
            pool_idle=pool.idle,
            pool_waiting=pool.waiting,
            pool_created=pool.created,
            pool_discarded=pool.discarded,
        )


def _now() -> datetime:
    return naive_utc(datetime.now(UTC))


async def _table_exists(conn: MySQLConnection, table: str) -> bool:
    rows = await conn.fetchall(
        "SELECT COUNT(*) FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_name = %s",
        (table,),
    )
    return bool(rows[0][0])


async def _column_exists(conn: MySQLConnection, table: str, column: str) -> bool:
    rows = await conn.fetchall(
        "SELECT COUNT(*) FROM information_schema.columns "
        "WHERE table_schema = DATABASE() AND table_name = %s AND column_name = %s",
        (table, column),
    )
    return bool(rows[0][0])


async def _index_exists(
    conn: MySQLConnection, table: str, index: str, columns: tuple[str, ...]
) -> bool:
    """Whether *table* has the index *index*, or another that starts with *columns*
    (the original's tables have their own names for some of Xintu's indexes)."""
    rows = await conn.fetchall(
        "SELECT index_name, column_name FROM information_schema.statistics "
        "WHERE table_schema = DATABASE() AND table_name = %s ORDER BY index_name, seq_in_index",
        (table,),
    )
    indexes: dict[str, list[str]] = {}
    for name, column in rows:
        indexes.setdefault(str(name), []).append(str(column).lower())
    if index in indexes:
        return True
    wanted = [c.lower() for c in columns]
    return any(cols[: len(wanted)] == wanted for cols in indexes.values())


async def _key_request_ids(conn: MySQLConnection) -> None:
    """Give ``request_log`` a unique key on ``request_id`` if it has no index on it
    (the original's has none): a retried row is then written once, and
    ``get_request_log`` is an index read. Rows that already repeat a request id get
    a plain index instead."""
    if await _index_exists(conn, "request_log", "uk_request_id", ("request_id",)):
        return
    try:
        await conn.execute("ALTER TABLE request_log ADD UNIQUE KEY uk_request_id (request_id)")
    except trio_mysql.IntegrityError as exc:
        if _code(exc) != _DUPLICATE_KEY:
            raise
        _log.warning("store_request_ids_repeat", table="request_log", index="idx_log_request_id")
        await conn.execute("CREATE INDEX idx_log_request_id ON request_log (request_id)")
