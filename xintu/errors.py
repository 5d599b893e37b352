"""Every error Xintu raises on purpose, and the one table that maps them to HTTP.

::

    XintuError                      base; carries ``error_code`` and a client-safe message
    ├── ConfigError                 bad or unknown configuration key (start refused)
    ├── ClientError                 the request is at fault (4xx)
    │   ├── BadImage                not an image, truncated, undecodable           400
    │   ├── BadRequest              malformed multipart or JSON                    400
    │   ├── PayloadTooLarge         body or image over the byte limit              413
    │   │   └── TooManyPixels       image over the pixel limit (decompression bomb) 413
    │   ├── UnsupportedFormat       an image format that is not accepted           415
    │   ├── ValidationFailed        a field fails validation                       422
    │   │   ├── HashMismatch        client image_hash != server's SHA-256          422
    │   │   └── IdempotencyKeyReused  same key, different request                  422
    │   ├── IdempotencyInFlight     same key, first request still running          409
    │   ├── RateLimited             over the client's rate limit (Retry-After)     429
    │   ├── Unauthorized            no or unknown API key (WWW-Authenticate)       401
    │   └── Forbidden               a valid key without the right (admin) access   403
    ├── Unavailable                 the service cannot take the work now (503, Retry-After)
    │   ├── Overloaded              an inbox is full: admission refused
    │   └── Draining                shutting down
    ├── DeadlineExceeded            no classifier answered before the deadline     504
    ├── StoreError                  the store failed (translated from sqlite3/trio-mysql)
    │   ├── StoreUnavailable        the store cannot be reached at all
    │   └── StoreRejected           the store refuses a write for good (schema, constraint)
    ├── ModelError                  the local ONNX model could not be built/loaded/run
    └── ClassifierError             a classifier failed on one image (internal; triggers fallback)

Foreign errors (Pillow, sqlite3, trio-mysql, httpx, onnxruntime) are translated at
the boundary with ``raise ... from``. :func:`http_status` is the only mapping from
errors to status codes; anything not listed is a 500 with a generic message.
"""

from __future__ import annotations

__all__ = [
    "BadImage",
    "BadRequest",
    "ClassifierError",
    "ClientError",
    "ConfigError",
    "DeadlineExceeded",
    "Draining",
    "Forbidden",
    "HashMismatch",
    "IdempotencyInFlight",
    "IdempotencyKeyReused",
    "ModelError",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "StoreError",
    "StoreRejected",
    "StoreUnavailable",
    "TooManyPixels",
    "Unauthorized",
    "Unavailable",
    "UnsupportedFormat",
    "ValidationFailed",
    "XintuError",
    "http_status",
]


class XintuError(Exception):
    """Base of Xintu's errors. ``str(err)`` is safe to show to a client."""

    error_code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(XintuError):
    """A configuration key is unknown or its value is bad; names the key."""

    error_code = "config_error"

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class ClientError(XintuError):
    """The request is at fault."""

    error_code = "bad_request"


class BadImage(ClientError):
    error_code = "invalid_image"


class BadRequest(ClientError):
    error_code = "bad_request"


class PayloadTooLarge(ClientError):
    error_code = "payload_too_large"


class TooManyPixels(PayloadTooLarge):
    error_code = "image_too_many_pixels"


class UnsupportedFormat(ClientError):
    error_code = "unsupported_format"


class ValidationFailed(ClientError):
    error_code = "validation_failed"


class HashMismatch(ValidationFailed):
    error_code = "image_hash_mismatch"


class IdempotencyKeyReused(ValidationFailed):
    error_code = "idempotency_key_reused"


class IdempotencyInFlight(ClientError):
    error_code = "idempotency_key_in_flight"


class RequestTimeout(ClientError):
    """The client did not send its request body within ``server.body_timeout_s``."""

    error_code = "request_timeout"


class _RetryAfter:
    retry_after_s: float

    def _set_retry_after(self, retry_after_s: float) -> None:
        self.retry_after_s = max(0.0, retry_after_s)


class RateLimited(ClientError, _RetryAfter):
    error_code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self._set_retry_after(retry_after_s)


class Unauthorized(ClientError):
    """No API key, or one that is not configured: answered with ``WWW-Authenticate``."""

    error_code = "unauthorized"


class Forbidden(ClientError):
    """A valid API key that lacks the access the endpoint needs (admin endpoints)."""

    error_code = "forbidden"


class Unavailable(XintuError, _RetryAfter):
    """The service cannot take this work now; the client should retry later."""

    error_code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self._set_retry_after(retry_after_s)


class Overloaded(Unavailable):
    error_code = "overloaded"


class Draining(Unavailable):
    error_code = "draining"


class DeadlineExceeded(XintuError):
    error_code = "deadline_exceeded"


class StoreError(XintuError):
    error_code = "store_error"


class StoreUnavailable(StoreError):
    error_code = "store_unavailable"


class StoreRejected(StoreError):
    """The store refused the statement for a reason that retrying cannot fix: an
    unknown column or table, a NOT NULL column without a default, a value too long,
    a constraint (unique, foreign key, check). Only a schema change helps."""

    error_code = "store_rejected"


class ModelError(XintuError):
    error_code = "model_error"


class ClassifierError(XintuError):
    error_code = "classifier_error"


# The one table: most specific class first.
_STATUS: tuple[tuple[type[XintuError], int], ...] = (
    (TooManyPixels, 413),
    (PayloadTooLarge, 413),
    (UnsupportedFormat, 415),
    (ValidationFailed, 422),
    (IdempotencyInFlight, 409),
    (RequestTimeout, 408),
    (RateLimited, 429),
    (Unauthorized, 401),
    (Forbidden, 403),
    (BadImage, 400),
    (BadRequest, 400),
    (ClientError, 400),
    (Unavailable, 503),
    (StoreUnavailable, 503),
    (DeadlineExceeded, 504),
)


def http_status(exc: BaseException) -> int:
    """The HTTP status for *exc*: the table above, else 500."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500
