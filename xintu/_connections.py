"""A per-process cap on open client connections, the front end's slowloris defence.

Hypercorn has timeouts but no connection limit. Timeouts bound how long one slow
client holds a connection (``server.keep_alive_s`` for the request headers, as
Hypercorn's idle timer runs from the accept until the headers are complete;
``server.body_timeout_s`` for the whole body; ``server.read_timeout_s`` for any
one read). The cap bounds how many such clients one process holds at once, so a
flood of slow connections costs a bounded number of file descriptors and buffers.
Classification work is never at stake: actors only see a request once its body
has arrived in full.

The cap lives on the app (``app.connections``, a :class:`ConnectionGate`).
:func:`install` swaps Hypercorn's trio ``TCPServer`` (the task that runs one
connection) for :class:`GatedTCPServer`, which enters the gate of the app it
serves first. A connection over the cap is answered at once with a complete
``503`` (``Retry-After``, ``Connection: close``) and closed, so the client gets a
clear answer instead of a hang or a reset; nothing about it reaches the app.
"""

from __future__ import annotations

import json
import resource
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from hypercorn.trio import run as hypercorn_trio_run
from hypercorn.trio.tcp_server import TCPServer

__all__ = [
    "ConnectionGate",
    "ConnectionStatistics",
    "GatedTCPServer",
    "install",
    "raise_open_files_limit",
]

log = structlog.get_logger("xintu.connections")

# A refused connection may take this long in all (answer, drain, close).
_REFUSAL_BUDGET_S = 0.25
# At most this many refusals are answered at once; beyond, a connection is closed
# without an answer, so a flood cannot hold descriptors in refusals either.
_MAX_REFUSING = 64
_REFUSAL_RETRY_AFTER_S = 1
# File descriptors a process needs besides its client connections (store pool,
# model, journal, logs, listeners).
_FD_HEADROOM = 128


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    limit: int
    open: int
    peak: int
    accepted: int
    refused: int


class ConnectionGate:
    """Counts the open connections of one process and refuses those over *limit*."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open = 0
        self._peak = 0
        self._accepted = 0
        self._refused = 0
        self.refusing = 0  # refusals being answered now

    def try_enter(self) -> bool:
        """Take a slot for a new connection; False (and counted) when all are taken."""
        if self._open >= self.limit:
            self._refused += 1
            return False
        self._open += 1
        self._accepted += 1
        self._peak = max(self._peak, self._open)
        return True

    def leave(self) -> None:
        self._open -= 1

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            limit=self.limit,
            open=self._open,
            peak=self._peak,
            accepted=self._accepted,
            refused=self._refused,
        )


def _refusal() -> bytes:
    body = json.dumps(
        {
            "success": False,
            "error": "too many open connections; retry later",
            "error_code": "overloaded",
            "request_id": uuid.uuid4().hex,
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"retry-after: {_REFUSAL_RETRY_AFTER_S}\r\n"
        "connection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class GatedTCPServer(TCPServer):
    """Hypercorn's connection task, entered through the served app's gate."""

    async def run(self) -> None:
        gate = _gate_of(self.app)
        if gate is None:
            await super().run()
            return
        if not gate.try_enter():
            if gate.refusing >= _MAX_REFUSING:
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()
                return
            gate.refusing += 1
            try:
                await _refuse(self.stream)
            finally:
                gate.refusing -= 1
            return
        try:
            await super().run()
        finally:
            gate.leave()

    async def _read_data(self) -> None:
        await super()._read_data()
        # The peer has gone (EOF, reset or read timeout) and Hypercorn has told the
        # protocol. Hypercorn would leave its idle timer running, so the task (with
        # its slot and descriptor) would outlive the peer by up to keep_alive_s.
        await self.idle_task.stop()


def _gate_of(app_wrapper: Any) -> ConnectionGate | None:
    # Hypercorn wraps the ASGI app (ASGIWrapper.app); the gate hangs off the app.
    gate = getattr(getattr(app_wrapper, "app", None), "connections", None)
    return gate if isinstance(gate, ConnectionGate) else None


async def _refuse(stream: Any) -> None:
    """Answer 503 without reading the request, then close.

    Closing a socket with unread input makes the kernel send a reset, which can
    destroy the answer before the client reads it; so the write side is shut
    first and what the client already sent is read and dropped, within a budget.
    """
    with trio.move_on_after(_REFUSAL_BUDGET_S):
        try:
            await stream.send_all(_refusal())
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, AttributeError):
            pass
    with trio.CancelScope(shield=True):
        await stream.aclose()


def install() -> None:
    """Make Hypercorn's trio worker run every connection through :class:`GatedTCPServer`.

    ``hypercorn.trio.run.worker_serve`` looks ``TCPServer`` up in its module when
    it starts serving; ``tests/test_slow_clients.py`` fails if a Hypercorn upgrade
    stops honouring this.
    """
    if hypercorn_trio_run.TCPServer is not GatedTCPServer:  # type: ignore[attr-defined]
        hypercorn_trio_run.TCPServer = GatedTCPServer  # type: ignore[attr-defined]


def raise_open_files_limit(max_connections: int) -> None:
    """Raise the soft open-files limit so that *max_connections* fit, if the hard one allows.

    Logs a warning when it cannot: the cap would then never be reached, and
    ``accept`` would fail with EMFILE first (Trio backs off and retries).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + _FD_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < wanted:
        log.warning(
            "open_files_limit_low",
            limit=soft,
            max_connections=max_connections,
            hint="raise `ulimit -n` or lower server.max_connections",
        )
