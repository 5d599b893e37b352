"""The Quart-Trio application: lifecycle, request ids and error handling.

The actor runtime starts in ``before_serving`` inside quart-trio's app nursery,
so it is ready before the first request is accepted, and drains in
``after_serving``, after Hypercorn has finished the in-flight requests.

Handlers reach the app through :func:`current_xintu` (typed), and the actors only
through the runtime's facade (:class:`~xintu.actors.Runtime`: lookups, classify,
aliases, the request log, readiness, statistics), never an actor directly.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable
from typing import Any

import structlog
import trio
from quart import Request, Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .._config import Config
from .._connections import ConnectionGate
from .._metrics import Metrics
from ..actors import LocalModel, Runtime
from ..actors._procs import ProcessModel
from ..errors import BadRequest, PayloadTooLarge, RequestTimeout, XintuError
from ..store import Store, open_store
from ._respond import error_body, error_response, json_response

__all__ = [
    "XintuApp",
    "begin_request",
    "body_timeout_error",
    "create_app",
    "current_xintu",
    "finish_response",
    "unexpected_error_response",
]

log = structlog.get_logger("xintu.http")

ModelFactory = Callable[[Config], LocalModel[Any] | ProcessModel]


def _default_model(config: Config) -> LocalModel[Any] | ProcessModel:
    """The local model of ``model.kind`` (xintu.vision's factory): here, or in the
    local pool's worker processes (``model.executor``), which build it themselves
    once its files are in the data directory."""
    from ..vision import build_local_model, ensure_local_model_files

    if config.model.executor == "process":
        ensure_local_model_files(config)
        return ProcessModel(config, build=build_local_model)
    return build_local_model(config)


class XintuApp(QuartTrio):
    """QuartTrio with the runtime attached (``app.runtime`` once serving)."""

    runtime: Runtime
    store: Store
    xintu_config: Config
    metrics: Metrics
    connections: ConnectionGate
    sampler: trio.CancelScope
    # /api/v1/stats: (when, album statistics) of the last store query.
    stats_cache: tuple[float, dict[str, Any]] | None = None

    def runtime_if_started(self) -> Runtime | None:
        """The runtime once ``before_serving`` has started it, else ``None``."""
        return getattr(self, "runtime", None)


def current_xintu() -> XintuApp:
    """The app handling the current request, typed (Quart's ``current_app`` is a
    plain ``Quart``)."""
    app = current_app
    assert isinstance(app, XintuApp)
    return app


def create_app(
    config: Config, *, model_factory: ModelFactory | None = None, freeze_gc: bool = False
) -> XintuApp:
    """Build the app for *config*. *model_factory* replaces the ONNX classifier (tests).

    *freeze_gc* (the serving entry points, one app per process): once started,
    collect and then :func:`gc.freeze` what start-up made (modules, Quart,
    Hypercorn, the config, the runtime's actors), so that the collector's full
    collections no longer scan it. A full collection is a pause of the whole event
    loop: ~110 ms of them under a burst on a 2-core VM, which every request in
    flight waited for; 16-39 ms with the freeze (BENCHMARKS.md, "Round 4")."""
    app = XintuApp("xintu")
    app.xintu_config = config
    app.metrics = Metrics()
    # Entered by every connection when served by xintu._serve (see _connections).
    app.connections = ConnectionGate(config.server.max_connections)
    app.config.update(
        MAX_CONTENT_LENGTH=config.server.max_body_bytes,
        # Non-file form fields (image_hash, image_hashes) are small.
        MAX_FORM_MEMORY_SIZE=64 * 1024,
        MAX_FORM_PARTS=64,
        # The runtime drains itself in after_serving; this is only the backstop.
        BACKGROUND_TASK_SHUTDOWN_TIMEOUT=config.server.graceful_timeout_s + 5.0,
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=config.server.body_timeout_s,
        JSON_SORT_KEYS=False,
    )
    factory = model_factory or _default_model

    @app.before_serving
    async def _start() -> None:
        app.store = await open_store(config)
        model = await trio.to_thread.run_sync(factory, config)
        app.runtime = Runtime(config, app.store, model)
        await app.nursery.start(app.runtime.run)
        app.sampler = await app.nursery.start(_sample_metrics, app)
        if freeze_gc:
            gc.collect()
            gc.freeze()
            log.info("gc_frozen", objects=gc.get_freeze_count())

    @app.after_serving
    async def _stop() -> None:
        sampler: trio.CancelScope | None = getattr(app, "sampler", None)
        if sampler is not None:
            sampler.cancel()
        try:
            runtime = app.runtime_if_started()
            if runtime is not None:
                with trio.move_on_after(config.server.graceful_timeout_s):
                    await runtime.drain()
        finally:
            # Even when the drain is cancelled (the server stopped by cancellation),
            # the store's connections are closed, not left to the garbage collector.
            store: Store | None = getattr(app, "store", None)
            if store is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_STORE_S):
                    await store.aclose()

    @app.before_request
    async def _request_id() -> None:
        begin_request(g._get_current_object())

    @app.after_request
    async def _finish(response: Response) -> Response:
        # The request and g once each: every ``request.``/``g.`` is a context lookup.
        req: Request = request._get_current_object()  # type: ignore[attr-defined]
        url_rule = req.url_rule
        finish_response(
            app,
            response,
            g._get_current_object(),
            rule=url_rule.rule if url_rule is not None else "unmatched",
            method=req.method,
            remote_addr=req.remote_addr,
            body_unread=_body_unread(req),
        )
        return response

    @app.errorhandler(XintuError)
    async def _xintu_error(exc: XintuError) -> Response:
        return error_response(exc, _rid())

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            return error_response(PayloadTooLarge("request body too large"), _rid())
        if status == 400:
            return error_response(BadRequest("malformed request"), _rid())
        if status == 408:
            return error_response(body_timeout_error(config), _rid())
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        return json_response(error_body(exc.name, code, _rid()), status)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        return unexpected_error_response(_rid())

    from ._admin import admin
    from ._ops import ops
    from ._page import page
    from ._v1 import v1

    app.register_blueprint(v1)
    app.register_blueprint(ops)
    app.register_blueprint(admin)
    app.register_blueprint(page)
    from ._cors import install_cors
    from ._guard import install_guard
    from ._idempotency import install_idempotency

    install_guard(app, config)
    install_idempotency(app, config)
    install_cors(app, config)
    from ._hot import serve_check_cache_below_quart

    serve_check_cache_below_quart(app)
    return app


async def _sample_metrics(
    app: XintuApp, *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
) -> None:
    """Keep sampled metrics fresh (for multiprocess scrapes) until cancelled."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        while True:
            sample_metrics(app)
            await trio.sleep(_SAMPLE_INTERVAL_S)


def sample_metrics(app: XintuApp) -> None:
    """Bring the sampled metrics up to date (actors, connections, guard, idempotency)."""
    app.metrics.sample(app.runtime.statistics())
    app.metrics.sample_connections(app.connections.statistics())
    if (guard := app.extensions.get("xintu.guard")) is not None:
        app.metrics.sample_guard(guard.statistics())
    if (idempotency := app.extensions.get("xintu.idempotency")) is not None:
        app.metrics.sample_idempotency(idempotency.statistics())


# Routes whose requests are not worth a log line each (probes and scrapes).
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
_SAMPLE_INTERVAL_S = 1.0
# Bound on closing the store at shutdown (shielded from cancellation).
_CLOSE_STORE_S = 5.0
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def begin_request(ctx: Any) -> None:
    """The start of every request: its id and start time in *ctx* (the request's
    ``g``, or the state of a request served below Quart, see :mod:`._hot`), and the id
    bound to every log line of the request, the actors' included."""
    ctx.request_id = rid = uuid.uuid4().hex
    ctx.started = trio.current_time()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=rid)


def finish_response(
    app: XintuApp,
    response: Response,
    ctx: Any,
    *,
    rule: str,
    method: str,
    remote_addr: str | None,
    body_unread: bool,
) -> None:
    """The end of every request: ``X-Request-ID``, ``Connection: close`` when the
    body was left unread, one latency observation and one request log line."""
    rid = getattr(ctx, "request_id", None)
    if rid:
        response.headers["X-Request-ID"] = rid
    if body_unread:
        # Answered (usually refused) before the whole body arrived: Hypercorn
        # will close this connection after the response, so say so, or a
        # keep-alive client may send its next request into the closing socket.
        response.headers["Connection"] = "close"
    _observe(app, rule, method, remote_addr, ctx, response.status_code)


def body_timeout_error(config: Config) -> RequestTimeout:
    """The error of a request whose body did not arrive within ``server.body_timeout_s``."""
    return RequestTimeout(f"request body not received within {config.server.body_timeout_s:g} s")


def unexpected_error_response(request_id: str) -> Response:
    """The 500 answer (and the logged traceback) of an exception no handler expected."""
    log.exception("unhandled_error", request_id=request_id)
    return json_response(error_body("internal error", "internal_error", request_id), 500)


def _observe(
    app: XintuApp, rule: str, method: str, remote_addr: str | None, ctx: Any, status: int
) -> None:
    """One latency observation and one structured log event per request (*ctx*, the
    request's ``g`` or its state below Quart)."""
    started = getattr(ctx, "started", None)
    if started is None:
        return
    seconds = trio.current_time() - started
    source = getattr(ctx, "source", None) or "none"
    # Labels never take client input as it came: any other method string would
    # make a new series (unmatched paths are "unmatched" for the same reason).
    app.metrics.observe_request(
        rule, method if method in _KNOWN_METHODS else "other", status, source, seconds
    )
    if rule in _QUIET_ROUTES:
        return
    image_hash = getattr(ctx, "image_hash", None)
    log.info(
        "request",
        method=method,
        route=rule,
        status=status,
        latency_ms=round(seconds * 1000.0, 2),
        user_id=getattr(ctx, "user_id", None),
        image_hash=image_hash[:12] if image_hash else None,
        source=source,
        provider=getattr(ctx, "provider", None),
        client_ip=getattr(ctx, "client_ip", None) or remote_addr,
    )


def _body_unread(req: Request) -> bool:
    """True when the request declared a body that has not been received in full."""
    # quart's Body sets ``_complete`` once the last ASGI body message arrived: a
    # body received in full (every hit) needs no look at the headers.
    complete = getattr(req.body, "_complete", None)
    if complete is None or complete.is_set():
        return False
    declared = req.content_length
    chunked = "chunked" in req.headers.get("Transfer-Encoding", "").lower()
    return bool(chunked or declared)


def _rid() -> str:
    rid = getattr(g, "request_id", None)
    return rid if isinstance(rid, str) else uuid.uuid4().hex
