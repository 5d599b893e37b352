"""Coalescing across processes: in-flight claims in the shared store.

Each "process" here is a Dispatcher with its own Writer, Cache and LRU and its own
store object, all on ONE database. Three layers:

- the protocol's timing (backoff, giving up, store failures, shutdown) on Trio's
  ``autojump_clock``, over an in-memory store with claims (no threads, so the
  clock can jump);
- the protocol on the real backends (a SQLite file, MariaDB): SQLite and MySQL I/O
  run in threads and sockets, so these use short real waits, each test bounded
  by ``trio.fail_after``;
- two real service processes against MariaDB and one fake LLM upstream.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import outcome
import pytest
import trio
import trio.testing
from PIL import Image

from xintu import Category, Classification, Source
from xintu.actors import Answer, Cache, Chain, ClassifyRequest, Dispatcher, Envelope, Writer
from xintu.actors._envelope import open_reply, wait_reply
from xintu.errors import ClassifierError, Overloaded, StoreUnavailable
from xintu.store import CachedEntry, Lru, ResultWrite, Store, WriteBatch
from xintu.store._mysql import parse_mysql_url

from .backends import mysql_admin, mysql_url_of, open_test_store
from .fakes import FakePool, MemoryStore
from .test_store import claims_in

T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
TEST_TIMEOUT_S = 20.0


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def answer_for(data: bytes) -> Classification:
    return Classification(
        category=list(Category)[data[0] % 8], confidence=0.9, source=Source.LLM, model="counted"
    )


def trio_wall_clock() -> datetime:
    """Claim times on Trio's clock, so that autojump moves claim expiry too."""
    return T0 + timedelta(seconds=trio.current_time())


class Classifier(FakePool):
    """Trio-native pool: counts calls; waits on ``gate`` if given; then takes
    ``latency_s`` and answers, or raises when ``fail`` is set."""

    def __init__(
        self, gate: trio.Event | None = None, *, latency_s: float = 0.01, fail: bool = False
    ) -> None:
        super().__init__()
        self.calls = 0
        self.gate = gate
        self.latency_s = latency_s
        self.fail = fail

    async def answer(self, data: bytes, image_hash: str, deadline: float) -> Classification:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(self.latency_s)
        if self.fail:
            raise ClassifierError("the upstream is down")
        return answer_for(data)


@dataclass
class Replica:
    dispatcher: Dispatcher
    writer: Writer
    cache: Cache

    async def ask(self, data: bytes, deadline: float) -> Answer:
        send, receive = open_reply(Answer)
        self.dispatcher.submit(Envelope(ClassifyRequest(data, h(data), "r"), deadline, send))
        return await wait_reply(receive, deadline)


