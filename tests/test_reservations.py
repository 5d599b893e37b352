"""Admission tickets (issue 14): uploads that pass the header check reserve their
place, so a burst of uploads is refused at its headers once the reservations fill
the capacity, not after the bodies arrived; and a ticket never outlives its request."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from werkzeug.datastructures import FileStorage

from xintu import Category, Classification, Source, load_config
from xintu.actors import (
    Answer,
    Cache,
    Chain,
    ClassifyRequest,
    Dispatcher,
    Envelope,
    Runtime,
    Writer,
)
from xintu.actors._admission import Reservations, held
from xintu.actors._envelope import open_reply
from xintu.errors import Overloaded
from xintu.http import create_app
from xintu.http._app import XintuApp
from xintu.llm import LlmPool
from xintu.store import CachedEntry, Lru

from .fakes import BlockingModel, FakePool, MemoryStore
from .test_llm_pool import config as llm_pool_config
from .test_service import multipart

# --- the tickets ------------------------------------------------------------------------


async def test_a_ticket_counts_until_released_once(autojump_clock: object) -> None:
    reservations = Reservations(ttl_s=3.0)
    first, second = reservations.take(), reservations.take()
    assert len(reservations) == 2
    assert held() is second  # the current request's
    first.release()
    first.release()  # a no-op
    assert len(reservations) == 1
    assert (first.released, second.released) == (True, False)
    reservations.release_held()
    assert len(reservations) == 0
    assert (reservations.taken, reservations.expired) == (2, 0)


async def test_a_ticket_is_released_when_its_block_fails_or_is_cancelled(
    autojump_clock: object,
) -> None:
    reservations = Reservations(ttl_s=3.0)

    def fails() -> None:
        with reservations.take():
            assert len(reservations) == 1
            raise ValueError("a bad field")

    with pytest.raises(ValueError, match=r"^a bad field$"):
        fails()
    assert len(reservations) == 0

    async def disconnects() -> None:
        with reservations.take():
            await trio.sleep_forever()  # reading a body that never comes

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(disconnects)
            await trio.testing.wait_all_tasks_blocked()
            assert len(reservations) == 1
            nursery.cancel_scope.cancel()  # the client went away
    assert len(reservations) == 0
    assert reservations.expired == 0


async def test_a_missed_release_stops_counting_at_the_ttl(autojump_clock: object) -> None:
    reservations = Reservations(ttl_s=3.0)
    reservations.take()
    await trio.sleep(2.9)
    later = reservations.take()
    assert len(reservations) == 2
    await trio.sleep(0.2)
    assert len(reservations) == 1  # the first one only
    assert not later.released
    await trio.sleep(3)
    assert len(reservations) == 0
    assert reservations.expired == 2


async def test_the_tasks_a_request_starts_share_its_ticket(autojump_clock: object) -> None:
    """A batch's items run in tasks of their own and see the request's ticket; each
    item submitted releases one photo of it: a ticket for three photos counts 3,
    then 2, 1 and 0 as they are submitted, and a fourth finds it released."""
    reservations = Reservations(ttl_s=3.0)
    ticket = reservations.take(3)
    seen: list[object] = []
    counts: list[int] = []

    async def item() -> None:
        seen.append(held())
        counts.append(len(reservations))
        reservations.release_held()

    assert len(reservations) == 3
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(item)
    assert seen == [ticket] * 4
    assert counts == [3, 2, 1, 0]
    assert ticket.released
    assert ticket.photos == 0
    assert len(reservations) == 0


async def test_a_batch_ticket_stops_counting_its_unsubmitted_photos_at_its_end(
    autojump_clock: object,
) -> None:
    """A batch expected to bring five photos submits two and answers an error for
    the rest (not images): the other three stop counting when its task ends, long
    before the ttl; a ticket for zero photos is an error."""
    reservations = Reservations(ttl_s=3.0)
    left: list[int] = []

    async def batch() -> None:
        ticket = reservations.take(5)
        reservations.release_held()
        reservations.release_held()
        left.append(ticket.photos)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batch)
    assert left == [3]
    assert len(reservations) == 0
    assert reservations.ended == 1
    with pytest.raises(ValueError, match=r"^photos must be >= 1, got 0$"):
        reservations.take(0)


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"^ttl_s must be > 0, got 0$"):
        Reservations(ttl_s=0)


# --- through the runtime ----------------------------------------------------------------


@asynccontextmanager
async def service(tmp_path: Path, **server: Any) -> AsyncIterator[tuple[XintuApp, BlockingModel]]:
    """Local model only, one decode thread and an inbox of two: room for three
    photos (one being prepared, two queued)."""
    config = load_config(
        env={},
        data={"dir": str(tmp_path)},
        server=server,
        model={"decode_threads": 1, "inference_threads": 1, "inbox_size": 2},
    )
    model = BlockingModel()
    app = create_app(config, model_factory=lambda _c: model)
    try:
        async with app.test_app():
            yield app, model
    finally:
        model.release.set()


async def test_reservations_fill_the_capacity_at_the_header_check(tmp_path: Path) -> None:
    """Three uploads past the header check fill the room for three photos before
    any of them has submitted its work: the fourth is refused then. One submitting
    its work moves it from the tickets to the pool's queue (still three); a ticket
    released without work gives its place back."""
    async with service(tmp_path) as (app, model):
        runtime: Runtime = app.runtime
        deadline = trio.current_time() + 10
        tickets = [runtime.reserve(deadline) for _ in range(3)]
        with pytest.raises(Overloaded) as refused:
            runtime.reserve(deadline)
        assert str(refused.value) == "no classifier can answer before the deadline"
        assert runtime.refusal(deadline) is not None

        async with trio.open_nursery() as nursery:
            # The last ticket's request submits its work (the ticket it holds).
            request = ClassifyRequest(b"p1", "a" * 64, "r1")
            nursery.start_soon(functools.partial(runtime.classify, request, deadline=deadline))
            for _ in range(500):  # the store's lookup runs in a thread
                if runtime.local.statistics().decoding == 1:
                    break
                await trio.sleep(0.01)
            assert runtime.local.statistics().decoding == 1
            assert tickets[2].released
            assert len(runtime.reservations) == 2
            assert runtime.refusal(deadline) is not None  # 1 being prepared + 2 tickets

            tickets[0].release()  # that request ended without work (an error, a disconnect)
            assert runtime.refusal(deadline) is None
            model.release.set()
    assert runtime.chain.statistics().shed_for_deadline >= 2


async def test_a_batch_ticket_counts_the_photos_its_body_brings(tmp_path: Path) -> None:
    """Room for three photos: a batch whose Content-Length holds three of the mean
    photo's size takes a ticket for three, so the next single upload is refused at
    its headers (before, the batch counted one, and two more uploads passed)."""
    async with service(tmp_path) as (app, _):
        runtime: Runtime = app.runtime
        deadline = trio.current_time() + 10
        ticket = runtime.reserve(deadline, batch_bytes=3 * 256 * 1024)
        assert ticket.photos == 3
        with pytest.raises(Overloaded):
            runtime.reserve(deadline)
        ticket.release()
        assert runtime.refusal(deadline) is None


def test_photos_in_follows_the_uploaded_photos_sizes() -> None:
    """From the prior (256 KiB a photo) to the running mean of the photos seen,
    between 1 and *most*."""
    reservations = Reservations(ttl_s=3.0)
    assert reservations.photos_in(1024 * 1024, 20) == 4
    assert reservations.photos_in(10, 20) == 1
    assert reservations.photos_in(100 * 1024 * 1024, 20) == 20
    for _ in range(200):
        reservations.saw_photo(64 * 1024)
    assert reservations.photos_in(1024 * 1024, 20) == 16


async def test_a_burst_of_uploads_is_refused_at_the_headers(tmp_path: Path) -> None:
    """Six uploads whose headers arrive together, bodies not sent yet, against room
    for three photos: three are refused at once from their headers (503, Retry-After,
    Connection: close), before any body arrives; before the reservations all six
    passed the check and the last three were refused only after their bodies."""
    async with service(tmp_path, latency_target_s=30.0) as (app, model):
        client = app.test_client()
        connections = []
        refused = []
        answered = []
        with trio.fail_after(10):
            async with AsyncExitStack() as stack:
                for i in range(6):
                    body, headers = multipart([("image", "p.jpg", f"photo {i} ".encode() * 500)])
                    connection = await stack.enter_async_context(
                        client.request(
                            "/api/v1/classify",
                            method="POST",
                            headers=headers | {"Content-Length": str(len(body))},
                        )
                    )
                    await connection.send(body[:100])  # the headers and a little
                    await trio.testing.wait_all_tasks_blocked()
                    connections.append((connection, body))
                assert len(app.runtime.reservations) == 3
                for connection, _ in connections[3:]:
                    refused.append(await connection.as_response())
                # The first three send their bodies and are answered.
                model.release.set()
                for connection, body in connections[:3]:
                    await connection.send(body[100:])
                    await connection.send_complete()
                    answered.append(await connection.as_response())
        assert len(app.runtime.reservations) == 0
    assert [r.status_code for r in refused] == [503, 503, 503]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert all(r.headers["Connection"] == "close" for r in refused)
    assert [r.status_code for r in answered] == [200, 200, 200]
    assert not any(b"photo 3" in data for data in model.prepared)


# --- flights still looking the cache up -------------------------------------------------


class SlowStore(MemoryStore):
    """Lookups wait for ``open``: flights stay before the chain until then."""

    def __init__(self) -> None:
        super().__init__()
        self.open = trio.Event()

    async def get(self, image_hash: str, *, scope: str | None = None) -> CachedEntry | None:
        await self.open.wait()
        return await super().get(image_hash, scope=scope)


async def test_flights_looking_the_cache_up_count_as_work_ahead(autojump_clock: object) -> None:
    """Submitted work whose store lookup is slow has reached no pool yet: admission
    counts it ahead (Dispatcher.before_chain), so the chain refuses once it fills
    the local pool's room, and counts it no more once it was handed to the chain."""
    store = SlowStore()
    writer = Writer(store, inbox_size=100, max_batch=10, flush_ms=5)
    local = CountingPool()
    local.room = 2
    chain = Chain(local)
    dispatcher = Dispatcher(
        cache=Cache(store, Lru(100), writer),
        writer=writer,
        chain=chain,
        inbox_size=8,
        max_in_flight=8,
        flight_grace_s=1.0,
    )
    deadline = trio.current_time() + 10
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await nursery.start(dispatcher.run)
            for data in (b"one", b"two"):
                send, _receive = open_reply(Answer)
                request = ClassifyRequest(data, hashlib.sha256(data).hexdigest(), "r")
                dispatcher.submit(Envelope(request, deadline, send))
            await trio.testing.wait_all_tasks_blocked()
            assert dispatcher.before_chain() == 2
            assert chain.refusal(deadline, dispatcher.before_chain()) is not None
            assert chain.refusal(deadline) is None  # without the work ahead
            store.open.set()
            await trio.testing.wait_all_tasks_blocked()
            assert dispatcher.before_chain() == 0
            assert local.asked_ahead[:2] == [2, 0]  # the two refusal questions above
            dispatcher.close()
            writer.close()


