"""One connection to MySQL / MariaDB through trio-mysql: :func:`connect` and
:class:`MySQLConnection` (the shared store's :class:`._sql.Connection`), and what
its errors mean.

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

The pool, the retries and the translation of errors into the store's are
:mod:`._mysql`'s; the settings :mod:`._mysql_settings`'.
"""

from __future__ import annotations

import math
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import structlog
import trio
import trio_mysql
import trio_mysql.connections
import trio_mysql.constants
import trio_mysql.cursors

from ..errors import StoreError
from ._base import Counters
from ._mysql_settings import MySQLSettings

__all__ = [
    "DEADLOCK",
    "DUPLICATE_KEY",
    "LOST",
    "MySQLConnection",
    "connect",
    "describe_error",
    "error_code",
    "is_lost_connection",
]

_log = structlog.get_logger("xintu.store")

# Error codes meaning "this connection is gone": the operation may run again on a
# fresh one. 2006 gone away, 2013 lost during query, 2055 lost (system error),
# 1927 connection killed (MariaDB), 4031 disconnected for inactivity (MySQL 8),
# 1053 server shutdown in progress.
LOST = frozenset({2006, 2013, 2055, 1927, 4031, 1053})
DEADLOCK = 1213
DUPLICATE_KEY = 1062


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


def error_code(exc: BaseException) -> int | None:
    args: tuple[Any, ...] = exc.args
    if args and isinstance(args[0], int):
        return args[0]
    return None


def describe_error(exc: BaseException) -> str:
    args: tuple[Any, ...] = exc.args
    if len(args) == 2 and isinstance(args[0], int):
        return f"({args[0]}) {args[1]}"
    return str(exc) or type(exc).__name__


def is_lost_connection(exc: BaseException) -> bool:
    code = error_code(exc)
    if code in LOST:
        return True
    # A closed connection, or a reply that does not belong to our request (what a
    # killed connection can look like) carries no code.
    return code is None and isinstance(exc, trio_mysql.InterfaceError | trio_mysql.InternalError)


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
            if error_code(exc) != DUPLICATE_KEY:
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
