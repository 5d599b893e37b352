"""The read side of the store: the in-process LRU in front of the shared store.

Only the writer writes; this object reads, fills the LRU and records hits (as
increments handed to the writer), so ``hit_count`` in the store equals the number
of hits served.

Lookups may name a photo by a client's own hash (an *alias*, DESIGN §2): with a
``scope`` the store resolves an asked hash to the verified entry first, else to an
alias in that scope, else to one visible to everyone (``"*"``). Resolved aliases
are remembered in a bounded map beside the LRU (``(scope, alias) -> verified
hash``), so a repeated alias lookup costs what a hit costs. An alias remembered
here is not re-checked against a verified entry of the same hash that appears
later in the store; both name the same photo's answer.

A store read that fails is not a silent miss. A miss re-classifies the photo (an
LLM call, or a client's upload after check-cache), so in a store outage every
lookup would turn into one. Failed reads are counted (:class:`CacheStatistics`),
and the hashes they leave unanswered are treated as misses only within a budget
(:class:`ReadErrorBudget`: ``read_error_budget`` hashes, refilled over
``read_error_window_s``); past it a lookup raises
:class:`~xintu.errors.Unavailable` (503 with ``Retry-After``) instead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
import trio

from ..errors import StoreError, Unavailable
from ..store import AliasWrite, CachedEntry, HitIncrement, Lru, Store
from ._writer import Writer

__all__ = ["SHARED_SCOPE", "Cache", "CacheStatistics", "ReadErrorBudget"]

# The scope of aliases every client sees (``api.client_hash_mode = "shared"``).
SHARED_SCOPE = "*"

log = structlog.get_logger("xintu.cache")

# Hashes a failed store read may turn into misses (re-classifications) per window.
READ_ERROR_BUDGET = 30
READ_ERROR_WINDOW_S = 60.0


class ReadErrorBudget:
    """A token bucket of misses that failed store reads may cause: *size* hashes,
    refilled at *size* per *window_s* (on Trio's clock)."""

    def __init__(self, size: int, window_s: float) -> None:
        if size < 0 or not window_s > 0:
            raise ValueError(f"need size >= 0 and window_s > 0, got {size!r}, {window_s!r}")
        self.size = size
        self._rate = size / window_s
        self._window_s = window_s
        self._tokens = float(size)
        self._at: float | None = None

    def _refill(self) -> None:
        now = trio.current_time()
        if self._at is not None:
            self._tokens = min(float(self.size), self._tokens + (now - self._at) * self._rate)
        self._at = now

    def take(self, n: int) -> float | None:
        """Spend *n* misses: ``None`` if the budget allows them, else the seconds
        until it would (at most the window)."""
        self._refill()
        if n <= self._tokens:
            self._tokens -= n
            return None
        if self._rate == 0 or n > self.size:
            return self._window_s
        return min(self._window_s, (n - self._tokens) / self._rate)


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of the cache's totals.

    ``store_errors``: store reads that failed; of the hashes they left
    unanswered, ``store_error_misses`` were answered as misses (within the read
    error budget) and ``store_error_refusals`` lookups were refused with
    :class:`~xintu.errors.Unavailable` (past it). ``misses`` includes
    ``store_error_misses``.
    """

    lru_size: int
    lru_max: int
    lru_hits: int
    store_hits: int
    misses: int
    store_errors: int
    aliases: int  # resolved aliases remembered in this process
    store_error_misses: int = 0
    store_error_refusals: int = 0


class Cache:
    def __init__(
        self,
        store: Store,
        lru: Lru,
        writer: Writer,
        *,
        read_error_budget: int = READ_ERROR_BUDGET,
        read_error_window_s: float = READ_ERROR_WINDOW_S,
    ) -> None:
        self.store = store
        self.lru = lru
        self._writer = writer
        self._budget = ReadErrorBudget(read_error_budget, read_error_window_s)
        self._store_error_misses = 0
        self._store_error_refusals = 0
        # (scope, alias hash) -> verified hash; bounded like the LRU.
        self._aliases: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lru_hits = 0
        self._store_hits = 0
        self._misses = 0
        self._store_errors = 0

    def statistics(self) -> CacheStatistics:
        lru = self.lru.statistics()
        return CacheStatistics(
            lru_size=lru.size,
            lru_max=lru.maxsize,
            lru_hits=self._lru_hits,
            store_hits=self._store_hits,
            misses=self._misses,
            store_errors=self._store_errors,
            aliases=len(self._aliases),
            store_error_misses=self._store_error_misses,
            store_error_refusals=self._store_error_refusals,
        )

    def _read_failed(self, exc: StoreError, hashes: int) -> None:
        """A store read for *hashes* hashes failed: return if the budget lets them
        be misses, else raise :class:`Unavailable`."""
        self._store_errors += 1
        wait_s = self._budget.take(hashes)
        if wait_s is None:
            self._store_error_misses += hashes
            log.warning("store_read_failed", error=str(exc), hashes=hashes, answered="miss")
            return
        self._store_error_refusals += 1
        log.warning("store_read_failed", error=str(exc), hashes=hashes, answered="unavailable")
        raise Unavailable(
            "the cache cannot be read now; retry later", retry_after_s=max(1.0, wait_s)
        ) from exc

    def peek(self, image_hash: str, scope: str | None = None) -> CachedEntry | None:
        """The LRU alone: no await, no store round trip. With *scope*, an alias of
        *image_hash* remembered for that scope (or for everyone) counts too."""
        entry = self.lru.get(image_hash)
        if entry is None:
            target = self._alias_target(image_hash, scope)
            if target is not None:
                entry = self.lru.get(target)
        if entry is not None:
            self._lru_hits += 1
        return entry

    def _alias_target(self, alias_hash: str, scope: str | None) -> str | None:
        scopes = (SHARED_SCOPE,) if scope is None else (scope, SHARED_SCOPE)
        for visible in scopes:
            key = (visible, alias_hash)
            target = self._aliases.get(key)
            if target is not None:
                self._aliases.move_to_end(key)
                return target
        return None

    def _remember_alias(self, scope: str, alias_hash: str, image_hash: str) -> None:
        if self.lru.maxsize == 0 or alias_hash == image_hash:
            return
        self._aliases[(scope, alias_hash)] = image_hash
        self._aliases.move_to_end((scope, alias_hash))
        while len(self._aliases) > self.lru.maxsize:
            self._aliases.popitem(last=False)

    def _found(self, asked: str, entry: CachedEntry, scope: str | None) -> None:
        self.lru.put(entry)
        if entry.image_hash != asked:
            self._remember_alias(scope or SHARED_SCOPE, asked, entry.image_hash)

    async def lookup(self, image_hash: str, scope: str | None = None) -> CachedEntry | None:
        """LRU, then the store. A failed store read is a miss within the read error
        budget, else raises :class:`~xintu.errors.Unavailable` (module docstring).

        With *scope*, *image_hash* may also be a client's alias of an entry (see the
        module docstring); without, only verified entries and aliases shared with
        everyone are found. The entry returned is the verified one.
        """
        entry = self.peek(image_hash, scope)
        if entry is not None:
            return entry
        try:
            entry = await self.store.get(image_hash, scope=scope)
        except StoreError as exc:
            self._read_failed(exc, 1)
            entry = None
        if entry is None:
            self._misses += 1
            return None
        self._store_hits += 1
        self._found(image_hash, entry, scope)
        return entry

    async def lookup_many(
        self, hashes: Sequence[str], scope: str | None = None
    ) -> dict[str, CachedEntry]:
        """:meth:`lookup` for many hashes at once (one store round trip), keyed by
        the asked hash."""
        found: dict[str, CachedEntry] = {}
        missing: list[str] = []
        for h in hashes:
            entry = self.peek(h, scope)
            if entry is not None:
                found[h] = entry
            else:
                missing.append(h)
        if missing:
            try:
                from_store = await self.store.get_many(missing, scope=scope)
            except StoreError as exc:
                self._read_failed(exc, len(missing))
                from_store = {}
            for h, entry in from_store.items():
                self._found(h, entry, scope)
                found[h] = entry
            self._store_hits += len(from_store)
            self._misses += len(missing) - len(from_store)
        return found

    def remember(self, entry: CachedEntry) -> None:
        self.lru.put(entry)

    def forget(self, image_hash: str) -> None:
        """Drop *image_hash* from the LRU and every alias remembered for it (a purge)."""
        self.lru.discard(image_hash)
        for key in [k for k, target in self._aliases.items() if target == image_hash]:
            del self._aliases[key]

    async def name_alias(self, scope: str, alias_hash: str, image_hash: str) -> None:
        """Record a client's hash *alias_hash* for the verified entry *image_hash*,
        visible in *scope* (``SHARED_SCOPE``: everyone): at once in this process,
        and through the writer in the store for every replica."""
        if alias_hash == image_hash:
            return
        self._remember_alias(scope, alias_hash, image_hash)
        # Never dropped: another replica's next check-cache depends on it.
        await self._writer.put(AliasWrite(scope, alias_hash, image_hash, datetime.now(UTC)))

    def record_hit(self, image_hash: str, count: int = 1) -> None:
        """Count *count* hits served for *image_hash* (written by the writer)."""
        self._writer.offer(HitIncrement(image_hash, count, datetime.now(UTC)))
