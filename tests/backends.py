"""Pytest plugin: the store backends, for the store's tests and the service's.

Fixtures:

``store_url``
    Parametrised over ``sqlite`` (a file under ``tmp_path``) and ``mysql`` (this
    session's database, marked ``mysql``); every test starts with empty tables.
``store``
    An open :class:`xintu.store.Store` on ``store_url``, closed after the test.
``store_config``
    A :class:`xintu.Config` on a fresh data directory with ``store.url = store_url``
    (and ``request_log_retention_days = 0``: tests write rows with old times).
``mysql_url``
    The URL of a fresh MySQL/MariaDB database made for this test session
    (``xintu_test_<random hex>``, dropped at the end), tables emptied per test.
``fresh_mysql_url``
    The URL of an empty database of its own for one test (``<session db>_<hex>``,
    dropped after it): for tests that build a schema the store did not make.
``own_store_url``
    ``store_url`` for tests that change the schema: MySQL on ``fresh_mysql_url``.

Helpers: :func:`private_mariadb` starts a ``mariadbd`` of the test's own (its own
data directory and port, extra server options such as TLS), and
:func:`make_certificates` makes a throw-away CA and server certificate for it.

The server is ``TEST_MYSQL_URL`` (default ``mysql://root@127.0.0.1:3306/``; not an
``XINTU_`` variable, which the configuration would refuse as an unknown key). If it
cannot be reached, MySQL tests are skipped with the reason, or, when ``CI=true``,
fail: in CI a silent skip would hide the production backend's tests.

Load it with ``pytest_plugins = ["tests.backends"]`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
import trio_mysql

from xintu import Config, load_config
from xintu.store import Store, open_store
from xintu.store._mysql import MySQLConnection, MySQLSettings, connect, parse_mysql_url
from xintu.store._schema import DATA_TABLES

__all__ = [
    "Certificates",
    "PrivateServer",
    "TcpProxy",
    "make_certificates",
    "mysql_admin",
    "mysql_execute",
    "mysql_url_of",
    "open_test_store",
    "private_mariadb",
]

DEFAULT_MYSQL_SERVER = "mysql://root@127.0.0.1:3306/"
ADMIN_TIMEOUT_S = 10.0


def _server_settings() -> MySQLSettings:
    return parse_mysql_url(
        os.environ.get("TEST_MYSQL_URL", DEFAULT_MYSQL_SERVER), require_database=False
    )


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@asynccontextmanager
async def mysql_admin(settings: MySQLSettings) -> AsyncIterator[MySQLConnection]:
    """A plain connection outside any store (for setup, ``KILL`` and inspection)."""
    conn = await connect(settings, timeout_s=ADMIN_TIMEOUT_S)
    try:
        yield conn
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()


async def mysql_execute(url: str, sql: str, args: Any = None) -> tuple[tuple[Any, ...], ...]:
    """Run one statement on the database of *url* on a connection of its own."""
    with trio.fail_after(ADMIN_TIMEOUT_S):
        async with mysql_admin(parse_mysql_url(url, require_database=False)) as conn:
            return await conn.fetchall(sql, args)


async def _run_admin(settings: MySQLSettings, *statements: str) -> None:
    with trio.fail_after(ADMIN_TIMEOUT_S):
        async with mysql_admin(settings) as conn:
            for sql in statements:
                await conn.execute(sql)


async def _empty_tables(settings: MySQLSettings) -> None:
    with trio.fail_after(ADMIN_TIMEOUT_S):
        async with mysql_admin(settings) as conn:
            rows = await conn.fetchall(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"
            )
            for (name,) in rows:
                if name in DATA_TABLES:
                    await conn.execute(f"DELETE FROM {name}")


@pytest.fixture(scope="session")
def _mysql_database() -> Iterator[MySQLSettings]:
    server = _server_settings()
    name = f"xintu_test_{secrets.token_hex(6)}"
    try:
        trio.run(
            _run_admin,
            server,
            f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        )
    except (OSError, trio_mysql.MySQLError, trio.TooSlowError) as exc:
        reason = (
            f"MariaDB/MySQL not usable at {server.url} ({type(exc).__name__}: {exc}); "
            "start it or point TEST_MYSQL_URL at one"
        )
        if _ci():
            pytest.fail(f"{reason} [CI=true: the MySQL tests are required]", pytrace=False)
        pytest.skip(reason)
    try:
        yield server.with_database(name)
    finally:
        trio.run(_run_admin, server, f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def mysql_url(_mysql_database: MySQLSettings) -> str:
    """This session's MySQL database, with the store's tables emptied."""
    trio.run(_empty_tables, _mysql_database)
    return mysql_url_of(_mysql_database)


@pytest.fixture
def fresh_mysql_url(_mysql_database: MySQLSettings) -> Iterator[str]:
    """An empty database for this test alone, dropped after it."""
    name = f"{_mysql_database.database}_{secrets.token_hex(4)}"
    trio.run(
        _run_admin,
        _mysql_database,
        f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
    )
    try:
        yield mysql_url_of(_mysql_database.with_database(name))
    finally:
        trio.run(_run_admin, _mysql_database, f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def own_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Like ``store_url``, but on a database of this test's own (MySQL:
    ``fresh_mysql_url``): for tests that change the schema."""
    if request.param == "mysql":
        url: str = request.getfixturevalue("fresh_mysql_url")
        return url
    return f"sqlite:///{tmp_path / 'own-store' / 'xintu.sqlite3'}"


