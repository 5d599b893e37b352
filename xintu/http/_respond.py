"""JSON responses and the error envelope: the one place errors become HTTP."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, TypeVarTuple

import trio
from quart import Response

from ..errors import RateLimited, Unavailable, XintuError, http_status

__all__ = ["error_body", "error_response", "json_response", "now_iso", "sized_work"]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_response(body: dict[str, Any], status: int = 200, **headers: str) -> Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    resp = Response(text, status=status, content_type="application/json")
    for name, value in headers.items():
        resp.headers[name.replace("_", "-")] = value
    return resp


def error_body(message: str, error_code: str, request_id: str) -> dict[str, Any]:
    """The error envelope: ``{success: false, error, error_code, request_id, detail}``.

    ``detail`` repeats the message: the original backend (FastAPI) answered
    ``{"detail": ...}``, and its clients read that field.
    """
    return {
        "success": False,
        "error": message,
        "error_code": error_code,
        "request_id": request_id,
        "detail": message,
    }


def error_response(exc: XintuError, request_id: str) -> Response:
    """The error envelope for *exc* with the table's status (and ``Retry-After``)."""
    status = http_status(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, Unavailable | RateLimited):
        headers["Retry_After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return json_response(error_body(exc.message, exc.error_code, request_id), status, **headers)


T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# CPU work on request bodies (hashing) above this size runs on a worker thread, so
# a large upload does not stall the event loop; below it a thread costs more.
_THREAD_ABOVE_BYTES = 256 * 1024


async def sized_work(size: int, fn: Callable[[*Ts], T], *args: *Ts) -> T:
    """``fn(*args)``: inline for small inputs, on a worker thread for large ones."""
    if size > _THREAD_ABOVE_BYTES:
        return await trio.to_thread.run_sync(fn, *args)
    return fn(*args)