class CountingPool(FakePool):
    """Takes work while fewer than ``room`` jobs would be ahead; records the
    deadline and the ``ahead`` it was asked about; answers at once."""

    def __init__(self) -> None:
        super().__init__()
        self.room = 0
        self.asked_ahead: list[int] = []

    def would_take(self, deadline: float, ahead: int = 0) -> bool:
        self.asked.append(deadline)
        self.asked_ahead.append(ahead)
        return ahead < self.room

    async def answer(self, data: bytes, image_hash: str, deadline: float) -> Classification:
        return Classification(Category.OTHER, 0.5, Source.LOCAL, "fake", "fake")


# --- where the work ahead goes: the LLM pool's room first -------------------------------


async def test_the_llm_pools_room_then_the_local_pools_queue(autojump_clock: object) -> None:
    """Two idle workers and an inbox of three: room for five jobs sent now (nothing
    measured yet: the unmeasured calls' wait, 3 rounds of hedge_after_s, is within
    the long deadline). The chain sends the work ahead where a miss goes: five to
    the LLM pool, the rest to the local pool, which is asked about that rest only."""
    pool = LlmPool(llm_pool_config(workers=2, inbox_size=3))
    deadline = trio.current_time() + 30
    assert pool.room(deadline, most=10) == 5
    assert pool.room(deadline, most=4) == 4
    assert pool.would_take(deadline, ahead=4)
    assert not pool.would_take(deadline, ahead=5)
    local = CountingPool()
    local.room = 2
    chain = Chain(local, llm=pool, latency_target_s=30.0)
    assert chain.would_take(deadline, ahead=4)  # the LLM pool takes it: local not asked
    assert local.asked_ahead == []
    assert chain.would_take(deadline, ahead=6)  # 5 to the LLM, 1 to the local pool
    assert not chain.would_take(deadline, ahead=7)  # 5 + 2: the local pool is full
    assert local.asked_ahead == [1, 2]
    pool.close()
    assert pool.room(deadline, most=10) == 0  # closed: every job goes local


