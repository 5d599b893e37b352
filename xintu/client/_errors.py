"""The client's errors: one class per way a call can fail, carrying the server's words.

::

    XintuClientError                the base; message, status, error_code, request_id
    ├── TransportError              no HTTP answer (connect, read, timeout); wraps httpx's
    ├── FileUnreadable              a local photo could not be read (classify_many items)
    └── APIError                    the server answered with an error envelope
        ├── BadRequestError         400 malformed request
        │   └── BadImageError       400 not an image, truncated, undecodable
        ├── AuthenticationError     401 / 403 missing or wrong API key
        ├── NotFoundError           404 no such endpoint (an old or foreign server)
        ├── PayloadTooLargeError    413 body, image or pixel count over the limit
        ├── UnsupportedFormatError  415 an image format the server does not accept
        ├── ValidationError         422 a field failed validation
        ├── RetryLater              answered with Retry-After; ``retry_after_s``
        │   ├── ConflictError       409 the same Idempotency-Key is still in flight
        │   ├── RateLimitedError    429 over this client's rate limit
        │   └── ServerBusy          503 over capacity or draining
        ├── DeadlineExceededError   504 no classifier answered in time
        └── ServerError             any other 5xx

The client retries :class:`RetryLater` (and, by policy, :class:`TransportError`)
itself; what reaches the caller is the last failure once the retry budget is spent.
:func:`error_from_response` is the one mapping from an HTTP answer to a class.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadImageError",
    "BadRequestError",
    "ConflictError",
    "DeadlineExceededError",
    "FileUnreadable",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RetryLater",
    "ServerBusy",
    "ServerError",
    "TransportError",
    "UnsupportedFormatError",
    "ValidationError",
    "XintuClientError",
    "error_from_item",
    "error_from_response",
    "parse_retry_after",
]


class XintuClientError(Exception):
    """Base of every error the client raises.

    ``status`` is the HTTP status (``None`` when no answer came), ``error_code`` the
    server's machine-readable code (``invalid_image``, ``overloaded``...) and
    ``request_id`` the id to quote in a bug report.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_code = error_code
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status!r}, "
            f"error_code={self.error_code!r}, request_id={self.request_id!r})"
        )


class TransportError(XintuClientError):
    """No HTTP answer: the server could not be reached or the connection broke."""


class FileUnreadable(XintuClientError):
    """A photo given by path could not be read."""


class APIError(XintuClientError):
    """The server answered with an error status and (usually) its JSON envelope."""


class BadRequestError(APIError):
    """400: the request was malformed."""


class BadImageError(BadRequestError):
    """400: the bytes are not an image, or a truncated or undecodable one."""


class AuthenticationError(APIError):
    """401 or 403: an API key is required, or the one given is not accepted."""


class NotFoundError(APIError):
    """404: no such endpoint."""


class PayloadTooLargeError(APIError):
    """413: the body or image is over the byte limit, or the image has too many pixels."""


class UnsupportedFormatError(APIError):
    """415: an image format the server does not accept."""


class ValidationError(APIError):
    """422: a field failed validation (bad hash, hash mismatch, reused key...)."""


class RetryLater(APIError):
    """The server asked to be called again later; ``retry_after_s`` says when."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None,
        status: int | None = None,
        error_code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, status=status, error_code=error_code, request_id=request_id)
        self.retry_after_s = retry_after_s


class ConflictError(RetryLater):
    """409: the first request with this Idempotency-Key is still in flight."""


class RateLimitedError(RetryLater):
    """429: this client is over its rate limit."""


class ServerBusy(RetryLater):
    """503: the service is over capacity or draining."""


class DeadlineExceededError(APIError):
    """504: no classifier answered before the request's deadline."""


class ServerError(APIError):
    """Any other 5xx answer."""


_BY_CODE: dict[str, type[APIError]] = {
    "invalid_image": BadImageError,
}

_RETRY_LATER: dict[int, type[RetryLater]] = {
    409: ConflictError,
    429: RateLimitedError,
    503: ServerBusy,
}

_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    415: UnsupportedFormatError,
    422: ValidationError,
    504: DeadlineExceededError,
}


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; ``None`` if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import UTC, datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _envelope(response: httpx.Response) -> dict[str, Any]:
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error for an error *response* (JSON envelope or not)."""
    body = _envelope(response)
    status = response.status_code
    code = body.get("error_code")
    error_code = code if isinstance(code, str) else None
    message = body.get("error")
    if not isinstance(message, str) or not message:
        text = response.text.strip()[:200] if not body else ""
        message = text or f"HTTP {status} {response.reason_phrase}".rstrip()
    rid = body.get("request_id")
    request_id = rid if isinstance(rid, str) else response.headers.get("X-Request-ID")
    if status in _RETRY_LATER:
        cls_retry = _RETRY_LATER[status]
        return cls_retry(
            message,
            retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            status=status,
            error_code=error_code,
            request_id=request_id,
        )
    cls = _BY_CODE.get(error_code or "") or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else APIError
    return cls(message, status=status, error_code=error_code, request_id=request_id)


def error_from_item(item: dict[str, Any], request_id: str | None) -> APIError:
    """The typed error for one failed item of a batch answer (which has no status)."""
    code = item.get("error_code")
    error_code = code if isinstance(code, str) else None
    message = item.get("error")
    text = message if isinstance(message, str) and message else "the image failed"
    cls = _BY_CODE.get(error_code or "", APIError)
    if error_code == "payload_too_large" or error_code == "image_too_many_pixels":
        cls = PayloadTooLargeError
    elif error_code == "unsupported_format":
        cls = UnsupportedFormatError
    elif error_code in ("overloaded", "draining", "unavailable"):
        return ServerBusy(text, retry_after_s=None, error_code=error_code, request_id=request_id)
    elif error_code == "deadline_exceeded":
        cls = DeadlineExceededError
    elif error_code is not None and error_code.startswith(("validation", "image_hash")):
        cls = ValidationError
    return cls(text, error_code=error_code, request_id=request_id)
