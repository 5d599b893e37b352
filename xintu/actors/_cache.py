"""The read side of the store: the in-process LRU in front of the shared store.

Only the writer writes; this object reads, fills the LRU and records hits (as
increments handed to the writer), so ``hit_count`` in the store equals the number
of hits served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from ..errors import StoreError
from ..store import CachedEntry, HitIncrement, Lru, Store
from ._writer import Writer

__all__ = ["Cache", "CacheStatistics"]

log = structlog.get_logger("xintu.cache")


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    lru_size: int
    lru_max: int
    lru_hits: int
    store_hits: int
    misses: int
    store_errors: int


class Cache:
    def __init__(self, store: Store, lru: Lru, writer: Writer) -> None:
        self.store = store
        self.lru = lru
        self._writer = writer
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
        )

    def peek(self, image_hash: str) -> CachedEntry | None:
        """The LRU alone: no await, no store round trip."""
        entry = self.lru.get(image_hash)
        if entry is not None:
            self._lru_hits += 1
        return entry

    async def lookup(self, image_hash: str) -> CachedEntry | None:
        """LRU, then the store; a store failure counts as a miss (and is logged)."""
        entry = self.peek(image_hash)
        if entry is not None:
            return entry
        try:
            entry = await self.store.get(image_hash)
        except StoreError as exc:
            self._store_errors += 1
            log.warning("store_read_failed", error=str(exc))
            entry = None
        if entry is None:
            self._misses += 1
            return None
        self._store_hits += 1
        self.lru.put(entry)
        return entry

    async def lookup_many(self, hashes: Sequence[str]) -> dict[str, CachedEntry]:
        found: dict[str, CachedEntry] = {}
        missing: list[str] = []
        for h in hashes:
            entry = self.peek(h)
            if entry is not None:
                found[h] = entry
            else:
                missing.append(h)
        if missing:
            try:
                from_store = await self.store.get_many(missing)
            except StoreError as exc:
                self._store_errors += 1
                log.warning("store_read_failed", error=str(exc))
                from_store = {}
            for h, entry in from_store.items():
                self.lru.put(entry)
                found[h] = entry
            self._store_hits += len(from_store)
            self._misses += len(missing) - len(from_store)
        return found

    def remember(self, entry: CachedEntry) -> None:
        self.lru.put(entry)

    def record_hit(self, image_hash: str, count: int = 1) -> None:
        """Count *count* hits served for *image_hash* (written by the writer)."""
        self._writer.offer(HitIncrement(image_hash, count, datetime.now(UTC)))