async def test_the_header_check_aims_before_the_target_by_the_lead(
    autojump_clock: object,
) -> None:
    """A request reached the chain 1 s after it arrived (body, hash, lookup): from
    the next upload's headers the local pool is asked about the target less that
    lead (2 s from now, not 3 s), since that upload will spend it too before the
    chain; asked with a request's arrival (the dispatcher, after the lookup), the
    target counts from that arrival."""
    local = CountingPool()
    local.room = 10
    chain = Chain(local, latency_target_s=3.0)
    data = b"photo"
    now = trio.current_time()
    await chain.classify(
        ClassifyRequest(data, hashlib.sha256(data).hexdigest(), "r", received_at=now - 1.0),
        now + 10,
    )
    assert chain.lead_s() == pytest.approx(1.0)
    local.asked.clear()
    assert chain.would_take(now + 10)
    assert chain.would_take(now + 10, received_at=now - 0.5)
    assert local.asked == pytest.approx([now + 2.0, now + 2.5])


# --- a ticket never outlives its request ------------------------------------------------


async def test_a_ticket_stops_counting_when_its_task_ends(autojump_clock: object) -> None:
    """A request's task that ends without submitting or releasing (an error it
    answered, a cancellation) leaves nothing counted, long before the ttl."""
    reservations = Reservations(ttl_s=3.0)

    async def fails_after_the_check() -> None:
        reservations.take()
        raise ValueError("a bad field")

    async def disconnects() -> None:
        reservations.take()
        await trio.sleep_forever()

    with trio.fail_after(10):
        with pytest.raises(ValueError, match=r"^a bad field$"):
            await fails_after_the_check()  # in this task, which goes on: still counts
        assert len(reservations) == 1
        held_here = held()
        assert held_here is not None
        held_here.release()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(disconnects)
            await trio.testing.wait_all_tasks_blocked()
            assert len(reservations) == 1
            nursery.cancel_scope.cancel()
        assert len(reservations) == 0
        assert (reservations.ended, reservations.expired) == (1, 0)

        async def answered_an_error() -> None:
            with contextlib.suppress(ValueError):
                await fails_after_the_check()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answered_an_error)
        assert len(reservations) == 0
        assert reservations.ended == 2


