"""Xintu on the original system's MySQL database, in place (a real MariaDB).

An operator replacing the original backend points ``XINTU_STORE_URL`` at its
database and keeps its cache. Each test loads ``tests/original_schema`` (the
original's tables and rows as its scripts and code leave them) into a database of
its own, then opens Xintu's MySQL store on it: the start-up migration must keep
every original column and row, the original's answers must be hits for every
client, and Xintu's own writes must fit the original's stricter columns.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.trio import serve as hypercorn_serve

from xintu import Category, Classification, Source, load_config
from xintu._serve import hypercorn_config
from xintu.http import create_app
from xintu.store import (
    AliasWrite,
    HitIncrement,
    RequestLogRow,
    ResultWrite,
    Store,
    WriteBatch,
)
from xintu.store._mysql import parse_mysql_url
from xintu.store._schema import SCHEMA_VERSION

from .backends import mysql_admin, open_test_store
from .fakes import FakeModel

pytestmark = pytest.mark.mysql

TEST_TIMEOUT_S = 30.0
FIXTURE = Path(__file__).parent / "original_schema"

# The client-named photos of 04_rows.sql: SHA-256 of each ORIGINAL file.
CAT = hashlib.sha256(b"IMG_0001.HEIC original bytes").hexdigest()
SEA = hashlib.sha256(b"IMG_0002.JPG original bytes").hexdigest()
NOODLES = hashlib.sha256(b"IMG_0003.PNG original bytes").hexdigest()
ORIGINAL_TABLES = ("image_classification_cache", "request_log", "unified_request_log")


def statements(text: str) -> list[str]:
    """The statements of one fixture file (``;`` at a line's end; ``--`` comments)."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";\n") if s.strip().rstrip(";")]


async def load_original(url: str) -> None:
    """Apply the fixture files in order (01 init, 02 inference_method, 03 unified
    log, 04 rows) to the database of *url*."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with mysql_admin(parse_mysql_url(url)) as admin:
            for path in sorted(FIXTURE.glob("*.sql")):
                for sql in statements(path.read_text(encoding="utf-8")):
                    await admin.execute(sql.rstrip(";"))


async def query(url: str, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with mysql_admin(parse_mysql_url(url)) as admin:
            return [tuple(r) for r in await admin.fetchall(sql, args)]


async def columns(url: str, table: str) -> list[tuple[Any, ...]]:
    """(name, type, nullable, default, extra, generated) of *table*, in order."""
    return await query(
        url,
        "SELECT column_name, column_type, is_nullable, column_default, extra, "
        "generation_expression FROM information_schema.columns "
        "WHERE table_schema = DATABASE() AND table_name = %s ORDER BY ordinal_position",
        (table,),
    )


async def indexes(url: str, table: str) -> set[tuple[Any, ...]]:
    return set(
        await query(
            url,
            "SELECT index_name, non_unique, seq_in_index, column_name "
            "FROM information_schema.statistics "
            "WHERE table_schema = DATABASE() AND table_name = %s",
            (table,),
        )
    )


async def rows(url: str, table: str, names: list[str]) -> list[tuple[Any, ...]]:
    return await query(url, f"SELECT {', '.join(names)} FROM {table} ORDER BY id")


@pytest.fixture
async def original_url(fresh_mysql_url: str) -> str:
    """A database of its own holding the original system's tables and rows."""
    await load_original(fresh_mysql_url)
    return fresh_mysql_url


def log_row(request_id: str, **values: Any) -> RequestLogRow:
    row: dict[str, Any] = {
        "request_id": request_id,
        "user_id": "user-1",
        "ip": "192.0.2.7",
        "image_hash": None,
        "image_size": None,
        "category": None,
        "confidence": None,
        "from_cache": False,
        "source": None,
        "processing_time_ms": 1.5,
        "created_at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    }
    row.update(values)
    return RequestLogRow(**row)


async def apply(store: Store, batch_id: str, **parts: Any) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        assert await store.apply(WriteBatch(batch_id, **parts))


# --- the fixture is what the original leaves ------------------------------------------


async def test_the_fixture_is_the_original_schema(original_url: str) -> None:
    """Pins the tables 01..03 build (as init.sql, add_inference_method.sql and
    create_unified_request_log.sql leave them, checked against the scripts)."""
    cache = await columns(original_url, "image_classification_cache")
    assert [(c[0], c[1], c[2]) for c in cache] == [
        ("id", "bigint(20) unsigned", "NO"),
        ("image_hash", "varchar(64)", "NO"),
        ("category", "varchar(50)", "NO"),
        ("confidence", "decimal(5,4)", "NO"),
        ("description", "text", "YES"),
        ("model_used", "varchar(50)", "NO"),
        ("model_response", "longtext", "YES"),  # MariaDB's JSON
        ("hit_count", "int(10) unsigned", "YES"),
        ("created_at", "datetime", "NO"),
        ("last_hit_at", "datetime", "NO"),
    ]
    assert cache[-1][3:5] == ("current_timestamp()", "on update current_timestamp()")
    log = await columns(original_url, "request_log")
    assert [(c[0], c[1], c[2], c[3]) for c in log] == [
        ("id", "bigint(20) unsigned", "NO", None),
        ("request_id", "varchar(64)", "NO", None),
        ("user_id", "varchar(64)", "YES", "NULL"),
        ("ip_address", "varchar(45)", "YES", "NULL"),
        ("image_hash", "varchar(64)", "NO", None),
        ("image_size", "int(10) unsigned", "YES", "NULL"),
        ("category", "varchar(50)", "NO", None),
        ("confidence", "decimal(5,4)", "NO", None),
        ("from_cache", "tinyint(1)", "YES", "0"),
        ("processing_time_ms", "int(10) unsigned", "YES", "NULL"),
        ("created_at", "datetime", "NO", "current_timestamp()"),
        ("created_date", "date", "YES", "NULL"),
        ("inference_method", "varchar(20)", "YES", "'llm'"),
    ]
    assert log[11][4] == "STORED GENERATED"
    # No unique key on request_id: the original never made one.
    assert not any(
        name == "uk_request_id" for name, *_ in await indexes(original_url, "request_log")
    )
    assert [
        r[0] for r in await rows(original_url, "image_classification_cache", ["hit_count"])
    ] == [
        1,
        3,
        2,
    ]


# --- migration ---------------------------------------------------------------------------


async def test_migration_keeps_the_originals_columns_and_rows(
    original_url: str, tmp_path: Path
) -> None:
    before = {t: await columns(original_url, t) for t in ORIGINAL_TABLES}
    before_indexes = {t: await indexes(original_url, t) for t in ORIGINAL_TABLES}
    before_rows = {
        t: await rows(original_url, t, [c[0] for c in before[t]]) for t in ORIGINAL_TABLES
    }
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(original_url, tmp_path) as store:
            assert store.statistics().server_warnings == 0
        async with open_test_store(original_url, tmp_path) as store:  # idempotent
            assert store.statistics().server_warnings == 0
    after = {t: await columns(original_url, t) for t in ORIGINAL_TABLES}
    # Every original column is as it was, in its place; Xintu's come after, nullable.
    for table in ORIGINAL_TABLES:
        assert after[table][: len(before[table])] == before[table]
    added = {t: [c for c in after[t][len(before[t]) :]] for t in ORIGINAL_TABLES}
    assert [(c[0], c[1], c[2]) for c in added["image_classification_cache"]] == [
        ("source", "varchar(16)", "YES"),
        ("image_size", "bigint(20)", "YES"),
    ]
    assert [(c[0], c[1], c[2]) for c in added["request_log"]] == [
        ("source", "varchar(16)", "YES"),
        ("ip", "varchar(64)", "YES"),
        ("hashes_asked", "int(11)", "YES"),
        ("hashes_hit", "int(11)", "YES"),
    ]
    assert added["unified_request_log"] == []
    # The original's indexes stay; request_log gains a unique key on request_id; no
    # index is added twice under another name (idx_created_at, idx_category exist).
    for table in ORIGINAL_TABLES:
        assert before_indexes[table] <= await indexes(original_url, table)
    log_indexes = {name for name, *_ in await indexes(original_url, "request_log")}
    assert "uk_request_id" in log_indexes
    assert not {"idx_log_created_at", "idx_log_category"} & log_indexes
    assert (
        await indexes(original_url, "unified_request_log") == before_indexes["unified_request_log"]
    )
    # Every row keeps every original value.
    for table in ORIGINAL_TABLES:
        names = [c[0] for c in before[table]]
        assert await rows(original_url, table, names) == before_rows[table]
    assert await query(original_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


async def test_repeated_request_ids_get_a_plain_index(original_url: str, tmp_path: Path) -> None:
    """The original never made request ids unique: where its rows repeat one, the
    migration indexes the column without the unique key instead of failing."""
    await query(
        original_url,
        "INSERT INTO request_log (request_id, image_hash, category, confidence) "
        "SELECT request_id, image_hash, category, confidence FROM request_log LIMIT 1",
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(original_url, tmp_path) as store:
            await apply(store, "b-1", logs=(log_row("xintu-1"),))
            found = await store.get_request_log("xintu-1")
            assert found is not None
    names = {name for name, *_ in await indexes(original_url, "request_log")}
    assert "idx_log_request_id" in names
    assert "uk_request_id" not in names


# --- the original's answers are hits ------------------------------------------------------


async def test_the_originals_rows_are_hits_for_everyone(original_url: str, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(original_url, tmp_path) as store:
            cat = await store.get(CAT)
            assert cat is not None
            assert cat.image_hash == CAT
            assert cat.classification == Classification(
                category=Category.PETS,
                confidence=0.95,
                source=Source.LLM,
                model="qwen-vl-plus_llm",
                description="一只橘猫趴在沙发上",
            )
            assert (cat.hit_count, cat.image_size) == (3, None)
            assert cat.last_hit_at is not None
            # Every client: with a scope of its own, or none.
            for scope in (None, "key:someone", "ip:198.51.100.9"):
                found = await store.get_many([CAT, SEA, NOODLES, "0" * 64], scope=scope)
                assert {h: e.classification.category for h, e in found.items()} == {
                    CAT: Category.PETS,
                    SEA: Category.TRAVEL_SCENERY,
                    NOODLES: Category.FOODS,
                }
                assert found[SEA].classification.model == "gpt-4-vision-preview"
                assert found[SEA].hit_count == 1
            # An alias (Xintu's, of a client's hash) may name an original row too.
            client = hashlib.sha256(b"another original").hexdigest()
            await apply(store, "b-alias", aliases=(AliasWrite("key:a", client, SEA),))
            found = await store.get_many([client], scope="key:a")
            assert found[client].image_hash == SEA
            assert await store.get(client) is None
            stats = await store.album_stats(datetime.now(UTC))
            assert stats is not None
            assert store.statistics().server_warnings == 0


# --- Xintu's writes fit the original's columns ---------------------------------------------


async def test_xintu_writes_fit_the_originals_columns(original_url: str, tmp_path: Path) -> None:
    new = hashlib.sha256(b"uploaded resized bytes").hexdigest()
    long_model = "qwen2.5-vl-72b-instruct-with-a-very-long-deployment-name-v2"  # > 50
    answer = Classification(Category.SCREENSHOT, 0.876543, Source.LLM, long_model, "截图")
    t = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)  # after the fixture's NOW()
    logs = (
        # A classification by the LLM: every column has a value.
        log_row(
            "xintu-llm",
            image_hash=new,
            image_size=123_456,
            category="screenshot",
            confidence=0.876543,
            source="llm",
            processing_time_ms=2345.6,
            user_id="u" * 100,  # the original's user_id holds 64
            ip="2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff:1234:5678",  # over its 45
        ),
        # A cache hit on an original row.
        log_row("xintu-hit", image_hash=CAT, category="pets", confidence=0.95, from_cache=True),
        # A request that failed: no hash, category or confidence (NOT NULL there).
        log_row("xintu-failed", user_id=None, ip=None),
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(original_url, tmp_path) as store:
            await apply(
                store,
                "b-1",
                results=(ResultWrite(new, answer, 98_765, t),),
                hits=(HitIncrement(CAT, 2, t), HitIncrement(SEA, 1, t)),
                logs=logs,
            )
            await apply(store, "b-2", hits=(HitIncrement(new, 1, t),))
            entry = await store.get(new)
            assert entry is not None
            assert entry.classification.model == long_model[:50]
            assert entry.classification.confidence == 0.8765
            assert (entry.hit_count, entry.image_size, entry.created_at) == (1, 98_765, t)
            cat = await store.get(CAT)
            assert cat is not None
            assert cat.hit_count == 5
            assert cat.last_hit_at == t  # the latest hit's time
            sea = await store.get(SEA)
            assert sea is not None
            assert sea.hit_count == 2
            llm = await store.get_request_log("xintu-llm")
            assert llm is not None
            assert (llm.user_id, llm.ip, llm.processing_time_ms) == ("u" * 64, logs[0].ip, 2346.0)
            assert store.statistics().server_warnings == 0
    written = await query(
        original_url,
        "SELECT request_id, user_id, ip_address, image_hash, category, confidence, "
        "from_cache, processing_time_ms, inference_method, source FROM request_log "
        "WHERE request_id LIKE 'xintu-%%' ORDER BY request_id",
    )
    assert written == [
        ("xintu-failed", None, None, "", "", Decimal("0.0000"), 0, 2, None, None),
        ("xintu-hit", "user-1", "192.0.2.7", CAT, "pets", Decimal("0.9500"), 1, 2, "cache", None),
        (
            "xintu-llm",
            "u" * 64,
            logs[0].ip[:45],
            new,
            "screenshot",
            Decimal("0.8765"),
            0,
            2346,
            "llm",
            "llm",
        ),
    ]
    # The new answer's row, in the original's columns.
    naive = t.replace(tzinfo=None)
    assert await query(
        original_url,
        "SELECT category, confidence, model_used, hit_count, created_at, last_hit_at "
        "FROM image_classification_cache WHERE image_hash = %s",
        (new,),
    ) == [
        (
            "screenshot",
            Decimal("0.8765"),
            long_model[:50],
            1,
            naive,
            naive,
        )
    ]


# --- the service on the original's database -------------------------------------------------


async def test_check_cache_by_an_original_hash_over_http(original_url: str, tmp_path: Path) -> None:
    """The service started on the original's database (its start-up migration
    included), on a real Hypercorn server, answers check-cache by an original row's
    hash: cached; the hits it served are counted on the original's rows."""
    data = tmp_path / "data"
    data.mkdir()
    config = load_config(
        env={},
        data={"dir": str(data)},
        store={"url": original_url},
        server={"bind": "127.0.0.1:0", "drain_delay_s": 0.0},
    )
    app = create_app(config, model_factory=lambda _c: FakeModel())
    stop = trio.Event()
    serve = partial(hypercorn_serve, app, hypercorn_config(config), shutdown_trigger=stop.wait)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(serve)
            async with httpx.AsyncClient(base_url=binds[0]) as client:
                reply = await client.post("/api/v1/classify/check-cache", json={"image_hash": CAT})
                assert reply.status_code == 200, reply.text
                body = reply.json()
                assert (body["success"], body["cached"]) == (True, True)
                assert body["data"]["category"] == "pets"
                assert body["data"]["confidence"] == 0.95
                assert body["data"]["description"] == "一只橘猫趴在沙发上"
                reply = await client.post(
                    "/api/v1/classify/batch-check-cache",
                    json={"image_hashes": [SEA, "0" * 64, NOODLES]},
                )
                assert reply.status_code == 200, reply.text
                items = reply.json()["items"]
                assert [(i["image_hash"], i["cached"]) for i in items] == [
                    (SEA, True),
                    ("0" * 64, False),
                    (NOODLES, True),
                ]
            stop.set()  # a graceful stop: the writer flushes, the store is closed
    counts = await query(
        original_url,
        "SELECT image_hash, hit_count FROM image_classification_cache ORDER BY id",
    )
    assert counts == [(SEA, 2), (CAT, 4), (NOODLES, 3)]
