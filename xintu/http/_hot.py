"""``POST /api/v1/classify/check-cache`` served below Quart: the hit path's own cost.

A cache hit is the service's most frequent request and its cheapest work (a lookup
in memory), so the framework's per-request cost dominates it: a profile under the
hit bench put Quart's request context, request and response objects, routing and
hook dispatch at more CPU than the handler and our hooks together, and the hit
path at 0.7x the throughput of a bare Quart-Trio app on the same Hypercorn (issue
14, "The hit path's own cost"). :func:`serve_check_cache_below_quart` wraps the
app's ASGI callable: a request to that route is served here, directly on the ASGI
messages, every other request goes to Quart unchanged.

Same rules, same code. Each step Quart's hooks and the handler take for the route
is the same function here, not a copy of its logic:

- :func:`~._app.begin_request`: the request id, the start time, the log binding;
- :meth:`~._guard.Guard.admit`: the client's identity, API keys, the rate limit
  and the refusal (401/403/429) with its headers;
- :func:`~._v1.check_cache_answer` and :func:`~._v1.parse_json_body`: the handler
  itself (validation, lookup, the hit and the request-log row, the answer);
- :func:`~._respond.error_response`, :func:`~._app.unexpected_error_response`,
  :func:`~._app.body_timeout_error`: errors, as Quart's error handlers answer them;
- :func:`~._cors.vary_on_origin` and :func:`~._app.finish_response`: ``Vary``,
  ``X-Request-ID``, the latency metric and the request log line.

What this module owns is HTTP plumbing only: which requests it takes, reading the
body (within ``server.body_timeout_s``, else 408 as Quart answers), the headers as
Quart builds them, and sending the answer as Quart sends it. It takes a request
only when nothing but those functions would act on it; the rest, Quart serves:

- another method or path, a query string (``?evidence``), a ``root_path``;
- a cross-origin request (``Origin``: Quart-CORS's work, :func:`~._cors.cross_origin`);
- an ``Idempotency-Key`` (:meth:`~._idempotency.Idempotency.applies`);
- a body without a ``Content-Length`` (chunked, or none), one declared over
  ``server.max_json_bytes`` or ``server.max_body_bytes`` (the 413s are Quart's and
  the handler's), and ``Expect: 100-continue``;
- without the guard installed (an app built without :func:`~._guard.install_guard`).

One difference in order, none in outcome: Quart reads a body while the guard
decides, this path reads the (small, declared) body first. A refused check-cache
therefore keeps its keep-alive connection here, where Quart closes it only if the
body had not arrived yet; a client that disconnects before its body is in gets no
answer in either (nothing is logged).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Response
from quart.utils import encode_headers
from quart.wrappers.response import DataBody
from werkzeug.datastructures import Headers

from .._config import Config
from ..errors import XintuError
from ._app import (
    XintuApp,
    begin_request,
    body_timeout_error,
    finish_response,
    unexpected_error_response,
)
from ._cors import EXTENSION as CORS_EXTENSION
from ._cors import cross_origin, vary_on_origin
from ._guard import Guard
from ._idempotency import Idempotency
from ._respond import error_response
from ._v1 import check_cache_answer, json_too_large, parse_json_body

__all__ = ["serve_check_cache_below_quart"]

_AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
_ENDPOINT = "v1.check_cache"
# Headers whose presence leaves a request to Quart (see the module docstring).
_TO_QUART = frozenset({b"transfer-encoding", b"expect"})


class RequestState:
    """What Quart keeps in ``g`` for one request, for a request served here: the
    hooks' and the handler's functions read and write the same attributes."""

    __slots__ = (
        "client",
        "client_ip",
        "image_hash",
        "provider",
        "request_id",
        "source",
        "started",
        "user_id",
    )

    def __init__(self) -> None:
        self.client: Any = None
        self.client_ip: str | None = None
        self.image_hash: str | None = None
        self.provider: str | None = None
        self.request_id = ""
        self.source: str | None = None
        self.started: float | None = None
        self.user_id: str | None = None


def serve_check_cache_below_quart(app: XintuApp) -> None:
    """Serve check-cache on *app* below Quart (see the module docstring).

    Installed last in :func:`~._app.create_app`, after the guard, idempotency and
    CORS layers, whose rules it asks. The route's path is the one the ``v1``
    blueprint registers, read from the app's URL map.
    """
    guard = app.extensions.get("xintu.guard")
    if not isinstance(guard, Guard):
        return
    rules = [r for r in app.url_map.iter_rules() if r.endpoint == _ENDPOINT]
    if len(rules) != 1 or rules[0].arguments or "POST" not in (rules[0].methods or ()):
        raise RuntimeError(f"{_ENDPOINT} must be one POST route without variables")
    path = rules[0].rule
    config = app.xintu_config
    limit = min(config.server.max_json_bytes, int(app.config["MAX_CONTENT_LENGTH"]))
    cors = bool(app.extensions.get(CORS_EXTENSION))
    inner: _AsgiApp = app.asgi_app

    async def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != path
            or scope["method"] != "POST"
            or scope["query_string"]
            or scope.get("root_path")
            or scope.get("_quart._preserve_context")
        ):
            await inner(scope, receive, send)
            return
        headers = Headers()
        for name, value in scope["headers"]:
            if name in _TO_QUART:
                await inner(scope, receive, send)
                return
            headers.add(name.decode("latin1").title(), value.decode("latin1"))
        declared = _content_length(headers)
        if (
            declared is _INVALID
            or (declared is not None and declared > limit)
            or cross_origin(headers)
            or Idempotency.applies("POST", headers)
        ):
            await inner(scope, receive, send)
            return
        peer = (scope.get("client") or ("<local>",))[0]
        ctx = RequestState()
        begin_request(ctx)
        body_unread = False
        try:
            raw = await _read_body(receive, limit, config)
            if raw is None:  # the client went away: nothing to answer, as in Quart
                return
            if raw is _OVER_LIMIT:
                body_unread = True
                raise json_too_large(limit)
            response = guard.admit(ctx, path=path, peer=peer, headers=headers, preflight=False)
            if response is None:
                response = await check_cache_answer(
                    app,
                    ctx,
                    parse_json_body(raw, limit),
                    user_header=headers.get("X-User-ID"),
                    remote_addr=peer,
                    # No query string here, so no ?evidence (see _v1._wants_evidence).
                    wants_evidence=_no_evidence,
                )
        except XintuError as exc:
            response = error_response(exc, ctx.request_id)
        except Exception:
            response = unexpected_error_response(ctx.request_id)
        if cors:
            vary_on_origin(response)
        finish_response(
            app,
            response,
            ctx,
            rule=path,
            method="POST",
            remote_addr=peer,
            body_unread=body_unread,
        )
        await _send(send, response)

    app.asgi_app = asgi  # type: ignore[method-assign]


def _no_evidence() -> bool:
    return False


# _content_length: a Content-Length header that is not one plain number (Quart's).
_INVALID = -1
# _read_body: more than the limit arrived (the rest is left unread).
_OVER_LIMIT = b"\0over"


def _content_length(headers: Headers) -> int | None:
    """The declared body length; ``None`` if none is declared, :data:`_INVALID` if
    the header is not one plain number."""
    values = headers.getlist("Content-Length")
    if not values:
        return None
    if len(values) != 1 or not values[0].isdigit() or not values[0].isascii():
        return _INVALID
    return int(values[0])


async def _read_body(receive: ASGIReceiveCallable, limit: int, config: Config) -> bytes | None:
    """The whole request body; ``None`` if the client disconnected first,
    :data:`_OVER_LIMIT` as soon as more than *limit* bytes arrived (possible only
    without a ``Content-Length``: over HTTP/1.1 such a body is empty, but an ASGI
    test client sends one). Raises :func:`~._app.body_timeout_error` past
    ``server.body_timeout_s``."""
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(config.server.body_timeout_s):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return _OVER_LIMIT
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    raise body_timeout_error(config)


async def _send(send: ASGISendCallable, response: Response) -> None:
    """*response* as Quart sends it (same status, headers and bytes); a body held
    in memory in one message."""
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": encode_headers(response.headers),
        }
    )
    body = response.response
    if isinstance(body, DataBody):
        await send({"type": "http.response.body", "body": body.data, "more_body": False})
        return
    async with body as chunks:
        async for data in chunks:
            await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