async def test_the_requests_end_frees_its_ticket(tmp_path: Path) -> None:
    """Over HTTP: a request that fails after the header check (no image field: 400)
    and one whose client disconnects before its body arrived leave no ticket."""
    async with service(tmp_path) as (app, _model):
        client = app.test_client()
        resp = await client.post(
            "/api/v1/classify", files={"other": FileStorage(io.BytesIO(b"x"), filename="p")}
        )
        assert resp.status_code == 400
        await trio.testing.wait_all_tasks_blocked()
        assert len(app.runtime.reservations) == 0
        body, headers = multipart([("image", "p.jpg", b"photo " * 500)])
        # The test connection waits forever for a response after a disconnect:
        # the cancel scope ends that wait (the assertions come before it).
        released = False
        with trio.move_on_after(2):
            async with client.request(
                "/api/v1/classify",
                method="POST",
                headers=headers | {"Content-Length": str(len(body))},
            ) as connection:
                await connection.send(body[:100])
                await trio.testing.wait_all_tasks_blocked()
                assert len(app.runtime.reservations) == 1
                await connection.disconnect()
                await trio.testing.wait_all_tasks_blocked()
                released = len(app.runtime.reservations) == 0
        assert released
        assert (app.runtime.reservations.ended, app.runtime.reservations.expired) == (2, 0)


async def test_tickets_are_in_the_metrics(tmp_path: Path) -> None:
    """/metrics shows the tickets: taken by every upload past the header check,
    ended for the one whose request failed before it submitted its work."""
    from .test_ops import metric

    async with service(tmp_path) as (app, model):
        model.release.set()  # prepare at once: the good upload is answered
        client = app.test_client()
        bad = await client.post(
            "/api/v1/classify", files={"other": FileStorage(io.BytesIO(b"x"), filename="p")}
        )
        good = await client.post(
            "/api/v1/classify", files={"image": FileStorage(io.BytesIO(b"a"), filename="p")}
        )
        assert (bad.status_code, good.status_code) == (400, 200)
        await trio.testing.wait_all_tasks_blocked()
        text = (await (await client.get("/metrics")).get_data()).decode()
    assert metric(text, "xintu_admission_tickets_total", outcome="taken") == 2
    assert metric(text, "xintu_admission_tickets_total", outcome="ended") == 1
    assert metric(text, "xintu_admission_tickets_total", outcome="expired") == 0
    assert metric(text, "xintu_admission_tickets_live") == 0
