"""Upgrades of local answers served from the cache: the spool, the budget, the
queue, and over HTTP, a check-cache hit on a local answer replaced by the LLM's."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from PIL import Image
from werkzeug.datastructures import FileStorage

from xintu import load_config
from xintu.actors._spool import Spool
from xintu.actors._upgrades import ReclassifyReport, Upgrades
from xintu.http import create_app
from xintu.testing.fakellm import run_fake_llm

from .fakes import FakeModel
from .llm_service import fake_env
from .test_ops import metric

V1 = "/api/v1/classify"
MB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Stats:
    recheck_queued: int
    recheck_max_queued: int


@dataclass
class FakeLlm:
    """The LLM pool's public surface, as the upgrades use it."""

    up: bool = True
    room: int = 100
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    providers: bool = True
    rechecks: bool = True  # llm.recheck_queue > 0
    full: bool = False  # its recheck queue is full now

    @property
    def enabled(self) -> bool:
        return self.providers

    @property
    def rechecks_enabled(self) -> bool:
        return self.rechecks

    def healthy(self) -> bool:
        return self.up

    def offer_recheck(self, data: bytes, image_hash: str) -> bool:
        self.sent.append((image_hash, data))
        return True

    def statistics(self) -> Any:
        if self.full:
            return _Stats(1, 1)
        return _Stats(len(self.sent) if self.room == 0 else 0, max(self.room, 1))


async def until(condition: Any) -> None:
    """Wait (on the real clock: the spool's file work runs in threads) until
    *condition()* holds; the mock clock only moves when a test jumps it."""
    with trio.fail_after(10):
        while not condition():  # threads tell nobody when they finish
            await trio.lowlevel.checkpoint()


async def started(nursery: trio.Nursery, llm: FakeLlm, spool: Spool, **kw: int) -> Upgrades:
    per_minute, queue_size = kw.get("per_minute", 60), kw.get("queue_size", 100)
    upgrades = Upgrades(llm, spool, per_minute=per_minute, queue_size=queue_size)
    await nursery.start(upgrades.run)
    return upgrades


async def test_the_spool_is_content_addressed_capped_and_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=250)
    await spool.open()
    photos = [bytes([i]) * 100 for i in range(3)]
    for p in photos:
        assert await spool.put(sha(p), p)
    # 300 bytes > 250: the oldest went.
    assert await spool.get(sha(photos[0])) is None
    assert await spool.get(sha(photos[2])) == photos[2]
    assert spool.statistics().evicted == 1
    assert not await spool.put(sha(b"x" * 300), b"x" * 300)  # over the cap
    # Damaged bytes are never returned.
    (tmp_path / "spool" / sha(photos[1])[:2] / sha(photos[1])).write_bytes(b"other")
    assert await spool.get(sha(photos[1])) is None
    assert await spool.delete(sha(photos[2]))
    assert await spool.has([sha(photos[2])]) == set()
    mode = (tmp_path / "spool").stat().st_mode & 0o777
    assert mode == 0o700
    # A restart finds what is there.
    again = Spool(tmp_path / "spool", max_bytes=250)
    assert await again.put(sha(photos[0]), photos[0])
    reopened = Spool(tmp_path / "spool", max_bytes=250)
    await reopened.open()
    assert reopened.statistics().files == 1


async def test_a_sync_of_many_local_hits_stays_within_the_budget(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """100 hits on local answers with spooled bytes, a budget of 10 a minute: 10 are
    sent now, 90 dropped for the budget; a minute later the next hits go again."""
    llm = FakeLlm()
    spool = Spool(tmp_path / "spool", max_bytes=MB)
    photos = [f"photo {i}".encode() for i in range(100)]
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, llm, spool, per_minute=10)
        for p in photos:
            await spool.put(sha(p), p)
        taken = [upgrades.offer(sha(p)) for p in photos]
        await until(lambda: len(llm.sent) == 10)
        stats = upgrades.statistics()
        assert taken.count(True) == 10
        assert (stats.queued, stats.dropped_budget, stats.sent) == (10, 90, 10)
        assert llm.sent == [(sha(p), p) for p in photos[:10]]
        mock_clock.jump(60)
        assert sum(upgrades.offer(sha(p)) for p in photos[10:]) == 10
        upgrades.close()


async def test_no_bytes_is_counted_and_costs_no_budget(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    llm = FakeLlm()
    spool = Spool(tmp_path / "spool", max_bytes=MB)
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, llm, spool, per_minute=1)
        assert upgrades.offer(sha(b"never spooled"))
        await until(lambda: upgrades.statistics().no_bytes == 1)
        # The token came back: a photo with bytes still goes this minute.
        await spool.put(sha(b"kept"), b"kept")
        assert upgrades.offer(sha(b"kept"))
        await until(lambda: llm.sent)
        assert llm.sent == [(sha(b"kept"), b"kept")]
        # Its answer replaces the local one: the bytes go.
        assert not await upgrades.upgraded(sha(b"kept"))
        assert await spool.get(sha(b"kept")) is None
        assert upgrades.statistics().upgraded == 1
        upgrades.close()


