"""What the sync and async clients share: settings, headers, answers, the flow driver."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from ._errors import TransportError, XintuClientError, error_from_response
from ._protocol import MAX_UPLOAD_FILES, ImageInput, Post, RetryState
from ._types import BatchItem, RetryPolicy

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_SERVER",
    "OnResult",
    "Settings",
    "answer_json",
    "as_inputs",
    "request_headers",
    "transport_error",
]

DEFAULT_SERVER = "http://127.0.0.1:8000"
#: Bytes of images per batch request: below the server's default 25 MiB body limit.
DEFAULT_MAX_BATCH_BYTES = 16 * 1024 * 1024

#: Called once per input of ``classify_many``, as soon as its outcome is known.
OnResult = Callable[[BatchItem], object]


class Settings:
    """The validated settings of a client (shared by both kinds)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        user_id: str | None,
        retry: RetryPolicy | None,
        max_batch_files: int,
        max_batch_bytes: int,
        headers: Mapping[str, str] | None,
    ) -> None:
        if not 1 <= max_batch_files <= MAX_UPLOAD_FILES:
            raise ValueError(f"max_batch_files must be 1..{MAX_UPLOAD_FILES}")
        if max_batch_bytes < 1:
            raise ValueError("max_batch_bytes must be positive")
        from .. import __version__

        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.max_batch_files = max_batch_files
        self.max_batch_bytes = max_batch_bytes
        self.headers: dict[str, str] = {
            "User-Agent": f"xintu-client/{__version__}",
            "Accept": "application/json",
        }
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        if user_id:
            self.headers["X-User-ID"] = user_id
        self.headers.update(headers or {})


def as_inputs(images: Iterable[ImageInput]) -> list[tuple[int, str, bytes | Path]]:
    """Number the inputs and name them (a path's text, or ``<bytes #i>``)."""
    out: list[tuple[int, str, bytes | Path]] = []
    for i, image in enumerate(images):
        if isinstance(image, bytes):
            out.append((i, f"<bytes #{i}>", image))
        elif isinstance(image, str | os.PathLike):
            path = Path(image)
            out.append((i, str(path), path))
        else:
            raise TypeError(f"expected bytes or a path, got {type(image).__name__}")
    return out


def request_headers(op: Post, state: RetryState) -> dict[str, str]:
    """Per-attempt headers: the logical request's ``Idempotency-Key`` and, for uploads,
    a multipart boundary of its own.

    The server fingerprints a keyed request by what it means (its fields and files),
    so any boundary would do; a fixed one keeps every retry byte-identical, which
    servers from before that change required (they answered a retry with a new
    boundary 422 ``idempotency_key_reused``).
    """
    headers = {"Idempotency-Key": state.idempotency_key}
    if op.files:
        headers["Content-Type"] = f"multipart/form-data; boundary=xintu-{state.idempotency_key}"
    return headers


def answer_json(response: httpx.Response) -> tuple[dict[str, Any], str | None]:
    """A success answer's JSON object and request id; an error answer raises its error."""
    if not response.is_success:
        raise error_from_response(response)
    rid = response.headers.get("X-Request-ID")
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        raise XintuClientError(
            f"the server's answer is not JSON (HTTP {response.status_code})",
            status=response.status_code,
            request_id=rid,
        ) from None
    if not isinstance(body, dict):
        raise XintuClientError(
            "the server's answer is not a JSON object", status=response.status_code
        )
    request_id = body.get("request_id")
    return body, request_id if isinstance(request_id, str) else rid


def transport_error(exc: httpx.TransportError) -> TransportError:
    """Translate httpx's transport failure (connect, read, timeout) into ours."""
    detail = str(exc) or type(exc).__name__
    error = TransportError(f"no answer from the server: {detail}")
    error.__cause__ = exc
    return error
