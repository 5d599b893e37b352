"""The store interface both backends implement, and the values it takes and returns.

The writer actor is the only caller of :meth:`Store.apply`; it hands over one
:class:`WriteBatch` at a time. A batch is applied in one transaction together
with a row in ``applied_batches``, so a batch that is retried after an ambiguous
failure (the commit may or may not have happened) is applied at most once.

In-flight claims (:meth:`Store.claim`, :meth:`Store.release_claim`) let processes
sharing the store coalesce their work: the process that claims a photo's hash
classifies it, and :meth:`Store.apply` deletes the claim in the same transaction
that writes the result, so the moment the claim is gone the answer is visible.
A claim lapses at its ``expires_at``; any process may then take it over.

Everything here is backend-neutral: row decoding, timestamp normalisation and
the preparation of a batch (sorting, merging hit increments) live in this module
so that SQLite and MySQL behave the same.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import trio

from .._types import Category, Classification, Source, is_image_hash
from ..errors import StoreError
from ._schema import LIMITS
from ._stats import AlbumStats

__all__ = [
    "SHARED_SCOPE",
    "AliasWrite",
    "CachedEntry",
    "HitIncrement",
    "IdempotencyRecord",
    "IdempotencyState",
    "RequestLogRow",
    "ResultWrite",
    "Store",
    "StoreStatistics",
    "WriteBatch",
]

IdempotencyState = Literal["in_flight", "completed"]

# The alias scope every client sees (``api.client_hash_mode = "shared"``).
SHARED_SCOPE = "*"

# A batch id is a client-chosen token (a UUID in practice); bounded by the column.
_MAX_BATCH_ID = LIMITS["batch_id"]


def _check_hash(image_hash: str) -> None:
    if not is_image_hash(image_hash):
        raise ValueError(f"not a lowercase 64-hex SHA-256 digest: {image_hash!r}")


@dataclass(frozen=True, slots=True)
class CachedEntry:
    """One row of ``image_classification_cache``: a photo's answer, as stored.

    ``image_size`` is an extension (bytes of the photo that was classified; ``None``
    for rows written by the original system).
    """

    image_hash: str
    classification: Classification
    hit_count: int
    created_at: datetime
    last_hit_at: datetime | None
    image_size: int | None = None


@dataclass(frozen=True, slots=True)
class ResultWrite:
    """A classifier's answer to store. The first answer for a hash wins, except
    that an ``llm`` answer replaces a stored ``local`` one.

    ``created_at`` (an extension) is when the answer was produced; ``None`` means
    the time the batch is applied.
    """

    image_hash: str
    classification: Classification
    image_size: int | None
    created_at: datetime | None = None
    # An operator's re-classification (``/admin/reclassify``): this answer replaces
    # whatever is stored, an ``llm`` one included (its hit count stays).
    replace: bool = False

    def __post_init__(self) -> None:
        _check_hash(self.image_hash)
        if self.image_size is not None and self.image_size < 0:
            raise ValueError(f"negative image_size {self.image_size!r}")


@dataclass(frozen=True, slots=True)
class HitIncrement:
    """``count`` more cache hits for a hash, the latest at ``last_hit_at``.

    An increment for a hash with no stored row changes nothing.
    """

    image_hash: str
    count: int
    last_hit_at: datetime

    def __post_init__(self) -> None:
        _check_hash(self.image_hash)
        if self.count < 0:
            raise ValueError(f"negative hit count {self.count!r}")


@dataclass(frozen=True, slots=True)
class RequestLogRow:
    """One row of ``request_log``; a second row with the same ``request_id`` is ignored.

    A batch-check-cache request is one row: ``hashes_asked`` and ``hashes_hit`` are
    its counts (``None`` for every other request). The stats count such a row as
    ``hashes_hit`` requests served from the cache.
    """

    request_id: str
    user_id: str | None
    ip: str | None
    image_hash: str | None
    image_size: int | None
    category: str | None
    confidence: float | None
    from_cache: bool
    source: str | None
    processing_time_ms: float
    created_at: datetime
    hashes_asked: int | None = None
    hashes_hit: int | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("empty request_id")
        if (self.hashes_asked is None) != (self.hashes_hit is None):
            raise ValueError("hashes_asked and hashes_hit go together")
        if self.hashes_hit is not None and not 0 <= self.hashes_hit <= (self.hashes_asked or 0):
            raise ValueError(f"need 0 <= hashes_hit <= hashes_asked, got {self.hashes_hit!r}")

    @property
    def requests(self) -> int:
        """Requests this row counts for in the stats: a batch check's hits, else 1."""
        return 1 if self.hashes_hit is None else self.hashes_hit


