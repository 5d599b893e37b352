"""The store on both backends (a real SQLite file, a real MariaDB), its pool and the LRU."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import ssl
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from xintu import Category, Classification, Config, Source, load_config
from xintu.errors import ConfigError, StoreError, StoreUnavailable
from xintu.store import (
    SHARED_SCOPE,
    AlbumStats,
    AliasWrite,
    CachedEntry,
    HitIncrement,
    IdempotencyRecord,
    Lru,
    LruStatistics,
    RequestLogRow,
    ResultWrite,
    Store,
    WriteBatch,
    open_store,
    sqlite_path,
)
from xintu.store._base import parse_time
from xintu.store._dialect import SQLiteDialect
from xintu.store._mysql import MySQLStore, TlsSettings, parse_mysql_url
from xintu.store._pool import Pool, PoolStatistics
from xintu.store._schema import SCHEMA_VERSION
from xintu.store._sql import SqlStore
from xintu.store._sqlite import SQLiteStore
from xintu.store._stats import stats_queries

from .backends import (
    TcpProxy,
    mysql_admin,
    mysql_execute,
    mysql_url_of,
    open_test_store,
)

TEST_TIMEOUT_S = 20.0
T0 = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


def new_hash() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def new_id() -> str:
    return uuid.uuid4().hex


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def clf(
    source: Source = Source.LLM,
    category: Category = Category.PETS,
    confidence: float = 0.9,
    model: str = "gpt-4o-mini",
    **extra: Any,
) -> Classification:
    return Classification(
        category=category, confidence=confidence, source=source, model=model, **extra
    )


def log_row(request_id: str, **changes: Any) -> RequestLogRow:
    row = RequestLogRow(
        request_id=request_id,
        user_id="user-1",
        ip="192.0.2.1",
        image_hash=None,
        image_size=None,
        category="pets",
        confidence=0.9,
        from_cache=False,
        source="llm",
        processing_time_ms=10.0,
        created_at=T0,
    )
    return dataclasses.replace(row, **changes)


async def put(store: Store, *results: ResultWrite) -> None:
    assert await store.apply(WriteBatch(new_id(), results=results))


async def hit(store: Store, image_hash: str, count: int, when: datetime) -> None:
    assert await store.apply(WriteBatch(new_id(), hits=(HitIncrement(image_hash, count, when),)))


async def entry_of(store: Store, image_hash: str) -> CachedEntry:
    entry = await store.get(image_hash)
    assert entry is not None
    return entry


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.utcoffset() == timedelta(0)
    assert value.tzinfo == UTC


# --- both backends ---------------------------------------------------------------


async def test_round_trip_of_every_field(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        h = new_hash()
        c = clf(
            Source.LOCAL,
            Category.TRAVEL_SCENERY,
            0.123456789,
            "efficientnet-lite0",
            description="雪山 and a lake — 🏔",
            provider="onnx",
            local_inference_result={"top5": [["alp", 0.61], ["lakeside", 0.2]], "faces": 0},
        )
        created = datetime(2025, 1, 2, 11, 4, 5, 678901, tzinfo=timezone(timedelta(hours=8)))
        await put(store, ResultWrite(h, c, 123_456, created_at=created))

        entry = await entry_of(store, h)
        assert entry == CachedEntry(h, c, 0, created, None, 123_456)
        assert entry.classification.local_inference_result == c.local_inference_result
        assert entry.created_at == datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        assert_utc(entry.created_at)

        await hit(store, h, 3, at(5))
        entry = await entry_of(store, h)
        assert (entry.hit_count, entry.last_hit_at) == (3, at(5))
        assert_utc(entry.last_hit_at)

        full = RequestLogRow(
            request_id="req-full",
            user_id="用户-7",
            ip="2001:db8::1",
            image_hash=h,
            image_size=123_456,
            category="travel_scenery",
            confidence=0.5,
            from_cache=True,
            source="cache",
            processing_time_ms=12.75,
            created_at=created,
        )
        empty = RequestLogRow("req-empty", None, None, None, None, None, None, False, None, 0.0, T0)
        assert await store.apply(WriteBatch(new_id(), logs=(full, empty)))
        got = await store.get_request_log("req-full")
        assert got == full
        assert got is not None
        assert_utc(got.created_at)
        assert await store.get_request_log("req-empty") == empty
        assert await store.get_request_log("req-missing") is None

        stats = store.statistics()
        assert (stats.errors, stats.server_warnings, stats.retries) == (0, 0, 0)
        assert stats.backend == store.backend


async def test_naive_datetimes_are_taken_as_utc(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        h = new_hash()
        naive = datetime(2025, 6, 7, 8, 9, 10, 111213)
        await put(store, ResultWrite(h, clf(), None, created_at=naive))
        assert (await entry_of(store, h)).created_at == naive.replace(tzinfo=UTC)


async def test_first_answer_wins(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        local_a = clf(Source.LOCAL, Category.PETS, 0.6, "local-a")
        local_b = clf(Source.LOCAL, Category.FOODS, 0.9, "local-b")
        llm_a = clf(Source.LLM, Category.OTHER, 0.7, "llm-a", provider="openai")
        llm_b = clf(Source.LLM, Category.IDCARD, 0.8, "llm-b", provider="anthropic")
        cases = [(local_a, local_b, local_a), (llm_a, local_a, llm_a), (llm_a, llm_b, llm_a)]
        for first, second, kept in cases:
            h = new_hash()
            await put(store, ResultWrite(h, first, 10, created_at=at(0)))
            await put(store, ResultWrite(h, second, 20, created_at=at(1)))
            entry = await entry_of(store, h)
            assert entry.classification == kept
            assert (entry.created_at, entry.image_size) == (at(0), 10)


async def test_llm_answer_replaces_local_keeping_hits_and_creation(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        h = new_hash()
        local = clf(Source.LOCAL, Category.PETS, 0.5, "effnet", local_inference_result={"top5": []})
        llm = clf(Source.LLM, Category.SINGLE_PERSON, 0.95, "gpt", description="a person")
        await put(store, ResultWrite(h, local, 99, created_at=at(0)))
        await hit(store, h, 4, at(2))
        await put(store, ResultWrite(h, llm, 99, created_at=at(3)))

        entry = await entry_of(store, h)
        assert entry.classification == llm
        assert entry.classification.local_inference_result is None
        assert (entry.hit_count, entry.created_at, entry.last_hit_at) == (4, at(0), at(2))

        # A later local answer does not bring the local one back.
        await put(store, ResultWrite(h, local, 99))
        assert (await entry_of(store, h)).classification == llm


@pytest.mark.parametrize("order", ["local-then-llm", "llm-then-local"])
async def test_llm_wins_within_one_batch(store: Store, order: str) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        h = new_hash()
        local = ResultWrite(h, clf(Source.LOCAL, model="effnet"), 5)
        llm = ResultWrite(h, clf(Source.LLM, model="gpt"), 5)
        results = (local, llm) if order == "local-then-llm" else (llm, local)
        await put(store, *results)
        assert (await entry_of(store, h)).classification.source == Source.LLM


async def test_hit_counts_are_exact(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        h1, h2, unknown = new_hash(), new_hash(), new_hash()
        await put(store, ResultWrite(h1, clf(), None), ResultWrite(h2, clf(), None))
        hits = (
            HitIncrement(h1, 2, at(5)),
            HitIncrement(h1, 3, at(3)),
            HitIncrement(h2, 1, at(1)),
            HitIncrement(unknown, 7, at(9)),
            HitIncrement(h2, 0, at(20)),  # no hit: changes nothing
        )
        assert await store.apply(WriteBatch(new_id(), hits=hits))
        e1, e2 = await entry_of(store, h1), await entry_of(store, h2)
        assert (e1.hit_count, e1.last_hit_at) == (5, at(5))
        assert (e2.hit_count, e2.last_hit_at) == (1, at(1))
        assert await store.get(unknown) is None  # an increment never creates a row

        await hit(store, h1, 1, at(2))  # an older hit does not move last_hit_at back
        e1 = await entry_of(store, h1)
        assert (e1.hit_count, e1.last_hit_at) == (6, at(5))
        await hit(store, h1, 1, at(9))
        e1 = await entry_of(store, h1)
        assert (e1.hit_count, e1.last_hit_at) == (7, at(9))


async def test_a_batch_is_applied_once(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        h = new_hash()
        batch = WriteBatch(
            new_id(),
            results=(ResultWrite(h, clf(), 1),),
            hits=(HitIncrement(h, 2, at(1)),),
            logs=(log_row("req-once", image_hash=h),),
        )
        assert await store.apply(batch) is True
        assert await store.apply(batch) is False
        # A retry rebuilds the batch: only the id counts.
        assert (
            await store.apply(dataclasses.replace(batch, hits=(HitIncrement(h, 9, at(2)),)))
            is False
        )
        entry = await entry_of(store, h)
        assert (entry.hit_count, entry.last_hit_at) == (2, at(1))
        stats = store.statistics()
        assert (stats.batches_applied, stats.batches_duplicate) == (1, 2)


async def test_an_empty_batch_is_recorded(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        batch = WriteBatch(new_id())
        assert await store.apply(batch) is True
        assert await store.apply(batch) is False


async def test_duplicate_request_ids_are_ignored(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        first = log_row("req-dup", user_id="first")
        same_batch = log_row("req-dup", user_id="second")
        assert await store.apply(WriteBatch(new_id(), logs=(first, same_batch)))
        assert await store.apply(WriteBatch(new_id(), logs=(log_row("req-dup", user_id="third"),)))
        assert await store.get_request_log("req-dup") == first


async def test_get_many(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        stored = [new_hash() for _ in range(3)]
        await put(store, *(ResultWrite(h, clf(), i) for i, h in enumerate(stored)))
        missing = [new_hash() for _ in range(600)]  # more than one IN (...) chunk
        wanted = [*missing[:300], stored[0], *missing[300:], stored[2], stored[0]]
        found = await store.get_many(wanted)
        assert set(found) == {stored[0], stored[2]}
        assert found[stored[2]].image_size == 2
        assert await store.get_many([]) == {}
        assert await store.get(missing[0]) is None


# --- client-named photos: aliases (DESIGN §2) ----------------------------------------


async def sql_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of *sql*, read around the store (a connection of its own)."""
    if url.startswith("sqlite"):

        def read() -> list[tuple[Any, ...]]:
            conn = sqlite3.connect(sqlite_path(url))
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()

        rows: list[tuple[Any, ...]] = await trio.to_thread.run_sync(read)
        return rows
    return [tuple(r) for r in await mysql_execute(url, sql)]


