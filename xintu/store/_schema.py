"""The store's tables, in both SQL dialects, and the schema version they make.

Tables (DESIGN §5):

- ``image_classification_cache``: one row per photo ever classified, unique by
  ``image_hash``; the columns of the original system plus the additive ``source``
  and ``image_size``. ``model_response`` holds JSON: the provider, the source and
  the local model's evidence.
- ``request_log``: one row per classification request, unique by ``request_id``
  (a batch upload's items each get one); a batch-check-cache request is one row
  whose ``hashes_asked`` and ``hashes_hit`` (added in version 5) hold its counts
  (NULL for every other row).
- ``idempotency_keys``: ``Idempotency-Key`` claims and stored answers.
- ``applied_batches``: the writer's batch ids, so that a retried batch is applied once.
- ``inflight_claims``: one row per photo some process is classifying now (its owner
  and when the claim lapses), so that replicas sharing the store classify a new
  photo once between them (added in version 2).
- ``image_hash_aliases``: client-named photos (DESIGN §2): the hash a client gave a
  photo (``alias_hash``), seen within ``scope`` (an uploader's scope, or ``"*"``
  for everyone), names the verified entry ``image_hash`` (added in version 3). No
  foreign key (a write must not fail on it): an alias whose entry is missing is
  simply never found. Nothing deletes cache entries today; code that does must
  delete the entry's aliases in the same transaction (``idx_alias_image_hash``).
- ``stats_requests`` and ``stats_cache``: the counters ``/api/v1/stats`` reads
  instead of scanning the tables (added in version 4). ``stats_requests`` counts
  ``request_log`` rows per UTC day, category (``''`` for none) and source
  (``'none'`` for none): ``requests`` and the sum of ``from_cache``; it is not
  pruned with the log, so totals count every request ever logged.
  ``stats_cache`` counts ``image_classification_cache`` rows (``entries``) and the
  sum of their ``hit_count`` (``hits``) per category and source (``''`` for none).
  :meth:`._sql.SqlStore.apply` keeps both in the transaction that writes the rows;
  the migration to version 4 fills them from the rows already there. A row with
  ``hashes_hit`` counts as that many requests, all from the cache (each hit a
  batch check served is a request served, as when each had a row of its own). Rows written
  by anything else (the original system, a process of an older version during a
  rolling upgrade) are not counted.
- ``schema_version``: one row, the version this module's tables describe.

Migration (:mod:`._migrate`) is additive and idempotent: tables are created if
missing (so a version 1 database gains ``inflight_claims``), and a table left by the
original system gets the columns and indexes it lacks (an index is not added twice
where the original has one on the same columns under another name; the original's
``request_log`` gains a unique key on ``request_id``, or a plain index if its rows
already repeat one). Its columns are never changed: the MySQL store fits what it
writes to them (:mod:`._layout`). A database whose version is newer than
:data:`SCHEMA_VERSION` is refused. Timestamps are UTC:
``DATETIME(6)`` on MySQL, fixed-width text (``YYYY-MM-DD HH:MM:SS.ffffff``) on SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADDED_COLUMNS",
    "DATA_TABLES",
    "INDEXES",
    "LIMITS",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_TABLE",
    "STATS_VERSION",
    "TABLES",
    "AddedColumn",
    "Index",
    "Table",
]

# 1: cache, request log, idempotency keys, applied batches; 2: + inflight_claims;
# 3: + image_hash_aliases; 4: + stats_requests, stats_cache (filled on migration);
# 5: + request_log.hashes_asked and hashes_hit (one row per batch check).
SCHEMA_VERSION = 5
# The version that added the stats counters: a database below it gets them filled.
STATS_VERSION = 4

# Longest value (in characters) of each bounded column; the store clips free text to
# these so that one over-long field cannot make a whole batch fail forever.
LIMITS: dict[str, int] = {
    "image_hash": 64,
    "batch_id": 64,
    "request_id": 128,
    "user_id": 255,
    "ip": 64,
    "category": 32,
    "source": 16,
    "model_used": 255,
    "description": 16_000,  # TEXT holds 65,535 bytes: 4 bytes a character at worst
    "scope": 64,
    "idem_key": 255,
    "fingerprint": 128,
    "content_type": 255,
    "owner": 64,
}


@dataclass(frozen=True, slots=True)
class Table:
    """A table: its column and key definitions in each dialect."""

    name: str
    mysql: str
    sqlite: str

    def mysql_create(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.name} ({self.mysql}) "
            "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
        )

    def sqlite_create(self) -> str:
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({self.sqlite})"


@dataclass(frozen=True, slots=True)
class AddedColumn:
    """A column added to a table the original system may already have."""

    table: str
    name: str
    mysql: str
    sqlite: str


@dataclass(frozen=True, slots=True)
class Index:
    """A non-unique index (unique keys are part of the table definitions)."""

    table: str
    name: str
    columns: tuple[str, ...]

    def create(self) -> str:
        return f"CREATE INDEX {self.name} ON {self.table} ({', '.join(self.columns)})"


_HASH_MYSQL = "CHAR(64) CHARACTER SET ascii COLLATE ascii_bin"
_KEY_MYSQL = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"  # keys compare byte for byte

SCHEMA_VERSION_TABLE = Table(
    "schema_version",
    mysql="""
        id TINYINT UNSIGNED NOT NULL,
        version INT NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        PRIMARY KEY (id)""",
    sqlite="""
        id INTEGER NOT NULL PRIMARY KEY,
        version INTEGER NOT NULL,
        updated_at TEXT NOT NULL""",
)

CACHE_TABLE = Table(
    "image_classification_cache",
    mysql=f"""
        id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
        image_hash {_HASH_MYSQL} NOT NULL,
        category VARCHAR(32) NOT NULL,
        confidence DOUBLE NOT NULL,
        description TEXT NULL,
        model_used VARCHAR(255) NULL,
        model_response JSON NULL,
        source VARCHAR(16) NULL,
        image_size BIGINT NULL,
        hit_count BIGINT UNSIGNED NOT NULL DEFAULT 0,
        created_at DATETIME(6) NOT NULL,
        last_hit_at DATETIME(6) NULL,
        PRIMARY KEY (id),
        UNIQUE KEY uk_image_hash (image_hash)""",
    sqlite="""
        id INTEGER PRIMARY KEY,
        image_hash CHAR(64) NOT NULL UNIQUE,
        category TEXT NOT NULL,
        confidence REAL NOT NULL,
        description TEXT,
        model_used TEXT,
        model_response TEXT,
        source TEXT,
        image_size INTEGER,
        hit_count INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        last_hit_at TEXT""",
)

REQUEST_LOG_TABLE = Table(
    "request_log",
    mysql=f"""
        id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
        request_id VARCHAR(128) {_KEY_MYSQL} NOT NULL,
        user_id VARCHAR(255) NULL,
        ip VARCHAR(64) NULL,
        image_hash VARCHAR(64) NULL,
        image_size BIGINT NULL,
        category VARCHAR(32) NULL,
        confidence DOUBLE NULL,
        from_cache TINYINT(1) NOT NULL DEFAULT 0,
        source VARCHAR(16) NULL,
        processing_time_ms DOUBLE NOT NULL DEFAULT 0,
        created_at DATETIME(6) NOT NULL,
        hashes_asked INT NULL,
        hashes_hit INT NULL,
        PRIMARY KEY (id),
        UNIQUE KEY uk_request_id (request_id)""",
    sqlite="""
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL UNIQUE,
        user_id TEXT,
        ip TEXT,
        image_hash TEXT,
        image_size INTEGER,
        category TEXT,
        confidence REAL,
        from_cache INTEGER NOT NULL DEFAULT 0,
        source TEXT,
        processing_time_ms REAL NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        hashes_asked INTEGER,
        hashes_hit INTEGER""",
)

IDEMPOTENCY_TABLE = Table(
    "idempotency_keys",
    mysql=f"""
        scope VARCHAR(64) {_KEY_MYSQL} NOT NULL,
        idem_key VARCHAR(255) {_KEY_MYSQL} NOT NULL,
        fingerprint VARCHAR(128) {_KEY_MYSQL} NOT NULL,
        state VARCHAR(16) NOT NULL,
        status INT NULL,
        body LONGBLOB NULL,
        content_type VARCHAR(255) NULL,
        created_at DATETIME(6) NOT NULL,
        expires_at DATETIME(6) NOT NULL,
        PRIMARY KEY (scope, idem_key)""",
    sqlite="""
        scope TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        state TEXT NOT NULL,
        status INTEGER,
        body BLOB,
        content_type TEXT,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        PRIMARY KEY (scope, idem_key)""",
)

APPLIED_BATCHES_TABLE = Table(
    "applied_batches",
    mysql=f"""
        batch_id VARCHAR(64) {_KEY_MYSQL} NOT NULL,
        applied_at DATETIME(6) NOT NULL,
        PRIMARY KEY (batch_id)""",
    sqlite="""
        batch_id TEXT NOT NULL PRIMARY KEY,
        applied_at TEXT NOT NULL""",
)

INFLIGHT_CLAIMS_TABLE = Table(
    "inflight_claims",
    mysql=f"""
        image_hash {_HASH_MYSQL} NOT NULL,
        owner VARCHAR(64) {_KEY_MYSQL} NOT NULL,
        expires_at DATETIME(6) NOT NULL,
        PRIMARY KEY (image_hash)""",
    sqlite="""
        image_hash CHAR(64) NOT NULL PRIMARY KEY,
        owner TEXT NOT NULL,
        expires_at TEXT NOT NULL""",
)

ALIASES_TABLE = Table(
    "image_hash_aliases",
    mysql=f"""
        scope VARCHAR(64) {_KEY_MYSQL} NOT NULL,
        alias_hash {_HASH_MYSQL} NOT NULL,
        image_hash {_HASH_MYSQL} NOT NULL,
        created_at DATETIME(6) NOT NULL,
        PRIMARY KEY (scope, alias_hash)""",
    sqlite="""
        scope TEXT NOT NULL,
        alias_hash CHAR(64) NOT NULL,
        image_hash CHAR(64) NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (scope, alias_hash)""",
)

STATS_REQUESTS_TABLE = Table(
    "stats_requests",
    mysql="""
        day DATE NOT NULL,
        category VARCHAR(64) NOT NULL,
        source VARCHAR(16) NOT NULL,
        requests BIGINT NOT NULL DEFAULT 0,
        from_cache BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (day, category, source)""",
    sqlite="""
        day TEXT NOT NULL,
        category TEXT NOT NULL,
        source TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        from_cache INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (day, category, source)""",
)

STATS_CACHE_TABLE = Table(
    "stats_cache",
    mysql="""
        category VARCHAR(64) NOT NULL,
        source VARCHAR(16) NOT NULL,
        entries BIGINT NOT NULL DEFAULT 0,
        hits BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (category, source)""",
    sqlite="""
        category TEXT NOT NULL,
        source TEXT NOT NULL,
        entries INTEGER NOT NULL DEFAULT 0,
        hits INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (category, source)""",
)

# Created in this order; schema_version first so that its row can be read at once.
TABLES: tuple[Table, ...] = (
    SCHEMA_VERSION_TABLE,
    CACHE_TABLE,
    REQUEST_LOG_TABLE,
    IDEMPOTENCY_TABLE,
    APPLIED_BATCHES_TABLE,
    INFLIGHT_CLAIMS_TABLE,
    ALIASES_TABLE,
    STATS_REQUESTS_TABLE,
    STATS_CACHE_TABLE,
)

# The tables that hold data (everything but schema_version).
DATA_TABLES: tuple[str, ...] = tuple(t.name for t in TABLES[1:])

# Columns the original system's tables lack (or might lack).
ADDED_COLUMNS: tuple[AddedColumn, ...] = (
    AddedColumn("image_classification_cache", "source", "VARCHAR(16) NULL", "TEXT"),
    AddedColumn("image_classification_cache", "image_size", "BIGINT NULL", "INTEGER"),
    AddedColumn("request_log", "source", "VARCHAR(16) NULL", "TEXT"),
    # The original's request_log names it ip_address (VARCHAR(45)); the store fills both.
    AddedColumn("request_log", "ip", "VARCHAR(64) NULL", "TEXT"),
    # A batch check's counts (version 5).
    AddedColumn("request_log", "hashes_asked", "INT NULL", "INTEGER"),
    AddedColumn("request_log", "hashes_hit", "INT NULL", "INTEGER"),
)

# What the stats endpoint and the pruning of old rows will query by.
INDEXES: tuple[Index, ...] = (
    Index("image_classification_cache", "idx_cache_created_at", ("created_at",)),
    Index("image_classification_cache", "idx_cache_category", ("category",)),
    Index("image_classification_cache", "idx_cache_source", ("source",)),
    Index("request_log", "idx_log_created_at", ("created_at",)),
    Index("request_log", "idx_log_category", ("category",)),
    Index("request_log", "idx_log_source", ("source",)),
    Index("request_log", "idx_log_image_hash", ("image_hash",)),
    Index("idempotency_keys", "idx_idem_expires_at", ("expires_at",)),
    Index("applied_batches", "idx_batches_applied_at", ("applied_at",)),
    Index("inflight_claims", "idx_claims_expires_at", ("expires_at",)),
    Index("image_hash_aliases", "idx_alias_image_hash", ("image_hash",)),
    Index("image_hash_aliases", "idx_alias_alias_hash", ("alias_hash",)),
)
