"""The client's values: a classification result, one item of a batch, the retry policy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import XintuClientError

__all__ = ["BatchItem", "ClassifyResult", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    """The service's answer for one photo.

    ``category`` is one of the eight album keys (kept a ``str`` so that a newer
    server's category does not break an older client). ``source`` is ``cache``,
    ``llm`` or ``local``; ``from_cache`` is true when no classifier ran for this
    call. ``raw`` is the ``data`` object exactly as the server sent it.
    """

    category: str
    confidence: float
    source: str
    from_cache: bool
    image_hash: str
    description: str | None = None
    provider: str | None = None
    model: str | None = None
    request_id: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_data(
        cls,
        data: Mapping[str, Any],
        *,
        image_hash: str,
        from_cache: bool,
        request_id: str | None,
    ) -> ClassifyResult:
        """Build from the API's ``data`` object (original fields plus extensions)."""

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) else None

        category = text("category")
        if category is None:
            raise ValueError("the answer has no category")
        confidence = data.get("confidence")
        source = text("source") or ("cache" if from_cache else "unknown")
        return cls(
            category=category,
            confidence=float(confidence) if isinstance(confidence, int | float) else 0.0,
            source=source,
            from_cache=from_cache,
            image_hash=text("image_hash") or image_hash,
            description=text("description"),
            provider=text("provider"),
            model=text("model"),
            request_id=request_id,
            raw=dict(data),
        )

    def to_dict(self) -> dict[str, Any]:
        """A flat, JSON-ready dict (``raw`` left out)."""
        return {
            "image_hash": self.image_hash,
            "category": self.category,
            "confidence": self.confidence,
            "source": self.source,
            "from_cache": self.from_cache,
            "description": self.description,
            "provider": self.provider,
            "model": self.model,
            "request_id": self.request_id,
        }


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One input of ``classify_many``: its result or its error, never both.

    ``index`` is the input's position, ``name`` its path (or ``<bytes #i>``),
    ``image_hash`` its SHA-256 (``None`` when the file could not be read).
    """

    index: int
    name: str
    image_hash: str | None
    result: ClassifyResult | None = None
    error: XintuClientError | None = None

    @property
    def ok(self) -> bool:
        """True when the photo was classified."""
        return self.result is not None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long the client retries a logical request.

    A request answered with a status in ``retry_statuses`` (409 "the first request
    with this key is still in flight", 429 and 503) is sent
    again after the server's ``Retry-After`` (else an exponential backoff from
    ``backoff_base_s`` up to ``backoff_max_s``), with the same ``Idempotency-Key``,
    for at most ``max_attempts`` sends and ``max_total_s`` seconds in all: a wait
    that would end past that budget is not started, and the last error is raised.
    ``retry_transport_errors`` also retries failed connections and broken reads,
    which the Idempotency-Key makes safe.
    """

    max_attempts: int = 5
    max_total_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    retry_statuses: frozenset[int] = frozenset({409, 429, 503})
    retry_transport_errors: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_total_s < 0 or self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("retry times must not be negative")
