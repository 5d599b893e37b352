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
- TLS: ``Connection(ssl=<ssl.SSLContext>)`` wraps the stream in a
  :class:`trio.SSLStream` after the server's greeting, but only if the server
  offers TLS; a server that does not gets the password in clear text. So the
  store checks that the session is encrypted and refuses it otherwise. A failed
  handshake (a certificate the CA does not vouch for) surfaces as a bare
  :class:`trio.BrokenResourceError` whose cause is the :class:`ssl.SSLError`.
- A connection cancelled mid-query is dead: the pool drops it. After a server
  restart or a ``KILL``, the next use of a pooled connection fails with 2013
  (lost connection) or 2006 (gone away); the store then re-runs the operation once
  on a fresh connection, if that cannot apply it twice.

The operations are the shared ones (:class:`._sql.SqlStore`) in the MySQL dialect
(:class:`._dialect.MySQLDialect`); this module connects, pools, retries, translates
errors, migrates the schema and reads the columns the tables really have, to which
every row written is fitted (:mod:`._layout`). In-flight claims are how replicas
coalesce: the claim's statements each commit on their own, so no lock outlives a
statement and no connection is held while the photo is classified; ``apply``
deletes the claims of the hashes it writes in the transaction that writes them: a
claim that succeeds after that commit (a claimer blocked on the row lock waits for
it) comes after the result is visible, which the claimer sees by reading the store
once more.
"""

from __future__ import annotations

import math
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import structlog
import trio
import trio_mysql
import trio_mysql.connections
import trio_mysql.constants
import trio_mysql.cursors

from .._redact import redact_url
from ..errors import ConfigError, StoreError, StoreRejected, StoreUnavailable
from ._base import Counters
from ._dialect import Dialect, MySQLDialect
from ._layout import read_mysql_layout
from ._migrate import MIGRATION_TIMEOUT_S, Migration
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


class _TlsRequired(Exception):
    """The URL asks for TLS and the server does not offer it."""


class _Connection(trio_mysql.connections.Connection):  # type: ignore[misc]  # untyped library
    """Refuses to authenticate in clear text when TLS was asked for (see the module doc)."""

    async def _request_authentication(self) -> None:
        if self.ssl and not self.server_capabilities & trio_mysql.constants.CLIENT.SSL:
            raise _TlsRequired
        await super()._request_authentication()


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


# The query options a store URL may carry (all about TLS), with what each takes.
URL_OPTIONS = {
    "ssl": "true or false: connect over TLS (implied by any other ssl_ option)",
    "ssl_ca": "a PEM file of the CA(s) to verify the server with (default: the system's)",
    "ssl_cert": "a PEM client certificate, for servers that require one",
    "ssl_key": "the client certificate's PEM key (if not in ssl_cert's file)",
    "ssl_verify": "true (default) or false: verify the server's certificate",
    "ssl_verify_identity": "true or false (default: ssl_verify): check the host name",
}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """How to speak TLS to the server (from the URL's ``ssl*`` options).

    ``verify``: the server's certificate must chain to ``ca`` (or the system's
    CAs); ``verify_identity``: and name the host of the URL. Without ``verify``
    the session is encrypted but anyone in the path can impersonate the server.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True
    verify_identity: bool = True

    def options(self) -> dict[str, str]:
        """The URL options that give these settings (defaults left out)."""
        out = {"ssl": "true"}
        for name, value in (("ssl_ca", self.ca), ("ssl_cert", self.cert), ("ssl_key", self.key)):
            if value is not None:
                out[name] = value
        if not self.verify:
            out["ssl_verify"] = "false"
        elif not self.verify_identity:
            out["ssl_verify_identity"] = "false"
        return out

    def context(self) -> ssl.SSLContext:
        """A client context (TLS 1.2+); :class:`ConfigError` for ``store.url`` if a
        file cannot be read. Reads the files: call it once, not per connection."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
            if self.cert is not None:
                ctx.load_cert_chain(self.cert, keyfile=self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("store.url", f"cannot use the TLS files of the URL: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.verify and self.verify_identity
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify else ssl.CERT_NONE
        return ctx


@dataclass(frozen=True, slots=True)
class MySQLSettings:
    """Where the server is; ``repr`` and :attr:`url` never show the password."""

    host: str
    port: int
    user: str | None
    password: str = field(repr=False)
    database: str
    tls: TlsSettings | None = None

    @property
    def url(self) -> str:
        """The URL with the password replaced by ``***``, for logs and messages."""
        creds = ""
        if self.user is not None:
            creds = self.user + (":***" if self.password else "") + "@"
        query = "" if self.tls is None else "?" + urlencode(self.tls.options(), safe="/")
        return f"mysql://{creds}{self.host}:{self.port}/{self.database}{query}"

    def with_database(self, database: str) -> MySQLSettings:
        return MySQLSettings(self.host, self.port, self.user, self.password, database, tls=self.tls)


def _flag(name: str, value: str, shown: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError("store.url", f"option {name} must be true or false, got {value!r} in {shown}")


def _parse_tls(query: str, shown: str) -> TlsSettings | None:
    """The TLS settings of a URL's query (``None``: no TLS); every option checked."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ConfigError("store.url", f"malformed URL options in {shown}") from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in URL_OPTIONS:
            known = ", ".join(URL_OPTIONS)
            raise ConfigError(
                "store.url", f"unknown URL option {name!r} in {shown} (known: {known})"
            )
        if name in options:
            raise ConfigError("store.url", f"URL option {name} given twice in {shown}")
        options[name] = value
    for name in ("ssl_ca", "ssl_cert", "ssl_key"):
        if name in options and not options[name]:
            raise ConfigError("store.url", f"URL option {name} needs a file path in {shown}")
    others = sorted(n for n in options if n != "ssl")
    on = _flag("ssl", options["ssl"], shown) if "ssl" in options else bool(others)
    if not on:
        if others:
            raise ConfigError("store.url", f"ssl=false contradicts {', '.join(others)} in {shown}")
        return None
    verify = _flag("ssl_verify", options.get("ssl_verify", "true"), shown)
    identity = verify
    if "ssl_verify_identity" in options:
        identity = _flag("ssl_verify_identity", options["ssl_verify_identity"], shown)
    if identity and not verify:
        raise ConfigError("store.url", f"ssl_verify_identity=true needs ssl_verify=true in {shown}")
    if "ssl_key" in options and "ssl_cert" not in options:
        raise ConfigError("store.url", f"ssl_key needs ssl_cert in {shown}")
    return TlsSettings(
        ca=options.get("ssl_ca"),
        cert=options.get("ssl_cert"),
        key=options.get("ssl_key"),
        verify=verify,
        verify_identity=identity,
    )


