"""The load generator: open loop on a schedule, or closed loop, in several processes.

Open loop: every request has an *intended* send time from a schedule fixed before the
run (Poisson arrivals by default). A request is started at its time whether or not
earlier ones have been answered, so a slow server cannot slow the client down and
hide its own queueing (coordinated omission). Each sample keeps the intended time,
the time the generator started the request (the difference is the generator's own
*lateness*: a late generator is flagged, see :mod:`bench._stats`), the time it was
written to a connection (after waiting for a free connection or connecting), and the
completion time; latency is measured from the intended time, so every wait counts.

Connections: ``max_conns`` keep-alive connections at most, ``warm_conns`` of them
opened before the start. With ``warm_conns == max_conns`` (the capacity runs) the
pool is fixed, like wrk2's ``-c``: a request that finds every connection busy waits
for one, and that wait is part of its latency. A pool that may grow (the burst runs)
opens connections on demand, as a crowd of new clients would; connection set-up
then costs the server too.

Closed loop: a fixed number of connections each send their next request as soon as
the previous one is answered; this finds the maximum throughput.

The schedule is dealt round-robin to ``processes`` generator processes (spawned once
per run by :class:`GeneratorPool`, each running Trio and :mod:`bench._http`) that
start on a common ``time.monotonic()`` instant (``CLOCK_MONOTONIC`` is system-wide
on Linux); their samples are merged. Every loop is bounded: each request by
``timeout_s``, each run by its schedule plus ``grace_s`` or by ``duration_s`` and
``max_requests``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from ._http import Connection, ProtocolError

__all__ = [
    "SAMPLE_DTYPE",
    "STATUS_CONNECT_ERROR",
    "STATUS_TIMEOUT",
    "STATUS_UNFINISHED",
    "GeneratorPool",
    "LoadResult",
    "poisson_schedule",
    "uniform_schedule",
]

#: One row per request; times in seconds from the run's start instant ``t0``.
SAMPLE_DTYPE = np.dtype(
    [
        ("intended", "f8"),
        ("started", "f8"),
        ("sent", "f8"),
        ("done", "f8"),
        ("status", "i2"),
        ("tag", "i2"),
        ("retry_after", "?"),
        ("source", "i1"),
    ]
)
#: Pseudo-statuses for requests that got no HTTP answer.
STATUS_CONNECT_ERROR = 0
STATUS_TIMEOUT = -1
STATUS_UNFINISHED = -2

_IDLE_CLOSE_S = 4.0  # under Hypercorn's keep_alive_s (5 s by default)
_NICE = -5  # generator wake-ups should not wait behind the service's CPU use
_START_MARGIN_S = 0.3
_PICKLE_BYTES_PER_S = 200e6  # to give big payload lists time to reach the processes
_MAX_CLOSED_RATE = 8000  # requests/s one process could ever do: sizes its sample array


def poisson_schedule(
    phases: Sequence[tuple[float, float]], *, seed: int
) -> npt.NDArray[np.float64]:
    """Send offsets (s) of Poisson arrivals, phase by phase: ``[(duration_s, rate), ...]``."""
    rng = np.random.default_rng(seed)
    out: list[npt.NDArray[np.float64]] = []
    start = 0.0
    for duration, rate in phases:
        if rate > 0:
            n = rng.poisson(rate * duration)
            out.append(np.sort(rng.uniform(start, start + duration, n)))
        start += duration
    return np.concatenate(out) if out else np.zeros(0)


def uniform_schedule(phases: Sequence[tuple[float, float]]) -> npt.NDArray[np.float64]:
    """Send offsets (s) at exactly the phase's rate, evenly spaced."""
    out: list[npt.NDArray[np.float64]] = []
    start = 0.0
    for duration, rate in phases:
        n = round(rate * duration)
        out.append(start + np.arange(n) / rate if n else np.zeros(0))
        start += duration
    return np.concatenate(out) if out else np.zeros(0)


