"""The LLM classifier's errors. Every one is a :class:`~xintu.errors.ClassifierError`.

::

    ClassifierError                 (xintu.errors) a classifier failed; the caller falls back
    └── LlmError                    an LLM classification failed
        ├── LlmUnavailable          refused at once, no upstream call made (``reason``)
        ├── ImageNotUploadable      the image could not be downscaled/re-encoded
        ├── BadAnswer               the answer is unparseable or off-schema
        └── UpstreamError           one provider failed (``provider``, ``retryable``)
            ├── UpstreamTimeout     no answer within the provider's timeout_s         retryable
            │   └── CallAbandoned   the caller's deadline came first: not the upstream's fault
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

Whose fault: an :class:`UpstreamError` (but :class:`CallAbandoned`) or a
:class:`BadAnswer` is the upstream's: its breaker counts it, and
:func:`failure_kind` names it for readiness, health and metrics (one of
:data:`FAILURE_KINDS`). :class:`CallAbandoned` is the caller's (its deadline, less
the fallback reserve, ran out before the upstream's own ``timeout_s``): the breaker
counts it neither as a success nor as a failure, unless the call had already run
past ``llm.breaker_slow_call_s`` (kind ``slow``: the pool counted it then).
"""

from __future__ import annotations

from typing import Literal

from ..errors import ClassifierError

__all__ = [
    "FAILURE_KINDS",
    "BadAnswer",
    "CallAbandoned",
    "FailureKind",
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
    "failure_kind",
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


class CallAbandoned(UpstreamTimeout):
    """The call was cut short by the caller's deadline (less the fallback reserve)
    before the upstream answered or reached its own ``timeout_s``.

    Not the upstream's failure: its breaker counts it neither way (one hurried
    client must not open the breaker that every client shares). It stays an
    :class:`UpstreamTimeout` (what such a call raised before) for whoever catches
    that, but is never retried: the deadline has passed. ``provider`` is the
    provider whose call was cut, or ``"llm"`` when the call was still queued.
    """

    error_code = "llm_call_abandoned"
    retryable = False


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


#: Why a provider's last call failed, as readiness, health and metrics name it:
#: a bounded set (a metric label). ``unauthorized`` (401) and ``forbidden`` (403)
#: mean a wrong key or account: they persist until the configuration changes.
FailureKind = Literal[
    "unauthorized",  # 401
    "forbidden",  # 403
    "rate_limited",  # 429
    "server_error",  # 5xx, 408
    "rejected",  # any other 4xx (a parameter or model the upstream refuses)
    "timeout",  # no answer within the provider's own timeout_s
    "slow",  # no answer within llm.breaker_slow_call_s (counted then, however it ends)
    "connect_error",  # connect, read or protocol error
    "bad_answer",  # an answer, but not a usable classification
    "other",  # any other LlmError
]
FAILURE_KINDS: tuple[FailureKind, ...] = (
    "unauthorized",
    "forbidden",
    "rate_limited",
    "server_error",
    "rejected",
    "timeout",
    "slow",
    "connect_error",
    "bad_answer",
    "other",
)


def failure_kind(exc: LlmError) -> FailureKind:
    """The :data:`FailureKind` of an upstream's failure."""
    if isinstance(exc, UpstreamRejected):
        if exc.status == 401:
            return "unauthorized"
        if exc.status == 403:
            return "forbidden"
        return "rejected"
    if isinstance(exc, UpstreamRateLimited):
        return "rate_limited"
    if isinstance(exc, UpstreamServerError):
        return "server_error"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamUnreachable):
        return "connect_error"
    if isinstance(exc, BadAnswer):
        return "bad_answer"
    return "other"