async def test_nothing_is_offered_while_no_provider_is_healthy(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    llm = FakeLlm(up=False)
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, llm, Spool(tmp_path / "s", max_bytes=MB))
        assert not upgrades.offer(sha(b"a"))
        assert upgrades.statistics().queued == 0
        upgrades.close()


async def test_an_operators_reclassification_is_paced_not_dropped(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    llm = FakeLlm()
    spool = Spool(tmp_path / "spool", max_bytes=MB)
    photos = [f"p{i}".encode() for i in range(4)]
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, llm, spool, per_minute=2)
        for p in photos[:3]:
            await spool.put(sha(p), p)
        report = await upgrades.reclassify([sha(p) for p in photos])
        assert report == ReclassifyReport(matched=4, queued=3, no_bytes=1, dropped=0)
        await until(lambda: len(llm.sent) == 2)  # the budget: 2 a minute
        await trio.testing.wait_all_tasks_blocked()
        assert len(llm.sent) == 2
        mock_clock.jump(30)  # one more token
        await until(lambda: len(llm.sent) == 3)
        # Its answer replaces any stored one.
        assert await upgrades.upgraded(sha(photos[0]))
        upgrades.close()


def _photo(n: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (n * 60 % 256, 30, 90)).save(out, "JPEG")
    return out.getvalue()


async def test_a_check_cache_hit_on_a_local_answer_is_upgraded(tmp_path: Path) -> None:
    """Over HTTP: the LLM refuses the first upload (400), the local model answers and
    its bytes are spooled; the album's next check-cache hit on it queues the LLM's
    re-classification, which replaces the local answer; the bytes then go."""
    async with run_fake_llm(fail_next=1, error_status=400) as fake:
        config = load_config(
            env=fake_env(fake.openai_base_url),
            data={"dir": str(tmp_path)},
            store={"writer_flush_ms": 1},
        )
        app = create_app(config, model_factory=lambda _c: FakeModel())
        async with app.test_app():
            client = app.test_client()
            data = _photo(3)
            resp = await client.post(
                V1, files={"image": FileStorage(io.BytesIO(data), filename="p.jpg")}
            )
            first = await resp.get_json()
            assert first["data"]["source"] == "local"
            spool = app.runtime.upgrades.spool
            with trio.fail_after(10):
                while await spool.get(sha(data)) is None:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            body = {"image_hash": sha(data)}
            hit = await (await client.post(f"{V1}/check-cache", json=body)).get_json()
            assert hit["data"]["model"] != "fake-vl"  # the local answer
            with trio.fail_after(10):
                while app.runtime.upgrades.statistics().upgraded < 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            again = await (await client.post(f"{V1}/check-cache", json=body)).get_json()
            await app.runtime.writer.wait_idle()
            stored = await app.store.get(sha(data))
            text = (await (await client.get("/metrics")).get_data()).decode()
            assert await spool.get(sha(data)) is None
    assert again["data"]["model"] == "fake-vl"
    assert stored is not None
    assert stored.classification.model == "fake-vl"
    assert metric(text, "xintu_upgrades_total", outcome="upgraded") == 1
    assert metric(text, "xintu_upgrades_total", outcome="sent") == 1


@pytest.mark.parametrize("key", ["spool_mb", "upgrades_per_minute"])
def test_the_settings_are_checked(key: str) -> None:
    from xintu.errors import ConfigError

    with pytest.raises(ConfigError, match=f"store.{key}"):
        load_config(env={f"XINTU_STORE_{key.upper()}": "-1"})


async def test_photos_held_in_memory_are_bounded(tmp_path: Path) -> None:
    """Uploads of known photos bring their bytes; past the bound the queue keeps only
    the hash and the photo goes to the spool, whence the worker reads it."""
    llm = FakeLlm()
    spool = Spool(tmp_path / "spool", max_bytes=MB)
    async with trio.open_nursery() as nursery:
        upgrades = Upgrades(llm, spool, per_minute=60, queue_size=10, max_held_bytes=10)
        await nursery.start(upgrades.run)
        small, big = b"12345", b"x" * 100
        assert upgrades.offer(sha(small), small)
        assert upgrades.offer(sha(big), big)
        await until(lambda: len(llm.sent) == 2)
        assert llm.sent == [(sha(small), small), (sha(big), big)]
        assert await spool.get(sha(big)) == big  # it went through the spool
        assert await spool.get(sha(small)) is None  # held in memory
        assert upgrades.statistics().no_bytes == 0
        upgrades.close()


