"""Scenario 5, local: the local classifier path, with no LLM configured.

Three layers, each against bare onnxruntime on the same model file, session options
and thread count, measured in the same run:

1. in-process: images/s of ``LocalClassifier.prepare`` + ``infer`` at batch 1 on one
   thread, at batch 1 on ``model.inference_threads`` threads, and at
   ``model.max_batch`` on those threads; decode + preprocess milliseconds for a
   640x480 and a 12-megapixel JPEG (``decode_image`` alone, and ``prepare``, which
   adds the face/people detectors), median and P90; the local pool itself
   (``LocalPool``, ``model.decode_threads`` + ``model.inference_threads``) with a
   backlog of queued photos at ``max_batch`` 1 and 8, alternated, for what batching
   gives on this machine;
2. the service (its configured ``model.executor``: worker processes by default,
   ``--env XINTU_MODEL_EXECUTOR=thread`` for threads): ``POST /api/v1/classify`` on
   distinct photos (every one a miss), a closed loop for the maximum images/s and its
   P99, then an open loop at 70 % of it for the latency a client sees below saturation.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from .._context import Bench, missing_service
from .._inproc import bare_onnxruntime, classifier_path, decode_cost, pool_throughput
from .._loadgen import poisson_schedule
from .._photos import single_photo
from .._report import Check, Outcome, Row
from .._stats import summarize

__all__ = ["run"]

_OPEN_FRACTION = 0.7
_CLOSED_CONNECTIONS = 8


def _config(bench: Bench) -> Any:
    from xintu import load_config

    env = {k: v for k, v in bench.settings.env.items() if k.startswith("XINTU_")}
    return load_config(env=env, data={"dir": str(bench.data_dir)})


def _in_process(bench: Bench, config: Any) -> dict[str, Any]:
    from xintu.vision import build_local_model, decode_image

    path = bench.model_path()
    m = config.model
    secs = bench.dur(2.5, 0.6)
    threads = m.inference_threads
    # Batch 8 whatever the config: the comparison that says whether batching pays.
    shapes = [(1, 1), (threads, 1), (threads, 8)]
    if bench.settings.quick:
        shapes = [(threads, 1), (threads, 8)]
    classifier = build_local_model(config)  # model.kind, in the run's data directory (path)
    photos = bench.photos(64, "inproc")
    out: dict[str, Any] = {"intra_op_threads": m.intra_op_threads, "runs": []}
    for n_threads, batch in shapes:
        ort = bare_onnxruntime(
            path, intra_op_threads=m.intra_op_threads, threads=n_threads, batch=batch, seconds=secs
        )
        ours = classifier_path(classifier, photos, threads=n_threads, batch=batch, seconds=secs)
        out["runs"].append(
            {"threads": n_threads, "batch": batch, "ort_img_s": ort, "classifier_img_s": ours}
        )
    small = photos[0]
    large = single_photo((4000, 3000), seed=bench.settings.seed)
    out["jpeg_bytes"] = {"640x480": len(small), "12MP": len(large)}
    small_n, large_n = int(bench.dur(30, 3)), int(bench.dur(8, 1))
    out["decode"] = {
        "640x480": decode_cost(lambda d: decode_image(d, config.images), small, repeats=small_n),
        "12MP": decode_cost(lambda d: decode_image(d, config.images), large, repeats=large_n),
    }
    out["prepare"] = {
        "640x480": decode_cost(classifier.prepare, small, repeats=small_n),
        "12MP": decode_cost(classifier.prepare, large, repeats=large_n),
    }
    out["pool"] = _pool_batching(bench, classifier, m)
    return out


def _pool_batching(bench: Bench, classifier: Any, m: Any) -> dict[str, Any]:
    """The pool at max_batch 1 and 8 on one backlog size, alternated (1, 8, 8, 1, ...):
    the ratio of the pairs is what to read on a busy machine."""
    photos = bench.photos(int(bench.dur(48, 16)), "pool")
    runs: dict[int, list[dict[str, float]]] = {1: [], 8: []}
    order = (1, 8, 8, 1) * (2 if not bench.settings.quick else 1)
    for max_batch in order:
        runs[max_batch].append(
            pool_throughput(
                classifier,
                photos,
                decode_threads=m.decode_threads,
                inference_threads=m.inference_threads,
                max_batch=max_batch,
                max_wait_ms=m.max_wait_ms,
            )
        )
    ratios = [b8["img_s"] / b1["img_s"] for b1, b8 in zip(runs[1], runs[8], strict=True)]
    return {
        "photos": len(photos),
        "max_wait_ms": m.max_wait_ms,
        "runs": {str(k): v for k, v in runs.items()},
        "median_img_s": {str(k): statistics.median(r["img_s"] for r in v) for k, v in runs.items()},
        "mean_batch": {
            str(k): statistics.median(r["mean_batch"] for r in v) for k, v in runs.items()
        },
        "ratio_8_to_1": round(statistics.median(ratios), 3),
    }


def _service(bench: Bench, in_process: float) -> dict[str, Any]:
    closed_s = bench.dur(10.0, 2.0)
    open_s = bench.dur(8.0, 1.5)
    # More photos than the service could classify in the time, each sent once.
    photos = bench.photos(int(closed_s * max(40.0, 5 * in_process)) + 50, "local-closed")
    out: dict[str, Any] = {}
    with bench.xintu("local") as svc:
        warm = bench.photos(4, "local-warm")
        bench.closed(svc, bench.classify_payloads(svc, warm), reuse=False, duration_s=30.0)
        payloads = bench.classify_payloads(svc, photos)
        cpu0 = svc.cpu_seconds()
        closed = bench.closed(
            svc, payloads, reuse=False, duration_s=closed_s, connections=_CLOSED_CONNECTIONS
        )
        cpu = svc.cpu_seconds() - cpu0
        last = float(np.nanmax(closed.samples["done"])) if len(closed.samples) else closed_s
        s = summarize(closed.samples, duration_s=min(closed_s, last))
        s["service_cpu_s"] = round(cpu, 2)
        s["generator_cpu_s"] = round(closed.generator_cpu_s, 2)
        s["photos_exhausted"] = len(closed.samples) >= len(photos)
        out["closed"] = s
        rate = _OPEN_FRACTION * s["goodput_rps"]
        offsets = poisson_schedule([(open_s, rate)], seed=bench.settings.seed + 5)
        fresh = bench.photos(len(offsets), "local-open")
        opened = bench.open(
            svc,
            bench.classify_payloads(svc, fresh),
            offsets,
            np.arange(len(offsets)),
            max_conns=64,
            warm_conns=64,
        )
        out["open"] = summarize(opened.samples, start=0.0, end=open_s)
    return out


def run(bench: Bench) -> Outcome:
    """Scenario 5."""
    t0 = time.monotonic()
    out = Outcome("local")
    try:
        config = _config(bench)
        inproc = _in_process(bench, config)
    except ImportError as exc:
        return Outcome("local", status="skipped", reason=f"the classifier has not landed: {exc}")
    out.details["in_process"] = inproc
    thr = config.model.inference_threads
    intra = config.model.intra_op_threads
    for r in inproc["runs"]:
        out.rows.append(
            Row(
                f"in-process prepare+infer, batch {r['batch']}, {r['threads']} thread(s)",
                r["classifier_img_s"],
                "img/s",
                "bare onnxruntime",
                r["ort_img_s"],
                f"intra_op_threads={intra}; 640x480 JPEGs; prepare = decode, resize, detectors",
            )
        )
    for what, key in (("decode+preprocess", "decode"), ("prepare (+detectors)", "prepare")):
        for size in ("640x480", "12MP"):
            cost = inproc[key][size]
            out.rows.append(
                Row(
                    f"{what} {size} JPEG",
                    cost["median_ms"],
                    "ms",
                    note=f"median of {cost['repeats']}, P90 {cost['p90_ms']} ms, "
                    f"min {cost['min_ms']} ms, "
                    f"{inproc['jpeg_bytes'][size] // 1024} KiB",
                )
            )
    pool = inproc["pool"]
    for mb in ("1", "8"):
        out.rows.append(
            Row(
                f"local pool, backlog of {pool['photos']} photos, max_batch {mb}",
                pool["median_img_s"][mb],
                "img/s",
                "max_batch 1" if mb == "8" else "",
                pool["median_img_s"]["1"] if mb == "8" else None,
                f"{thr} inference + {config.model.decode_threads} decode threads, "
                f"intra_op_threads={intra}, max_wait_ms={pool['max_wait_ms']}; "
                f"mean batch {pool['mean_batch'][mb]}"
                + (
                    f"; median ratio of alternated pairs {pool['ratio_8_to_1']}"
                    if mb == "8"
                    else ""
                ),
            )
        )
    best = max(inproc["runs"], key=lambda r: r["ort_img_s"])
    # The shape the service runs (its threads and max_batch), else the nearest.
    pipeline = min(
        inproc["runs"],
        key=lambda r: (r["threads"] != thr, abs(r["batch"] - config.model.max_batch)),
    )
    if (why := missing_service()) is not None:
        out.rows.append(Row("service: POST /classify (misses)", None, "", note=f"skipped: {why}"))
        out.seconds = time.monotonic() - t0
        return out
    service = _service(bench, pipeline["classifier_img_s"])
    out.details["service"] = service
    bench.measured["local_img_s"] = service["closed"]["goodput_rps"]
    if (p99 := service["open"]["latency_accepted_ms"]["p99"]) is not None:
        bench.measured["local_open_p99_ms"] = p99  # the outage scenario compares with it
    closed, opened = service["closed"], service["open"]
    lat = closed["latency_accepted_ms"]
    out.rows += [
        Row(
            "service POST /classify max throughput (closed loop, every photo new)",
            closed["goodput_rps"],
            "img/s",
            f"bare onnxruntime batch {best['batch']}, {best['threads']} thr",
            best["ort_img_s"],
            f"{_CLOSED_CONNECTIONS} connections; model.executor "
            f"{getattr(config.model, 'executor', 'thread')}; P50 {lat['p50']} ms; "
            f"service CPU {closed['service_cpu_s']} s, generator CPU {closed['generator_cpu_s']} s"
            + ("; **ran out of photos**" if closed["photos_exhausted"] else ""),
        ),
        Row(
            "service POST /classify max throughput vs in-process path",
            closed["goodput_rps"],
            "img/s",
            f"in-process batch {pipeline['batch']}, {thr} thr",
            pipeline["classifier_img_s"],
            "HTTP, multipart, hashing, actors and store on top of prepare+infer",
        ),
        Row("service POST /classify P99 at max (closed loop)", lat["p99"], "ms"),
        Row(
            f"service POST /classify P99 at {round(_OPEN_FRACTION * 100)}% of max (open loop)",
            opened["latency_accepted_ms"]["p99"],
            "ms",
            note=f"{opened['offered_rps']:.0f} img/s offered; "
            f"P50 {opened['latency_accepted_ms']['p50']} ms, "
            f"P99.9 {opened['latency_accepted_ms']['p999']} ms; "
            f"generator lagged: {opened['lateness']['generator_lagged']}",
        ),
    ]
    out.rows.append(bench.rss_row("local"))
    answered = closed["accepted"] + opened["accepted"]
    local = closed["sources"].get("local", 0) + opened["sources"].get("local", 0)
    out.checks.append(
        Check(
            "every classify answered 200 by the local model",
            closed["errors"] + opened["errors"] + closed["refused"] + opened["refused"] == 0
            and local == answered,
            f"closed {closed['status_counts']}, open {opened['status_counts']}, "
            f"sources {closed['sources']} / {opened['sources']}",
        )
    )
    out.seconds = time.monotonic() - t0
    return out
