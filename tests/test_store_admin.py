"""The store's operator methods on both backends: listing entries, purging one, and
an operator's re-classification that replaces any stored answer."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import trio

from xintu import Category, Classification, Source
from xintu.actors._journal import decode_batch, encode_batch
from xintu.store import AliasWrite, HitIncrement, RequestLogRow, ResultWrite, Store, WriteBatch

TEST_TIMEOUT_S = 20.0
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def new_hash() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def answer(source: Source, category: Category = Category.PETS) -> Classification:
    return Classification(category, 0.8, source, model="m")


async def apply(store: Store, **parts: object) -> None:
    assert await store.apply(WriteBatch(uuid.uuid4().hex, **parts))  # type: ignore[arg-type]


async def test_find_hashes_by_source_and_date(store: Store) -> None:
    old_local, new_local, llm = new_hash(), new_hash(), new_hash()
    with trio.fail_after(TEST_TIMEOUT_S):
        await apply(
            store,
            results=(
                ResultWrite(old_local, answer(Source.LOCAL), 1, T0),
                ResultWrite(new_local, answer(Source.LOCAL), 1, T0 + timedelta(days=2)),
                ResultWrite(llm, answer(Source.LLM), 1, T0 + timedelta(days=1)),
            ),
        )
        assert await store.find_hashes(limit=10) == [old_local, llm, new_local]
        assert await store.find_hashes(source="local", limit=10) == [old_local, new_local]
        assert await store.find_hashes(source="llm", limit=10) == [llm]
        day1 = T0 + timedelta(days=1)
        assert await store.find_hashes(since=day1, limit=10) == [llm, new_local]
        assert await store.find_hashes(until=day1, limit=10) == [old_local]
        assert await store.find_hashes(source="local", since=day1, limit=10) == [new_local]
        assert await store.find_hashes(limit=1) == [old_local]
        assert await store.find_hashes(limit=0) == []


async def test_purge_deletes_the_entry_its_aliases_and_its_counts(store: Store) -> None:
    h, other, alias = new_hash(), new_hash(), new_hash()
    now = datetime.now(UTC)
    with trio.fail_after(TEST_TIMEOUT_S):
        await apply(
            store,
            results=(
                ResultWrite(h, answer(Source.LOCAL), 1),
                ResultWrite(other, answer(Source.LLM, Category.FOODS), 1),
            ),
        )
        await apply(
            store,
            hits=(HitIncrement(h, 5, now), HitIncrement(other, 2, now)),
            aliases=(AliasWrite("user:a", alias, h), AliasWrite("*", new_hash(), other)),
        )
        assert await store.get(alias, scope="user:a") is not None
        assert await store.purge(h)
        assert await store.get(h) is None
        assert await store.get(alias, scope="user:a") is None  # its alias went with it
        assert await store.get(other) is not None
        stats = await store.album_stats(now)
        assert dict(stats.categories) == {"foods": 1}
        assert stats.cache_hits_total == 2
        assert not await store.purge(h)  # gone already
        # The hash may be classified again.
        await apply(store, results=(ResultWrite(h, answer(Source.LLM), 1),))
        entry = await store.get(h)
        assert entry is not None
        assert entry.hit_count == 0


async def test_purge_refuses_a_malformed_hash(store: Store) -> None:
    with pytest.raises(ValueError, match="not a lowercase 64-hex SHA-256 digest"):
        await store.purge("abc")


async def test_a_replacing_result_replaces_an_llm_answer(store: Store) -> None:
    """An ordinary llm answer never replaces another; an operator's does, and the
    entry keeps its hits (the counters move with them)."""
    h = new_hash()
    now = datetime.now(UTC)
    first = answer(Source.LLM, Category.PETS)
    second = answer(Source.LLM, Category.FOODS)
    with trio.fail_after(TEST_TIMEOUT_S):
        await apply(store, results=(ResultWrite(h, first, 1),))
        await apply(store, hits=(HitIncrement(h, 3, now),))
        await apply(store, results=(ResultWrite(h, second, 1),))
        entry = await store.get(h)
        assert entry is not None
        assert entry.classification.category is Category.PETS
        await apply(store, results=(ResultWrite(h, second, 1, replace=True),))
        entry = await store.get(h)
        assert entry is not None
        assert entry.classification.category is Category.FOODS
        assert entry.hit_count == 3
        stats = await store.album_stats(now)
        assert dict(stats.categories) == {"foods": 1}
        assert stats.cache_hits_total == 3


def test_the_journal_keeps_replace_and_a_batch_checks_counts() -> None:
    h = new_hash()
    batch = WriteBatch(
        "j1",
        results=(ResultWrite(h, answer(Source.LLM), 1, T0, replace=True),),
        logs=(
            RequestLogRow("r1", None, None, None, None, None, None, True, "cache", 1.0, T0, 9, 4),
        ),
    )
    assert decode_batch(encode_batch(batch)) == batch
    # A line written before these keys reads as before.
    old = json.loads(encode_batch(batch))
    del old["results"][0]["replace"]
    del old["logs"][0]["hashes_asked"], old["logs"][0]["hashes_hit"]
    again = decode_batch(json.dumps(old))
    assert not again.results[0].replace
    assert again.logs[0].hashes_hit is None