def parse_mysql_url(url: str, *, require_database: bool = True) -> MySQLSettings:
    """``mysql://user:pass@host:port/db[?ssl=true&ssl_ca=/path/ca.pem...]`` as settings
    (``mariadb://`` too; the options are :data:`URL_OPTIONS`).

    User and password may be percent-encoded. Raises :class:`ConfigError` for
    ``store.url``, naming an unknown option; the message never contains the password.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 3306
    except ValueError as exc:
        raise ConfigError("store.url", f"not a valid MySQL URL: {shown} ({exc})") from None
    if parts.scheme.lower() not in ("mysql", "mariadb"):
        raise ConfigError("store.url", f"not a MySQL URL: {shown}")
    if parts.fragment:
        raise ConfigError("store.url", f"a URL fragment is not supported: {shown}")
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
        tls=_parse_tls(parts.query, shown) if parts.query else None,
    )


# --- one connection ----------------------------------------------------------------


class MySQLConnection:
    """One trio-mysql connection and the socket under it, closed properly.

    Statements go through :meth:`execute`, :meth:`executemany` and :meth:`fetchall`
    (``%s`` or ``%(name)s`` placeholders); each counts as a query and any server
    warnings it caused are fetched and logged, never raised. It is the shared
    store's :class:`._sql.Connection`.
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
        self.commits = 0  # COMMITs begun: the store's retry must know if one was sent

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

    async def executemany(self, sql: str, rows: Sequence[Any]) -> int:
        """Run *sql* for many rows: an ``INSERT ... VALUES (...)`` as multi-row
        inserts, anything else once per row."""
        head, _, on_duplicate = sql.partition("ON DUPLICATE KEY UPDATE")
        # trio-mysql's multi-row form fills the VALUES list only, not parameters
        # of the ON DUPLICATE KEY UPDATE clause.
        if head.lstrip()[:6].upper() == "INSERT" and "%" not in on_duplicate:
            affected, _ = await self._run(sql, list(rows), many=True)
            return affected
        total = 0
        for row in rows:
            total += await self.execute(sql, row)
        return total

    async def fetchall(self, sql: str, args: Any = None) -> tuple[tuple[Any, ...], ...]:
        """Run a query; all its rows."""
        _, rows = await self._run(sql, args, many=False)
        return rows

    async def begin(self) -> None:
        self._counters.queries += 1
        await self._conn.begin()

    async def insert_new(self, sql: str, args: Any) -> bool:
        """Run a plain ``INSERT`` of one row; ``False`` if its key exists.

        Not ``ON DUPLICATE KEY UPDATE``: a duplicate leaves a shared lock on the
        row where that takes an exclusive one (see ``SqlStore.idempotency_begin``).
        """
        try:
            await self.execute(sql, args)
        except trio_mysql.IntegrityError as exc:
            if _code(exc) != _DUPLICATE_KEY:
                raise
            return False
        return True

    async def commit(self) -> None:
        self._counters.queries += 1
        self.commits += 1
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