@dataclass(frozen=True, slots=True)
class AliasWrite:
    """A client's name *alias_hash* for the verified entry *image_hash*, seen in
    *scope* (an uploader's scope, or :data:`SHARED_SCOPE` for everyone); DESIGN §2.

    A later alias of the same (*scope*, *alias_hash*) replaces it (the latest upload
    wins, by ``created_at``; ``None`` means the time the batch is applied). An alias
    of a hash to itself is skipped. Lookups never let an alias hide a verified entry
    of the same hash.
    """

    scope: str
    alias_hash: str
    image_hash: str
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        _check_hash(self.alias_hash)
        _check_hash(self.image_hash)
        if not 0 < len(self.scope) <= LIMITS["scope"]:
            raise ValueError(f"alias scope must have 1..{LIMITS['scope']} characters")


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """Everything the writer flushes at once; applied in one transaction, at most once.

    Aliases are written after results, so an alias may name a result of the same batch.
    """

    batch_id: str
    results: tuple[ResultWrite, ...] = ()
    hits: tuple[HitIncrement, ...] = ()
    logs: tuple[RequestLogRow, ...] = ()
    aliases: tuple[AliasWrite, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < len(self.batch_id) <= _MAX_BATCH_ID:
            raise ValueError(f"batch_id must have 1..{_MAX_BATCH_ID} characters")


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The stored state of one ``Idempotency-Key`` within a scope.

    ``in_flight``: the first request holds the claim; ``completed``: its answer
    (``status``, ``body``, ``content_type``) is stored for replay until ``expires_at``.
    """

    scope: str
    key: str
    fingerprint: str
    state: IdempotencyState
    status: int | None
    body: bytes | None
    content_type: str | None
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """A snapshot of one store's counters (totals since it was opened).

    ``queries``: statements sent; ``errors``: operations that failed with a
    :class:`~xintu.errors.StoreError`; ``retries``: operations re-run once on a fresh
    connection (stale connection, deadlock); ``server_warnings``: warnings the
    server reported (logged, never raised). The ``pool_*`` fields describe the
    connection pool (SQLite: its one connection).
    """

    backend: str
    queries: int
    errors: int
    retries: int
    server_warnings: int
    batches_applied: int
    batches_duplicate: int
    pool_size: int
    pool_in_use: int
    pool_idle: int
    pool_waiting: int
    pool_created: int
    pool_discarded: int


@dataclass(slots=True)
class Counters:
    """The mutable totals behind :class:`StoreStatistics` (one per store instance)."""

    queries: int = 0
    errors: int = 0
    retries: int = 0
    server_warnings: int = 0
    batches_applied: int = 0
    batches_duplicate: int = 0


class Store(abc.ABC):
    """One async interface over the SQLite and MySQL/MariaDB backends.

    Open one with :func:`xintu.store.open_store`. Every method bounds its waits by
    ``store.query_timeout_s``; failures raise :class:`~xintu.errors.StoreError`
    (:class:`~xintu.errors.StoreUnavailable` when the store cannot be reached or
    timed out). Using a closed store raises :class:`trio.ClosedResourceError`.
    """

    backend: str

    @abc.abstractmethod
    async def get(self, image_hash: str, *, scope: str | None = None) -> CachedEntry | None:
        """The stored answer for *image_hash*, or ``None``.

        *image_hash* names the verified entry of that hash if there is one; else an
        alias of it visible in *scope*; else one visible to everyone
        (:data:`SHARED_SCOPE`). ``scope=None``: verified entries and shared aliases
        only. The entry returned is the verified one (its ``image_hash`` may differ
        from the one asked).
        """

    @abc.abstractmethod
    async def get_many(
        self, hashes: Sequence[str], *, scope: str | None = None
    ) -> dict[str, CachedEntry]:
        """:meth:`get` for many hashes in one round trip, keyed by the hash asked
        (only those that have an answer)."""

    @abc.abstractmethod
    async def apply(self, batch: WriteBatch) -> bool:
        """Apply *batch* in one transaction; ``False`` if it had been applied before.

        The in-flight claims of the hashes it writes results for are deleted in the
        same transaction.
        """

    @abc.abstractmethod
    async def get_request_log(self, request_id: str) -> RequestLogRow | None:
        """The ``request_log`` row of *request_id*, or ``None`` (an extension)."""

    @abc.abstractmethod
    async def album_stats(self, now: datetime) -> AlbumStats:
        """Totals, today's counts, distributions and latency percentiles (``/api/v1/stats``)."""

    # Operators' reads and writes (``/admin``, ``xintu admin``). The SQL backends
    # implement them; a store that does not (a test's fake) says so.

    async def find_hashes(
        self,
        *,
        source: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int,
    ) -> list[str]:
        """Hashes of cached entries made from *since* (inclusive) until *until*
        (exclusive) whose source is *source* (any if ``None``), oldest first, at
        most *limit*."""
        raise StoreError(f"{self.backend} store: listing entries is not supported")

    async def purge(self, image_hash: str) -> bool:
        """Delete the entry of *image_hash*, the aliases naming it and its claim, in
        one transaction (the stats counters follow); ``False`` if there was none.

        The one write that does not go through the writer: an operator's, answered
        at once. A result for the hash that the writer still holds may bring the
        entry back.
        """
        raise StoreError(f"{self.backend} store: purging entries is not supported")

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return if the store answers a trivial query; else raise ``StoreUnavailable``."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the connection(s); idempotent."""

    @abc.abstractmethod
    def statistics(self) -> StoreStatistics:
        """A snapshot of this store's counters."""

    @abc.abstractmethod
    async def idempotency_begin(
        self, scope: str, key: str, fingerprint: str, *, now: datetime, ttl_s: float
    ) -> IdempotencyRecord | None:
        """Claim (*scope*, *key*) for a first request and return ``None``.

        If a live record exists (``expires_at > now``) nothing changes and it is
        returned, in flight or completed, with its fingerprint: the caller decides
        between 409, 422 and a replay. An expired record is replaced by the claim.
        """

    @abc.abstractmethod
    async def idempotency_complete(
        self, scope: str, key: str, status: int, body: bytes, content_type: str
    ) -> None:
        """Store the first request's answer for replay (the claim must be in flight)."""

    @abc.abstractmethod
    async def idempotency_release(self, scope: str, key: str) -> None:
        """Forget an in-flight claim whose request failed without a storable answer."""

    # In-flight claims. The backends shared by processes override both; the default
    # serves a store that one process owns alone (the test fakes): nobody else can
    # hold a claim, so every claim is won.

    async def claim(self, image_hash: str, owner: str, *, now: datetime, ttl_s: float) -> bool:
        """Take the in-flight claim on *image_hash* for *owner*, until ``now + ttl_s``.

        ``True`` if there was no claim, the existing one had expired
        (``expires_at <= now``), or *owner* already holds it (its expiry is then
        renewed); ``False`` while another owner's claim is live. Atomic: of
        concurrent claimers exactly one wins. Raises ``ValueError`` for a malformed
        hash, an owner of more than 64 characters or ``ttl_s <= 0``.
        """
        check_claim(image_hash, owner, ttl_s)
        await trio.lowlevel.checkpoint()
        return True

    async def release_claim(self, image_hash: str, owner: str) -> None:
        """Delete *owner*'s claim on *image_hash*, if it still holds one; another
        owner's claim is left alone."""
        check_claim(image_hash, owner, 1.0)
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# --- shared helpers -------------------------------------------------------------

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def to_utc(value: datetime) -> datetime:
    """*value* as an aware UTC datetime; a naive value is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def naive_utc(value: datetime) -> datetime:
    """*value* in UTC without tzinfo, the form both databases store."""
    return to_utc(value).replace(tzinfo=None)


def time_text(value: datetime) -> str:
    """The fixed-width text form (UTC, microseconds) SQLite stores; sorts like time."""
    return naive_utc(value).strftime(_TIME_FORMAT)


def parse_time(value: object) -> datetime:
    """A stored timestamp (text from SQLite, naive datetime from MySQL) as aware UTC."""
    if isinstance(value, datetime):
        return to_utc(value)
    if isinstance(value, str):
        return to_utc(datetime.fromisoformat(value))
    raise TypeError(f"not a stored timestamp: {value!r}")


def parse_optional_time(value: object) -> datetime | None:
    return None if value is None else parse_time(value)


def clip(value: str | None, column: str) -> str | None:
    """*value* cut to the column's length, so that one over-long field (a model name,
    a user id) cannot make a whole batch fail forever."""
    if value is None:
        return None
    return value[: LIMITS[column]]


def _json_default(obj: object) -> Any:
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def encode_model_response(c: Classification) -> str:
    """The ``model_response`` JSON: what the columns of the original table lack."""
    payload = {
        "source": c.source.value,
        "provider": c.provider,
        "local_inference_result": (
            dict(c.local_inference_result) if c.local_inference_result is not None else None
        ),
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _decode_model_response(raw: object) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def _category(value: object) -> Category:
    try:
        return Category(str(value))
    except ValueError:
        # A row from another writer with a category this version does not know.
        return Category.OTHER


def _source(column: object, response: Mapping[str, Any]) -> Source:
    for candidate in (column, response.get("source")):
        if candidate in (Source.LLM.value, Source.LOCAL.value):
            return Source(str(candidate))
    # Rows written by the original system carry no source: its answers came from the LLM.
    return Source.LLM


def _confidence(value: object) -> float:
    try:
        f = float(value)  # type: ignore[arg-type]  # DECIMAL, FLOAT or str in legacy rows
    except (TypeError, ValueError):
        return 0.0
    if math.isnan(f):
        return 0.0
    return min(1.0, max(0.0, f))


# The columns every backend selects, in this order, to build a CachedEntry.
CACHE_SELECT = (
    "image_hash, category, confidence, description, model_used, model_response, "
    "source, hit_count, created_at, last_hit_at, image_size"
)


def lookup_scope(scope: str | None) -> str:
    """The caller's scope in a lookup (``None``: shared aliases only)."""
    return SHARED_SCOPE if scope is None else scope


