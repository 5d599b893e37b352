"""Scenario 'loopshare': the event loop's share while the local path is saturated.

No LLM is configured, so every new photo goes to the local model. After seeding
:data:`KNOWN` photos, one open loop sends ``check-cache`` hits for them at a modest
:data:`HIT_RATE` per second throughout, first alone for :data:`REST_S` seconds (at
rest), then for :data:`SATURATED_S` seconds beside a Poisson stream of new 640x480
photos (``POST /api/v1/classify``) at :data:`MISS_RATE` per second, well above what
the local path can classify on this machine. A hit needs nothing but the event
loop (the LRU answers it), so its latency is how long the loop took to get to it:
what a starved loop would also do to an LLM answer that has arrived.

It runs the service once per variant in :data:`VARIANTS` (``model.executor``: the
local model in threads of the service process, or in worker processes, with and
without their ``model.process_nice``), one after the other in the same run, so
they are compared in one sitting. A service that has no ``model.executor`` runs
once, as configured.

Measured per executor: hits' P99 at rest and saturated (and their ratio, checked
against :data:`MAX_HIT_RATIO`), the new photos answered per second (the local
path's throughput under the burst), accepted and refused P99 of the new photos,
the service's event-loop lag P99 at rest and saturated (``xintu_event_loop_lag_seconds``
on ``/metrics``, scraped as each phase starts and ends: how late anything that
has arrived, an LLM answer too, is read), and the service's CPU seconds and peak
RSS (summed over its process tree).
Bounded: the load ends after ``REST_S + SATURATED_S`` seconds and stragglers wait
at most the request deadline; 127.0.0.1 only.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._context import Bench, missing_service
from .._loadgen import poisson_schedule
from .._photos import sha256
from .._report import Check, Outcome, Row, loop_lag_row
from .._services import MetricsAt, process_tree, read_proc
from .._stats import histogram_window, summarize
from ._mixed import TAG_HIT, TAG_MISS

__all__ = ["run"]

KNOWN = 32
HIT_RATE = 50.0
MISS_RATE = 60.0
REST_S = 8.0
SATURATED_S = 12.0
#: The target: hits' P99 with the local path saturated <= this x their P99 at rest.
MAX_HIT_RATIO = 2.0
#: The services compared: (label, settings). "process-nice0" shows what the worker
#: processes' niceness (model.process_nice) adds to the processes alone.
VARIANTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("thread", {"XINTU_MODEL_EXECUTOR": "thread"}),
    ("process-nice0", {"XINTU_MODEL_EXECUTOR": "process", "XINTU_MODEL_PROCESS_NICE": "0"}),
    ("process", {"XINTU_MODEL_EXECUTOR": "process"}),
)
LAG = "xintu_event_loop_lag_seconds"
#: The new photos' window leaves out the first seconds of the burst (the queue
#: filling up) when the throughput is computed.
_WARMUP_S = 2.0


def _tree_usage(pid: int) -> tuple[float, float, int]:
    """(CPU seconds, resident MiB, processes) of *pid*'s process tree now (the
    harness's tree: children of any thread, as the local pool's processes are)."""
    cpu, rss_kib, n = 0.0, 0, 0
    for p in process_tree(pid):
        got = read_proc(p)
        if got is None:
            continue
        n += 1
        _hwm, rss, seconds = got
        cpu += seconds
        rss_kib += rss
    return cpu, rss_kib / 1024.0, n


def _variants() -> tuple[tuple[str, dict[str, str]], ...]:
    """The variants this service knows (without model.executor: one, as configured)."""
    from xintu import load_config

    model = load_config(env={}).model
    if not hasattr(model, "executor"):
        return (("", {}),)
    return tuple(v for v in VARIANTS if hasattr(model, "process_nice") or "nice" not in v[0])


def _measure(bench: Bench, executor: str, env: dict[str, str]) -> dict[str, Any]:
    label = f"loopshare-{executor}" if executor else "loopshare"
    rest_s, sat_s = bench.dur(REST_S, 3.0), bench.dur(SATURATED_S, 5.0)
    seed = bench.settings.seed + 11
    known = bench.photos(int(bench.dur(KNOWN, 16)), "loopshare-known")
    with bench.xintu(label, env=env) as svc:
        out: dict[str, Any] = {"executor": executor or "configured", "env": env}
        out["seeding"] = {
            k: v
            for k, v in bench.seed(svc, known, connections=2).items()
            if k in ("accepted", "goodput_rps", "latency_accepted_ms")
        }
        hits = bench.check_cache_payloads(svc, [sha256(p) for p in known])
        bench.closed(svc, hits, duration_s=1.0, connections=4)  # warm: connections, LRU
        hit_off = poisson_schedule([(rest_s + sat_s, HIT_RATE)], seed=seed)
        miss_off = rest_s + poisson_schedule([(sat_s, MISS_RATE)], seed=seed + 1)
        fresh = bench.photos(len(miss_off), f"loopshare-new-{executor}")
        payloads = hits + bench.classify_payloads(svc, fresh)
        rng = np.random.default_rng(seed)
        offsets = np.concatenate([hit_off, miss_off])
        choice = np.concatenate(
            [rng.integers(0, len(hits), len(hit_off)), len(hits) + np.arange(len(miss_off))]
        ).astype(np.int64)
        tags = np.concatenate(
            [np.full(len(hit_off), TAG_HIT), np.full(len(miss_off), TAG_MISS)]
        ).astype(np.int16)
        order = np.argsort(offsets, kind="stable")
        cpu0, _, _ = _tree_usage(svc.proc.pid)
        t0 = bench.gen.start_time(sum(len(p) for p in payloads))
        phases = {"start": t0, "saturated": t0 + rest_s, "end": t0 + rest_s + sat_s}
        scrapes = MetricsAt(svc, phases, (LAG,))
        try:
            result = bench.open(
                svc,
                payloads,
                offsets[order],
                choice[order],
                tags=tags[order],
                timeout_s=30.0,
                grace_s=15.0,
                max_conns=512,
                warm_conns=64,
                start_at=t0,
            )
            scrapes.join()
        finally:
            scrapes.cancel()
        out["loop_lag_rest"] = histogram_window(scrapes.get("start"), scrapes.get("saturated"), LAG)
        out["loop_lag_saturated"] = histogram_window(
            scrapes.get("saturated"), scrapes.get("end"), LAG
        )
        cpu1, rss_mib, processes = _tree_usage(svc.proc.pid)
        out["service_cpu_s"] = round(cpu1 - cpu0, 2)
        out["service_rss_mib"] = round(rss_mib, 1)
        out["service_processes"] = processes
    s = result.samples
    end = rest_s + sat_s
    out["rest_hits"] = summarize(s, start=0.0, end=rest_s, tag=TAG_HIT)
    out["saturated_hits"] = summarize(s, start=rest_s, end=end, tag=TAG_HIT)
    out["saturated_new"] = summarize(s, start=rest_s, end=end, tag=TAG_MISS)
    steady = summarize(s, start=rest_s + _WARMUP_S, end=end, tag=TAG_MISS)
    out["local_photos_s"] = steady["goodput_rps"]
    out["generator_cpu_s"] = round(result.generator_cpu_s, 2)
    out["client_errors"] = result.client_errors
    out["label"] = label
    return out


def _rows(bench: Bench, m: dict[str, Any]) -> list[Row]:
    ex = m["executor"]
    rest, sat, new = m["rest_hits"], m["saturated_hits"], m["saturated_new"]
    r_lat, s_lat = rest["latency_accepted_ms"], sat["latency_accepted_ms"]
    acc, ref = new["latency_accepted_ms"], new["latency_refused_ms"]
    return [
        Row(f"hits P99 at rest ({ex})", r_lat["p99"], "ms", note=f"P50 {r_lat['p50']} ms"),
        Row(
            f"hits P99, local path saturated ({ex})",
            s_lat["p99"],
            "ms",
            "hits P99 at rest",
            r_lat["p99"],
            f"P50 {s_lat['p50']} ms, max {s_lat['max']} ms; {sat['accepted']} hits, "
            f"statuses {sat['status_counts']}",
        ),
        Row(
            f"new photos answered by the local model ({ex})",
            m["local_photos_s"],
            "photos/s",
            "offered",
            new["offered_rps"],
            f"{new['accepted']} answered, {new['refused']} refused, statuses "
            f"{new['status_counts']}; accepted P50 {acc['p50']} ms, P99 {acc['p99']} ms",
        ),
        Row(
            f"refusals P99, local path saturated ({ex})",
            ref["p99"],
            "ms",
            note=f"P50 {ref['p50']} ms over {ref['count']}",
        ),
        loop_lag_row(
            f"event-loop lag P99, local path saturated ({ex})",
            m["loop_lag_saturated"],
            "at rest",
            m["loop_lag_rest"]["p99"],
        ),
        Row(
            f"service CPU under the load ({ex})",
            m["service_cpu_s"],
            "s",
            note=f"the service's process tree; generator CPU {m['generator_cpu_s']} s",
        ),
        Row(
            f"service RSS after the load ({ex})",
            m["service_rss_mib"],
            "MiB",
            note=f"VmRSS summed over its {m['service_processes']} process(es)",
        ),
    ]


def _checks(m: dict[str, Any]) -> list[Check]:
    ex = m["executor"]
    rest = m["rest_hits"]["latency_accepted_ms"]["p99"] or 0.0
    sat = m["saturated_hits"]["latency_accepted_ms"]["p99"]
    hits_ok = m["saturated_hits"]["errors"] + m["saturated_hits"]["refused"] == 0
    return [
        Check(
            f"hits' P99 saturated <= {MAX_HIT_RATIO:g}x at rest ({ex})",
            sat is not None and rest > 0 and sat <= MAX_HIT_RATIO * rest,
            f"{sat} ms vs {rest} ms at rest",
        ),
        Check(
            f"every hit answered 200 ({ex})",
            hits_ok,
            f"statuses {m['saturated_hits']['status_counts']}",
        ),
        Check(
            f"new photos: only 200 or 503 with Retry-After ({ex})",
            m["saturated_new"]["errors"] == 0
            and m["saturated_new"]["refused_with_retry_after"] == m["saturated_new"]["refused"],
            f"statuses {m['saturated_new']['status_counts']}",
        ),
    ]


def run(bench: Bench) -> Outcome:
    """Scenario 'loopshare'."""
    if (why := missing_service()) is not None:
        return Outcome("loopshare", status="skipped", reason=why)
    t0 = time.monotonic()
    out = Outcome("loopshare")
    out.details["params"] = {
        "known": KNOWN,
        "hit_rate_rps": HIT_RATE,
        "miss_rate_rps": MISS_RATE,
        "rest_s": bench.dur(REST_S, 3.0),
        "saturated_s": bench.dur(SATURATED_S, 5.0),
    }
    for executor, env in _variants():
        m = _measure(bench, executor, env)
        out.details[m["executor"]] = m
        out.rows += _rows(bench, m)
        out.checks += _checks(m)
    out.seconds = time.monotonic() - t0
    return out
