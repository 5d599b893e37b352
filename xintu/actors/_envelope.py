"""What travels through the actor system: requests, envelopes and answers.

An :class:`Envelope` is one caller's task: the request, an absolute Trio deadline,
and a reply channel of its own with buffer 1, so that no worker ever blocks on a
caller that has gone (a send to a closed reply channel is simply dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import outcome
import trio

from .._types import Classification
from ..errors import DeadlineExceeded

__all__ = [
    "Answer",
    "ClassifyRequest",
    "Envelope",
    "Reply",
    "open_reply",
    "send_reply",
    "wait_reply",
]


@dataclass(frozen=True, slots=True)
class ClassifyRequest:
    """One image to classify. ``image_hash`` is the server's own SHA-256 of ``data``."""

    data: bytes
    image_hash: str
    request_id: str
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to one request: a classification and whether it came from the cache."""

    classification: Classification
    image_hash: str
    from_cache: bool


Reply = outcome.Outcome[Answer]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Envelope:
    request: ClassifyRequest
    deadline: float  # trio.current_time() based
    reply: trio.MemorySendChannel[Reply]


def open_reply() -> tuple[trio.MemorySendChannel[Reply], trio.MemoryReceiveChannel[Reply]]:
    """A reply channel: buffer 1, one answer, never a blocked sender."""
    return trio.open_memory_channel[Reply](1)


def send_reply(channel: trio.MemorySendChannel[T], reply: T) -> bool:
    """Deliver *reply* on a one-answer channel without waiting, then close it.

    False if the caller has already left (its receive side is closed).
    """
    try:
        channel.send_nowait(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        return False
    finally:
        channel.close()
    return True


async def wait_reply(receive: trio.MemoryReceiveChannel[Reply], deadline: float) -> Answer:
    """The caller's side: wait for the one answer until *deadline*, then give up.

    Giving up (or being cancelled) closes only this reply channel; the work the
    caller was waiting for carries on and is cached.
    """
    with receive:
        with trio.move_on_at(deadline):
            reply = await receive.receive()
            return reply.unwrap()
    raise DeadlineExceeded("no classifier answered before the deadline")