def resolve_lookup(
    rows: Sequence[Sequence[Any]], wanted: Sequence[str], out: dict[str, CachedEntry]
) -> None:
    """Add to *out*, keyed by the asked hash, the best answer of each in *rows*
    (from :func:`._sql.lookup_sql`): the verified entry, else the caller's alias,
    else a shared one."""
    asked_set = set(wanted)
    best: dict[str, tuple[int, Sequence[Any]]] = {}
    for row in rows:
        asked, pri = str(row[0]), int(row[1])
        if asked not in asked_set:
            asked = asked.lower()  # a case-insensitive legacy column may differ in case
        prev = best.get(asked)
        if prev is None or pri < prev[0]:
            best[asked] = (pri, row[2:])
    for asked, (_, row) in best.items():
        out[asked] = decode_cache_row(row)


def decode_cache_row(row: Sequence[Any]) -> CachedEntry:
    """A :class:`CachedEntry` from a row selected with :data:`CACHE_SELECT`."""
    (
        image_hash,
        category,
        confidence,
        description,
        model_used,
        model_response,
        source,
        hit_count,
        created_at,
        last_hit_at,
        image_size,
    ) = row
    response = _decode_model_response(model_response)
    lir = response.get("local_inference_result")
    provider = response.get("provider")
    classification = Classification(
        category=_category(category),
        confidence=_confidence(confidence),
        source=_source(source, response),
        model=str(model_used or ""),
        description=description,
        provider=provider if isinstance(provider, str) else None,
        local_inference_result=lir if isinstance(lir, dict) else None,
    )
    return CachedEntry(
        image_hash=str(image_hash),
        classification=classification,
        hit_count=int(hit_count or 0),
        created_at=parse_time(created_at),
        last_hit_at=parse_optional_time(last_hit_at),
        image_size=None if image_size is None else int(image_size),
    )


