"""Fakes for the actor and HTTP tests: a deterministic local model, a classifier
pool for the chain, an in-memory store.

The real ONNX classifier has tests of its own; these let the actor system be
tested fast and exactly (call counts, failures on demand).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from xintu import Category, Classification, Source
from xintu.actors import ClassifyRequest
from xintu.errors import BadImage, StoreUnavailable
from xintu.store import (
    SHARED_SCOPE,
    AlbumStats,
    CachedEntry,
    IdempotencyRecord,
    RequestLogRow,
    Store,
    StoreStatistics,
    WriteBatch,
)

CATS = list(Category)


@dataclass(frozen=True)
class FakeDecoded:
    data: bytes


def fake_category(data: bytes) -> Category:
    return CATS[hashlib.sha256(data).digest()[0] % len(CATS)]


class FakeModel:
    """Classifies by the bytes' hash; ``b"bad..."`` raises BadImage; counts calls."""

    model_name = "fake-model"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prepared: Counter[bytes] = Counter()
        self.batches: list[int] = []

    def prepare(self, data: bytes) -> FakeDecoded:
        with self._lock:
            self.prepared[data] += 1
        if data.startswith(b"bad"):
            raise BadImage("not an image")
        return FakeDecoded(data)

    def infer(self, batch: Sequence[FakeDecoded]) -> list[Classification]:
        with self._lock:
            self.batches.append(len(batch))
        out = []
        for item in batch:
            out.append(
                Classification(
                    category=fake_category(item.data),
                    confidence=0.5,
                    source=Source.LOCAL,
                    model=self.model_name,
                    description="fake",
                    local_inference_result={"rule": "fake"},
                )
            )
        return out


class BlockingModel(FakeModel):
    """Preparation waits for ``release`` (at most 30 s): the local pool stays busy
    until then."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def prepare(self, data: bytes) -> FakeDecoded:
        self.release.wait(30)
        return super().prepare(data)


class FakePool:
    """A Trio-native classifier pool in the local pool's place in the chain
    (``Chain(pool)``): subclasses define :meth:`answer`. ``takes`` and ``wait_s``
    are its admission answers (``urgent_s`` its priority lane's expected time per
    photo); ``asked`` and ``asked_ahead`` record the deadlines and the jobs ahead it
    was asked about, ``urgent`` counts
    the priority lane's calls and ``urgent_pending`` those under way."""

    def __init__(self) -> None:
        self.takes = True
        self.wait_s = 0.0
        self.urgent_s = 0.0
        self.urgent = 0
        self.urgent_pending = 0
        self.asked: list[float] = []
        self.asked_ahead: list[int] = []

    async def answer(self, data: bytes, image_hash: str, deadline: float) -> Classification:
        raise NotImplementedError("each FakePool subclass says how it answers")

    async def classify(self, request: ClassifyRequest, deadline: float) -> Classification:
        return await self.answer(request.data, request.image_hash, deadline)

    async def classify_now(self, request: ClassifyRequest) -> Classification:
        self.urgent += 1
        self.urgent_pending += 1
        try:
            return await self.answer(request.data, request.image_hash, math.inf)
        finally:
            self.urgent_pending -= 1

    def would_take(self, deadline: float, ahead: int = 0) -> bool:
        self.asked.append(deadline)
        self.asked_ahead.append(ahead)
        return self.takes

    def expected_wait_s(self, ahead: int = 0) -> float:
        return self.wait_s

    def urgent_wait_s(self, ahead: int = 0) -> float:
        """``urgent_s`` per job: the lane's, behind the priority calls under way and
        *ahead* more, then its own."""
        return self.urgent_s * (self.urgent_pending + ahead + 1)

    def statistics(self) -> None:
        return None


