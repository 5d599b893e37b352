"""The store: cached classifications, the request log, idempotency keys and the
in-flight claims through which processes sharing the store classify a photo once.

One async interface (:class:`Store`), implemented once over SQL
(:class:`._sql.SqlStore`) and spoken in two dialects (:mod:`._dialect`), one
backend module each, with the same tables (:mod:`._schema`):

- SQLite, embedded, in a file under the data directory (``sqlite:///abs/path``;
  :mod:`._sqlite`: a writer and a read-only reader connection, in threads);
- MySQL / MariaDB, shared by all replicas (``mysql://user:pass@host:port/db``,
  :mod:`._mysql_settings`; :mod:`._mysql`: a bounded pool, :mod:`._pool`, of
  trio-mysql connections, :mod:`._mysql_conn`), also in place on the original
  system's database (:mod:`._layout`).

Both create and migrate the schema the same way (:mod:`._migrate`). A new backend
is a dialect and one module; :mod:`._dialect` says how.

:func:`open_store` picks the backend from ``config.store_url``, connects and
creates or migrates the schema. An in-process :class:`Lru` sits in front of it.
"""

from __future__ import annotations

from pathlib import Path

from .._config import Config
from .._redact import redact_url
from ..errors import ConfigError
from ._base import SHARED_SCOPE as SHARED_SCOPE
from ._base import AliasWrite as AliasWrite
from ._base import CachedEntry as CachedEntry
from ._base import HitIncrement as HitIncrement
from ._base import IdempotencyRecord as IdempotencyRecord
from ._base import IdempotencyState as IdempotencyState
from ._base import RequestLogRow as RequestLogRow
from ._base import ResultWrite as ResultWrite
from ._base import Store as Store
from ._base import StoreStatistics as StoreStatistics
from ._base import WriteBatch as WriteBatch
from ._lru import Lru as Lru
from ._lru import LruStatistics as LruStatistics
from ._mysql import MySQLStore, parse_mysql_url
from ._sqlite import SQLiteStore
from ._stats import AlbumStats as AlbumStats

__all__ = [
    "SHARED_SCOPE",
    "AlbumStats",
    "AliasWrite",
    "CachedEntry",
    "HitIncrement",
    "IdempotencyRecord",
    "IdempotencyState",
    "Lru",
    "LruStatistics",
    "RequestLogRow",
    "ResultWrite",
    "Store",
    "StoreStatistics",
    "WriteBatch",
    "open_store",
    "sqlite_path",
]

_SQLITE_PREFIX = "sqlite://"


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///abs/path`` URL (``sqlite:////abs/path`` also works).

    Raises :class:`ConfigError` for ``store.url`` unless the path is absolute.
    """
    if not url.lower().startswith(_SQLITE_PREFIX):
        raise ConfigError("store.url", f"not a SQLite URL: {redact_url(url)}")
    rest = url[len(_SQLITE_PREFIX) :]
    if not rest.startswith("/") or rest.strip("/") == "":
        raise ConfigError(
            "store.url", f"expected sqlite:///absolute/path/to/file, got {redact_url(url)}"
        )
    return Path("/" + rest.lstrip("/"))


async def open_store(config: Config) -> Store:
    """Open the store named by ``config.store_url`` and bring its schema up to date.

    Raises :class:`~xintu.errors.ConfigError` for a URL that is not understood and
    :class:`~xintu.errors.StoreUnavailable` when the store cannot be reached
    (within ``store.query_timeout_s`` for each connection attempt).
    """
    url = config.store_url
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return await SQLiteStore.open(
            sqlite_path(url),
            query_timeout_s=config.store.query_timeout_s,
            request_log_retention_days=config.store.request_log_retention_days,
        )
    if scheme in ("mysql", "mariadb"):
        return await MySQLStore.open(
            parse_mysql_url(url),
            pool_size=config.store.pool_size,
            query_timeout_s=config.store.query_timeout_s,
            request_log_retention_days=config.store.request_log_retention_days,
        )
    raise ConfigError(
        "store.url",
        f"unsupported store URL {redact_url(url)!r}: expected sqlite:///path or "
        "mysql://user:pass@host:port/db",
    )
