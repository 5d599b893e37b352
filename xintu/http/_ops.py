"""Operational endpoints: liveness, readiness and the OpenAPI document.

``/readyz`` answers 200 while the process can serve and 503 when it cannot
(starting, draining, actors crashing, no model, and, only with
``server.ready_without_store = false``, a store that does not answer). Its body
says what is wrong either way: ``degraded`` with ``reasons`` (a store that does
not answer while the process stays ready, writes failing, an LLM provider whose
breaker is not closed, with the kind of its last failure), and every check.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import trio
from quart import Blueprint, Response

from .._metrics import CONTENT_TYPE_LATEST
from ..actors import RuntimeStatistics
from ..errors import Unavailable
from ._app import current_xintu, sample_metrics
from ._openapi import openapi_document
from ._respond import json_response, now_iso

__all__ = ["ops"]

ops = Blueprint("ops", __name__)

_READY_STORE_TIMEOUT_S = 1.0


@ops.get("/healthz")
async def healthz() -> Response:
    """Alive: the process answers. Never touches the store."""
    return json_response({"status": "ok"})


@ops.get("/api/v1/health")
async def health() -> Response:
    """The original backend's health check, which its album app calls at start.

    Always 200, as the original: ``status`` is ``healthy`` when the store answers
    and a classifier is loaded (the local model suffices: unlike the original,
    Xintu classifies without an LLM); ``database`` is ``connected`` or
    ``disconnected``; ``model_api`` is ``available`` when LLM providers are
    configured, else ``not_configured``. The extension ``llm_providers`` gives each
    provider's ``state`` (its breaker: ``closed``, ``open``, ``half_open``), the kind
    of its ``last_error`` (``unauthorized``, ``timeout``, …, or ``null``) and
    ``last_error_at`` (ISO 8601 UTC, or ``null``).
    """
    runtime = current_xintu().runtime_if_started()
    database = "disconnected"
    providers: dict[str, dict[str, str | None]] = {}
    loaded = False
    if runtime is not None:
        readiness = await runtime.readiness(store_timeout_s=_READY_STORE_TIMEOUT_S)
        database = "connected" if readiness.store == "ok" else "disconnected"
        providers = {
            name: {
                "state": p.state,
                "last_error": p.last_failure,
                "last_error_at": _iso(p.last_failure_at),
            }
            for name, p in readiness.providers.items()
        }
        loaded = readiness.model_loaded and readiness.running
    healthy = database == "connected" and loaded
    return json_response(
        {
            "status": "healthy" if healthy else "unhealthy",
            "timestamp": now_iso(),
            "database": database,
            "model_api": "available" if providers else "not_configured",
            "llm_providers": providers,
        }
    )


@ops.get("/readyz")
async def readyz() -> Response:
    """Ready for traffic (see the module docstring); the body says what is wrong."""
    runtime = current_xintu().runtime_if_started()
    checks: dict[str, Any] = {}
    if runtime is None:
        checks["runtime"] = "starting"
        body = {"ready": False, "degraded": False, "reasons": [], "checks": checks}
        return json_response(body, 503)
    readiness = await runtime.readiness(store_timeout_s=_READY_STORE_TIMEOUT_S)
    checks["draining"] = readiness.draining
    checks["actors_running"] = readiness.running
    checks["actors_healthy"] = readiness.actors_healthy
    checks["model_loaded"] = readiness.model_loaded
    checks["breakers"] = readiness.breakers
    # Flat strings per provider (the album page lists checks two levels deep).
    checks["llm_last_failure"] = {
        name: _last_failure(p.last_failure, p.last_failure_at)
        for name, p in readiness.providers.items()
    }
    checks["writer"] = "ok" if readiness.writer_healthy else "retrying (store writes failing)"
    checks["store"] = readiness.store
    ready = readiness.ready
    body = {
        "ready": ready,
        "degraded": readiness.degraded,
        "reasons": readiness.reasons,
        "checks": checks,
    }
    return json_response(body, 200 if ready else 503)


def _iso(at: datetime | None) -> str | None:
    return at.isoformat(timespec="seconds").replace("+00:00", "Z") if at else None


def _last_failure(kind: str | None, at: datetime | None) -> str:
    """``none``, or the kind and when: ``unauthorized at 2025-01-02T03:04:05Z``."""
    return f"{kind} at {_iso(at)}" if kind else "none"


@ops.get("/metrics")
async def metrics() -> Response:
    """Prometheus exposition (all workers' values with ``--workers N``)."""
    app = current_xintu()
    if app.runtime_if_started() is not None:
        sample_metrics(app)
    body = app.metrics.render()
    return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)


# /api/v1/stats is computed by the store; polling it more often than this reuses
# the last answer.
_STATS_TTL_S = 2.0


@ops.get("/api/v1/stats")
async def stats() -> Response:
    """Album totals and distributions from the store, plus this worker's actors."""
    app = current_xintu()
    runtime = app.runtime_if_started()
    if runtime is None:
        raise Unavailable("starting", retry_after_s=1.0)
    now = trio.current_time()
    cached = app.stats_cache
    if cached is None or now - cached[0] > _STATS_TTL_S:
        album = await runtime.album_stats()
        cached = (now, album.as_dict())
        app.stats_cache = cached
    body = dict(cached[1])
    body["service"] = _service(runtime.statistics())
    body["success"] = True
    return json_response(body)


def _service(stats: RuntimeStatistics) -> dict[str, Any]:
    """This worker's actors, for the album page's live panel and operators."""
    d, lp, w, c, llm = stats.dispatcher, stats.local, stats.writer, stats.cache, stats.llm
    return {
        "ready": stats.ready,
        "draining": stats.draining,
        "queues": {
            "dispatcher": {"depth": d.queued, "capacity": d.max_queued, "in_flight": d.in_flight},
            "local": {
                "depth": lp.queued,
                "capacity": lp.max_queued,
                "batch_mean": round(lp.mean_batch_size, 2),
                "priority_lane": lp.urgent,
            },
            "llm": {"depth": llm.queued, "capacity": llm.max_queued, "busy": llm.busy},
            "writer": {
                "depth": w.queued,
                "capacity": w.max_queued,
                "store_healthy": w.store_healthy,
            },
        },
        "lru": {"size": c.lru_size, "max": c.lru_max, "hits": c.lru_hits},
        "shed": d.refused,
        "coalesced": d.coalesced,
        "fallbacks": dict(stats.fallbacks),
        "breakers": {p.name: str(p.breaker.state) for p in llm.providers},
    }


@ops.get("/openapi.json")
async def openapi() -> Response:
    return json_response(openapi_document(current_xintu().xintu_config))
