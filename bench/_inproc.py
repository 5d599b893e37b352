"""In-process measurements: bare onnxruntime, the classifier's own path, decode cost.

These run in the harness process while no service is running. Throughput is
measured by ``threads`` Python threads, each repeating one unit of work until a
shared deadline (onnxruntime and Pillow release the GIL, as the service's worker
threads rely on); the result is images per second of wall time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bare_onnxruntime", "classifier_path", "decode_cost", "pool_throughput", "throughput"]


def throughput(unit: Callable[[int], int], *, threads: int, seconds: float) -> float:
    """Images/s of *threads* threads calling ``unit(i)`` (returns images done) until time."""
    unit(0)  # warm-up: the first run allocates and plans
    stop = time.perf_counter() + seconds

    def loop(worker: int) -> int:
        done, i = 0, worker
        while time.perf_counter() < stop:
            done += unit(i)
            i += threads
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(loop, range(threads)))
    return total / (time.perf_counter() - start)


def bare_onnxruntime(
    model_path: Path, *, intra_op_threads: int, threads: int, batch: int, seconds: float
) -> float:
    """Images/s of ``session.run`` alone on random input, the service's session options."""
    from xintu.model import INPUT_NAME, OUTPUT_NAME, create_session

    session = create_session(model_path, intra_op_threads=intra_op_threads)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)

    def unit(_i: int) -> int:
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return batch

    return throughput(unit, threads=threads, seconds=seconds)


def classifier_path(
    classifier: Any, photos: Sequence[bytes], *, threads: int, batch: int, seconds: float
) -> float:
    """Images/s of ``prepare`` (decode, preprocess, detectors) then ``infer`` on a batch."""

    def unit(i: int) -> int:
        start = (i * batch) % len(photos)
        prepared = [classifier.prepare(photos[(start + k) % len(photos)]) for k in range(batch)]
        classifier.infer(prepared)
        return batch

    return throughput(unit, threads=threads, seconds=seconds)


def decode_cost(fn: Callable[[bytes], Any], data: bytes, *, repeats: int) -> dict[str, float]:
    """Median, P90 and min milliseconds of ``fn(data)`` over *repeats* runs (after one
    warm-up)."""
    fn(data)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(data)
        times.append((time.perf_counter() - t0) * 1000.0)
    ordered = sorted(times)
    return {
        "median_ms": round(statistics.median(times), 2),
        "p90_ms": round(ordered[round(0.9 * (len(ordered) - 1))], 2),
        "min_ms": round(min(times), 2),
        "repeats": repeats,
    }


def pool_throughput(
    model: Any,
    photos: Sequence[bytes],
    *,
    decode_threads: int,
    inference_threads: int,
    max_batch: int,
    max_wait_ms: int,
) -> dict[str, float]:
    """Images/s of a :class:`~xintu.actors.LocalPool` around *model*, every photo
    queued at once (a backlog: what batching is for), with its mean batch size."""
    import trio

    from xintu.actors import ClassifyRequest, LocalPool

    async def main() -> dict[str, float]:
        pool = LocalPool(
            model,
            inbox_size=len(photos) + 1,
            decode_threads=decode_threads,
            inference_threads=inference_threads,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
        )
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            async with trio.open_nursery() as callers:
                for i, data in enumerate(photos):
                    request = ClassifyRequest(data, f"{i:064x}", "bench")
                    callers.start_soon(pool.classify, request, trio.current_time() + 600)
            pool.close()
        stats = pool.statistics()
        return {
            "img_s": round(len(photos) / (time.perf_counter() - start), 1),
            "runs": stats.batches,
            "mean_batch": round(stats.mean_batch_size, 2),
        }

    return trio.run(main)
