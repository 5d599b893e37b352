"""Prometheus metrics: request histograms observed per request, the rest sampled.

Gauges and counters of the actors are not kept twice: :meth:`Metrics.sample`
reads every actor's ``statistics()`` snapshot and moves the Prometheus values to
match (gauges set, counters advanced by the delta since the last sample). It runs
on every scrape and once a second in the background, so that with
``--workers N`` each worker's values stay fresh in prometheus-client's
multiprocess files.

Multiprocess mode: ``xintu serve --workers N`` points ``PROMETHEUS_MULTIPROC_DIR``
at a fresh directory before the workers start; every worker then writes its
values there and ``/metrics`` on any worker aggregates all of them (counters and
histograms summed, gauges summed over live workers). In-process serving uses a
registry of its own per app.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from .actors._looplag import INTERVAL_S as LAG_INTERVAL_S
from .actors._looplag import LAG_BUCKETS_S
from .llm._errors import FAILURE_KINDS

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "multiprocess_dir"]

# Seconds; spans cache hits (sub-ms) to LLM calls (seconds).
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def multiprocess_dir() -> str | None:
    """The multiprocess directory when prometheus-client runs in that mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric of one app (one registry, so tests may build many apps)."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode values live in files; the registry only names them.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Gauges of all live workers are summed in multiprocess mode.
        live: dict[str, Literal["livesum"]] = (
            {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        )

        self.request_seconds = Histogram(
            "xintu_http_request_duration_seconds",
            "HTTP request latency by route, method and answer source.",
            ["route", "method", "source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "xintu_http_requests",
            "HTTP requests by route and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "xintu_cache_lookups", "Cache lookups by result.", ["result"], registry=r
        )
        self.cache_read_errors = Counter(
            "xintu_cache_store_read_errors",
            "Hashes whose store read failed, by how they were answered: as a miss "
            "(within store.read_error_budget: re-classified) or refused (503).",
            ["answered"],
            registry=r,
        )
        self.classifications = Counter(
            "xintu_classifications",
            "Classifications made (cache misses) by classifier.",
            ["source"],
            registry=r,
        )
        self.shed = Counter(
            "xintu_shed_requests",
            "Requests refused by admission, by reason.",
            ["reason"],
            registry=r,
        )
        self.coalesced = Counter(
            "xintu_coalesced_requests",
            "Requests that joined a classification already in flight.",
            registry=r,
        )
        self.coalesced_replicas = Counter(
            "xintu_replica_coalesced",
            "New photos answered from another replica's classification (in-flight claims).",
            registry=r,
        )
        self.writer_ops = Counter(
            "xintu_writer_operations", "Store write operations by outcome.", ["outcome"], registry=r
        )
        self.writer_retries = Counter(
            "xintu_writer_retries", "Store write batches retried.", registry=r
        )
        self.writer_poisoned = Counter(
            "xintu_writer_poisoned_batches",
            "Store write batches the store refused for good (schema or constraint errors), "
            "set aside in the poison journal.",
            registry=r,
        )
        # Every worker of one data directory sees the same files: the largest count.
        most: dict[str, Literal["livemax"]] = (
            {"multiprocess_mode": "livemax"} if self.multiprocess else {}
        )
        self.writer_poison_pending = Gauge(
            "xintu_writer_poisoned_operations",
            "Write operations in the poison journal on disk, waiting for a schema fix.",
            registry=r,
            **most,
        )
        self.worker_crashes = Counter(
            "xintu_worker_crashes", "Actor workers that crashed and were restarted.", registry=r
        )
        self.admission_live = Gauge(
            "xintu_admission_tickets_live",
            "Photos of uploads that passed the header check and have not submitted their "
            "work yet (admission tickets: one photo for an upload, a batch's expected "
            "photos; counted as work queued ahead by the next checks).",
            registry=r,
            **live,
        )
        self.admission_tickets = Counter(
            "xintu_admission_tickets",
            "Admission tickets by outcome: taken (an upload passed the header check), "
            "expired (its body took longer than server.latency_target_s), ended (its "
            "request ended without submitting work: an error or a disconnect). Taken "
            "less the other two, less the live ones, were submitted.",
            ["outcome"],
            registry=r,
        )
        self.local_processes = Gauge(
            "xintu_local_processes",
            "The local model's worker processes alive (model.executor = process).",
            registry=r,
            **live,
        )
        self.local_process_deaths = Counter(
            "xintu_local_process_deaths",
            "The local model's worker processes that died and were replaced; each "
            "photo one was classifying was answered with an error.",
            registry=r,
        )
        # The local model's own counters (LocalClassifier.statistics()), summed over
        # the local pool's classifiers (threads: one; processes: one per worker).
        self.local_faces = Counter(
            "xintu_local_face_images",
            "Images the local model's face detectors ran on (detected), and those of "
            "them with at least one face (with_faces).",
            ["outcome"],
            registry=r,
        )
        self.local_faces_found = Counter(
            "xintu_local_faces_found", "Faces the local model's detectors found.", registry=r
        )
        self.local_text = Counter(
            "xintu_local_text_images",
            "Images the local model's text path looked at, by outcome: gated_out (nothing "
            "pointed at text), settled (no text could change the answer), detected (text "
            "boxes detected), read (words read) and read_skipped (boxes found, but too "
            "few, or words could not change the answer).",
            ["outcome"],
            registry=r,
        )
        self.local_seconds = Counter(
            "xintu_local_model_seconds",
            "Wall-clock seconds in the local model, by stage: prepare (decode and "
            "faces), infer (EfficientNet, rules and text), faces, text, text_detect.",
            ["stage"],
            registry=r,
        )
        self.batch_size = Gauge(
            "xintu_local_batch_size",
            "Images per ONNX session run: the last one and the mean since start.",
            ["stat"],
            registry=r,
            **live,
        )
        self.llm_calls = Counter(
            "xintu_llm_calls",
            "LLM call attempts by provider and outcome: success, failure (the upstream's "
            "fault, counted by its breaker), abandoned (cut short by the caller's deadline, "
            "counted neither way).",
            ["provider", "outcome"],
            registry=r,
        )
        self.llm_provider_up = Gauge(
            "xintu_llm_provider_up",
            "1 while the provider's circuit breaker is closed (summed over live workers).",
            ["provider"],
            registry=r,
            **live,
        )
        self.llm_last_failure = Gauge(
            "xintu_llm_provider_last_failure",
            "1 for the kind of the provider's last failed call (unauthorized, forbidden, "
            "rate_limited, server_error, rejected, timeout, slow, connect_error, bad_answer, "
            "other), 0 for the others (summed over live workers).",
            ["provider", "kind"],
            registry=r,
            **live,
        )
        self.llm_last_failure_at = Gauge(
            "xintu_llm_provider_last_failure_timestamp_seconds",
            "Unix time of the provider's last failed call (0: none yet).",
            ["provider"],
            registry=r,
            **most,
        )
        self.llm_upgrades = Counter(
            "xintu_llm_upgrades_queued",
            "Local answers made only because the caller's deadline left the LLM no room, "
            "queued for the LLM re-classification that replaces them.",
            registry=r,
        )
        self.upgrades = Counter(
            "xintu_upgrades",
            "Upgrades of local answers served from the cache: queued (offers taken), "
            "dropped_budget (no token of store.upgrades_per_minute left), dropped_full "
            "(the queue was full), dropped_llm (the LLM pool refused the recheck), "
            "no_bytes (no spooled photo to send), sent (to the LLM pool), upgraded "
            "(an LLM re-classification finished and its answer was written over the "
            "cached one; also counts a hedge's late LLM answer).",
            ["outcome"],
            registry=r,
        )
        self.upgrade_queue = Gauge(
            "xintu_upgrade_queue_depth",
            "Upgrades waiting for the LLM (summed over live workers).",
            registry=r,
            **live,
        )
        self.spool_bytes = Gauge(
            "xintu_spool_bytes",
            "Bytes of photos kept in the spool for their upgrade (summed over live workers).",
            registry=r,
            **live,
        )
        self.llm_hedges = Counter(
            "xintu_llm_hedges",
            "Hedged LLM calls: started (the call ran past the hedge budget and the local "
            "model was started beside it), local_won / llm_won (which answered the "
            "caller), replaced (an LLM answer after the local one replaced it), "
            "withdrawn (the local answer won while the LLM call was still queued: the "
            "call was withdrawn and its re-classification queued in the background).",
            ["outcome"],
            registry=r,
        )
        self.llm_hedge_after = Gauge(
            "xintu_llm_hedge_after_seconds",
            "How long an LLM call runs now before the local model is started beside "
            "it (the recent P95 call time within llm.hedge_min_s..hedge_after_s; 0: off).",
            registry=r,
            **most,
        )
        self.llm_retries = Counter(
            "xintu_llm_retries", "LLM call retries by provider.", ["provider"], registry=r
        )
        self.fallbacks = Counter(
            "xintu_llm_fallbacks",
            "Work sent to the local model instead of the LLM.",
            ["reason"],
            registry=r,
        )
        self.inbox_depth = Gauge(
            "xintu_inbox_depth", "Items waiting in an actor's inbox.", ["actor"], registry=r, **live
        )
        self.inbox_capacity = Gauge(
            "xintu_inbox_capacity", "Bound of an actor's inbox.", ["actor"], registry=r, **live
        )
        self.in_flight = Gauge(
            "xintu_in_flight", "Work in progress by actor.", ["actor"], registry=r, **live
        )
        self.breaker_state = Gauge(
            "xintu_breaker_state",
            "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open.",
            ["provider"],
            registry=r,
            **live,
        )
        self.lru_entries = Gauge(
            "xintu_lru_entries", "Entries in the in-process LRU.", registry=r, **live
        )
        self.ready = Gauge(
            "xintu_ready", "1 when this worker is ready for traffic.", registry=r, **live
        )
        self.guard_refusals = Counter(
            "xintu_guard_refusals",
            "Requests refused by the guard: unauthorized, forbidden, rate_limited.",
            ["reason"],
            registry=r,
        )
        self.ratelimit_clients = Gauge(
            "xintu_ratelimit_clients", "Clients in the rate limiter's table.", registry=r, **live
        )
        self.idempotency = Counter(
            "xintu_idempotency_keys",
            "Idempotency-Key outcomes: claimed, completed, released, replayed, "
            "in_flight_conflict, reused, taken_over, store_error.",
            ["outcome"],
            registry=r,
        )
        self.connections_open = Gauge(
            "xintu_connections_open", "Open client connections.", registry=r, **live
        )
        self.connections_refused = Counter(
            "xintu_connections_refused",
            "Client connections answered 503 and closed: server.max_connections reached.",
            registry=r,
        )
        self.connections_accepted = Counter(
            "xintu_connections_accepted",
            "Client connections taken under server.max_connections, each a new TCP "
            "connection (those over it: xintu_connections_refused_total).",
            registry=r,
        )
        self.loop_lag = Histogram(
            "xintu_event_loop_lag_seconds",
            "How late the event loop woke a task that was due (a timer checked every "
            f"{LAG_INTERVAL_S * 1000:g} ms): a socket that became ready (an LLM answer, "
            "a request) waited about as long before it was read. One observation per "
            "wake.",
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        # The loop-lag snapshot last sampled: (counts, sums) per bucket.
        self._lag_last: tuple[tuple[int, ...], tuple[float, ...]] | None = None
        self._last: dict[str, float] = {}
        # (route, method, status, source) -> (histogram child, counter child): the
        # labels are bounded (routes, known methods, statuses, sources), and a
        # child looked up once is not looked up again on every request (issue 14).
        self._request_children: dict[tuple[str, str, int, str], tuple[Any, Any]] = {}

    # --- per request -------------------------------------------------------------

    def observe_request(
        self, route: str, method: str, status: int, source: str, seconds: float
    ) -> None:
        key = (route, method, status, source)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.request_seconds.labels(route, method, source),
                self.requests.labels(route, method, str(status)),
            )
            self._request_children[key] = children
        children[0].observe(seconds)
        children[1].inc()

    # --- sampling ----------------------------------------------------------------

    def _advance(self, counter: Any, key: str, total: float) -> None:
        """Move *counter* forward to *total* (a monotonically growing snapshot)."""
        delta = total - self._last.get(key, 0.0)
        if delta > 0:
            counter.inc(delta)
        self._last[key] = max(total, self._last.get(key, 0.0))

    def sample(self, stats: Any) -> None:
        """Bring every sampled metric up to date from a ``RuntimeStatistics``."""
        d, lp, w, c, sup = (
            stats.dispatcher,
            stats.local,
            stats.writer,
            stats.cache,
            stats.supervisor,
        )
        self.ready.set(1 if stats.ready else 0)
        for actor, depth, cap in (
            ("dispatcher", d.queued, d.max_queued),
            ("local", lp.queued, lp.max_queued),
            ("writer", w.queued, w.max_queued),
        ):
            self.inbox_depth.labels(actor).set(depth)
            self.inbox_capacity.labels(actor).set(cap)
        self.in_flight.labels("dispatcher").set(d.in_flight)
        self.in_flight.labels("local").set(lp.decoding + lp.inferring + lp.waiting_for_batch)
        self.in_flight.labels("writer").set(w.pending)
        self.lru_entries.set(c.lru_size)
        self._advance(self.cache_lookups.labels("hit"), "hit", c.lru_hits + c.store_hits)
        self._advance(self.cache_lookups.labels("miss"), "miss", c.misses)
        self._advance(
            self.cache_read_errors.labels("miss"), "read_error_miss", c.store_error_misses
        )
        self._advance(
            self.cache_read_errors.labels("refused"), "read_error_refused", c.store_error_refusals
        )
        self._advance(self.shed.labels("overloaded"), "shed", d.refused)
        self._advance(self.shed.labels("deadline"), "shed_deadline", stats.shed_for_deadline)
        self._advance(self.coalesced_replicas, "waited_hits", d.waited_hits)
        self._advance(self.coalesced, "coalesced", d.coalesced)
        self._advance(self.writer_ops.labels("applied"), "w_applied", w.ops_applied)
        self._advance(self.writer_ops.labels("dropped"), "w_dropped", w.ops_dropped)
        self._advance(self.writer_ops.labels("journaled"), "w_journaled", w.journaled_ops)
        self._advance(self.writer_retries, "w_retries", w.retries)
        self._advance(self.writer_ops.labels("poisoned"), "w_poisoned_ops", w.poisoned_ops)
        self._advance(self.writer_poisoned, "w_poisoned", w.poisoned_batches)
        self.writer_poison_pending.set(w.poison_pending_ops)
        self._advance(self.worker_crashes, "crashes", sup.crashes_total)
        admission = getattr(stats, "admission", None)
        if admission is not None:
            self.admission_live.set(admission.live)
            for outcome in ("taken", "expired", "ended"):
                self._advance(
                    self.admission_tickets.labels(outcome),
                    f"tickets_{outcome}",
                    getattr(admission, outcome),
                )
        self.local_processes.set(lp.processes)
        self._advance(self.local_process_deaths, "local_process_deaths", lp.process_deaths)
        self._advance(self.classifications.labels("local"), "local_done", lp.completed)
        self.batch_size.labels("last").set(lp.last_batch_size)
        self.batch_size.labels("mean").set(lp.mean_batch_size)
        model = getattr(stats, "local_model", None)  # LocalPool.model_statistics()
        if model is not None:
            self._sample_local_model(model)
        self._sample_llm(stats.llm, stats.fallbacks)
        self._advance(self.llm_upgrades, "upgrades", stats.upgrades_queued)
        self.llm_hedge_after.set(stats.llm.hedge_after_s or 0.0)
        for hedge_outcome, total in stats.hedges.items():
            self._advance(self.llm_hedges.labels(hedge_outcome), f"hedge:{hedge_outcome}", total)
        lag = getattr(stats, "loop_lag", None)
        if lag is not None:
            self.sample_loop_lag(lag)
        up = getattr(stats, "upgrades", None)
        if up is not None:
            for name in (
                "queued",
                "dropped_budget",
                "dropped_full",
                "dropped_llm",
                "no_bytes",
                "sent",
                "upgraded",
            ):
                self._advance(self.upgrades.labels(name), f"upgrade:{name}", getattr(up, name))
            self.upgrade_queue.set(up.queue_depth)
            self.spool_bytes.set(up.spool.bytes if up.spool is not None else 0)

    def _sample_local_model(self, m: Any) -> None:
        """The local model's counters: faces, the text path's outcomes, time."""
        f, t = m.faces, m.text
        self._advance(self.local_faces.labels("detected"), "lm:faces", f.images)
        self._advance(self.local_faces.labels("with_faces"), "lm:with_faces", f.with_faces)
        self._advance(self.local_faces_found, "lm:faces_found", f.faces)
        seconds = {"prepare": m.prepare_ms, "infer": m.infer_ms, "faces": f.total_ms}
        if t is not None:
            for outcome, total in (
                ("gated_out", t.gated_out),
                ("settled", t.settled),
                ("detected", t.ran),
                ("read", t.read),
                ("read_skipped", t.read_skipped),
            ):
                self._advance(self.local_text.labels(outcome), f"lm:text:{outcome}", total)
            seconds |= {"text": t.total_ms, "text_detect": t.detect_ms}
        for stage, ms in seconds.items():
            self._advance(self.local_seconds.labels(stage), f"lm:s:{stage}", ms / 1000.0)

    def sample_loop_lag(self, lag: Any) -> None:
        """Bring the loop-lag histogram up to date from a ``LoopLagStatistics``.

        The monitor keeps per-bucket counts and per-bucket sums of its lags; a
        Prometheus histogram takes only single observations. So the wakes new in
        each bucket since the last sample are observed at their mean lag, which lies
        in that bucket: the bucket counts and the sum come out exact. (At most
        1/interval observations a second: 10.)
        """
        counts, sums = tuple(lag.counts), tuple(lag.sums)
        last_counts, last_sums = self._lag_last or ((0,) * len(counts), (0.0,) * len(sums))
        for i, (count, total) in enumerate(zip(counts, sums, strict=True)):
            new = count - last_counts[i]
            if new <= 0:
                continue
            value = (total - last_sums[i]) / new
            # The mean of lags in (lower, upper] is in it too, but for rounding.
            if i < len(LAG_BUCKETS_S):
                value = min(value, LAG_BUCKETS_S[i])
            if i > 0:
                value = max(value, math.nextafter(LAG_BUCKETS_S[i - 1], math.inf))
            for _ in range(new):
                self.loop_lag.observe(value)
        self._lag_last = (counts, sums)

    def sample_guard(self, guard: Any) -> None:
        """Bring the guard's metrics up to date from a ``GuardStatistics``."""
        for reason in ("unauthorized", "forbidden", "rate_limited"):
            self._advance(
                self.guard_refusals.labels(reason), f"guard:{reason}", getattr(guard, reason)
            )
        self.ratelimit_clients.set(guard.clients_tracked)

    def sample_idempotency(self, idem: Any) -> None:
        """Bring the idempotency metrics up to date from an ``IdempotencyStatistics``."""
        for outcome, field in (
            ("claimed", "claimed"),
            ("completed", "completed"),
            ("released", "released"),
            ("replayed", "replayed"),
            ("in_flight_conflict", "in_flight_conflicts"),
            ("reused", "reused"),
            ("taken_over", "taken_over"),
            ("store_error", "store_errors"),
        ):
            self._advance(self.idempotency.labels(outcome), f"idem:{outcome}", getattr(idem, field))

    def sample_connections(self, conns: Any) -> None:
        """Bring the connection metrics up to date from a ``ConnectionStatistics``."""
        self.connections_open.set(conns.open)
        self._advance(self.connections_refused, "conn_refused", conns.refused)
        self._advance(self.connections_accepted, "conn_accepted", conns.accepted)

    def _sample_llm(self, llm: Any, fallbacks: Mapping[str, int]) -> None:
        state_code = {"closed": 0, "half_open": 1, "open": 2}
        for p in llm.providers:
            self.breaker_state.labels(p.name).set(state_code.get(str(p.breaker.state), 0))
            self._advance(self.llm_calls.labels(p.name, "success"), f"ok:{p.name}", p.successes)
            self._advance(self.llm_calls.labels(p.name, "failure"), f"ko:{p.name}", p.failures)
            self._advance(self.llm_retries.labels(p.name), f"retry:{p.name}", p.retries)
            self._advance(
                self.llm_calls.labels(p.name, "abandoned"), f"abandoned:{p.name}", p.abandoned
            )
            self.llm_provider_up.labels(p.name).set(1 if str(p.breaker.state) == "closed" else 0)
            for kind in FAILURE_KINDS:
                self.llm_last_failure.labels(p.name, kind).set(1 if p.last_failure == kind else 0)
            at = p.last_failure_at
            self.llm_last_failure_at.labels(p.name).set(at.timestamp() if at else 0)
        for reason, total in fallbacks.items():
            self._advance(self.fallbacks.labels(reason), f"fallback:{reason}", total)
        self._advance(self.classifications.labels("llm"), "llm_done", llm.succeeded)
        self.inbox_depth.labels("llm").set(llm.queued)
        self.inbox_capacity.labels("llm").set(llm.max_queued)
        self.in_flight.labels("llm").set(llm.busy)

    def render(self) -> bytes:
        """The exposition text: this process, or every worker in multiprocess mode."""
        if self.multiprocess:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