@dataclass
class LoadResult:
    """Merged samples of one load run, with the generator's own cost."""

    samples: npt.NDArray[Any]
    t0: float  # the schedule's zero, in time.monotonic() seconds
    wall_s: float
    generator_cpu_s: float
    client_errors: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)


# --- in the generator process ----------------------------------------------------------


class _Pool:
    """Keep-alive connections to one server, at most ``limit`` at once."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Connection] = []
        self.slots = trio.Semaphore(limit)

    async def warm(self, n: int) -> None:
        for _ in range(n):
            self.idle.append(await Connection.open(self.host, self.port))

    async def acquire(self) -> Connection:
        await self.slots.acquire()
        try:
            now = trio.current_time()
            while self.idle:
                conn = self.idle.pop()
                if conn.usable and now - conn.last_used < _IDLE_CLOSE_S:
                    return conn
                await _close(conn)
            return await Connection.open(self.host, self.port)
        except BaseException:
            self.slots.release()
            raise

    async def release(self, conn: Connection, *, ok: bool) -> None:
        if ok and conn.usable:
            self.idle.append(conn)
        else:
            await _close(conn)
        self.slots.release()

    async def close_all(self) -> None:
        while self.idle:
            await _close(self.idle.pop())


async def _close(conn: Connection) -> None:
    with trio.CancelScope(shield=True), contextlib.suppress(OSError, trio.BrokenResourceError):
        await conn.aclose()


class _Recorder:
    def __init__(self, n: int, t0_trio: float) -> None:
        self.rows = np.zeros(n, dtype=SAMPLE_DTYPE)
        self.rows["status"] = STATUS_UNFINISHED
        self.rows["done"] = np.nan
        self.rows["sent"] = np.nan
        self.rows["started"] = np.nan
        self.t0 = t0_trio
        self.errors: Counter[str] = Counter()

    def now(self) -> float:
        return trio.current_time() - self.t0


async def _one(pool: _Pool, rec: _Recorder, i: int, payload: bytes, timeout_s: float) -> None:
    """Send one request, retrying once on a kept-alive connection the server had closed."""
    row = rec.rows[i]
    row["started"] = rec.now()
    with trio.move_on_after(timeout_s) as scope:
        for attempt in range(2):
            conn = await pool.acquire()
            if attempt == 0:
                row["sent"] = rec.now()
            fresh = conn.requests == 0
            ok = False
            try:
                resp = await conn.request(payload)
                ok = True
            except (OSError, ProtocolError, trio.BrokenResourceError) as exc:
                if attempt == 0 and not fresh and isinstance(exc, ProtocolError):
                    continue  # a stale keep-alive connection: one retry on a new one
                row["status"] = STATUS_CONNECT_ERROR
                rec.errors[type(exc).__name__] += 1
                return
            finally:
                await pool.release(conn, ok=ok)
            row["status"] = resp.status
            row["retry_after"] = resp.retry_after
            row["source"] = resp.source
            break
    row["done"] = rec.now()
    if scope.cancelled_caught:
        row["status"] = STATUS_TIMEOUT
        rec.errors["client_timeout"] += 1


async def _open_loop(job: dict[str, Any]) -> _Recorder:
    offsets: npt.NDArray[np.float64] = job["offsets"]
    choice: npt.NDArray[np.int64] = job["choice"]
    payloads: list[bytes] = job["payloads"]
    t0 = trio.current_time() + (job["t0"] - time.monotonic())
    rec = _Recorder(len(offsets), t0)
    rec.rows["intended"] = offsets
    rec.rows["tag"] = job["tags"]
    pool = _Pool(job["host"], job["port"], job["max_conns"])
    await pool.warm(job["warm_conns"])
    try:
        async with trio.open_nursery() as nursery:
            for i, offset in enumerate(offsets):
                await trio.sleep_until(t0 + float(offset))
                nursery.start_soon(_one, pool, rec, i, payloads[choice[i]], job["timeout_s"])
            last = float(offsets[-1]) if len(offsets) else 0.0
            nursery.cancel_scope.deadline = t0 + last + job["grace_s"]
    finally:
        await pool.close_all()
    unfinished = int(np.count_nonzero(rec.rows["status"] == STATUS_UNFINISHED))
    if unfinished:
        rec.errors["unfinished_at_end"] += unfinished
    return rec


async def _closed_loop(job: dict[str, Any]) -> _Recorder:
    payloads: list[bytes] = job["payloads"]
    limit = min(job["max_requests"], int(job["duration_s"] * _MAX_CLOSED_RATE) + 1000)
    if not job["reuse"]:
        limit = min(limit, len(payloads))
    t0 = trio.current_time() + (job["t0"] - time.monotonic())
    rec = _Recorder(limit, t0)
    rec.rows["tag"] = job["tag"]
    counter = iter(range(limit))
    pool = _Pool(job["host"], job["port"], job["connections"])
    await pool.warm(job["connections"])

    async def client() -> None:
        for i in counter:
            now = rec.now()
            if now >= job["duration_s"]:
                return
            rec.rows[i]["intended"] = now
            await _one(pool, rec, i, payloads[i % len(payloads)], job["timeout_s"])

    try:
        await trio.sleep_until(t0)
        with trio.move_on_after(job["duration_s"] + job["grace_s"]):
            async with trio.open_nursery() as nursery:
                for _ in range(job["connections"]):
                    nursery.start_soon(client)
    finally:
        await pool.close_all()
    used = ~np.isnan(rec.rows["sent"])
    rec.rows = rec.rows[used]
    return rec


def _worker_main(pipe: Pipe) -> None:
    """A generator process: run jobs from *pipe* until it sends ``None``.

    It raises its own priority a little when allowed (root), so that its wake-ups are
    not delayed behind the service's threads on a small machine: its CPU time is
    small and reported, and lateness measures whatever delay is left.
    """
    with contextlib.suppress(OSError):
        os.nice(_NICE)
    while True:
        job = pipe.recv()
        if job is None:
            return
        cpu0 = _cpu_s()
        runner = _open_loop if job["mode"] == "open" else _closed_loop
        try:
            rec = trio.run(runner, job)
        except Exception as exc:  # reported to the parent, which raises it
            pipe.send({"error": f"{type(exc).__name__}: {exc}"})
            continue
        pipe.send({"rows": rec.rows, "cpu_s": _cpu_s() - cpu0, "errors": dict(rec.errors)})


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- in the parent ---------------------------------------------------------------------


class GeneratorPool:
    """``processes`` spawned generator processes, reused for every load run."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("at least one generator process is needed")
        self.processes = processes
        self._pipes: list[Pipe] = []
        self._procs: list[Any] = []

    def __enter__(self) -> GeneratorPool:
        ctx = mp.get_context("spawn")
        for _ in range(self.processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)
        return self

    def __exit__(self, *exc: object) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def start_time(self, payload_bytes: int = 0) -> float:
        """A ``time.monotonic()`` instant by which a job of that size reaches every process."""
        return time.monotonic() + _START_MARGIN_S + payload_bytes / _PICKLE_BYTES_PER_S

    def _run(
        self, jobs: list[dict[str, Any]], limit_s: float, start_at: float | None = None
    ) -> tuple[list[Any], float, float]:
        payload_bytes = sum(len(p) for job in jobs for p in job["payloads"])
        start = start_at if start_at is not None else self.start_time(payload_bytes)
        for pipe, job in zip(self._pipes, jobs, strict=False):
            job["t0"] = start
            pipe.send(job)
        replies: list[Any] = []
        for pipe in self._pipes[: len(jobs)]:
            remaining = start + limit_s + 30.0 - time.monotonic()
            if not pipe.poll(max(remaining, 1.0)):
                self.__exit__()
                raise TimeoutError("a generator process did not finish in time")
            try:
                reply = pipe.recv()
            except (EOFError, OSError) as exc:
                self.__exit__()
                raise RuntimeError("a generator process died") from exc
            if "error" in reply:
                raise RuntimeError(f"generator process failed: {reply['error']}")
            replies.append(reply)
        return replies, start, time.monotonic() - start

    def open_loop(
        self,
        host: str,
        port: int,
        payloads: Sequence[bytes],
        offsets: npt.NDArray[np.float64],
        choice: npt.NDArray[np.int64],
        *,
        tags: npt.NDArray[np.int16] | None = None,
        timeout_s: float = 30.0,
        grace_s: float = 15.0,
        max_conns: int = 512,
        warm_conns: int = 64,
        start_at: float | None = None,
    ) -> LoadResult:
        """Send ``payloads[choice[i]]`` at ``offsets[i]`` seconds after a common start.

        The start is *start_at* (``time.monotonic()``, see :meth:`start_time`) if given.
        """
        if tags is None:
            tags = np.zeros(len(offsets), dtype=np.int16)
        n = self.processes
        jobs: list[dict[str, Any]] = []
        for p in range(n):
            idx = np.arange(p, len(offsets), n)
            used, local = np.unique(choice[idx], return_inverse=True)
            jobs.append(
                {
                    "mode": "open",
                    "host": host,
                    "port": port,
                    "offsets": offsets[idx],
                    "choice": local.astype(np.int64),
                    "tags": tags[idx],
                    "payloads": [payloads[int(u)] for u in used],
                    "timeout_s": timeout_s,
                    "grace_s": grace_s,
                    "max_conns": max(1, max_conns // n),
                    "warm_conns": max(1, warm_conns // n),
                }
            )
        span = float(offsets[-1]) if len(offsets) else 0.0
        replies, t0, wall = self._run(jobs, span + grace_s, start_at)
        return _merged(
            replies,
            t0,
            wall,
            {
                "mode": "open",
                "requests": len(offsets),
                "span_s": round(span, 3),
                "processes": n,
                "max_conns": max_conns,
                "timeout_s": timeout_s,
            },
        )

    def closed_loop(
        self,
        host: str,
        port: int,
        payloads: Sequence[bytes],
        *,
        connections: int,
        duration_s: float,
        max_requests: int = 10_000_000,
        reuse: bool = True,
        tag: int = 0,
        timeout_s: float = 30.0,
    ) -> LoadResult:
        """Max throughput: *connections* clients each send again as soon as answered.

        With ``reuse=False`` each payload is sent at most once (distinct photos).
        """
        n = min(self.processes, connections)
        jobs: list[dict[str, Any]] = []
        for p in range(n):
            share = list(payloads[p::n]) if not reuse else list(payloads)
            jobs.append(
                {
                    "mode": "closed",
                    "host": host,
                    "port": port,
                    "payloads": share,
                    "connections": len(range(p, connections, n)),
                    "duration_s": duration_s,
                    "max_requests": max_requests // n,
                    "reuse": reuse,
                    "tag": tag,
                    "timeout_s": timeout_s,
                    "grace_s": timeout_s,
                }
            )
        replies, t0, wall = self._run(jobs, duration_s + timeout_s)
        return _merged(
            replies,
            t0,
            wall,
            {
                "mode": "closed",
                "connections": connections,
                "duration_s": duration_s,
                "processes": n,
                "distinct_payloads": not reuse,
            },
        )


def _merged(
    replies: Sequence[dict[str, Any]], t0: float, wall: float, params: dict[str, Any]
) -> LoadResult:
    """One result from every generator process's rows, in intended-time order."""
    rows = np.concatenate([r["rows"] for r in replies])
    rows = rows[np.argsort(rows["intended"], kind="stable")]
    return LoadResult(
        samples=rows,
        t0=t0,
        wall_s=wall,
        generator_cpu_s=sum(r["cpu_s"] for r in replies),
        client_errors=_merge_errors(replies),
        params=params,
    )


def _merge_errors(replies: Sequence[dict[str, Any]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for reply in replies:
        total.update(reply["errors"])
    return dict(total)
