"""The local model in worker processes: the local pool's ``model.executor = "process"``.

::

    LocalPool decode worker ──take an idle process──▶ stdin:  image bytes (one frame)
           ▲                                          stdout: ("ok", Classification)
           └────────── the answer, the process back ◀──────── or ("error", XintuError)

Why processes: the model's own work (Pillow, NumPy, OpenCV and the Python glue
between them) holds the GIL for most of its ~40 ms per photo, so in threads of the
service it competes with the Trio event loop, and under a burst the loop is
starved: hits wait, and an LLM answer that has arrived is read late (BENCHMARKS.md,
"The event loop's share"). In a process of its own, it competes only for a core.

Each worker process (:mod:`._procworker`, ``python -m xintu.actors._procworker``)
receives the configuration and the model's builder (a module-level function,
pickled by reference: :func:`xintu.vision.build_local_model` for the service), builds
the model once, says it is ready, then classifies one photo per request, ``prepare``
and ``infer`` together. The frames on its pipes are an 8-byte length and the bytes:
the photo as it came, the answer pickled.

Why not trio-parallel, nor :mod:`multiprocessing`: ``xintu serve --workers N`` runs
each service process as Hypercorn's daemonic ``multiprocessing`` child, and a
daemonic process may not start ``multiprocessing`` children (trio-parallel's workers
are such children). Plain subprocesses with two pipes need none of that, and let the
pool start every process at startup (the model is built before the first request,
and a model that cannot be built fails the start), keep them for the service's life
(no idle retirement: a rebuild costs seconds), and count them.

Lifetimes:

- :meth:`ProcessModel.run` starts :attr:`ProcessModel.processes` processes at once
  and reports ready when all have built the model; one that cannot is a
  :class:`~xintu.errors.ModelError` that fails the start.
- A process that dies (killed, crashed, out of memory) is replaced, under the
  runtime's :class:`~._supervisor.CrashRecord` (restart backoff; a crash loop fails
  readiness). The photo it was classifying is answered with a
  :class:`~xintu.errors.ClassifierError`, not retried: a photo that crashes its
  process would crash the next one too.
- A call cancelled while its process works waits for its answer, as a thread's
  would (the process stays in step with its pipes and is kept); when the pool's
  ``run`` is cancelled, the processes are killed, which ends that wait at once.
- :meth:`ProcessModel.close` (the local pool calls it once its queue is done) closes
  every process's stdin: each exits after its current photo. Processes that do not
  exit within :data:`STOP_GRACE_S` are killed, and so are all of them when ``run`` is
  cancelled.
- The processes die with the service: each exits when its stdin reaches EOF (the
  service exited or crashed and the kernel closed the pipe) or its parent changes
  (a watchdog thread, every :data:`PARENT_POLL_S`), and ignores SIGINT and SIGTERM,
  which a terminal or a process manager sends to the whole group: the service's
  own drain stops them after the queued photos are answered.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from .._config import Config
from .._types import Classification
from ..errors import ClassifierError, Draining, ModelError, XintuError
from ._supervisor import CrashRecord

__all__ = [
    "PARENT_POLL_S",
    "STOP_GRACE_S",
    "ModelBuilder",
    "ProcessModel",
    "ProcessStatistics",
    "default_processes",
]

log = structlog.get_logger("xintu.local_pool")

#: ``(config) -> model``, a module-level function (it is pickled by reference).
ModelBuilder = Callable[[Config], Any]

#: How long a closed process may take to finish its photo and exit before it is killed.
STOP_GRACE_S = 10.0
#: How often a worker process checks that the service that started it is alive.
PARENT_POLL_S = 0.5
#: Most time a worker process may take to build the model and say it is ready.
STARTUP_TIMEOUT_S = 300.0

_HEADER = struct.Struct(">Q")
_READ_CHUNK = 1 << 20
_COMMAND = (sys.executable, "-m", "xintu.actors._procworker")


def default_processes(config: Config) -> int:
    """``model.processes``, or when 0: the CPUs this process may use, shared by
    ``server.workers`` service processes (at least one each)."""
    if config.model.processes:
        return config.model.processes
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, config.server.workers))


@dataclass(frozen=True, slots=True)
class ProcessStatistics:
    processes: int  # configured
    alive: int  # started and ready, not known to have died
    busy: int  # classifying a photo now
    started: int  # processes started so far (replacements included)
    died: int  # processes that died while the service needed them
    startup_s: float  # the last process's time from start to ready


class _Gone(Exception):
    """The worker process closed its pipe (it died)."""


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class _Worker:
    """One worker process and the parent's ends of its pipes."""

    def __init__(self, proc: trio.Process, index: int) -> None:
        self.proc = proc
        self.index = index
        self.pid = proc.pid
        self._buffer = bytearray()
        #: Its model's ``statistics()`` after its last photo (None: none yet, or no such method).
        self.model_statistics: Any = None
        assert proc.stdin is not None
        assert proc.stdout is not None
        self._stdin = proc.stdin
        self._stdout = proc.stdout

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def exit_description(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    async def send(self, payload: bytes) -> None:
        try:
            await self._stdin.send_all(_frame(payload))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Gone from exc

    async def receive(self) -> bytes:
        header = await self._read(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        return await self._read(size)

    async def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            try:
                chunk = await self._stdout.receive_some(max(_READ_CHUNK, n - len(self._buffer)))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Gone from exc
            if not chunk:
                raise _Gone
            self._buffer += chunk
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def stop(self, grace_s: float) -> None:
        """Close its stdin (it exits after its photo), wait up to *grace_s*, else kill."""
        with trio.CancelScope(shield=True):
            try:
                await self._stdin.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(grace_s):
                await self.proc.wait()
            self.kill()
            await self.proc.wait()
            await self._stdout.aclose()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class ProcessModel:
    """The local model in :attr:`processes` worker processes; one photo each at a time.

    The local pool drives it (:class:`~._local_pool.LocalPool` given a
    :class:`ProcessModel` runs :meth:`run` inside its own ``run`` and sends each
    photo through :meth:`classify`); see the module docstring.
    """

    def __init__(
        self,
        config: Config,
        *,
        build: ModelBuilder,
        processes: int | None = None,
        crashes: CrashRecord | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        """*build* makes the model from *config* in each process; *processes*
        defaults to :func:`default_processes`."""
        self.processes = processes or default_processes(config)
        self.model_name: str = config.model.kind
        self.crashes = crashes or CrashRecord()
        # What each process receives: the builder (by reference) and the configuration
        # (pickle refuses its read-only mapping of origins; a dict travels).
        self._setup = pickle.dumps(
            (build, dataclasses.replace(config, origins=dict(config.origins)))
        )
        self._startup_timeout_s = startup_timeout_s
        self._idle: deque[_Worker] = deque()
        self._idle_lot = trio.lowlevel.ParkingLot()
        self._workers: set[_Worker] = set()
        self._closed = trio.Event()
        self._firsts: list[_Worker] | None = None
        self._retired_statistics: list[Any] = []
        self._running = False
        self._busy = 0
        self._started = 0
        self._died = 0
        self._startup_s = 0.0

    def statistics(self) -> ProcessStatistics:
        return ProcessStatistics(
            processes=self.processes,
            alive=sum(1 for w in self._workers if w.alive),
            busy=self._busy,
            started=self._started,
            died=self._died,
            startup_s=round(self._startup_s, 3),
        )

    def model_statistics(self) -> Any:
        """The sum of the processes' model ``statistics()`` (each counts its own),
        those that have died or stopped included; ``None`` before any or when the
        model has none. Its type must support ``+`` (``xintu.vision.LocalStatistics``
        does)."""
        parts = [*self._retired_statistics]
        parts += [w.model_statistics for w in self._workers if w.model_statistics is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def _retire(self, worker: _Worker) -> None:
        """*worker* is gone: keep what its model counted."""
        self._workers.discard(worker)
        if worker.model_statistics is not None:
            self._retired_statistics.append(worker.model_statistics)
            worker.model_statistics = None

    def pids(self) -> list[int]:
        """The process ids of the live worker processes (tests, diagnostics)."""
        return sorted(w.pid for w in self._workers if w.alive)

    def close(self) -> None:
        """No more photos: :meth:`run` stops every process and returns."""
        self._closed.set()

    async def start(self) -> None:
        """Start every process at once and return when all have built the model;
        raises :class:`~xintu.errors.ModelError` (the first process that could not),
        with the others stopped. :meth:`run` calls it unless it was called first
        (the local pool does, so that the error reaches its caller as it is)."""
        if self._firsts is None:
            self._firsts = await self._start_all()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the processes (:meth:`start`), report ready, keep them (replacing
        the dead) until :meth:`close`, then stop them."""
        await self.start()
        assert self._firsts is not None
        firsts, self._firsts = self._firsts, []
        try:
            async with trio.open_nursery() as nursery:
                for worker in firsts:
                    nursery.start_soon(
                        self.crashes.supervise,
                        f"local-process-{worker.index}",
                        functools.partial(self._keep, worker.index, [worker]),
                    )
                self._running = True
                log.info(
                    "local_processes_ready",
                    processes=self.processes,
                    model=self.model_name,
                    startup_s=round(self._startup_s, 2),
                )
                task_status.started()
                await self._closed.wait()
                await self._stop_all()
                nursery.cancel_scope.cancel()  # replacements still starting
        finally:
            self._running = False
            with trio.CancelScope(shield=True):
                await self._stop_all(grace_s=0.0)

    async def classify(self, data: bytes) -> Classification:
        """Classify *data* in the next idle process; raises the photo's own error,
        :class:`~xintu.errors.ClassifierError` when its process died, or
        :class:`~xintu.errors.Draining` once closed."""
        worker = await self._take()
        self._busy += 1
        try:
            # Like a thread's, a photo's run is not abandoned when its caller is
            # cancelled (the pipe stays in step and the process is kept); a cancelled
            # run of the pool kills the processes, which ends this wait.
            with trio.CancelScope(shield=True):
                await worker.send(data)
                reply = await worker.receive()
        except _Gone:
            worker.kill()
            await worker.proc.wait()
            raise ClassifierError(
                f"the local model's worker process died ({worker.exit_description()})"
            ) from None
        finally:
            self._busy -= 1
        self._put(worker)
        kind, value, worker.model_statistics = pickle.loads(reply)
        if kind == "ok" and isinstance(value, Classification):
            return value
        if isinstance(value, XintuError):
            raise value
        raise ClassifierError("the local model's worker process answered nonsense")

    # --- the processes -------------------------------------------------------------

    async def _take(self) -> _Worker:
        while True:
            if self._closed.is_set():
                raise Draining("the service is shutting down")
            if not self._running:
                raise ClassifierError("the local classifier is not running")
            while not self._idle:
                await self._idle_lot.park()
                if self._closed.is_set():
                    raise Draining("the service is shutting down")
            worker = self._idle.popleft()
            if worker.alive:
                return worker

    def _put(self, worker: _Worker) -> None:
        self._idle.append(worker)
        self._idle_lot.unpark()

    async def _start_all(self) -> list[_Worker]:
        """Every process at once; the first that cannot start stops the others and
        is raised (a :class:`~xintu.errors.ModelError`)."""
        started: list[_Worker] = []
        failed: list[ModelError] = []

        async def start(index: int, scope: trio.CancelScope) -> None:
            try:
                started.append(await self._spawn(index))
            except ModelError as exc:
                failed.append(exc)
                scope.cancel()

        async with trio.open_nursery() as starting:
            for i in range(self.processes):
                starting.start_soon(start, i, starting.cancel_scope)
        if failed:
            await self._stop_all(grace_s=0.0)
            raise failed[0]
        return started

    async def _keep(self, index: int, first: list[_Worker]) -> None:
        """One process slot: its process (the first, else a new one) until it dies
        (raises: the supervisor counts it and starts this again after a backoff) or
        the model is closed (returns)."""
        worker = first.pop() if first else await self._spawn(index)
        if self._closed.is_set():
            await worker.stop(STOP_GRACE_S)
            return
        self._put(worker)
        await worker.proc.wait()
        self._retire(worker)
        await worker.stop(0.0)  # closes the parent's ends of its pipes
        if self._closed.is_set():
            return
        self._died += 1
        raise ClassifierError(
            f"local model worker process {worker.pid} died ({worker.exit_description()})"
        )

    async def _spawn(self, index: int) -> _Worker:
        started = time.perf_counter()
        proc = await trio.lowlevel.open_process(
            _COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        worker = _Worker(proc, index)
        self._workers.add(worker)
        self._started += 1
        ready = False
        try:
            hello = pickle.dumps({"sys_path": list(sys.path), "setup": self._setup})
            with trio.fail_after(self._startup_timeout_s):
                await worker.send(hello)
                kind, value = pickle.loads(await worker.receive())
            if kind != "ready":
                raise ModelError(f"the local model could not be built: {value}")
            ready = True
        except trio.TooSlowError:
            raise ModelError(
                f"the local model's worker process was not ready in {self._startup_timeout_s:g} s"
            ) from None
        except _Gone:
            await worker.proc.wait()
            raise ModelError(
                f"the local model's worker process exited at start ({worker.exit_description()})"
            ) from None
        finally:
            if not ready:
                self._workers.discard(worker)
                await worker.stop(0.0)  # shielded: kills it and reaps it
        self._startup_s = time.perf_counter() - started
        self.model_name = str(value.get("model_name", self.model_name))
        log.debug("local_process_started", pid=worker.pid, startup_s=round(self._startup_s, 2))
        return worker

    async def _stop_all(self, grace_s: float = STOP_GRACE_S) -> None:
        self._idle_lot.unpark_all()
        workers = list(self._workers)
        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(worker.stop, grace_s)
        for worker in workers:
            self._retire(worker)
