"""The local pool: the ONNX fallback classifier as an actor pool.

::

    inbox ──▶ decode workers (N threads: decode, preprocess, detectors)
                 │ DecodedImage
                 ▼
              batch channel ──▶ inference runners (M threads under a CapacityLimiter)
                                 gather ≤ max_batch or max_wait_ms, one session.run

Where the model runs (``model.executor``) is the model object's kind. Given a
:class:`LocalModel`, the pool runs its ``prepare`` and ``infer`` in threads of this
process, as drawn above. Given a :class:`~._procs.ProcessModel` (``"process"``, the
default), the pool starts its worker processes inside :meth:`LocalPool.run` (ready
once each has built the model), and a decode worker's step is the whole
classification of one photo in an idle process (``prepare`` and ``infer`` there):
N is then the number of processes, the images reaching the batch channel are
answers already, and the runners only hand them over (one at a time; no
batching). The event loop then never competes with the model's Python and NumPy
work for the GIL (:mod:`._procs` says why and how the processes live and die). The
shape below holds for both.

Batching: one runner gathers at a time (the others wait their turn), so a backlog of
prepared images becomes full batches instead of being split between runners. After
its first image, a runner waits up to ``max_wait_ms`` for more, but only while more
are on the way (jobs queued in the inbox, being prepared, or prepared and waiting):
a lone job is never held back. Batches form when inference is the bottleneck (a
backlog of prepared images builds up). When preparation is (decoding and detectors
take longer than a session run, as on a CPU), images reach the runners one at a
time, a ``max_wait_ms`` shorter than a preparation closes every batch at one, and
that is right: a bigger batch could not be served sooner, since the runners are
idle, waiting for preparation. On a CPU a session run costs the same per image at
any batch size, so ``model.max_batch`` defaults to 1 (BENCHMARKS.md, "Local path").

It is a :class:`~xintu.actors.Classifier` (the chain's fallback): :meth:`LocalPool.classify`
puts an envelope (:mod:`._envelope`: the request and its reply channel of buffer 1)
into the inbox with ``send_nowait`` (a full inbox is :class:`~xintu.errors.Overloaded`
at once) and waits for the one answer. An error on one image (not an image, too
many pixels, …) answers that envelope alone. Envelopes are never dropped: a runner
that fails answers every envelope of its batch with the error.

:meth:`LocalPool.classify_now` is the priority lane, for work the service has
already held (an LLM call that failed or ran out of time, a hedge beside a slow
LLM call): it skips the inbox and
takes the next free decode thread (Trio's ``CapacityLimiter`` is FIFO, and the
decode workers ask for a thread again only after taking their next job), so it
waits for at most one image's preparation instead of the whole queue.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import outcome
import structlog
import trio

from .._rate import ServiceTime
from .._types import Classification
from ..errors import ClassifierError, Draining, Overloaded, XintuError
from ._envelope import ClassifyRequest, Envelope, open_reply, send_reply, wait_reply
from ._procs import ProcessModel
from ._supervisor import CrashRecord

__all__ = ["LocalModel", "LocalPool", "LocalPoolStatistics"]

log = structlog.get_logger("xintu.local_pool")


D = TypeVar("D")


class LocalModel(Protocol[D]):
    """What the pool needs of a classifier (``xintu.vision.LocalClassifier`` is one).

    ``prepare`` decodes one image (a worker thread each); ``infer`` runs one batch
    of prepared images (one session run). Both must be thread-safe.
    """

    model_name: str

    def prepare(self, data: bytes) -> D: ...

    def infer(self, batch: Sequence[D]) -> list[Classification]: ...


_Job = Envelope[Classification]


@dataclass(frozen=True, slots=True)
class LocalPoolStatistics:
    queued: int
    max_queued: int
    decoding: int
    waiting_for_batch: int
    inferring: int
    completed: int
    failed: int
    urgent: int  # jobs that came through the priority lane (classify_now)
    batches: int
    last_batch_size: int
    mean_batch_size: float
    # model.executor = "process": worker processes alive, and those that died.
    processes: int = 0
    process_deaths: int = 0


def _as_error(exc: Exception) -> XintuError:
    if isinstance(exc, XintuError):
        return exc
    return ClassifierError(f"local classifier failed: {type(exc).__name__}")


class LocalPool:
    """Decode workers and batching inference runners around a :class:`LocalModel`."""

    def __init__(
        self,
        model: LocalModel[Any] | ProcessModel,
        *,
        inbox_size: int,
        decode_threads: int,
        inference_threads: int,
        max_batch: int,
        max_wait_ms: int,
        crashes: CrashRecord | None = None,
        retry_after_s: Callable[[], float] | None = None,
    ) -> None:
        """*retry_after_s* gives the ``Retry-After`` of a refusal at a full inbox
        (the runtime passes the service's; default :meth:`expected_wait_s`).

        With a :class:`~._procs.ProcessModel`, *decode_threads* and
        *inference_threads* give way to its ``processes`` and one runner, and
        *max_batch* to 1 (see the module docstring)."""
        self.model = model
        # Exactly one of the two is set: where prepare and infer run.
        self._procs: ProcessModel | None = None
        self._threads: LocalModel[Any] | None = None
        if isinstance(model, ProcessModel):
            self._procs = model
            decode_threads, inference_threads, max_batch = model.processes, 1, 1
            if crashes is not None:
                model.crashes = crashes  # a crash loop of its processes fails readiness
        else:
            self._threads = model
        self._retry_after_s = retry_after_s or self.expected_wait_s
        self._decode_threads = decode_threads
        self._inference_threads = inference_threads
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000.0
        self._crashes = crashes or CrashRecord()
        self._send, self._receive = trio.open_memory_channel[_Job](inbox_size)
        self._batch_send, self._batch_receive = trio.open_memory_channel[tuple[object, _Job]](
            max(max_batch * inference_threads, 1)
        )
        self._decode_limiter = trio.CapacityLimiter(decode_threads)
        self._infer_limiter = trio.CapacityLimiter(inference_threads)
        # One runner gathers at a time: runners do not split a backlog between them.
        self._gather_lock = trio.Lock()
        self._max_queued = inbox_size
        self._decoding = 0
        # Jobs admitted whose image has not reached the batch channel yet (queued or
        # being prepared): changed with no checkpoint between it and the hand-over.
        self._unprepared = 0
        # The gathering runner parks here; woken by every image handed over or failed.
        self._progress = trio.lowlevel.ParkingLot()
        self._inferring = 0
        self._completed = 0
        self._failed = 0
        self._batches = 0
        self._batched_images = 0
        self._last_batch_size = 0
        self._prepare_time = ServiceTime()
        self._urgent = 0
        self._urgent_pending = 0  # priority-lane jobs not prepared yet
        self._running = False
        self._closed = False
        # The priority lane's way into the batch channel; the runners end once it and
        # the decoders' clones are all closed.
        self._urgent_send = self._batch_send.clone()

    def expected_wait_s(self, ahead: int = 0) -> float:
        """How long a job queued now would take to be answered (decoding dominates),
        behind *ahead* more jobs on their way (the chain's admission tickets).

        Cautious (a margin for the spread of preparation times): admitting on the
        mean puts the last admitted jobs right at their deadline, where the jobs
        of the priority lane, or a slower photo ahead, turn them into 504s.
        """
        ahead += self._receive.statistics().current_buffer_used + self._decoding
        return self._prepare_time.expected_wait_s(ahead, self._decode_threads, cautious=True)

    def urgent_wait_s(self, ahead: int = 0) -> float:
        """How long a job sent to the priority lane (:meth:`classify_now`) now would
        take: the priority jobs already on their way, *ahead* more to be sent
        before it, then its own preparation, as if every worker had just started
        a job (cautious: the chain starts a hedge this long before its caller's
        answer is wanted)."""
        ahead += self._urgent_pending + self._decode_threads
        return self._prepare_time.expected_wait_s(ahead, self._decode_threads, cautious=True)

    def would_take(self, deadline: float, ahead: int = 0) -> bool:
        """Whether a job sent now, behind *ahead* more on their way (taken by idle
        decode workers first, then queued), would find room and be answered
        before *deadline*."""
        queued = self._receive.statistics().current_buffer_used
        idle = max(0, self._decode_threads - self._decoding - queued)
        if queued + max(0, ahead - idle) >= self._max_queued:
            return False
        return trio.current_time() + self.expected_wait_s(ahead) <= deadline

    def close(self) -> None:
        """No more jobs: workers finish what is queued and return."""
        self._closed = True
        self._send.close()
        self._urgent_send.close()

    async def classify(self, request: ClassifyRequest, deadline: float) -> Classification:
        """Classify *request* through the inbox; refused at once when it is full.

        Raises :class:`~xintu.errors.Overloaded` (inbox full) or
        :class:`~xintu.errors.Draining` (closed) without waiting, else the image's
        own error. *deadline* travels with the envelope; the wait is bounded by the
        caller (the dispatcher's flight), so that late work is still answered and
        cached.
        """
        send, receive = open_reply(Classification)
        try:
            self._send.send_nowait(Envelope(request, deadline, send))
        except trio.WouldBlock:
            send.close()
            receive.close()
            raise Overloaded(
                "the local classifier is over capacity", retry_after_s=self._retry_after_s()
            ) from None
        except trio.ClosedResourceError:
            send.close()
            receive.close()
            raise Draining("the service is shutting down") from None
        self._unprepared += 1
        return await wait_reply(receive, math.inf)

    async def classify_now(self, request: ClassifyRequest) -> Classification:
        """Classify ahead of the inbox (the priority lane; see the module docstring).

        Raises the image's own error, :class:`~xintu.errors.Draining` when the pool is
        shutting down, or :class:`~xintu.errors.ClassifierError` before it runs.
        """
        if self._closed:
            raise Draining("the service is shutting down")
        if not self._running:
            raise ClassifierError("the local classifier is not running")
        self._urgent += 1
        self._urgent_pending += 1
        self._decoding += 1
        self._unprepared += 1
        try:
            # Not timed: its wait for a thread is not a preparation time.
            decoded = await self._prepare(request.data)
        except trio.Cancelled:
            raise
        except Exception as exc:
            self._failed += 1
            raise _as_error(exc) from exc
        finally:
            self._urgent_pending -= 1
            self._decoding -= 1
            self._unprepared -= 1
            self._progress.unpark_all()
        send, receive = open_reply(Classification)
        try:
            await self._urgent_send.send((decoded, Envelope(request, math.inf, send)))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            send.close()
            receive.close()
            raise Draining("the service is shutting down") from None
        return await wait_reply(receive, math.inf)

    def statistics(self) -> LocalPoolStatistics:
        return LocalPoolStatistics(
            queued=self._receive.statistics().current_buffer_used,
            max_queued=self._max_queued,
            decoding=self._decoding,
            waiting_for_batch=self._batch_receive.statistics().current_buffer_used,
            inferring=self._inferring,
            completed=self._completed,
            failed=self._failed,
            urgent=self._urgent,
            batches=self._batches,
            last_batch_size=self._last_batch_size,
            mean_batch_size=self._batched_images / self._batches if self._batches else 0.0,
            **self._process_statistics(),
        )

    def model_statistics(self) -> Any:
        """The model's own ``statistics()`` (``xintu.vision.LocalStatistics`` for the
        default model): the model's in threads, the sum over the worker processes'
        models otherwise; ``None`` when the model has none."""
        if self._procs is not None:
            return self._procs.model_statistics()
        statistics = getattr(self._threads, "statistics", None)
        return statistics() if callable(statistics) else None

    def _process_statistics(self) -> dict[str, int]:
        if self._procs is None:
            return {}
        procs = self._procs.statistics()
        return {"processes": procs.alive, "process_deaths": procs.died}

    async def _prepare(self, data: bytes) -> object:
        """A decode worker's step, under the decode limiter (FIFO: the priority lane
        goes next): ``prepare`` in a thread, or the whole classification in a process."""
        if self._threads is not None:
            return await trio.to_thread.run_sync(
                self._threads.prepare, data, limiter=self._decode_limiter
            )
        assert self._procs is not None
        async with self._decode_limiter:
            return await self._procs.classify(data)

    async def _run_infer(self, batch: list[object]) -> list[Classification]:
        """One batch: ``infer`` in a thread; from processes, the answers themselves."""
        if self._threads is not None:
            return await trio.to_thread.run_sync(
                self._threads.infer, batch, limiter=self._infer_limiter
            )
        return [c for c in batch if isinstance(c, Classification)]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._procs is None:
            await self._run(task_status=task_status)
            return
        await self._procs.start()  # a model that cannot be built: ModelError, as it is
        async with trio.open_nursery() as processes:
            await processes.start(self._procs.run)
            try:
                await self._run(task_status=task_status)
            finally:
                self._procs.close()

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as decoders:
            async with trio.open_nursery() as runners:
                for i in range(self._inference_threads):
                    runners.start_soon(
                        self._crashes.supervise, f"local-infer-{i}", self._infer_loop
                    )
                self._running = True
                async with self._batch_send:
                    for i in range(self._decode_threads):
                        decoders.start_soon(self._decoder, i, self._batch_send.clone())
                task_status.started()
                # Runners end once every decoder's clone of the batch channel is closed.

    async def _decoder(
        self, i: int, batch_send: trio.MemorySendChannel[tuple[object, _Job]]
    ) -> None:
        async with batch_send:
            await self._crashes.supervise(
                f"local-decode-{i}", functools.partial(self._decode_loop, batch_send)
            )

    async def _decode_loop(self, batch_send: trio.MemorySendChannel[tuple[object, _Job]]) -> None:
        async for job in self._receive:
            self._decoding += 1
            started = trio.current_time()
            try:
                decoded = await self._prepare(job.request.data)
                # Wall time from the worker's side, thread hand-offs included: what a
                # queued job will wait per job ahead of it on a busy machine.
                self._prepare_time.record(trio.current_time() - started)
            except trio.Cancelled:
                send_reply(job.reply, outcome.Error(ClassifierError("shutting down")))
                raise
            except Exception as exc:
                self._failed += 1
                send_reply(job.reply, outcome.Error(_as_error(exc)))
                continue
            finally:
                self._decoding -= 1
                self._unprepared -= 1
                self._progress.unpark_all()
            await batch_send.send((decoded, job))

    async def _infer_loop(self) -> None:
        while True:
            async with self._gather_lock:
                batch = await self._gather()
            if not batch:
                return
            await self._infer(batch)

    async def _gather(self) -> list[tuple[object, _Job]]:
        """The next batch: one image, then more up to ``max_batch`` while more are on
        the way, for at most ``max_wait_ms`` after the first; [] once the channel ends.

        "On the way" is ``_unprepared``: it drops with no checkpoint before the image
        is in the channel (Trio's ``send`` does not yield first), and every image
        handed over or failed wakes the gathering runner to look again.
        """
        receive = self._batch_receive
        try:
            batch = [await receive.receive()]
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return []
        deadline = trio.current_time() + self._max_wait_s
        while len(batch) < self._max_batch:
            try:
                batch.append(receive.receive_nowait())
                continue
            except trio.WouldBlock:
                pass
            except (trio.EndOfChannel, trio.ClosedResourceError):
                break
            if self._unprepared <= 0 or trio.current_time() >= deadline:
                break
            try:
                with trio.move_on_at(deadline):
                    await self._progress.park()
            except trio.Cancelled:
                for _, job in batch:
                    send_reply(job.reply, outcome.Error(ClassifierError("shutting down")))
                raise
        return batch

    async def _infer(self, batch: list[tuple[object, _Job]]) -> None:
        self._inferring += len(batch)
        try:
            results = await self._run_infer([d for d, _ in batch])
            if len(results) != len(batch):
                raise ClassifierError(f"model answered {len(results)} of {len(batch)} images")
        except trio.Cancelled:
            for _, job in batch:
                send_reply(job.reply, outcome.Error(ClassifierError("shutting down")))
            raise
        except Exception as exc:
            log.exception("local_inference_failed", batch_size=len(batch))
            self._failed += len(batch)
            for _, job in batch:
                send_reply(job.reply, outcome.Error(_as_error(exc)))
            return
        finally:
            self._inferring -= len(batch)
        self._batches += 1
        self._batched_images += len(batch)
        self._last_batch_size = len(batch)
        for (_, job), result in zip(batch, results, strict=True):
            self._completed += 1
            send_reply(job.reply, outcome.Value(result))