# The request_log columns, in the order both backends insert and select them.
LOG_COLUMNS = (
    "request_id, user_id, ip, image_hash, image_size, category, confidence, "
    "from_cache, source, processing_time_ms, created_at, hashes_asked, hashes_hit"
)


def decode_log_row(row: Sequence[Any]) -> RequestLogRow:
    (
        request_id,
        user_id,
        ip,
        image_hash,
        image_size,
        category,
        confidence,
        from_cache,
        source,
        processing_time_ms,
        created_at,
        hashes_asked,
        hashes_hit,
    ) = row
    return RequestLogRow(
        request_id=str(request_id),
        user_id=user_id,
        ip=ip,
        image_hash=image_hash,
        image_size=None if image_size is None else int(image_size),
        category=category,
        confidence=None if confidence is None else float(confidence),
        from_cache=bool(from_cache),
        source=source,
        processing_time_ms=float(processing_time_ms),
        created_at=parse_time(created_at),
        hashes_asked=None if hashes_asked is None else int(hashes_asked),
        hashes_hit=None if hashes_hit is None else int(hashes_hit),
    )


@dataclass(frozen=True, slots=True)
class ResultParams:
    """One result write, flattened into column values (timestamps still aware)."""

    image_hash: str
    category: str
    confidence: float
    description: str | None
    model_used: str | None
    model_response: str
    source: str
    image_size: int | None
    created_at: datetime
    replace: bool = False


