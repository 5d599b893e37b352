"""The writer is not woken by every operation while it gathers a batch (issue 14:
under hits each request's log row woke it once, most of its cost on the event loop).
It still takes everything that came within the window into that batch, wakes at
once for a full batch's worth, and a producer waiting for room is not held up."""

from __future__ import annotations

import trio
import trio.testing

from xintu.actors import Writer
from xintu.store import WriteBatch

from .fakes import MemoryStore
from .test_writer_bookkeeping import hit, log_row


class Recording(MemoryStore):
    """Keeps every batch applied."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[WriteBatch] = []

    async def apply(self, batch: WriteBatch) -> bool:
        self.seen.append(batch)
        return await super().apply(batch)


class _Steps(trio.abc.Instrument):
    """Counts the steps of the writer's own task."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("Writer.run"):
            self.steps += 1


async def test_one_window_one_wake_up_not_one_per_operation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = Recording()
    writer = Writer(store, inbox_size=1000, max_batch=256, flush_ms=50)
    steps = _Steps()
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        trio.lowlevel.add_instrument(steps)
        try:
            for i in range(100):  # 100 requests, one every 0.2 ms: all in one 50 ms window
                writer.offer(log_row(f"r{i}"))
                writer.offer(hit(i % 3))
                await trio.sleep(0.0002)
            await writer.wait_idle()
        finally:
            trio.lowlevel.remove_instrument(steps)
        writer.close()
    # Before: the writer ran once per operation offered (over 100 steps).
    assert steps.steps < 20, steps.steps
    assert store.apply_calls == 1  # one batch: the window took everything
    assert len(store.logs) == 100
    assert sum(h.count for b in store.seen for h in b.hits) == 100
    assert writer.statistics().ops_applied == 200


async def test_a_full_batch_wakes_it_at_once(autojump_clock: trio.testing.MockClock) -> None:
    store = Recording()
    writer = Writer(store, inbox_size=1000, max_batch=8, flush_ms=10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.offer(log_row("first"))
        await trio.sleep(0.001)
        for i in range(7):
            writer.offer(log_row(f"r{i}"))
        start = trio.current_time()
        await writer.wait_idle()
        assert trio.current_time() - start < 1.0  # not the 10 s window
        writer.close()
    assert store.apply_calls == 1
    assert len(store.logs) == 8


async def test_a_producer_waiting_for_room_is_not_held_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without a journal, put waits for room; a half-full inbox wakes the writer."""
    store = Recording()
    writer = Writer(store, inbox_size=4, max_batch=256, flush_ms=10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        start = trio.current_time()
        for i in range(12):
            await writer.put(log_row(f"r{i}"))
        assert trio.current_time() - start < 1.0
        writer.close()
    assert len(store.logs) == 12
