"""The in-process LRU of cached classifications that sits in front of the store.

A plain :class:`collections.OrderedDict` is the whole implementation: the LRU is
touched only from the Trio thread, so it needs no lock, and a dependency
(``cachetools``) would add nothing but a type-stub gap.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ._base import CachedEntry

__all__ = ["Lru", "LruStatistics"]


@dataclass(frozen=True, slots=True)
class LruStatistics:
    """A snapshot of the LRU: lookups that found an entry, lookups that did not,
    entries held, and the bound (0: disabled)."""

    hits: int
    misses: int
    size: int
    maxsize: int


class Lru:
    """At most *maxsize* :class:`CachedEntry` values by image hash, least recently
    used evicted first. ``maxsize=0`` disables it: nothing is kept, every lookup misses.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize!r}")
        self._maxsize = maxsize
        self._entries: OrderedDict[str, CachedEntry] = OrderedDict()
        self._hits = 0
        self._misses = 0

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def get(self, image_hash: str) -> CachedEntry | None:
        """The entry for *image_hash* (now the most recently used), or ``None``."""
        entry = self._entries.get(image_hash)
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(image_hash)
        self._hits += 1
        return entry

    def put(self, entry: CachedEntry) -> None:
        """Insert or replace the entry for ``entry.image_hash``; evict beyond the bound."""
        if self._maxsize == 0:
            return
        self._entries[entry.image_hash] = entry
        self._entries.move_to_end(entry.image_hash)
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)

    def discard(self, image_hash: str) -> None:
        """Forget *image_hash* if held."""
        self._entries.pop(image_hash, None)

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, image_hash: object) -> bool:
        """Membership without counting a lookup or touching recency."""
        return image_hash in self._entries

    def statistics(self) -> LruStatistics:
        return LruStatistics(
            hits=self._hits,
            misses=self._misses,
            size=len(self._entries),
            maxsize=self._maxsize,
        )
