"""A bounded pool of connections (trio-mysql has none).

The pool holds at most ``size`` connections, idle and in use together. A
:class:`trio.Semaphore` of ``size`` slots bounds them: a task holds a slot for as
long as it uses a connection. Idle connections wait in a memory channel whose
buffer is ``size``, so returning one never blocks.

A connection goes back to the pool only when the ``async with acquire()`` block
that used it ends without an exception. Any exception, ``trio.Cancelled``
included, drops it: a query cancelled half-way leaves the wire protocol in an
unknown state, and a connection that saw an error may sit in a transaction.
Dropping costs a reconnect; reusing a broken connection would cost a wrong answer.

``acquire(fresh=True)`` closes every idle connection first and connects anew:
after a server restart all idle connections are stale, so a retry must not pick
another one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import trio

__all__ = ["Pool", "PoolStatistics"]


class Closeable(Protocol):
    """What the pool needs of a connection."""

    async def aclose(self) -> None: ...


ConnT = TypeVar("ConnT", bound=Closeable)


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot: the bound, connections in use and idle, tasks waiting for a slot,
    and totals of connections opened and dropped."""

    size: int
    in_use: int
    idle: int
    waiting: int
    created: int
    discarded: int


class Pool(Generic[ConnT]):
    """At most *size* connections made by *connect*.

    *connect* must bound its own waits. Closing a connection is bounded by
    *close_timeout_s* and shielded, so it also happens while the user is cancelled.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[ConnT]],
        *,
        size: int,
        close_timeout_s: float = 1.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size!r}")
        self._connect = connect
        self._size = size
        self._close_timeout_s = close_timeout_s
        self._slots = trio.Semaphore(size, max_value=size)
        self._idle_send, self._idle_recv = trio.open_memory_channel[ConnT](size)
        self._in_use = 0
        self._created = 0
        self._discarded = 0
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @asynccontextmanager
    async def acquire(self, *, fresh: bool = False) -> AsyncIterator[ConnT]:
        """A connection for the duration of the block; waits for a free slot.

        Raises :class:`trio.ClosedResourceError` once the pool is closed, and
        whatever *connect* raises when a new connection cannot be made.
        """
        if self._closed:
            raise trio.ClosedResourceError("the connection pool is closed")
        async with self._slots:
            conn = await self._checkout(fresh=fresh)
            self._in_use += 1
            reusable = False
            try:
                yield conn
                reusable = True
            finally:
                self._in_use -= 1
                if reusable and not self._closed:
                    # Never blocks: idle + in use <= size, and the buffer is size.
                    self._idle_send.send_nowait(conn)
                else:
                    await self._discard(conn)

    async def _checkout(self, *, fresh: bool) -> ConnT:
        while True:
            try:
                conn = self._idle_recv.receive_nowait()
            except trio.WouldBlock:
                break
            if not fresh:
                return conn
            await self._discard(conn)
        conn = await self._connect()
        self._created += 1
        return conn

    async def _discard(self, conn: ConnT) -> None:
        self._discarded += 1
        with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout_s):
            await conn.aclose()

    async def discard_idle(self) -> int:
        """Close every idle connection (e.g. after the server restarted); how many."""
        n = 0
        while True:
            try:
                conn = self._idle_recv.receive_nowait()
            except trio.WouldBlock:
                return n
            await self._discard(conn)
            n += 1

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when they are returned."""
        self._closed = True
        await self.discard_idle()

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            size=self._size,
            in_use=self._in_use,
            idle=self._idle_recv.statistics().current_buffer_used,
            waiting=self._slots.statistics().tasks_waiting,
            created=self._created,
            discarded=self._discarded,
        )