def mysql_url_of(settings: MySQLSettings, *, port: int | None = None) -> str:
    """The URL of *settings*, password included (percent-encoded), optionally on *port*."""
    creds = ""
    if settings.user:
        creds = quote(settings.user, safe="")
        if settings.password:
            creds += ":" + quote(settings.password, safe="")
        creds += "@"
    return f"mysql://{creds}{settings.host}:{port or settings.port}/{settings.database}"


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL for each backend; every test starts with an empty store."""
    if request.param == "mysql":
        url: str = request.getfixturevalue("mysql_url")
        return url
    return f"sqlite:///{tmp_path / 'store' / 'xintu.sqlite3'}"


@pytest.fixture
def store_config(store_url: str, tmp_path: Path) -> Config:
    """Defaults on a fresh data directory, the store at ``store_url``."""
    data = tmp_path / "store-data"  # not "data": conftest's data_dir fixture makes that one
    data.mkdir(exist_ok=True)
    # Keep the request log forever: tests write rows with fixed (old) times.
    return load_config(
        env={}, data={"dir": str(data)}, store={"url": store_url, "request_log_retention_days": 0}
    )


@pytest.fixture
async def store(store_config: Config) -> AsyncIterator[Store]:
    """An open store on ``store_url``."""
    with trio.fail_after(30):
        opened = await open_store(store_config)
    try:
        yield opened
    finally:
        await opened.aclose()


@asynccontextmanager
async def open_test_store(url: str, data_dir: Path, **store: Any) -> AsyncIterator[Store]:
    """A store on *url* with ``[store]`` overrides (``pool_size=2``...), closed after."""
    store = {"request_log_retention_days": 0, **store}  # as store_config
    config = load_config(env={}, data={"dir": str(data_dir)}, store={"url": url, **store})
    opened = await open_store(config)
    try:
        yield opened
    finally:
        await opened.aclose()


class TcpProxy:
    """A loopback TCP proxy in front of a server, which a test can cut.

    :meth:`sever` drops every proxied connection (what clients see when the server
    restarts); :meth:`stop` also stops listening (the server is down). Run it with
    ``await nursery.start(proxy.run)``; :attr:`port` is then set.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._connections: set[trio.CancelScope] = set()
        self._listening: trio.CancelScope | None = None
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as handlers:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            with trio.CancelScope() as self._listening:
                task_status.started()
                await trio.serve_listeners(self._handle, listeners, handler_nursery=handlers)

    def sever(self) -> None:
        for scope in self._connections:
            scope.cancel()

    def stop(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
        self.sever()

    async def _handle(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                async with client:
                    upstream = await trio.open_tcp_stream(*self._target)
                    async with upstream, trio.open_nursery() as pumps:
                        pumps.start_soon(self._pump, client, upstream, pumps.cancel_scope)
                        pumps.start_soon(self._pump, upstream, client, pumps.cancel_scope)
            finally:
                self._connections.discard(scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            done.cancel()


# --- a private server, and certificates for it ------------------------------------------


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
        if found:
            return found
    return None


def _required(what: str) -> None:
    reason = f"{what} not found: this test needs it"
    if _ci():
        pytest.fail(f"{reason} [CI=true: required]", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True, slots=True)
class Certificates:
    """PEM files: a CA, a server certificate it signed (for 127.0.0.1 only, not
    ``localhost``) with its key, and an unrelated CA (what a wrong ``ssl_ca`` is)."""

    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path


async def make_certificates(folder: Path) -> Certificates:
    """Throw-away certificates in *folder*, made with the ``openssl`` command."""
    openssl = _find("openssl")
    if openssl is None:
        _required("openssl")
    assert openssl is not None
    await trio.Path(folder).mkdir(parents=True, exist_ok=True)

    async def run(*args: str) -> None:
        await trio.run_process(
            [openssl, *args], cwd=folder, capture_stdout=True, capture_stderr=True
        )

    for name in ("ca", "other-ca"):
        await run(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=xintu test {name}",
        )  # fmt: skip
    await run(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    await trio.Path(folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    await run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "server.ext",
    )  # fmt: skip
    return Certificates(
        folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "other-ca.pem"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateServer:
    """A running private ``mariadbd``: its port, and a root URL without a database."""

    port: int
    root: Path

    def url(self, database: str = "", *, query: str = "") -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{database}" + (f"?{query}" if query else "")


@asynccontextmanager
async def private_mariadb(root: Path, *server_args: str) -> AsyncIterator[PrivateServer]:
    """Install and start a ``mariadbd`` of this test's own under *root* (the shared
    server is never touched), with *server_args* added to its options; stopped
    (SIGKILL) after. The ``root`` user has no password (``root@localhost``, which
    127.0.0.1 is). Skips without the binaries, or fails when ``CI=true``."""
    server = _find("mariadbd", "mysqld")
    install = _find("mariadb-install-db", "mysql_install_db")
    if server is None or install is None:
        _required("mariadbd / mariadb-install-db")
    assert server is not None
    assert install is not None
    user = ["--user=root"] if os.geteuid() == 0 else []
    datadir = root / "data"
    await trio.Path(root).mkdir(parents=True, exist_ok=True)
    await trio.run_process(
        [install, "--no-defaults", f"--datadir={datadir}",
         "--auth-root-authentication-method=normal", "--skip-test-db", *user],
        capture_stdout=True, capture_stderr=True,
    )  # fmt: skip
    port = _free_port()
    process = await trio.lowlevel.open_process(
        [server, "--no-defaults", f"--datadir={datadir}", f"--socket={root / 'sock'}",
         f"--pid-file={root / 'pid'}", f"--port={port}", "--bind-address=127.0.0.1",
         "--skip-log-bin", "--innodb-buffer-pool-size=16M", *user, *server_args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        log = b""
        async for chunk in process.stderr:
            log += chunk
            if b"ready for connections" in log:
                break
        else:
            raise AssertionError(f"mariadbd exited early:\n{log.decode(errors='replace')}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process)
            yield PrivateServer(port, root)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()


async def _drain(process: trio.Process) -> None:
    assert process.stderr is not None
    async for _ in process.stderr:
        pass