async def aliases_in(url: str) -> dict[tuple[str, str], str]:
    """The ``image_hash_aliases`` rows: (scope, alias hash) -> verified hash."""
    rows = await sql_rows(url, "SELECT scope, alias_hash, image_hash FROM image_hash_aliases")
    return {(scope, alias): target for scope, alias, target in rows}


async def name(store: Store, *aliases: AliasWrite) -> None:
    assert await store.apply(WriteBatch(new_id(), aliases=aliases))


async def target_of(store: Store, image_hash: str, scope: str | None = None) -> str | None:
    entry = await store.get(image_hash, scope=scope)
    return None if entry is None else entry.image_hash


async def test_an_alias_is_seen_in_its_scope_only(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        target, alias = new_hash(), new_hash()
        await put(store, ResultWrite(target, clf(category=Category.FOODS), 7))
        await name(store, AliasWrite("key:a", alias, target))
        entry = await store.get(alias, scope="key:a")
        assert entry == await store.get(target)  # the verified entry itself
        assert entry is not None
        assert (entry.image_hash, entry.classification.category) == (target, Category.FOODS)
        assert await target_of(store, alias, "key:b") is None
        assert await target_of(store, alias, "KEY:A") is None  # scopes compare exactly
        assert await target_of(store, alias) is None  # scope=None: shared aliases only
        # Shared with everyone ("*"): every scope sees it, and so does scope=None.
        shared = new_hash()
        await name(store, AliasWrite(SHARED_SCOPE, shared, target))
        for scope in ("key:a", "key:b", None, SHARED_SCOPE):
            assert await target_of(store, shared, scope) == target


async def test_own_scope_before_shared_and_verified_before_both(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        mine, theirs, other = new_hash(), new_hash(), new_hash()
        await put(store, *(ResultWrite(h, clf(), 1) for h in (mine, theirs, other)))
        alias = new_hash()
        await name(
            store,
            AliasWrite("user:1", alias, mine),
            AliasWrite(SHARED_SCOPE, alias, theirs),
        )
        assert await target_of(store, alias, "user:1") == mine
        assert await target_of(store, alias, "user:2") == theirs
        assert await target_of(store, alias) == theirs
        # An alias never replaces a verified entry of the same hash, in any scope.
        await name(store, AliasWrite("user:1", other, mine), AliasWrite("*", other, theirs))
        for scope in ("user:1", "user:2", None):
            assert await target_of(store, other, scope) == other
        # An alias of a hash to itself is pointless: not stored.
        await name(store, AliasWrite("user:1", mine, mine))
        assert ("user:1", mine) not in await aliases_in_store(store)


async def aliases_in_store(store: Store) -> dict[tuple[str, str], str]:
    """:func:`aliases_in` for an open test store (whichever backend)."""
    if isinstance(store, MySQLStore):
        return await aliases_in(mysql_url_of(store.settings))
    assert isinstance(store, SQLiteStore)
    return await aliases_in(f"sqlite:///{store.path}")


async def test_the_latest_alias_wins(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        first, second, third = new_hash(), new_hash(), new_hash()
        await put(store, *(ResultWrite(h, clf(), 1) for h in (first, second, third)))
        alias = new_hash()
        await name(store, AliasWrite("ip:192.0.2.1", alias, first, at(1)))
        await name(store, AliasWrite("ip:192.0.2.1", alias, second, at(2)))
        assert await target_of(store, alias, "ip:192.0.2.1") == second
        # An older upload applied late (a journal replayed after newer work) loses.
        await name(store, AliasWrite("ip:192.0.2.1", alias, third, at(0)))
        assert await target_of(store, alias, "ip:192.0.2.1") == second
        # Within one batch, the later of two with the same time wins.
        await name(
            store,
            AliasWrite("ip:192.0.2.1", alias, first, at(3)),
            AliasWrite("ip:192.0.2.1", alias, third, at(3)),
        )
        assert await target_of(store, alias, "ip:192.0.2.1") == third
        assert (await aliases_in_store(store))[("ip:192.0.2.1", alias)] == third


async def test_an_alias_may_name_a_result_of_its_own_batch(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        target, alias, later = new_hash(), new_hash(), new_hash()
        assert await store.apply(
            WriteBatch(
                new_id(),
                aliases=(AliasWrite("key:a", alias, target),),
                results=(ResultWrite(target, clf(), 3),),
            )
        )
        assert await target_of(store, alias, "key:a") == target
        # An alias whose entry is not (yet) stored answers nothing until it is.
        await name(store, AliasWrite("key:a", new_hash(), later))
        orphan = next(a for (s, a), t in (await aliases_in_store(store)).items() if t == later)
        assert await store.get(orphan, scope="key:a") is None
        await put(store, ResultWrite(later, clf(), 4))
        assert await target_of(store, orphan, "key:a") == later


async def test_get_many_is_keyed_by_the_asked_hash(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        t1, t2 = new_hash(), new_hash()
        await put(store, ResultWrite(t1, clf(), 1), ResultWrite(t2, clf(), 2))
        mine, shared, foreign = new_hash(), new_hash(), new_hash()
        await name(
            store,
            AliasWrite("key:a", mine, t1),
            AliasWrite(SHARED_SCOPE, shared, t2),
            AliasWrite("key:b", foreign, t2),
        )
        missing = [new_hash() for _ in range(450)]  # more than one chunk
        wanted = [*missing[:200], mine, t1, shared, foreign, *missing[200:], mine, t2]
        found = await store.get_many(wanted, scope="key:a")
        assert {k: e.image_hash for k, e in found.items()} == {
            mine: t1,
            t1: t1,
            shared: t2,
            t2: t2,
        }
        assert found[mine] == found[t1]
        unscoped = await store.get_many(wanted)
        assert {k: e.image_hash for k, e in unscoped.items()} == {t1: t1, shared: t2, t2: t2}


async def test_a_retried_batch_applies_its_aliases_once(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        t1, t2, alias = new_hash(), new_hash(), new_hash()
        await put(store, ResultWrite(t1, clf(), 1), ResultWrite(t2, clf(), 2))
        # No created_at: each application would stamp "now", so a second application
        # of the first batch would win over the newer alias.
        first = WriteBatch(new_id(), aliases=(AliasWrite("key:a", alias, t1),))
        assert await store.apply(first)
        await name(store, AliasWrite("key:a", alias, t2))
        assert await store.apply(first) is False
        assert await target_of(store, alias, "key:a") == t2
        assert await aliases_in_store(store) == {("key:a", alias): t2}


def test_aliases_are_validated() -> None:
    h = new_hash()
    with pytest.raises(ValueError, match=r"^not a lowercase 64-hex SHA-256 digest: 'ABC'$"):
        AliasWrite("key:a", "ABC", h)
    with pytest.raises(ValueError, match=r"^not a lowercase 64-hex SHA-256 digest: 'x'$"):
        AliasWrite("key:a", h, "x")
    with pytest.raises(ValueError, match=r"^alias scope must have 1\.\.64 characters$"):
        AliasWrite("", h, new_hash())
    with pytest.raises(ValueError, match=r"^alias scope must have 1\.\.64 characters$"):
        AliasWrite("k" * 65, h, new_hash())
    assert AliasWrite("k" * 64, h, new_hash()).scope == "k" * 64


async def test_idempotency_key_lifecycle(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        now = datetime.now(UTC)
        s = timedelta(seconds=1)
        assert await store.idempotency_begin("classify", "k-1", "fp-a", now=now, ttl_s=60) is None

        # Still running: the record comes back with the first request's fingerprint.
        again = await store.idempotency_begin("classify", "k-1", "fp-b", now=now + s, ttl_s=60)
        assert again == IdempotencyRecord(
            "classify", "k-1", "fp-a", "in_flight", None, None, None, now, now + 60 * s
        )
        assert again is not None
        assert_utc(again.expires_at)
        # Another scope, another key.
        assert await store.idempotency_begin("batch", "k-1", "fp-z", now=now, ttl_s=60) is None

        body = b'{"success": true}\x00\xff\xfe'
        await store.idempotency_complete("classify", "k-1", 201, body, "application/json")
        replay = await store.idempotency_begin("classify", "k-1", "fp-a", now=now + s, ttl_s=60)
        assert replay == IdempotencyRecord(
            "classify", "k-1", "fp-a", "completed", 201, body, "application/json", now, now + 60 * s
        )

        # Releasing never forgets a stored answer.
        await store.idempotency_release("classify", "k-1")
        replay = await store.idempotency_begin("classify", "k-1", "fp-a", now=now + s, ttl_s=60)
        assert replay is not None
        assert replay.state == "completed"

        # At expires_at the record is dead: the next request claims the key anew.
        later = now + 60 * s
        assert await store.idempotency_begin("classify", "k-1", "fp-c", now=later, ttl_s=30) is None
        fresh = await store.idempotency_begin("classify", "k-1", "fp-d", now=later + s, ttl_s=30)
        assert fresh == IdempotencyRecord(
            "classify", "k-1", "fp-c", "in_flight", None, None, None, later, later + 30 * s
        )


async def test_idempotency_release_forgets_the_claim(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        now = datetime.now(UTC)
        assert await store.idempotency_begin("classify", "k-2", "fp-a", now=now, ttl_s=60) is None
        await store.idempotency_release("classify", "k-2")
        assert await store.idempotency_begin("classify", "k-2", "fp-b", now=now, ttl_s=60) is None
        record = await store.idempotency_begin("classify", "k-2", "fp-c", now=now, ttl_s=60)
        assert record is not None
        assert record.fingerprint == "fp-b"
        # Completing or releasing a key nobody claimed stores nothing.
        await store.idempotency_complete("classify", "k-3", 200, b"{}", "application/json")
        await store.idempotency_release("classify", "k-4")
        assert await store.idempotency_begin("classify", "k-3", "fp", now=now, ttl_s=60) is None


async def test_idempotency_keys_are_case_sensitive(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        now = datetime.now(UTC)
        assert await store.idempotency_begin("classify", "Key", "fp", now=now, ttl_s=60) is None
        assert await store.idempotency_begin("classify", "key", "fp", now=now, ttl_s=60) is None


async def test_bad_idempotency_arguments_are_refused(store: Store) -> None:
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match=r"^idempotency key must have 1\.\.255 characters$"):
        await store.idempotency_begin("classify", "k" * 256, "fp", now=now, ttl_s=60)
    with pytest.raises(ValueError, match=r"^ttl_s must be > 0, got 0$"):
        await store.idempotency_begin("classify", "k", "fp", now=now, ttl_s=0)


async def test_overlong_fields_are_clipped_not_fatal(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        h = new_hash()
        c = clf(model="m" * 1000, description="d" * 20_000)
        row = log_row("req-long", user_id="u" * 1000, ip="i" * 100)
        assert await store.apply(WriteBatch(new_id(), results=(ResultWrite(h, c, 1),), logs=(row,)))
        entry = await entry_of(store, h)
        assert entry.classification.model == "m" * 255
        assert entry.classification.description == "d" * 16_000
        logged = await store.get_request_log("req-long")
        assert logged is not None
        assert (logged.user_id, logged.ip) == ("u" * 255, "i" * 64)


async def test_concurrent_applies_of_one_batch_apply_it_once(
    store_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            open_test_store(store_url, tmp_path / "a") as one,
            open_test_store(store_url, tmp_path / "b") as two,
        ):
            h = new_hash()
            await put(one, ResultWrite(h, clf(), None))
            batch = WriteBatch(new_id(), hits=(HitIncrement(h, 5, at(1)),))
            outcomes: list[bool] = []

            async def apply(s: Store) -> None:
                outcomes.append(await s.apply(batch))

            async with trio.open_nursery() as nursery:
                for s in (one, two, one, two):
                    nursery.start_soon(apply, s)
            assert sorted(outcomes) == [False, False, False, True]
            assert (await entry_of(two, h)).hit_count == 5


async def test_concurrent_claims_of_one_key_have_one_winner(store_url: str, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            open_test_store(store_url, tmp_path / "a") as one,
            open_test_store(store_url, tmp_path / "b") as two,
        ):
            now = datetime.now(UTC)
            outcomes: list[IdempotencyRecord | None] = []

            async def claim(s: Store, fingerprint: str) -> None:
                outcomes.append(
                    await s.idempotency_begin("classify", "race", fingerprint, now=now, ttl_s=60)
                )

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(claim, (one, two)[i % 2], f"fp-{i}")
            winners = [o for o in outcomes if o is None]
            losers = [o for o in outcomes if o is not None]
            assert len(winners) == 1
            assert len({o.fingerprint for o in losers}) == 1
            assert all(o.state == "in_flight" for o in losers)


# --- in-flight claims (both backends) ------------------------------------------------


async def claims_in(url: str) -> dict[str, tuple[str, datetime]]:
    """The ``inflight_claims`` rows, read around the store: hash -> (owner, expires_at)."""
    sql = "SELECT image_hash, owner, expires_at FROM inflight_claims"
    if url.startswith("sqlite"):

        def read() -> list[tuple[Any, ...]]:
            conn = sqlite3.connect(sqlite_path(url))
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()

        rows: Any = await trio.to_thread.run_sync(read)
    else:
        rows = await mysql_execute(url, sql)
    return {h: (owner, parse_time(expires)) for h, owner, expires in rows}


async def test_claim_lifecycle(store: Store, store_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        s = timedelta(seconds=1)
        h = new_hash()
        assert await store.claim(h, "a/1", now=T0, ttl_s=60) is True
        assert await claims_in(store_url) == {h: ("a/1", T0 + 60 * s)}
        # A live claim of another owner is refused and left as it is.
        assert await store.claim(h, "b/1", now=T0 + s, ttl_s=60) is False
        # The owner's own claim is renewed (also to the very same expiry).
        assert await store.claim(h, "a/1", now=T0, ttl_s=60) is True
        assert await store.claim(h, "a/1", now=T0 + 10 * s, ttl_s=60) is True
        assert await claims_in(store_url) == {h: ("a/1", T0 + 70 * s)}
        assert await store.claim(h, "b/1", now=T0 + 69 * s, ttl_s=60) is False
        # At expires_at the claim is dead: anyone takes it over.
        assert await store.claim(h, "b/1", now=T0 + 70 * s, ttl_s=5) is True
        assert await claims_in(store_url) == {h: ("b/1", T0 + 75 * s)}
        assert await store.claim(h, "a/1", now=T0 + 71 * s, ttl_s=60) is False
        # Releasing deletes only the owner's claim.
        await store.release_claim(h, "a/1")
        assert await store.claim(h, "c/1", now=T0 + 71 * s, ttl_s=60) is False
        await store.release_claim(h, "b/1")
        assert await claims_in(store_url) == {}
        await store.release_claim(h, "b/1")  # nothing to release: no error
        assert await store.claim(h, "c/1", now=T0 + 71 * s, ttl_s=60) is True
        # Owners compare exactly.
        assert await store.claim(h, "C/1", now=T0 + 71 * s, ttl_s=60) is False
        # Claims are per hash.
        other = new_hash()
        assert await store.claim(other, "b/1", now=T0 + 71 * s, ttl_s=60) is True
        assert set(await claims_in(store_url)) == {h, other}
        assert store.statistics().server_warnings == 0


async def test_apply_deletes_the_claims_of_the_results_it_writes(
    store: Store, store_url: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        written, hit_only, untouched = new_hash(), new_hash(), new_hash()
        for h in (written, hit_only, untouched):
            assert await store.claim(h, "owner/1", now=datetime.now(UTC), ttl_s=60)
        await put(store, ResultWrite(hit_only, clf(), None))  # its claim goes too
        assert set(await claims_in(store_url)) == {written, untouched}
        assert await store.claim(hit_only, "owner/2", now=datetime.now(UTC), ttl_s=60)
        batch = WriteBatch(
            new_id(),
            results=(ResultWrite(written, clf(), 10), ResultWrite(written, clf(Source.LOCAL), 10)),
            hits=(HitIncrement(hit_only, 1, at(1)),),
        )
        assert await store.apply(batch)
        # The result and the end of its claim are one transaction: visible together.
        assert set(await claims_in(store_url)) == {hit_only, untouched}
        assert (await entry_of(store, written)).classification == clf()
        # Another process's claim on a hash with a result is deleted as well.
        assert await store.claim(written, "late/1", now=datetime.now(UTC), ttl_s=60)
        assert await store.apply(WriteBatch(new_id(), results=(ResultWrite(written, clf(), 1),)))
        assert set(await claims_in(store_url)) == {hit_only, untouched}
        # A batch applied before changes nothing, claims included.
        assert await store.claim(written, "late/2", now=datetime.now(UTC), ttl_s=60)
        assert not await store.apply(batch)
        assert set(await claims_in(store_url)) == {written, hit_only, untouched}
        assert store.statistics().server_warnings == 0


async def test_expired_claims_are_pruned(store_url: str, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        stale, lapsed, live = new_hash(), new_hash(), new_hash()
        now = datetime.now(UTC)
        async with open_test_store(store_url, tmp_path / "a") as one:
            assert await one.claim(stale, "dead/1", now=now - timedelta(hours=1), ttl_s=30)
            # Expired, but within the margin kept for clock skew between processes.
            assert await one.claim(lapsed, "dead/2", now=now - timedelta(seconds=31), ttl_s=30)
            assert await one.claim(live, "alive/1", now=now, ttl_s=30)
        # A store prunes on its first write, then every PRUNE_INTERVAL_S.
        async with open_test_store(store_url, tmp_path / "b") as two:
            assert await two.apply(WriteBatch(new_id()))
        assert set(await claims_in(store_url)) == {lapsed, live}


async def test_concurrent_claims_of_one_hash_have_one_winner(
    store_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            open_test_store(store_url, tmp_path / "a") as one,
            open_test_store(store_url, tmp_path / "b") as two,
        ):
            won: list[str] = []

            async def claim(s: Store, h: str, owner: str, now: datetime) -> None:
                if await s.claim(h, owner, now=now, ttl_s=60):
                    won.append(owner)

            for round_no in range(5):
                h = new_hash()
                now = datetime.now(UTC)
                # Round 0: nobody holds it. Later rounds: an expired claim is there.
                if round_no:
                    assert await one.claim(h, "dead/1", now=now - timedelta(hours=1), ttl_s=1)
                won.clear()
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(claim, (one, two)[i % 2], h, f"p{i % 2}/{i}", now)
                assert len(won) == 1
                assert (await claims_in(store_url))[h] == (won[0], now + timedelta(seconds=60))
            assert one.statistics().server_warnings == 0
            assert two.statistics().server_warnings == 0


async def test_bad_claim_arguments_are_refused(store: Store) -> None:
    now = datetime.now(UTC)
    h = new_hash()
    with pytest.raises(ValueError, match=r"^claim owner must have 1\.\.64 characters$"):
        await store.claim(h, "o" * 65, now=now, ttl_s=60)
    with pytest.raises(ValueError, match=r"^claim owner must have 1\.\.64 characters$"):
        await store.release_claim(h, "")
    with pytest.raises(ValueError, match=r"^ttl_s must be finite and > 0, got 0$"):
        await store.claim(h, "o", now=now, ttl_s=0)
    with pytest.raises(ValueError, match=r"^ttl_s must be finite and > 0, got inf$"):
        await store.claim(h, "o", now=now, ttl_s=float("inf"))
    with pytest.raises(ValueError, match=r"^not a lowercase 64-hex SHA-256 digest: 'ABC'$"):
        await store.claim("ABC", "o", now=now, ttl_s=60)


@pytest.mark.parametrize("version", [1, 2])
async def test_an_older_database_gains_the_new_tables(
    store_url: str, tmp_path: Path, version: int
) -> None:
    """A database left by an older version is migrated: version 1 had no
    inflight_claims, version 2 no image_hash_aliases."""
    with trio.fail_after(TEST_TIMEOUT_S):
        h = new_hash()
        async with open_test_store(store_url, tmp_path / "a") as s:
            await put(s, ResultWrite(h, clf(), 1))
        downgrade = (
            "DROP TABLE image_hash_aliases",
            *(["DROP TABLE inflight_claims"] if version == 1 else []),
            f"UPDATE schema_version SET version = {version}",
        )
        await change_schema(store_url, *downgrade)
        async with open_test_store(store_url, tmp_path / "b") as s:
            assert (await entry_of(s, h)).classification == clf()
            other = new_hash()
            assert await s.claim(other, "o/1", now=datetime.now(UTC), ttl_s=60)
            assert set(await claims_in(store_url)) == {other}
            alias = new_hash()
            await name(s, AliasWrite("key:a", alias, h))
            assert await target_of(s, alias, "key:a") == h
            assert s.statistics().server_warnings == 0
        version = await sql_rows(store_url, "SELECT version FROM schema_version")
        assert version == [(SCHEMA_VERSION,)]


async def test_ping_and_statistics(store: Store) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        before = store.statistics().queries
        await store.ping()
        stats = store.statistics()
        assert stats.queries > before
        assert stats.pool_created >= 1
        assert stats.pool_in_use == 0
        assert stats.pool_idle >= 1
        assert stats.pool_size >= 1


async def test_reopening_keeps_the_data(store_config: Config) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        h = new_hash()
        async with await open_store(store_config) as first:
            await put(first, ResultWrite(h, clf(), 1))
        async with await open_store(store_config) as second:
            assert (await entry_of(second, h)).image_size == 1
            assert second.statistics().server_warnings == 0


async def test_a_closed_store_refuses_work(store_config: Config) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        s = await open_store(store_config)
        await s.aclose()
        await s.aclose()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await s.get(new_hash())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_retried_batches_count_hits_exactly_once(
    store_url: str, tmp_path: Path, data: st.DataObject
) -> None:
    """Any sequence of batches, some re-applied (retries after ambiguous failures),
    leaves hit_count == the sum over distinct batches."""
    hashes = [new_hash() for _ in range(data.draw(st.integers(1, 3), label="hashes"))]
    increments = st.tuples(
        st.integers(0, len(hashes) - 1), st.integers(1, 5), st.integers(0, 10_000)
    )
    plans = data.draw(st.lists(st.lists(increments, max_size=4), min_size=1, max_size=6))
    batches = [
        WriteBatch(
            new_id(),
            hits=tuple(HitIncrement(hashes[i], n, at(m)) for i, n, m in plan),
            logs=(log_row(f"req-{new_id()}"),),
        )
        for plan in plans
    ]
    retries = data.draw(st.lists(st.integers(0, len(batches) - 1), max_size=8), label="retries")
    order = data.draw(st.permutations([*range(len(batches)), *retries]), label="order")

    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(store_url, tmp_path / "data") as store:
            await put(store, *(ResultWrite(h, clf(), None) for h in hashes))
            seen: set[int] = set()
            for i in order:
                assert await store.apply(batches[i]) is (i not in seen)
                seen.add(i)
            found = await store.get_many(hashes)
            for k, h in enumerate(hashes):
                mine = [(n, m) for plan in plans for i, n, m in plan if i == k]
                assert found[h].hit_count == sum(n for n, _ in mine)
                assert found[h].last_hit_at == (at(max(m for _, m in mine)) if mine else None)
            for b in batches:
                assert await store.get_request_log(b.logs[0].request_id) is not None


# --- stats: counters kept as the store writes ---------------------------------------

# What /api/v1/stats computed before the counters, by scanning the tables: the
# counters must give the same answer.
SCAN_QUERIES = {
    "totals": "SELECT COUNT(*), COALESCE(SUM(from_cache), 0) FROM request_log",
    "today": "SELECT COUNT(*), COALESCE(SUM(from_cache), 0) FROM request_log "
    "WHERE created_at >= :day",
    "sources": "SELECT COALESCE(source, 'none'), COUNT(*) FROM request_log GROUP BY source",
    "cache": "SELECT category, COUNT(*), COALESCE(SUM(hit_count), 0), "
    "COALESCE(SUM(CASE WHEN source = 'llm' THEN hit_count ELSE 0 END), 0) "
    "FROM image_classification_cache GROUP BY category",
}


async def scanned_stats(store: Store, now: datetime) -> dict[str, Any]:
    """The stats fields the counters replace, computed by scanning the tables."""
    assert isinstance(store, SqlStore)
    d = store._dialect
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)

    async def op(conn: Any) -> dict[str, Any]:
        return {
            name: await conn.fetchall(d.named(sql), {"day": d.time(day)} if ":day" in sql else {})
            for name, sql in SCAN_QUERIES.items()
        }

    rows = await store._run("scan", op, read_only=True)
    return {
        "requests_total": int(rows["totals"][0][0]),
        "requests_from_cache_total": int(rows["totals"][0][1]),
        "requests_today": int(rows["today"][0][0]),
        "requests_from_cache_today": int(rows["today"][0][1]),
        "sources": {str(s): int(n) for s, n in rows["sources"]},
        "categories": {str(c): int(n) for c, n, _, _ in rows["cache"]},
        "cache_hits_total": sum(int(h) for _, _, h, _ in rows["cache"]),
        "llm_calls_saved": sum(int(s) for _, _, _, s in rows["cache"]),
    }


def counted_stats(stats: AlbumStats) -> dict[str, Any]:
    return {
        "requests_total": stats.requests_total,
        "requests_from_cache_total": stats.requests_from_cache_total,
        "requests_today": stats.requests_today,
        "requests_from_cache_today": stats.requests_from_cache_today,
        "sources": dict(stats.sources),
        "categories": dict(stats.categories),
        "cache_hits_total": stats.cache_hits_total,
        "llm_calls_saved": stats.llm_calls_saved,
    }


async def write_history(store: Store, now: datetime) -> None:
    """Batches that exercise every rule the counters follow."""
    a, b, c = new_hash(), new_hash(), new_hash()
    yesterday = now - timedelta(days=1)
    local = clf(Source.LOCAL, Category.FOODS)
    batches = [
        # Two answers for one hash in one batch: local, then llm replaces it.
        WriteBatch(
            new_id(),
            results=(ResultWrite(a, local, 1), ResultWrite(a, clf(Source.LLM), 1)),
            logs=(log_row("r1", created_at=yesterday, source="llm"),),
        ),
        # A local answer that is hit, then replaced by an llm one: its hits move.
        WriteBatch(
            new_id(),
            results=(ResultWrite(b, local, 1),),
            hits=(HitIncrement(b, 3, now), HitIncrement(c, 5, now)),  # c: no row yet
            logs=(log_row("r2", created_at=now, source="local", category="foods"),),
        ),
        WriteBatch(
            new_id(),
            results=(ResultWrite(b, clf(Source.LLM, Category.SCREENSHOT), 1),),
            hits=(HitIncrement(b, 2, now), HitIncrement(a, 4, now)),
            logs=(
                log_row("r3", created_at=now, source="cache", from_cache=True),
                log_row("r4", created_at=now, source=None, category=None),
            ),
        ),
        # An llm answer is never replaced; a repeated request id is not logged again.
        WriteBatch(
            new_id(),
            results=(ResultWrite(a, local, 1), ResultWrite(c, local, 1)),
            hits=(HitIncrement(c, 1, now),),
            logs=(log_row("r3", created_at=now, from_cache=True), log_row("r5", created_at=now)),
        ),
    ]
    for batch in batches:
        assert await store.apply(batch)
    assert not await store.apply(batches[0])  # a replayed batch counts nothing


async def test_stats_counters_give_what_the_scans_gave(store: Store) -> None:
    now = datetime.now(UTC)
    with trio.fail_after(TEST_TIMEOUT_S):
        await write_history(store, now)
        stats = await store.album_stats(now)
        assert counted_stats(stats) == await scanned_stats(store, now)
        assert counted_stats(stats) == {
            "requests_total": 5,
            "requests_from_cache_total": 1,
            "requests_today": 4,
            "requests_from_cache_today": 1,
            "sources": {"llm": 2, "local": 1, "cache": 1, "none": 1},
            "categories": {"pets": 1, "screenshot": 1, "foods": 1},
            "cache_hits_total": 10,
            "llm_calls_saved": 9,  # a: 4, b: 3 moved + 2; c is local
        }


async def test_the_migration_fills_the_counters_from_the_rows(
    own_store_url: str, tmp_path: Path
) -> None:
    """A database of schema version 3 (no counters) gets them filled on opening."""
    now = datetime.now(UTC)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(own_store_url, tmp_path) as store:
            await write_history(store, now)
            expected = counted_stats(await store.album_stats(now))
        # Back to version 3: the counters never existed.
        statements = ["DROP TABLE stats_requests", "DROP TABLE stats_cache",
                      "UPDATE schema_version SET version = 3"]  # fmt: skip
        await change_schema(own_store_url, *statements)
        async with open_test_store(own_store_url, tmp_path) as store:
            assert counted_stats(await store.album_stats(now)) == expected


async def change_schema(url: str, *statements: str) -> None:
    """Run *statements* on the store's database, around the store."""
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            for sql in statements:
                conn.execute(sql)
        conn.close()
    else:
        for sql in statements:
            await mysql_execute(url, sql)


async def indexes_of(url: str) -> list[tuple[str, str, str]]:
    """Every (table, index, column) of the store's database."""
    if url.startswith("sqlite"):
        sql = (
            "SELECT m.tbl_name, il.name, ii.name FROM sqlite_master AS m, "
            "pragma_index_list(m.name) AS il, pragma_index_info(il.name) AS ii "
            "WHERE m.type = 'table'"
        )
    else:
        sql = (
            "SELECT table_name, index_name, column_name FROM information_schema.statistics "
            "WHERE table_schema = DATABASE()"
        )
    return sorted((str(t), str(i), str(c)) for t, i, c in await sql_rows(url, sql))


async def test_the_migration_logs_once_and_runs_again_harmlessly(
    own_store_url: str, tmp_path: Path
) -> None:
    """Both backends log store_migrated when they migrate, and only then; a database
    migrated already, told it is older, gains no table, column or index twice."""
    backend = "sqlite" if own_store_url.startswith("sqlite") else "mysql"
    with trio.fail_after(TEST_TIMEOUT_S):
        with capture_logs() as logs:
            async with open_test_store(own_store_url, tmp_path):
                pass
        migrated = [e for e in logs if e["event"] == "store_migrated"]
        assert migrated == [
            {
                "event": "store_migrated",
                "log_level": "info",
                "backend": backend,
                "version": SCHEMA_VERSION,
                "from_version": 0,
            }
        ]
        indexes = await indexes_of(own_store_url)
        assert ("request_log", "idx_log_created_at", "created_at") in indexes
        with capture_logs() as logs:
            async with open_test_store(own_store_url, tmp_path):
                pass
        assert [e for e in logs if e["event"] == "store_migrated"] == []
        await change_schema(own_store_url, "UPDATE schema_version SET version = 1")
        with capture_logs() as logs:
            async with open_test_store(own_store_url, tmp_path) as store:
                assert store.statistics().server_warnings == 0
        assert [e["from_version"] for e in logs if e["event"] == "store_migrated"] == [1]
        assert await indexes_of(own_store_url) == indexes
        assert await sql_rows(own_store_url, "SELECT version FROM schema_version") == [
            (SCHEMA_VERSION,)
        ]


async def test_a_newer_schema_is_refused(own_store_url: str, tmp_path: Path) -> None:
    backend = "sqlite" if own_store_url.startswith("sqlite") else "mysql"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(own_store_url, tmp_path):
            pass
        await change_schema(own_store_url, "UPDATE schema_version SET version = 99")
        with pytest.raises(StoreError) as info:
            async with open_test_store(own_store_url, tmp_path):
                pass
        assert str(info.value) == (
            f"{backend} store: schema version 99 is newer than this Xintu's "
            f"({SCHEMA_VERSION}); upgrade Xintu"
        )
        assert await sql_rows(own_store_url, "SELECT version FROM schema_version") == [(99,)]


async def test_stats_scan_no_table_that_grows(tmp_path: Path) -> None:
    """SQLite's plans for the stats queries: only the counters are scanned; the
    request log is read through its created_at index (the latency window)."""
    path = tmp_path / "plans.sqlite3"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(f"sqlite:///{path}", tmp_path):
            pass
    d = SQLiteDialect()
    plans: dict[str, str] = {}
    with sqlite3.connect(path) as conn:
        for name, (sql, params) in stats_queries(
            datetime.now(UTC), encode_time=d.time, encode_date=d.date
        ).items():
            rows = conn.execute("EXPLAIN QUERY PLAN " + d.named(sql), params).fetchall()
            plans[name] = " | ".join(str(r[-1]) for r in rows)
    conn.close()
    for name, plan in plans.items():
        assert "SCAN request_log" not in plan, (name, plan)
        assert "SCAN image_classification_cache" not in plan, (name, plan)
    assert "USING INDEX idx_log_created_at" in plans["latency"]


# --- URLs and opening ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgres://u:hunter2@db/x", "unsupported store URL"),
        ("sqlite://relative/file.db", "expected sqlite:///absolute/path/to/file"),
        ("sqlite:///", "expected sqlite:///absolute/path/to/file"),
        ("mysql://u:hunter2@127.0.0.1:3306", "no database in mysql://u:***@127.0.0.1:3306"),
        ("mysql://u:hunter2@127.0.0.1:nope/db", "not a valid MySQL URL"),
        (
            "mysql://u:hunter2@127.0.0.1/db?sslmode=require",
            "unknown URL option 'sslmode' in mysql://u:***@127.0.0.1/db?sslmode=require (known: "
            "ssl, ssl_ca, ssl_cert, ssl_key, ssl_verify, ssl_verify_identity)",
        ),
        ("mysql://u:hunter2@127.0.0.1/db?ssl=maybe", "option ssl must be true or false"),
        ("mysql://u:hunter2@127.0.0.1/db?ssl=1&ssl=0", "URL option ssl given twice"),
        ("mysql://u:hunter2@127.0.0.1/db?ssl=false&ssl_ca=/x", "ssl=false contradicts ssl_ca"),
        ("mysql://u:hunter2@127.0.0.1/db?ssl_ca=", "URL option ssl_ca needs a file path"),
        ("mysql://u:hunter2@127.0.0.1/db?ssl_key=/k.pem", "ssl_key needs ssl_cert"),
        (
            "mysql://u:hunter2@127.0.0.1/db?ssl_verify=false&ssl_verify_identity=true",
            "ssl_verify_identity=true needs ssl_verify=true",
        ),
        ("mysql://u:hunter2@127.0.0.1/db?ssl", "malformed URL options"),
        ("mysql://u:hunter2@127.0.0.1/db#x", "a URL fragment is not supported"),
        (
            "mysql://u:hunter2@127.0.0.1/db?ssl_ca=/nonexistent/ca.pem",
            "cannot use the TLS files of the URL: [Errno 2] No such file or directory",
        ),
    ],
)
async def test_bad_store_urls_are_config_errors(tmp_path: Path, url: str, problem: str) -> None:
    config = load_config(env={}, data={"dir": str(tmp_path)}, store={"url": url})
    with pytest.raises(ConfigError) as info:
        await open_store(config)
    assert info.value.key == "store.url"
    assert problem in info.value.problem
    assert "hunter2" not in str(info.value)


def test_sqlite_urls() -> None:
    assert sqlite_path("sqlite:///var/lib/xintu/x.db") == Path("/var/lib/xintu/x.db")
    assert sqlite_path("sqlite:////var/lib/xintu/x.db") == Path("/var/lib/xintu/x.db")


def test_mysql_urls() -> None:
    s = parse_mysql_url("mysql://us%40er:p%3Ass@db.example:3307/xintu")
    assert (s.host, s.port, s.user, s.password, s.database) == (
        "db.example",
        3307,
        "us@er",
        "p:ss",
        "xintu",
    )
    assert "p:ss" not in repr(s)
    assert s.url == "mysql://us@er:***@db.example:3307/xintu"
    assert s.tls is None
    assert parse_mysql_url("mariadb://root@localhost/x").port == 3306


def test_mysql_tls_options() -> None:
    s = parse_mysql_url("mysql://u:p@db.example/x?ssl=true&ssl_ca=/etc/ca%20dir/ca.pem")
    assert s.tls == TlsSettings(ca="/etc/ca dir/ca.pem", verify=True, verify_identity=True)
    assert s.url == "mysql://u:***@db.example:3306/x?ssl=true&ssl_ca=/etc/ca+dir/ca.pem"
    assert s.with_database("y").tls == s.tls
    # Any ssl_ option implies ssl=true; verification is on unless turned off.
    assert parse_mysql_url("mysql://u@h/x?ssl_verify=false").tls == TlsSettings(
        verify=False, verify_identity=False
    )
    assert parse_mysql_url("mysql://u@h/x?ssl=1&ssl_verify_identity=no").tls == TlsSettings(
        verify=True, verify_identity=False
    )
    assert parse_mysql_url("mysql://u@h/x?ssl=false").tls is None
    assert parse_mysql_url("mysql://u@h/x?ssl=true&ssl_cert=/c.pem&ssl_key=/k.pem").tls == (
        TlsSettings(cert="/c.pem", key="/k.pem")
    )
    # The system's CAs, verified, host name checked: what a managed service wants.
    ctx = parse_mysql_url("mysql://u@h/x?ssl=true").tls.context()  # type: ignore[union-attr]
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    loose = parse_mysql_url("mysql://u@h/x?ssl_verify=false").tls.context()  # type: ignore[union-attr]
    assert (loose.verify_mode, loose.check_hostname) == (ssl.CERT_NONE, False)


async def test_the_default_url_is_a_sqlite_file_in_the_data_dir(tmp_path: Path) -> None:
    config = load_config(env={}, data={"dir": str(tmp_path / "data")})
    with trio.fail_after(TEST_TIMEOUT_S):
        async with await open_store(config) as s:
            assert s.backend == "sqlite"
    assert (tmp_path / "data" / "xintu.sqlite3").is_file()


def test_values_are_validated() -> None:
    with pytest.raises(ValueError, match=r"^not a lowercase 64-hex SHA-256 digest: 'ABC'$"):
        ResultWrite("ABC", clf(), None)
    with pytest.raises(ValueError, match=r"^negative hit count -1$"):
        HitIncrement(new_hash(), -1, T0)
    with pytest.raises(ValueError, match=r"^batch_id must have 1\.\.64 characters$"):
        WriteBatch("")
    with pytest.raises(ValueError, match=r"^empty request_id$"):
        log_row("")


# --- SQLite only -----------------------------------------------------------------


async def test_sqlite_file_is_wal_in_created_directories(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "x.sqlite3"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(f"sqlite:///{path}", tmp_path):
            pass
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


async def test_sqlite_unusable_path_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(StoreUnavailable):
        async with open_test_store(f"sqlite:///{blocker / 'x.sqlite3'}", tmp_path):
            pass


async def test_sqlite_lock_held_by_another_process_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite3"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(f"sqlite:///{path}", tmp_path, query_timeout_s=0.2) as s:
            other = sqlite3.connect(path, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")  # another writer holds the file
                with pytest.raises(StoreUnavailable) as info:
                    await s.apply(WriteBatch(new_id()))
                assert str(info.value) == "sqlite store: apply timed out after 0.2s"
                other.execute("ROLLBACK")
            finally:
                other.close()
            assert await s.apply(WriteBatch(new_id()))
            assert s.statistics().errors == 1


async def test_sqlite_reads_do_not_wait_for_a_blocked_write(tmp_path: Path) -> None:
    """A cache lookup runs on the reader connection: a write stuck behind another
    process's lock holds the writer connection, not the reads."""
    path = tmp_path / "x.sqlite3"
    h = new_hash()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(f"sqlite:///{path}", tmp_path, query_timeout_s=3.0) as s:
            assert await s.apply(WriteBatch(new_id(), results=(ResultWrite(h, clf(), 10),)))
            other = sqlite3.connect(path, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")  # another writer holds the file
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(s.apply, WriteBatch(new_id()))
                    await trio.sleep(0.2)  # the write is waiting on the writer connection
                    assert s.statistics().pool_in_use == 1
                    with trio.fail_after(1.0):  # not the 3 s the write may wait
                        entry = await s.get(h)
                        await s.ping()
                    assert entry is not None
                    other.execute("ROLLBACK")  # the write goes through
            finally:
                other.close()


_LEGACY_SQLITE = """
CREATE TABLE image_classification_cache (
    id INTEGER PRIMARY KEY, image_hash CHAR(64) NOT NULL UNIQUE, category TEXT NOT NULL,
    confidence REAL, description TEXT, model_used TEXT, model_response TEXT,
    hit_count INTEGER DEFAULT 0, created_at TEXT NOT NULL, last_hit_at TEXT
);
"""


async def test_sqlite_upgrades_an_original_table(tmp_path: Path) -> None:
    path = tmp_path / "legacy.sqlite3"
    h = new_hash()
    with sqlite3.connect(path) as conn:
        conn.executescript(_LEGACY_SQLITE)
        conn.execute(
            "INSERT INTO image_classification_cache (image_hash, category, confidence, "
            "model_used, model_response, hit_count, created_at) "
            "VALUES (?, 'pets', 0.875, 'qwen-vl', '{\"raw\": 1}', 3, '2024-05-06 07:08:09')",
            (h,),
        )
    conn.close()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(f"sqlite:///{path}", tmp_path) as s:
            entry = await entry_of(s, h)
            assert entry.classification == clf(Source.LLM, Category.PETS, 0.875, "qwen-vl")
            assert (entry.hit_count, entry.created_at) == (
                3,
                datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
            )
            await put(s, ResultWrite(h, clf(Source.LOCAL), 1))
            assert (await entry_of(s, h)).classification.model == "qwen-vl"


# --- MySQL only ------------------------------------------------------------------


def _mysql(s: Store) -> MySQLStore:
    assert isinstance(s, MySQLStore)
    return s


@pytest.mark.mysql
async def test_mysql_pool_is_bounded(mysql_url: str, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(mysql_url, tmp_path, pool_size=2) as s:
            pool = _mysql(s).pool
            created_before = pool.statistics().created
            release, both_holding = trio.Event(), trio.Event()
            holders: list[int] = []

            async def hold() -> None:
                async with pool.acquire() as conn:
                    await conn.fetchall("SELECT 1")
                    holders.append(conn.thread_id)
                    if len(holders) == 2:
                        both_holding.set()
                    await release.wait()

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(hold)
                await both_holding.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics() == PoolStatistics(
                    size=2, in_use=2, idle=0, waiting=3, created=2, discarded=0
                )
                assert created_before == 1  # the migration's connection, now idle
                release.set()
            stats = pool.statistics()
            assert (stats.in_use, stats.idle, stats.created) == (0, 2, 2)
            assert len(holders) == 5
            assert len(set(holders)) == 2


@pytest.mark.mysql
async def test_mysql_cancelled_query_drops_its_connection(mysql_url: str, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(mysql_url, tmp_path, pool_size=1) as s:
            pool = _mysql(s).pool
            async with pool.acquire() as conn:
                first = conn.thread_id

            async def slow(
                *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
            ) -> None:
                async with pool.acquire() as conn:
                    assert conn.thread_id == first  # the idle connection is reused...
                    task_status.started()
                    await conn.fetchall("SELECT SLEEP(5)")

            async with trio.open_nursery() as nursery:
                await nursery.start(slow)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()

            stats = pool.statistics()
            assert (stats.in_use, stats.idle, stats.discarded) == (0, 0, 1)  # ...but not this one
            async with pool.acquire() as conn:
                assert conn.thread_id != first
                assert await conn.fetchall("SELECT 1") == ((1,),)
            await s.ping()
            assert pool.statistics().created == 2
            await _kill_quietly(mysql_url, first)


@pytest.mark.mysql
async def test_mysql_server_warnings_are_counted_not_raised(mysql_url: str, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(mysql_url, tmp_path) as s:
            async with _mysql(s).pool.acquire() as conn:
                # Truncating '1x' to an integer is a warning (1292), which trio-mysql
                # would raise as a Python warning, an error under -W error.
                assert await conn.fetchall("SELECT CAST('1x' AS SIGNED)") == ((1,),)
            assert s.statistics().server_warnings == 1


async def _kill_quietly(url: str, thread_id: int) -> None:
    rows = await mysql_execute(
        url, "SELECT COUNT(*) FROM information_schema.processlist WHERE id = %s", (thread_id,)
    )
    if rows[0][0]:
        await mysql_execute(url, f"KILL {int(thread_id)}")


@pytest.mark.mysql
async def test_mysql_killed_connection_is_replaced(mysql_url: str, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(mysql_url, tmp_path, pool_size=1) as s:
            h = new_hash()
            await put(s, ResultWrite(h, clf(), 7))
            pool = _mysql(s).pool
            async with pool.acquire() as conn:
                victim = conn.thread_id
            await mysql_execute(mysql_url, f"KILL {victim}")

            assert (await entry_of(s, h)).image_size == 7  # transparently, on a new connection
            stats = s.statistics()
            assert (stats.retries, stats.errors, stats.pool_discarded) == (1, 0, 1)
            async with pool.acquire() as conn:
                assert conn.thread_id != victim


@pytest.mark.mysql
async def test_mysql_survives_a_server_restart_and_reports_an_outage(
    mysql_url: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    settings = parse_mysql_url(mysql_url)
    proxy = TcpProxy(settings.host, settings.port)
    await nursery.start(proxy.run)
    proxied = mysql_url_of(settings, port=proxy.port).replace(settings.host, "127.0.0.1", 1)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(proxied, tmp_path, pool_size=2) as s:
            h = new_hash()
            await put(s, ResultWrite(h, clf(), 3))

            proxy.sever()  # every pooled connection is now stale, as after a restart
            await trio.testing.wait_all_tasks_blocked()
            assert (await entry_of(s, h)).image_size == 3
            assert s.statistics().retries == 1

            proxy.stop()  # the server is gone
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(2), pytest.raises(StoreUnavailable) as info:
                await s.ping()
            assert str(info.value) == (
                f"mysql store {parse_mysql_url(proxied).url}: ping failed: "
                f"all attempts to connect to 127.0.0.1:{proxy.port} failed"
            )
            assert s.statistics().errors == 1


async def test_mysql_unreachable_server_fails_fast(tmp_path: Path) -> None:
    url = "mysql://root:hunter2@127.0.0.1:1/xintu"
    with trio.fail_after(2), pytest.raises(StoreUnavailable) as info:
        async with open_test_store(url, tmp_path):
            pass
    assert str(info.value) == (
        "mysql store mysql://root:***@127.0.0.1:1/xintu: open failed: "
        "all attempts to connect to 127.0.0.1:1 failed"
    )
    # ping on a store that never connected (what /readyz asks) fails just as fast.
    s = MySQLStore(parse_mysql_url(url), pool_size=1, query_timeout_s=5.0)
    with trio.fail_after(2), pytest.raises(StoreUnavailable) as info:
        await s.ping()
    assert str(info.value) == (
        "mysql store mysql://root:***@127.0.0.1:1/xintu: ping failed: "
        "all attempts to connect to 127.0.0.1:1 failed"
    )
    await s.aclose()


@pytest.mark.mysql
async def test_mysql_query_timeout_is_unavailable(mysql_url: str, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(mysql_url, tmp_path, query_timeout_s=0.2, pool_size=1) as s:
            locker = await _hold_row_lock(mysql_url)
            try:
                with pytest.raises(StoreUnavailable) as info:
                    await s.apply(
                        WriteBatch(new_id(), hits=(HitIncrement(locker.image_hash, 1, T0),))
                    )
                assert str(info.value) == (
                    f"mysql store {parse_mysql_url(mysql_url).url}: apply timed out after 0.2s"
                )
                assert s.statistics().pool_discarded == 1
            finally:
                await locker.release()
            await s.ping()


class _RowLock:
    def __init__(self, image_hash: str, release: Callable[[], Awaitable[None]]) -> None:
        self.image_hash = image_hash
        self.release = release


async def _hold_row_lock(url: str) -> _RowLock:
    """Another session holds a row lock on a cached row until released."""
    h = new_hash()
    settings = parse_mysql_url(url)
    cm = mysql_admin(settings)
    conn = await cm.__aenter__()
    await conn.execute(
        "INSERT INTO image_classification_cache (image_hash, category, confidence, created_at) "
        "VALUES (%s, 'pets', 0.5, %s)",
        (h, T0.replace(tzinfo=None)),
    )
    await conn.begin()
    await conn.fetchall(
        "SELECT id FROM image_classification_cache WHERE image_hash = %s FOR UPDATE", (h,)
    )

    async def release() -> None:
        await conn.rollback()
        await cm.__aexit__(None, None, None)

    return _RowLock(h, release)


_LEGACY_MYSQL = [
    """CREATE TABLE image_classification_cache (
        id INT AUTO_INCREMENT PRIMARY KEY,
        image_hash VARCHAR(64) NOT NULL UNIQUE,
        category VARCHAR(50) NOT NULL,
        confidence FLOAT,
        description TEXT,
        model_used VARCHAR(100),
        model_response JSON,
        hit_count INT DEFAULT 0,
        created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
        last_hit_at TIMESTAMP NULL
    ) DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE request_log (
        id INT AUTO_INCREMENT PRIMARY KEY,
        request_id VARCHAR(64) NOT NULL UNIQUE,
        user_id VARCHAR(64), ip VARCHAR(45), image_hash VARCHAR(64), image_size INT,
        category VARCHAR(50), confidence FLOAT, from_cache BOOLEAN DEFAULT FALSE,
        source VARCHAR(20), processing_time_ms FLOAT,
        created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
    ) DEFAULT CHARSET=utf8mb4""",
]


@pytest.mark.mysql
async def test_mysql_upgrades_the_original_tables(mysql_url: str, tmp_path: Path) -> None:
    settings = parse_mysql_url(mysql_url)
    legacy = settings.with_database(f"{settings.database}_legacy")
    h = new_hash()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with mysql_admin(settings) as admin:
            await admin.execute(f"CREATE DATABASE `{legacy.database}`")
            try:
                await admin.execute(f"USE `{legacy.database}`")
                for sql in _LEGACY_MYSQL:
                    await admin.execute(sql)
                await admin.execute(
                    "INSERT INTO image_classification_cache (image_hash, category, confidence, "
                    "model_used, model_response, hit_count, created_at) VALUES "
                    "(%s, 'pets', 0.875, 'qwen-vl', '{\"raw\": 1}', 3, '2024-05-06 07:08:09')",
                    (h,),
                )
                async with open_test_store(mysql_url_of(legacy), tmp_path) as s:
                    entry = await entry_of(s, h)
                    assert entry.classification == clf(Source.LLM, Category.PETS, 0.875, "qwen-vl")
                    assert entry.created_at == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
                    await put(s, ResultWrite(h, clf(Source.LOCAL), 1))
                    await hit(s, h, 2, at(1))
                    entry = await entry_of(s, h)
                    assert (entry.classification.model, entry.hit_count) == ("qwen-vl", 5)
                    assert s.statistics().server_warnings == 0
                columns = await admin.fetchall(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = %s AND table_name = 'image_classification_cache'",
                    (legacy.database,),
                )
                assert {"source", "image_size"} <= {c for (c,) in columns}
            finally:
                await admin.execute(f"DROP DATABASE IF EXISTS `{legacy.database}`")


# --- the pool without a server -----------------------------------------------------


class _FakeConnection:
    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


async def test_pool_drops_connections_that_saw_an_error() -> None:
    made: list[_FakeConnection] = []

    async def connect() -> _FakeConnection:
        made.append(_FakeConnection(len(made)))
        return made[-1]

    pool = Pool(connect, size=2)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with pool.acquire() as conn:
            assert conn.n == 0
        async with pool.acquire() as conn:
            assert conn.n == 0  # reused
        with pytest.raises(RuntimeError, match=r"^boom$"):
            async with pool.acquire() as conn:
                raise RuntimeError("boom")
        assert made[0].closed
        async with pool.acquire() as conn:
            assert conn.n == 1
        async with pool.acquire(fresh=True) as conn:
            assert conn.n == 2  # the idle one was closed, not reused
        assert made[1].closed
        assert pool.statistics() == PoolStatistics(2, 0, 1, 0, 3, 2)
        await pool.aclose()
        assert made[2].closed
        with pytest.raises(trio.ClosedResourceError):
            async with pool.acquire():
                pass


async def test_pool_slot_is_freed_when_connecting_fails() -> None:
    async def connect() -> _FakeConnection:
        raise OSError("refused")

    pool = Pool(connect, size=1)
    with trio.fail_after(TEST_TIMEOUT_S):
        for _ in range(3):
            with pytest.raises(OSError, match=r"^refused$"):
                async with pool.acquire():
                    pass
    assert pool.statistics() == PoolStatistics(1, 0, 0, 0, 0, 0)


# --- the LRU -----------------------------------------------------------------------


def _entry(image_hash: str) -> CachedEntry:
    return CachedEntry(image_hash, clf(), 0, T0, None)


def test_lru_evicts_the_least_recently_used() -> None:
    lru = Lru(2)
    a, b, c = new_hash(), new_hash(), new_hash()
    lru.put(_entry(a))
    lru.put(_entry(b))
    assert lru.get(a) == _entry(a)  # a is now the most recent
    lru.put(_entry(c))  # evicts b
    assert lru.get(b) is None
    assert len(lru) == 2
    assert a in lru
    assert c in lru
    assert lru.statistics() == LruStatistics(hits=1, misses=1, size=2, maxsize=2)
    lru.discard(a)
    assert lru.get(a) is None
    lru.clear()
    assert len(lru) == 0


def test_lru_of_size_zero_keeps_nothing() -> None:
    lru = Lru(0)
    h = new_hash()
    lru.put(_entry(h))
    assert lru.get(h) is None
    assert lru.statistics() == LruStatistics(hits=0, misses=1, size=0, maxsize=0)
    with pytest.raises(ValueError, match=r"^maxsize must be >= 0, got -1$"):
        Lru(-1)
