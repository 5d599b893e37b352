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
"""

from __future__ import annotations

from quart import request
from quart_cors import cors
from quart_trio import QuartTrio

from .._config import Config

__all__ = ["EXPOSED_HEADERS", "install_cors", "is_preflight"]

# Response headers a cross-origin script may read.
EXPOSED_HEADERS = ("Retry-After", "X-Request-ID", "Idempotency-Replayed", "WWW-Authenticate")
_PREFLIGHT_MAX_AGE_S = 600
_METHODS = ("GET", "HEAD", "POST", "OPTIONS")


def is_preflight() -> bool:
    """True for a CORS preflight: ``OPTIONS`` with ``Access-Control-Request-Method``."""
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def install_cors(app: QuartTrio, config: Config) -> None:
    """Send CORS headers for ``api.cors_origins``; nothing when the list is empty."""
    origins = config.api.cors_origins
    if not origins:
        return
    cors(
        app,
        allow_origin="*" if "*" in origins else list(origins),
        allow_credentials=False,
        allow_headers=["*"],
        allow_methods=list(_METHODS),
        expose_headers=list(EXPOSED_HEADERS),
        max_age=_PREFLIGHT_MAX_AGE_S,
        send_origin_wildcard=True,
    )