@asynccontextmanager
async def replica(
    store: Store,
    classify: Classifier,
    owner: str,
    *,
    claim_ttl_s: float = 30.0,
    autojump: bool = False,
) -> AsyncIterator[Replica]:
    """One process's actors (the dispatcher and its writer) on *store*."""
    writer = Writer(store, inbox_size=1000, max_batch=50, flush_ms=5)
    cache = Cache(store, Lru(1000), writer)
    dispatcher = Dispatcher(
        cache=cache,
        writer=writer,
        chain=Chain(classify),
        inbox_size=64,
        max_in_flight=64,
        flight_grace_s=10.0,
        claim_ttl_s=claim_ttl_s,
        owner=owner,
        wall_clock=trio_wall_clock if autojump else None,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as inner:
            await inner.start(dispatcher.run)
            yield Replica(dispatcher, writer, cache)
            dispatcher.close()
        writer.close()


async def flushed(*replicas: Replica) -> None:
    """Every write the replicas' flights made has been applied.

    ``Writer.wait_idle`` alone can return while a write handed straight to the
    waiting writer task has not been taken yet: let that task run first.
    """
    await trio.testing.wait_all_tasks_blocked()
    for r in replicas:
        await r.writer.wait_idle()


async def until(condition: Any, *, every_s: float = 0.005) -> None:
    """Poll *condition* (bounded by the test's ``fail_after``): what it watches are
    counters of actors working on a real store, with no event to wait on."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(every_s)


# --- the protocol's timing, on autojump ---------------------------------------------


class ClaimStore(MemoryStore):
    """:class:`MemoryStore` with in-flight claims, as the real backends keep them
    (tests/test_store.py checks those); records the time of every read."""

    def __init__(self) -> None:
        super().__init__()
        self.claims: dict[str, tuple[str, datetime]] = {}
        self.reads: list[float] = []
        self.claims_down = False
        self.release_calls = 0
        # Called inside claim(): what another process does just before our claim lands.
        self.before_claim: Any = None

    async def get(self, image_hash: str, *, scope: str | None = None) -> CachedEntry | None:
        self.reads.append(trio.current_time())
        return await super().get(image_hash, scope=scope)

    async def claim(self, image_hash: str, owner: str, *, now: datetime, ttl_s: float) -> bool:
        await trio.lowlevel.checkpoint()
        if self.claims_down:
            raise StoreUnavailable("memory store: claim failed")
        if self.before_claim is not None:
            self.before_claim(image_hash)
        held = self.claims.get(image_hash)
        if held is not None and held[0] != owner and held[1] > now:
            return False
        self.claims[image_hash] = (owner, now + timedelta(seconds=ttl_s))
        return True

    async def release_claim(self, image_hash: str, owner: str) -> None:
        await trio.lowlevel.checkpoint()
        self.release_calls += 1
        if self.claims_down:
            raise StoreUnavailable("memory store: release failed")
        held = self.claims.get(image_hash)
        if held is not None and held[0] == owner:
            del self.claims[image_hash]

    def _apply(self, batch: WriteBatch) -> bool:
        applied = super()._apply(batch)
        if applied:
            for r in batch.results:
                self.claims.pop(r.image_hash, None)
        return applied


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


async def test_the_waiter_polls_with_backoff_and_answers_from_the_owners_result(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = ClaimStore()
    owner_classify, waiter_classify = Classifier(latency_s=1.0), Classifier()
    data = b"\x01 new photo"
    with trio.fail_after(60):
        async with (
            replica(store, owner_classify, "a", autojump=True) as a,
            replica(store, waiter_classify, "b", autojump=True) as b,
        ):
            t0 = trio.current_time()
            deadline = t0 + 10
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.ask, data, deadline)
                await trio.testing.wait_all_tasks_blocked()
                assert store.claims == {h(data): ("a/1", trio_wall_clock() + timedelta(seconds=30))}
                store.reads.clear()
                answer = await b.ask(data, deadline)
                answered_at = trio.current_time() - t0
    assert (owner_classify.calls, waiter_classify.calls) == (1, 0)
    assert answer == Answer(answer_for(data), h(data), from_cache=True)
    # The owner answered at 1.0 s and its writer flushed 5 ms later; the waiter read
    # the store at 0 (miss), then polled after 20 ms, doubling to 200 ms.
    assert gaps(store.reads) == [0.02, 0.04, 0.08, 0.16, 0.2, 0.2, 0.2, 0.2]
    assert answered_at == pytest.approx(1.1)
    stats = b.dispatcher.statistics()
    assert (stats.claims_won, stats.claims_lost, stats.waited_hits, stats.wait_timeouts) == (
        0,
        1,
        1,
        0,
    )
    assert (stats.cache_hits, stats.classified) == (1, 0)
    assert a.dispatcher.statistics().claims_won == 1
    assert store.claims == {}
    assert store.rows[h(data)].hit_count == 1  # the waiter's answer counts as a hit


async def test_a_miss_no_classifier_can_take_is_refused_before_the_claim(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The chain's refusal answers a miss at once (no claim, no classifier); a photo
    the store knows is still answered, whatever the classifiers would take."""
    store = ClaimStore()
    classify = Classifier()
    classify.takes, classify.wait_s = False, 3.0  # full: nothing fits a deadline
    known = b"\x05 a photo another replica classified"
    await store.apply(WriteBatch("seed", results=(ResultWrite(h(known), answer_for(known), 1),)))
    asked = classify.asked

    with trio.fail_after(60):
        async with replica(store, classify, "b", autojump=True) as b:
            deadline = trio.current_time() + 10
            with pytest.raises(Overloaded) as info:
                await b.ask(b"\x06 a new photo", deadline)
            hit = await b.ask(known, deadline)
    assert str(info.value) == "no classifier can answer before the deadline"
    assert info.value.retry_after_s == 3.0
    assert asked == [deadline]  # asked once, for the miss only
    assert classify.calls == 0
    assert store.claims == {}
    assert store.release_calls == 0
    assert hit.from_cache
    stats = b.dispatcher.statistics()
    assert (stats.claims_won, stats.claims_lost, stats.failed, stats.cache_hits) == (0, 0, 1, 1)


async def test_the_waiter_gives_up_at_half_its_deadline(autojump_clock: trio.abc.Clock) -> None:
    store = ClaimStore()
    data = b"\x02 photo whose owner hangs"
    store.claims[h(data)] = ("hung/1", T0 + timedelta(days=1))
    classify = Classifier()
    with trio.fail_after(60):
        async with replica(store, classify, "b", autojump=True) as b:
            t0 = trio.current_time()
            answer = await b.ask(data, t0 + 10)
            answered_at = trio.current_time() - t0
    assert answer == Answer(answer_for(data), h(data), from_cache=False)
    assert classify.calls == 1
    assert answered_at == pytest.approx(5.01)  # waited 10 / 2 s, then classified (10 ms)
    polls = gaps(store.reads)
    assert polls[:5] == [0.02, 0.04, 0.08, 0.16, 0.2]
    assert max(polls) == 0.2
    assert store.reads[-1] - t0 == pytest.approx(5.0)
    stats = b.dispatcher.statistics()
    assert (stats.claims_lost, stats.wait_timeouts, stats.waited_hits, stats.classified) == (
        1,
        1,
        0,
        1,
    )


async def test_the_waiter_takes_over_an_expired_claim(autojump_clock: trio.abc.Clock) -> None:
    store = ClaimStore()
    data = b"\x03 photo whose owner died"
    store.claims[h(data)] = ("dead/1", trio_wall_clock() + timedelta(seconds=2))
    classify = Classifier()
    with trio.fail_after(60):
        async with replica(store, classify, "b", autojump=True) as b:
            t0 = trio.current_time()
            answer = await b.ask(data, t0 + 10)
            answered_at = trio.current_time() - t0
    assert answer.from_cache is False
    assert classify.calls == 1
    # Polls at 0.02, 0.06, 0.14, 0.30, then every 0.2 s: the first one after 2 s wins.
    assert answered_at == pytest.approx(2.11)
    stats = b.dispatcher.statistics()
    assert (stats.claims_lost, stats.takeovers, stats.claims_won, stats.wait_timeouts) == (
        1,
        1,
        1,
        0,
    )
    assert store.claims == {}  # the answer was written, the claim went with it


@pytest.mark.parametrize("when", ["first claim", "while waiting"])
async def test_a_result_stored_just_before_the_claim_is_used(
    autojump_clock: trio.abc.Clock, when: str
) -> None:
    """Between a flight's read of the store and its claim, the owner may store its
    answer (deleting its claim): after winning the claim the flight reads again."""
    store = ClaimStore()
    data = b"\x04 photo finished elsewhere"
    elsewhere = answer_for(data)
    if when == "while waiting":
        store.claims[h(data)] = ("other/1", T0 + timedelta(days=1))
    claims = 0

    def finish_elsewhere(image_hash: str) -> None:
        nonlocal claims
        claims += 1
        if claims == (1 if when == "first claim" else 3):
            store.rows[image_hash] = CachedEntry(image_hash, elsewhere, 0, T0, None)
            store.claims.pop(image_hash, None)

    store.before_claim = finish_elsewhere
    classify = Classifier()
    with trio.fail_after(60):
        async with replica(store, classify, "b", autojump=True) as b:
            answer = await b.ask(data, trio.current_time() + 10)
            await flushed(b)
    assert answer == Answer(elsewhere, h(data), from_cache=True)
    assert classify.calls == 0
    assert store.claims == {}  # released
    assert store.release_calls == 1
    assert store.rows[h(data)].hit_count == 1
    stats = b.dispatcher.statistics()
    assert (stats.cache_hits, stats.claims_won, stats.takeovers) == (1, 0, 0)
    assert stats.waited_hits == (0 if when == "first claim" else 1)


async def test_a_store_failure_while_claiming_means_classifying(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = ClaimStore()
    store.claims_down = True
    classify = Classifier()
    data = b"\x05 photo"
    with trio.fail_after(60):
        async with replica(store, classify, "b", autojump=True) as b:
            answer = await b.ask(data, trio.current_time() + 10)
    assert answer.from_cache is False
    assert classify.calls == 1
    stats = b.dispatcher.statistics()
    assert (stats.claim_errors, stats.claims_won, stats.claims_lost) == (1, 0, 0)
    assert store.release_calls == 0  # it held no claim


async def test_a_failed_classification_releases_the_claim_best_effort(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = ClaimStore()
    classify = Classifier(fail=True)
    with trio.fail_after(60):
        async with replica(store, classify, "b", autojump=True) as b:
            with pytest.raises(ClassifierError, match=r"^the upstream is down$"):
                await b.ask(b"\x06 one", trio.current_time() + 10)
            await trio.testing.wait_all_tasks_blocked()
            assert store.claims == {}
            # A release that fails is logged; the flight and the dispatcher carry on.
            store.claims_down = False
            classify.latency_s = 0.5

            async def break_claims_soon() -> None:
                await trio.sleep(0.1)
                store.claims_down = True

            async with trio.open_nursery() as nursery:
                nursery.start_soon(break_claims_soon)
                with pytest.raises(ClassifierError, match=r"^the upstream is down$"):
                    await b.ask(b"\x07 two", trio.current_time() + 10)
            await trio.testing.wait_all_tasks_blocked()
            assert list(store.claims) == [h(b"\x07 two")]  # left to expire
            store.claims_down = False
            classify.fail = False
            answer = await b.ask(b"\x08 three", trio.current_time() + 10)
            assert answer.from_cache is False
    assert store.release_calls == 2
    assert b.dispatcher.statistics().failed == 2


async def test_a_cancelled_flight_releases_its_claim(autojump_clock: trio.abc.Clock) -> None:
    store = ClaimStore()
    classify = Classifier(trio.Event())  # never opened: the flight hangs
    data = b"\x09 photo"
    with trio.fail_after(60):
        with trio.move_on_after(1):
            async with replica(store, classify, "b", autojump=True) as b:
                await b.ask(data, trio.current_time() + 10)
        assert classify.calls == 1
    assert store.claims == {}
    assert store.release_calls == 1


async def test_claim_owners_are_per_process_and_per_flight() -> None:
    store = ClaimStore()
    writer = Writer(store, inbox_size=1, max_batch=1, flush_ms=1)
    cache = Cache(store, Lru(1), writer)

    def make(owner: str | None = None) -> Dispatcher:
        return Dispatcher(
            cache=cache,
            writer=writer,
            chain=Chain(Classifier()),
            inbox_size=1,
            max_in_flight=1,
            flight_grace_s=1,
            owner=owner,
        )

    one, two = make(), make()
    assert one.owner != two.owner
    assert one.owner.split(":")[1] == str(os.getpid())
    # Room is kept for "/<flight number>" within the column's 64 characters.
    assert len(make("x" * 100).owner) == 44
    with pytest.raises(ValueError, match=r"^claim_ttl_s must be > 0, got 0$"):
        Dispatcher(
            cache=cache,
            writer=writer,
            chain=Chain(Classifier()),
            inbox_size=1,
            max_in_flight=1,
            flight_grace_s=1,
            claim_ttl_s=0,
        )


# --- the protocol on the real backends -------------------------------------------------


@asynccontextmanager
async def two_processes(
    store_url: str, tmp_path: Path, a_classify: Classifier, b_classify: Classifier
) -> AsyncIterator[tuple[Replica, Replica, Store]]:
    async with (
        open_test_store(store_url, tmp_path / "a") as store_a,
        open_test_store(store_url, tmp_path / "b") as store_b,
        replica(store_a, a_classify, "a") as a,
        replica(store_b, b_classify, "b") as b,
    ):
        yield a, b, store_a


async def test_two_processes_classify_a_new_photo_once(store_url: str, tmp_path: Path) -> None:
    gate = trio.Event()
    classify_a, classify_b = Classifier(gate), Classifier(gate)
    data = b"\x0a a photo both processes see at once"
    answers: dict[tuple[str, int], Answer] = {}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with two_processes(store_url, tmp_path, classify_a, classify_b) as (a, b, store):
            deadline = trio.current_time() + 10

            async def ask(name: str, r: Replica, i: int) -> None:
                answers[name, i] = await r.ask(data, deadline)

            def lost() -> int:
                return a.dispatcher.statistics().claims_lost + b.dispatcher.statistics().claims_lost

            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(ask, "a", a, i)
                    nursery.start_soon(ask, "b", b, i)
                # One process classifies (held at the gate), the other waits for it.
                await until(lambda: classify_a.calls + classify_b.calls == 1 and lost() == 1)
                gate.set()
            await flushed(a, b)
            entry = await store.get(h(data))
            assert await claims_in(store_url) == {}
    assert classify_a.calls + classify_b.calls == 1
    owner, waiter = ("a", "b") if classify_a.calls else ("b", "a")
    assert len(answers) == 6
    for (name, _), answer in answers.items():
        assert answer.classification == answer_for(data)
        assert answer.from_cache is (name == waiter)
    stats = {"a": a.dispatcher.statistics(), "b": b.dispatcher.statistics()}
    assert (stats[owner].claims_won, stats[owner].claims_lost, stats[owner].classified) == (1, 0, 1)
    assert (stats[waiter].claims_lost, stats[waiter].waited_hits) == (1, 1)
    assert (stats[waiter].claims_won, stats[waiter].wait_timeouts) == (0, 0)
    assert stats["a"].coalesced == stats["b"].coalesced == 2
    assert entry is not None
    assert entry.hit_count == 3  # the waiter's three answers were hits


async def test_a_failed_owner_hands_over_at_once(store_url: str, tmp_path: Path) -> None:
    gate = trio.Event()
    classify_a, classify_b = Classifier(gate, fail=True), Classifier()
    data = b"\x0b a photo the first process fails on"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with two_processes(store_url, tmp_path, classify_a, classify_b) as (a, b, _):
            deadline = trio.current_time() + 10
            results: dict[str, outcome.Outcome[Answer]] = {}

            async def ask(name: str, r: Replica) -> None:
                results[name] = await outcome.acapture(r.ask, data, deadline)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "a", a)
                await until(lambda: classify_a.calls == 1)
                nursery.start_soon(ask, "b", b)
                await until(lambda: b.dispatcher.statistics().claims_lost == 1)
                gate.set()
                failed_at = trio.current_time()
            handed_over_s = trio.current_time() - failed_at
            await flushed(b)
            assert await claims_in(store_url) == {}
    with pytest.raises(ClassifierError, match=r"^the upstream is down$"):
        results["a"].unwrap()
    answer = results["b"].unwrap()
    assert answer == Answer(answer_for(data), h(data), from_cache=False)
    assert (classify_a.calls, classify_b.calls) == (1, 1)
    # Released, so taken over at the next poll (<= 200 ms), not after the 30 s TTL
    # or at half the 10 s deadline.
    assert handed_over_s < 4.0
    stats = b.dispatcher.statistics()
    assert (stats.takeovers, stats.claims_won, stats.wait_timeouts) == (1, 1, 0)


async def test_a_dead_owners_claim_is_taken_over_after_its_ttl(
    store_url: str, tmp_path: Path
) -> None:
    classify = Classifier()
    data = b"\x0c a photo whose first process died"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            open_test_store(store_url, tmp_path / "b") as store,
            replica(store, classify, "b") as b,
        ):
            # The owner claimed it, then died: it never writes and never releases.
            assert await store.claim(h(data), "dead/1", now=datetime.now(UTC), ttl_s=0.3)
            t0 = trio.current_time()
            answer = await b.ask(data, t0 + 10)
            took_s = trio.current_time() - t0
            await flushed(b)
            assert await claims_in(store_url) == {}
    assert answer == Answer(answer_for(data), h(data), from_cache=False)
    assert classify.calls == 1
    assert 0.25 < took_s < 4.0  # after the 0.3 s TTL, well before half the 10 s deadline
    stats = b.dispatcher.statistics()
    assert (stats.claims_lost, stats.takeovers, stats.wait_timeouts) == (1, 1, 0)


# --- two service processes, one MariaDB, one fake LLM ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}: {err[-2000:]!r}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not up within {timeout_s}s")


@contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _chelsea_jpeg() -> bytes:
    skimage_data = pytest.importorskip("skimage.data")
    buf = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def replica_database(mysql_url: str) -> Iterator[str]:
    """A fresh database next to the session's, for the service processes."""
    settings = parse_mysql_url(mysql_url)
    fresh = settings.with_database(f"{settings.database}_r{secrets.token_hex(3)}")

    async def run(sql: str) -> None:
        with trio.fail_after(10):
            async with mysql_admin(settings) as admin:
                await admin.execute(sql)

    trio.run(run, f"CREATE DATABASE `{fresh.database}` CHARACTER SET utf8mb4")
    try:
        yield mysql_url_of(fresh)
    finally:
        trio.run(run, f"DROP DATABASE IF EXISTS `{fresh.database}`")


@pytest.mark.mysql
def test_two_service_processes_make_one_llm_call(replica_database: str, tmp_path: Path) -> None:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("XINTU_")}
    fake_port = _free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    ports = [_free_port(), _free_port()]
    with _process(
        ["-m", "xintu.testing.fakellm", "--port", str(fake_port), "--latency-median-ms", "300"],
        base_env,
    ) as fake:
        _wait_until_up(f"{fake_url}/_fake/stats", fake)
        env = {
            **base_env,
            "XINTU_STORE_URL": replica_database,
            "XINTU_LLM_PROVIDERS": "fake",
            "XINTU_LLM_FAKE_BASE_URL": f"{fake_url}/v1",
            "XINTU_LLM_FAKE_MODEL": "m",
            "XINTU_SERVER_DRAIN_DELAY_S": "0",
        }
        with (
            _process(
                ["-m", "xintu", "serve", "--bind", f"127.0.0.1:{ports[0]}"],
                {**env, "XINTU_DATA_DIR": str(tmp_path / "one")},
            ) as one,
            _process(
                ["-m", "xintu", "serve", "--bind", f"127.0.0.1:{ports[1]}"],
                {**env, "XINTU_DATA_DIR": str(tmp_path / "two")},
            ) as two,
        ):
            for port, proc in zip(ports, (one, two), strict=True):
                _wait_until_up(f"http://127.0.0.1:{port}/readyz", proc)
            photo = _chelsea_jpeg()
            start = threading.Barrier(10)

            def classify(port: int) -> dict[str, Any]:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
                    start.wait(timeout=10)
                    resp = client.post("/api/v1/classify", files={"image": ("cat.jpg", photo)})
                assert resp.status_code == 200, resp.text
                body: dict[str, Any] = resp.json()
                return body

            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                futures = [(port, pool.submit(classify, port)) for port in ports * 5]
                bodies = [(port, f.result(timeout=30)) for port, f in futures]
            calls = httpx.get(f"{fake_url}/_fake/stats", timeout=5).json()["calls"]
            for proc in (one, two):
                proc.send_signal(signal.SIGTERM)
            for proc in (one, two):
                _, err = proc.communicate(timeout=15)
                assert proc.returncode == 0, err[-2000:]
                assert b"Traceback" not in err, err[-2000:]
    assert calls == 1
    data = [b["data"] for _, b in bodies]
    assert {d["image_hash"] for d in data} == {hashlib.sha256(photo).hexdigest()}
    assert {(d["category"], d["model"]) for d in data} == {(data[0]["category"], "m")}
    # One replica classified (its requests joined that flight); the other's were
    # all answered from the cache, after waiting on the first one's claim.
    classified_on = {port for port, b in bodies if not b["from_cache"]}
    assert len(classified_on) == 1
    for _, b in bodies:
        assert b["data"]["source"] == ("cache" if b["from_cache"] else "llm")
