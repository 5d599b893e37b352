"""The LLM classifier's errors. Every one is a :class:`~xintu.errors.ClassifierError`.

::

    ClassifierError                 (xintu.errors) a classifier failed; the caller falls back
    └── LlmError                    an LLM classification failed
        ├── LlmUnavailable          refused at once, no upstream call made (``reason``)
        ├── ImageNotUploadable      the image could not be downscaled/re-encoded
        ├── BadAnswer               the answer is unparseable or off-schema
        └── UpstreamError           one provider failed (``provider``, ``retryable``)
            ├── UpstreamTimeout     no answer in time (attempt timeout or deadline)  retryable
            ├── UpstreamUnreachable connect/read/protocol error                      retryable
            ├── UpstreamRateLimited 429, with ``retry_after_s`` if the upstream sent one  retryable
            ├── UpstreamServerError 5xx (and 408)                                    retryable
            └── UpstreamRejected    any other 4xx (bad key, bad request)              not retried

Messages name the provider and the HTTP status at most: never an upstream body,
a header or an API key. An error answer's own message, stripped of anything like
a key and shortened, is kept apart in ``UpstreamError.upstream_message`` for the
operator's log (the pool logs it); it is never part of ``str()`` or ``repr()``.
httpx's errors are translated at the boundary with ``raise ... from`` in
:mod:`xintu.llm._providers`.
"""

from __future__ import annotations

from typing import Literal

from ..errors import ClassifierError

__all__ = [
    "BadAnswer",
    "ImageNotUploadable",
    "LlmError",
    "LlmUnavailable",
    "UnavailableReason",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamRejected",
    "UpstreamServerError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]

#: Why :class:`LlmUnavailable` refused a call without trying.
UnavailableReason = Literal[
    "no_provider",  # no provider configured: local only
    "breaker_open",  # every provider's breaker is open
    "inbox_full",  # the LLM pool's inbox is full
    "no_time",  # the remaining deadline is under the fallback reserve
    "queue_too_long",  # the queue ahead would outlast the deadline less the reserve
    "closed",  # the pool is shutting down
]


class LlmError(ClassifierError):
    """An LLM classification failed; the dispatcher falls back to the local pool.

    ``queued`` is True when the pool had taken the work (the caller waited for it)
    and False for a refusal at the door: the runtime gives the fallback of queued
    work priority over new work on the local pool.
    """

    error_code = "llm_error"
    queued = False


class LlmUnavailable(LlmError):
    """Refused at once, before any upstream call: degrade to the local pool now."""

    error_code = "llm_unavailable"

    def __init__(self, message: str, *, reason: UnavailableReason) -> None:
        super().__init__(message)
        self.reason: UnavailableReason = reason


class ImageNotUploadable(LlmError):
    """The image could not be downscaled and re-encoded for upload."""

    error_code = "llm_image_not_uploadable"


class BadAnswer(LlmError):
    """The upstream answered, but not with a usable classification."""

    error_code = "llm_bad_answer"


class UpstreamError(LlmError):
    """One provider failed one attempt. ``retryable`` says whether trying again may help."""

    error_code = "llm_upstream_error"
    retryable: bool = False

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.status = status
        self.retry_after_s = retry_after_s
        # The upstream's own error message, sanitised (see the module docstring).
        self.upstream_message: str | None = None


class UpstreamTimeout(UpstreamError):
    error_code = "llm_upstream_timeout"
    retryable = True


class UpstreamUnreachable(UpstreamError):
    error_code = "llm_upstream_unreachable"
    retryable = True


class UpstreamRateLimited(UpstreamError):
    error_code = "llm_upstream_rate_limited"
    retryable = True


class UpstreamServerError(UpstreamError):
    error_code = "llm_upstream_server_error"
    retryable = True


class UpstreamRejected(UpstreamError):
    error_code = "llm_upstream_rejected"
    retryable = False