class MemoryStore(Store):
    """An in-memory :class:`Store` with failures on demand, for actor tests.

    ``fail_applies`` makes the next N ``apply`` calls raise before writing;
    ``ambiguous_applies`` makes the next N commit and *then* raise, as a lost
    connection after COMMIT would.
    """

    backend = "memory"

    def __init__(self) -> None:
        self.rows: dict[str, CachedEntry] = {}
        self.logs: dict[str, RequestLogRow] = {}
        # (scope, alias hash) -> (verified hash, created_at)
        self.aliases: dict[tuple[str, str], tuple[str, datetime]] = {}
        self.applied: set[str] = set()
        self.apply_calls = 0
        self.fail_applies = 0
        self.ambiguous_applies = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("memory store is down")

    def _resolve(self, image_hash: str, scope: str | None) -> CachedEntry | None:
        entry = self.rows.get(image_hash)
        if entry is not None:
            return entry
        for visible in dict.fromkeys((scope or SHARED_SCOPE, SHARED_SCOPE)):
            alias = self.aliases.get((visible, image_hash))
            if alias is not None and alias[0] in self.rows:
                return self.rows[alias[0]]
        return None

    async def get(self, image_hash: str, *, scope: str | None = None) -> CachedEntry | None:
        await trio.lowlevel.checkpoint()
        self._check()
        return self._resolve(image_hash, scope)

    async def get_many(
        self, hashes: Sequence[str], *, scope: str | None = None
    ) -> dict[str, CachedEntry]:
        await trio.lowlevel.checkpoint()
        self._check()
        found = {h: self._resolve(h, scope) for h in hashes}
        return {h: e for h, e in found.items() if e is not None}

    async def apply(self, batch: WriteBatch) -> bool:
        await trio.lowlevel.checkpoint()
        self.apply_calls += 1
        self._check()
        if self.fail_applies:
            self.fail_applies -= 1
            raise StoreUnavailable("injected failure before commit")
        applied = self._apply(batch)
        if self.ambiguous_applies:
            self.ambiguous_applies -= 1
            raise StoreUnavailable("injected failure after commit")
        return applied

    def _apply(self, batch: WriteBatch) -> bool:
        if batch.batch_id in self.applied:
            return False
        self.applied.add(batch.batch_id)
        now = datetime.now(UTC)
        for r in batch.results:
            old = self.rows.get(r.image_hash)
            if old is None:
                self.rows[r.image_hash] = CachedEntry(r.image_hash, r.classification, 0, now, None)
            elif (
                old.classification.source is Source.LOCAL and r.classification.source is Source.LLM
            ):
                self.rows[r.image_hash] = dataclasses.replace(old, classification=r.classification)
        for h in batch.hits:
            old = self.rows.get(h.image_hash)
            if old is not None:
                last = max(filter(None, [old.last_hit_at, h.last_hit_at]))
                self.rows[h.image_hash] = dataclasses.replace(
                    old, hit_count=old.hit_count + h.count, last_hit_at=last
                )
        for row in batch.logs:
            self.logs.setdefault(row.request_id, row)
        for a in batch.aliases:  # after the results, as the real stores
            if a.alias_hash == a.image_hash:
                continue
            when = a.created_at or now
            old_alias = self.aliases.get((a.scope, a.alias_hash))
            if old_alias is None or when >= old_alias[1]:
                self.aliases[(a.scope, a.alias_hash)] = (a.image_hash, when)
        return True

    async def get_request_log(self, request_id: str) -> RequestLogRow | None:
        await trio.lowlevel.checkpoint()
        return self.logs.get(request_id)

    async def album_stats(self, now: datetime) -> AlbumStats:
        raise NotImplementedError("not needed by the actor tests")

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    def statistics(self) -> StoreStatistics:
        n = len(self.applied)
        return StoreStatistics("memory", self.apply_calls, 0, 0, 0, n, 0, 1, 0, 1, 0, 1, 0)

    async def idempotency_begin(
        self, scope: str, key: str, fingerprint: str, *, now: datetime, ttl_s: float
    ) -> IdempotencyRecord | None:
        raise NotImplementedError("not needed by the actor tests")

    async def idempotency_complete(
        self, scope: str, key: str, status: int, body: bytes, content_type: str
    ) -> None:
        raise NotImplementedError("not needed by the actor tests")

    async def idempotency_release(self, scope: str, key: str) -> None:
        raise NotImplementedError("not needed by the actor tests")
