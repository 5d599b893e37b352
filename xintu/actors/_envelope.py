"""What travels through the actor system: requests, envelopes and answers.

An :class:`Envelope` is one caller's task: the request, an absolute Trio deadline,
and a reply channel of its own with buffer 1, so that no worker ever blocks on a
caller that has gone (a send to a closed reply channel is simply dropped).

It is the one reply protocol of every actor: the dispatcher answers an
``Envelope[Answer]``, the LLM pool and the local pool an
``Envelope[Classification]``. Whoever takes an envelope answers it exactly once
(:func:`send_reply`); the caller waits for that answer with :func:`wait_reply`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

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
    """One image to classify. ``image_hash`` is the server's own SHA-256 of ``data``.

    ``received_at``: when its HTTP request arrived (``trio.current_time()``), if it
    came over HTTP: the latency target counts from then, as the client's clock
    does (reading the body, hashing and the cache lookup count against it)."""

    data: bytes
    image_hash: str
    request_id: str
    user_id: str | None = None
    received_at: float | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to one request: a classification and whether it came from the cache."""

    classification: Classification
    image_hash: str
    from_cache: bool


# What an envelope is answered with: the dispatcher's Answer, a pool's Classification.
A = TypeVar("A")
#: The dispatcher's reply: an :class:`Answer` or the error that stands for it.
Reply = outcome.Outcome[Answer]


@dataclass(frozen=True, slots=True)
class Envelope(Generic[A]):
    request: ClassifyRequest
    deadline: float  # trio.current_time() based
    reply: trio.MemorySendChannel[outcome.Outcome[A]]


@overload
def open_reply() -> tuple[trio.MemorySendChannel[Reply], trio.MemoryReceiveChannel[Reply]]: ...


@overload
def open_reply(
    answer: type[A],
) -> tuple[
    trio.MemorySendChannel[outcome.Outcome[A]], trio.MemoryReceiveChannel[outcome.Outcome[A]]
]: ...


def open_reply(answer: type[Any] = Answer) -> tuple[Any, Any]:
    """A reply channel for an *answer* (default :class:`Answer`): buffer 1, one
    answer, never a blocked sender."""
    return trio.open_memory_channel[outcome.Outcome[Any]](1)


def send_reply(channel: trio.MemorySendChannel[A], reply: A) -> bool:
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


async def wait_reply(
    receive: trio.MemoryReceiveChannel[outcome.Outcome[A]], deadline: float = math.inf
) -> A:
    """The caller's side: wait for the one answer until *deadline*, then give up
    with :class:`~xintu.errors.DeadlineExceeded`.

    Giving up (or being cancelled) closes only this reply channel; the work the
    caller was waiting for carries on and is cached.
    """
    with receive:
        with trio.move_on_at(deadline):
            reply = await receive.receive()
            return reply.unwrap()
    raise DeadlineExceeded("no classifier answered before the deadline")
