"""request_log retention: rows older than ``store.request_log_retention_days`` are
deleted by the store's periodic pruning (after an apply), on both backends, while
``/api/v1/stats`` keeps counting them; 0 keeps the log forever."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from xintu import load_config
from xintu.errors import ConfigError
from xintu.store import Store, WriteBatch

from .backends import open_test_store
from .test_store import log_row, new_id

TEST_TIMEOUT_S = 30.0


async def write_logs(store: Store, now: datetime, ages_days: list[float]) -> list[str]:
    ids = [f"req-{i}-{new_id()[:8]}" for i in range(len(ages_days))]
    logs = tuple(
        log_row(rid, created_at=now - timedelta(days=age), from_cache=i % 2 == 0)
        for i, (rid, age) in enumerate(zip(ids, ages_days, strict=True))
    )
    assert await store.apply(WriteBatch(new_id(), logs=logs))
    return ids


async def test_old_request_log_rows_are_pruned_and_still_counted(
    own_store_url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    ages = [0.0, 1.0, 29.0, 31.0, 45.0, 400.0]
    with trio.fail_after(TEST_TIMEOUT_S):
        # Keep forever first: nothing is pruned.
        async with open_test_store(own_store_url, tmp_path) as store:
            ids = await write_logs(store, now, ages)
            for rid in ids:
                assert await store.get_request_log(rid) is not None
            before = await store.album_stats(now)
        # 30 days: the first apply of this process prunes (after its commit).
        async with open_test_store(own_store_url, tmp_path, request_log_retention_days=30) as store:
            assert await store.apply(WriteBatch(new_id(), logs=(log_row("later", created_at=now),)))
            kept = [rid for rid, age in zip(ids, ages, strict=True) if age < 30]
            for rid in ids:
                assert (await store.get_request_log(rid) is not None) is (rid in kept), rid
            after = await store.album_stats(now)
    # Totals count every request ever logged, the pruned ones too.
    assert after.requests_total == before.requests_total + 1 == len(ages) + 1
    assert after.requests_from_cache_total == before.requests_from_cache_total
    assert after.requests_today == before.requests_today + 1


def test_retention_is_a_checked_setting() -> None:
    # Kept by default: a database taken over from the original keeps its log.
    assert load_config(env={}).store.request_log_retention_days == 0
    assert (
        load_config(
            env={"XINTU_STORE_REQUEST_LOG_RETENTION_DAYS": "90"}
        ).store.request_log_retention_days
        == 90
    )
    with pytest.raises(ConfigError) as info:
        load_config(env={"XINTU_STORE_REQUEST_LOG_RETENTION_DAYS": "-1"})
    assert str(info.value) == "store.request_log_retention_days: must be >= 0, got -1"