# --- review findings: purges stick, nothing stalls when rechecks cannot run ----------


class _GatedSpool(Spool):
    """A spool whose writes wait for :attr:`gate` (a purge comes mid-put)."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        super().__init__(directory, max_bytes=max_bytes)
        self.gate = trio.Event()
        self.putting = trio.Event()

    async def put(self, image_hash: str, data: bytes) -> bool:
        self.putting.set()
        await self.gate.wait()
        return await super().put(image_hash, data)


async def test_a_purge_mid_spool_write_leaves_no_bytes(tmp_path: Path) -> None:
    """The spooler was writing the photo when its entry was purged: the bytes do
    not stay in the spool."""
    spool = _GatedSpool(tmp_path / "spool", max_bytes=MB)
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, FakeLlm(), spool)
        data = b"a photo being spooled"
        upgrades.local_answered(sha(data), data)
        await spool.putting.wait()
        await upgrades.purged(sha(data))
        spool.gate.set()
        await until(lambda: not upgrades._spooling)
        assert await spool.get(sha(data)) is None
        assert spool.statistics().files == 0
        assert upgrades.recently_purged(sha(data))
        upgrades.close()


async def test_a_purge_stops_an_upgrade_already_taken_by_the_worker(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """The worker had taken the photo and was waiting for room in the LLM pool when
    the entry was purged: it is not sent; a hit within PURGED_TTL_S is refused, one
    after it is taken again."""
    from xintu.actors._upgrades import PURGED_TTL_S

    llm = FakeLlm(full=True)
    spool = Spool(tmp_path / "spool", max_bytes=MB)
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, llm, spool)
        data = b"a photo to upgrade"
        await spool.put(sha(data), data)
        assert upgrades.offer(sha(data))
        await until(lambda: upgrades.statistics().queue_depth == 0)  # taken
        await trio.testing.wait_all_tasks_blocked()
        await upgrades.purged(sha(data))
        llm.full = False
        mock_clock.jump(1)  # the worker looks again
        await trio.testing.wait_all_tasks_blocked()
        assert llm.sent == []
        assert not upgrades.offer(sha(data))
        mock_clock.jump(PURGED_TTL_S + 1)
        assert not upgrades.recently_purged(sha(data))
        assert upgrades.offer(sha(data))
        upgrades.close()


async def test_nothing_is_spooled_nor_queued_when_the_llm_takes_no_rechecks(
    tmp_path: Path,
) -> None:
    """llm.recheck_queue = 0: the upgrades are off; an operator's re-classification
    is reported dropped, not queued for ever; nothing is spooled."""
    spool = Spool(tmp_path / "spool", max_bytes=MB)
    data = b"kept before"
    assert await spool.put(sha(data), data)
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, FakeLlm(rechecks=False), spool)
        assert not upgrades.enabled
        other = b"answered locally"
        upgrades.local_answered(sha(other), other)
        report = await upgrades.reclassify([sha(data)])
        assert report == ReclassifyReport(matched=1, queued=0, no_bytes=0, dropped=1)
        assert not upgrades.offer(sha(data))
        await trio.testing.wait_all_tasks_blocked()
        assert not upgrades._spooling
        assert await spool.get(sha(other)) is None
        upgrades.close()


async def test_a_reclassification_is_dropped_when_the_budget_is_zero(tmp_path: Path) -> None:
    """store.upgrades_per_minute = 0: an operator's hashes are reported dropped,
    not queued for ever."""
    spool = Spool(tmp_path / "spool", max_bytes=MB)
    data = b"a local answer's photo"
    assert await spool.put(sha(data), data)
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, FakeLlm(), spool, per_minute=0)
        report = await upgrades.reclassify([sha(data)])
        assert report == ReclassifyReport(matched=1, queued=0, no_bytes=0, dropped=1)
        assert upgrades.statistics().queue_depth == 0
        upgrades.close()


@pytest.mark.parametrize("setting", ["no_llm", "no_rechecks", "no_budget", "no_spool"])
async def test_the_spool_directory_is_made_only_when_upgrades_can_run(
    tmp_path: Path, setting: str
) -> None:
    """A service without an LLM (or without upgrades) starts without a writable
    <data dir>/spool."""
    llm = FakeLlm(providers=setting != "no_llm", rechecks=setting != "no_rechecks")
    spool = Spool(tmp_path / "spool", max_bytes=0 if setting == "no_spool" else MB)
    per_minute = 0 if setting == "no_budget" else 60
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, llm, spool, per_minute=per_minute)
        upgrades.close()
    assert not (tmp_path / "spool").exists()
    # And with all of them, it is made.
    async with trio.open_nursery() as nursery:
        upgrades = await started(nursery, FakeLlm(), Spool(tmp_path / "on", max_bytes=MB))
        upgrades.close()
    assert (tmp_path / "on").is_dir()
