"""CORS: browser clients on other origins (the web album, WeChat pages) may call the API.

The original backend allowed every origin; Xintu makes the allowed origins a
setting, ``api.cors_origins`` (``["*"]`` by default, as the original). Quart-CORS
(by Quart's author) does the header work: it answers preflight ``OPTIONS``
requests itself and adds ``Access-Control-Allow-Origin`` to every answer, errors
included, so a browser can read a 401, 429 or 503 and its ``Retry-After``.

The API authenticates with ``Authorization: Bearer`` keys, never with cookies, so
credentials are never allowed; an allowed origin may send any request header
(``Authorization``, ``X-User-ID``, ``Idempotency-Key``, ``X-Deadline-Ms``), and the
headers a client acts on are exposed to its script. The guard lets preflights
through without a key (they carry none, by the CORS rules) and without charging
the rate limit: a preflight answer holds no data.

A request without an ``Origin`` header is not a cross-origin request: its answer
gets only ``Vary: Origin`` (what Quart-CORS adds then), set here directly, without
Quart-CORS's per-request work (it re-reads its settings and the view function
each time; issue 14, the hit path's cost). Requests with an ``Origin`` go through
Quart-CORS unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from quart import Quart, Response, request
from quart_cors import cors
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers

from .._config import Config

__all__ = [
    "EXPOSED_HEADERS",
    "EXTENSION",
    "cross_origin",
    "install_cors",
    "is_preflight",
    "vary_on_origin",
]

# Response headers a cross-origin script may read.
EXPOSED_HEADERS = ("Retry-After", "X-Request-ID", "Idempotency-Replayed", "WWW-Authenticate")
_PREFLIGHT_MAX_AGE_S = 600
_METHODS = ("GET", "HEAD", "POST", "OPTIONS")
#: ``app.extensions`` key, set when the CORS layer is installed.
EXTENSION = "xintu.cors"


def is_preflight() -> bool:
    """True for a CORS preflight: ``OPTIONS`` with ``Access-Control-Request-Method``."""
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def install_cors(app: QuartTrio, config: Config) -> None:
    """Send CORS headers for ``api.cors_origins``; nothing when the list is empty."""
    origins = config.api.cors_origins
    if not origins:
        return
    hooks = _Hooks()
    cors(
        cast(Quart, hooks),
        allow_origin="*" if "*" in origins else list(origins),
        allow_credentials=False,
        allow_headers=["*"],
        allow_methods=list(_METHODS),
        expose_headers=list(EXPOSED_HEADERS),
        max_age=_PREFLIGHT_MAX_AGE_S,
        send_origin_wildcard=True,
    )
    cors_after = hooks.after_request_hook
    assert cors_after is not None
    assert hooks.websocket_hook is not None

    async def after_request(response: Response) -> Response:
        if not cross_origin(request.headers):
            vary_on_origin(response)
            return response
        return cast(Response, await cors_after(response))

    app.after_request(after_request)
    app.before_websocket(hooks.websocket_hook)
    app.extensions[EXTENSION] = True


def cross_origin(headers: Headers) -> bool:
    """Whether a request is cross-origin (has an ``Origin``): Quart-CORS answers for
    it; a request served below Quart (:mod:`._hot`) never is."""
    return bool(headers.get("Origin"))


def vary_on_origin(response: Response) -> None:
    """The CORS work on the answer to a request that is not cross-origin, where
    ``api.cors_origins`` is set: Quart-CORS would add this header and nothing else."""
    if "Vary" in response.headers:
        response.vary.add("Origin")
    else:
        response.headers["Vary"] = "Origin"


class _Hooks:
    """Takes the hooks Quart-CORS registers (its ``cors`` registers an after-request
    and a before-websocket function), for :func:`install_cors` to wrap."""

    def __init__(self) -> None:
        self.after_request_hook: Callable[[Response], Awaitable[Any]] | None = None
        self.websocket_hook: Callable[[], Awaitable[Any]] | None = None

    def after_request(self, fn: Callable[[Response], Awaitable[Any]]) -> Any:
        self.after_request_hook = fn
        return fn

    def before_websocket(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        self.websocket_hook = fn
        return fn