def _tls_failure(settings: MySQLSettings, exc: BaseException) -> StoreError | None:
    """A clear error for a failed TLS handshake, or ``None`` if *exc* is not one.

    trio's SSLStream raises :class:`trio.BrokenResourceError` from the
    :class:`ssl.SSLError`; trio-mysql wraps an ``OSError`` (an ``SSLError`` is
    one) as ``OperationalError(2003)`` with the original as ``original_exception``.
    """
    cause = exc.__cause__ or getattr(exc, "original_exception", None)
    if not isinstance(cause, ssl.SSLError):
        return None
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message or str(cause)
        return StoreError(
            f"mysql store {settings.url}: the server's TLS certificate was not accepted "
            f"({why}): is ssl_ca the CA that signed it, and does it name the host?"
        )
    return StoreError(f"mysql store {settings.url}: TLS handshake failed: {cause}")


async def connect(
    settings: MySQLSettings,
    *,
    timeout_s: float,
    counters: Counters | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> MySQLConnection:
    """A new connection (autocommit, utf8mb4, UTC session), within *timeout_s*;
    over TLS when ``settings.tls`` says so (*tls_context*, else one built now).

    Raises ``OSError``, ``trio_mysql.MySQLError`` or :class:`trio.TooSlowError`,
    which the store translates, or :class:`StoreError` when TLS was asked for
    and the handshake failed or the server did not offer it.
    """
    if settings.tls is not None and tls_context is None:
        tls_context = settings.tls.context()
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(settings.host, settings.port)
        ok = False
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            raw = _Connection(
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
                ssl=tls_context,
            )
            try:
                await raw.connect(sock=stream)
            except _TlsRequired:
                raise StoreError(
                    f"mysql store {settings.url}: the server does not offer TLS, which "
                    "the URL asks for; nothing was sent"
                ) from None
            except (trio.BrokenResourceError, trio_mysql.OperationalError) as exc:
                failure = None if tls_context is None else _tls_failure(settings, exc)
                if failure is None:
                    raise
                raise failure from exc
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
        message = f"mysql store {self._settings.url}: {what} failed: {_describe(exc)}"
        if isinstance(exc, OSError) or _code(exc) in _UNAVAILABLE or _is_lost_connection(exc):
            return StoreUnavailable(message)
        if _code(exc) in _REJECTED:
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
                retry = _is_lost_connection(exc) or _code(exc) == _DEADLOCK
                if retry and attempt_no == 1 and (run.idempotent or not committing):
                    self._counters.retries += 1
                    _log.info(
                        "store_retry",
                        backend=self.backend,
                        operation=run.what,
                        error=_describe(exc),
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
            if _code(exc) != _DUPLICATE_KEY:
                raise
            _log.warning(
                "store_request_ids_repeat", table="request_log", index="idx_log_request_id"
            )
            await conn.execute("CREATE INDEX idx_log_request_id ON request_log (request_id)")