@dataclass(frozen=True, slots=True)
class HitParams:
    image_hash: str
    count: int
    last_hit_at: datetime


@dataclass(frozen=True, slots=True)
class AliasParams:
    scope: str
    alias_hash: str
    image_hash: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A batch in the shape the backends write: sorted by key (so that concurrent
    writers take row locks in the same order), hit increments merged per hash,
    request-log rows de-duplicated (the first of a request id wins)."""

    batch_id: str
    applied_at: datetime
    results: tuple[ResultParams, ...]
    hits: tuple[HitParams, ...]
    logs: tuple[RequestLogRow, ...] = field(default=())
    aliases: tuple[AliasParams, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.results or self.hits or self.logs or self.aliases)


def prepare_batch(batch: WriteBatch, *, now: datetime) -> PreparedBatch:
    """Normalise *batch* for writing; *now* stands in for missing result times."""
    results = tuple(
        ResultParams(
            image_hash=r.image_hash,
            category=r.classification.category.value,
            confidence=float(r.classification.confidence),
            description=r.classification.description,
            model_used=clip(r.classification.model, "model_used"),
            model_response=encode_model_response(r.classification),
            source=r.classification.source.value,
            image_size=r.image_size,
            created_at=to_utc(r.created_at or now),
            replace=r.replace,
        )
        # A stable sort: two answers for one hash keep their order.
        for r in sorted(batch.results, key=lambda r: r.image_hash)
    )
    merged: dict[str, HitParams] = {}
    for h in batch.hits:
        if h.count == 0:
            continue
        at = to_utc(h.last_hit_at)
        prev = merged.get(h.image_hash)
        if prev is not None:
            merged[h.image_hash] = HitParams(
                h.image_hash, prev.count + h.count, max(prev.last_hit_at, at)
            )
        else:
            merged[h.image_hash] = HitParams(h.image_hash, h.count, at)
    logs: dict[str, RequestLogRow] = {}
    for row in batch.logs:
        logs.setdefault(row.request_id, row)
    # One alias per (scope, alias hash): the latest, the later one of a tie.
    aliases: dict[tuple[str, str], AliasParams] = {}
    for a in batch.aliases:
        if a.alias_hash == a.image_hash:
            continue  # pointless: the hash names its verified entry already
        key = (a.scope, a.alias_hash)
        made = AliasParams(a.scope, a.alias_hash, a.image_hash, to_utc(a.created_at or now))
        before = aliases.get(key)
        if before is None or made.created_at >= before.created_at:
            aliases[key] = made
    return PreparedBatch(
        batch_id=batch.batch_id,
        applied_at=to_utc(now),
        results=results,
        hits=tuple(merged[k] for k in sorted(merged)),
        logs=tuple(logs[k] for k in sorted(logs)),
        aliases=tuple(aliases[k] for k in sorted(aliases)),
    )


def log_params(row: RequestLogRow) -> tuple[Any, ...]:
    """A request-log row's values in :data:`LOG_COLUMNS` order (time left aware)."""
    return (
        clip(row.request_id, "request_id"),
        clip(row.user_id, "user_id"),
        clip(row.ip, "ip"),
        clip(row.image_hash, "image_hash"),
        row.image_size,
        clip(row.category, "category"),
        row.confidence,
        bool(row.from_cache),
        clip(row.source, "source"),
        float(row.processing_time_ms),
        row.created_at,
        row.hashes_asked,
        row.hashes_hit,
    )


def check_idempotency_key(scope: str, key: str) -> None:
    """Refuse keys the columns cannot hold: truncating would merge distinct keys."""
    if not 0 < len(scope) <= LIMITS["scope"]:
        raise ValueError(f"idempotency scope must have 1..{LIMITS['scope']} characters")
    if not 0 < len(key) <= LIMITS["idem_key"]:
        raise ValueError(f"idempotency key must have 1..{LIMITS['idem_key']} characters")


def check_claim(image_hash: str, owner: str, ttl_s: float) -> None:
    """Refuse claim arguments the table cannot hold or that make no sense."""
    _check_hash(image_hash)
    if not 0 < len(owner) <= LIMITS["owner"]:
        raise ValueError(f"claim owner must have 1..{LIMITS['owner']} characters")
    if not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError(f"ttl_s must be finite and > 0, got {ttl_s!r}")
