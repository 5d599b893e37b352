"""The values that travel between actors: categories, sources and classifications."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["CATEGORIES", "Category", "Classification", "Source", "is_image_hash"]


class Category(StrEnum):
    """The eight album categories, stored and returned as these exact strings."""

    SOCIAL_ACTIVITIES = "social_activities"  # people together
    PETS = "pets"
    SINGLE_PERSON = "single_person"
    FOODS = "foods"
    TRAVEL_SCENERY = "travel_scenery"  # landscapes, landmarks, buildings
    SCREENSHOT = "screenshot"  # phone or desktop screenshots
    IDCARD = "idcard"  # identity documents, passports, cards
    OTHER = "other"


CATEGORIES: tuple[str, ...] = tuple(c.value for c in Category)


class Source(StrEnum):
    """Where an answer came from."""

    CACHE = "cache"
    LLM = "llm"
    LOCAL = "local"


_HASH_RE = re.compile(r"[0-9a-f]{64}")


def is_image_hash(value: object) -> bool:
    """True for a lowercase 64-hex SHA-256 digest (callers lowercase input first)."""
    return isinstance(value, str) and _HASH_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Classification:
    """One classifier's answer for one image.

    ``source`` is the classifier that produced it (``llm`` or ``local``); a cached
    answer keeps its original source and is marked ``from_cache`` on the wire.
    ``local_inference_result`` carries the local model's evidence (top-5 labels,
    detector counts, the deciding rule) and is ``None`` for LLM answers.
    """

    category: Category
    confidence: float
    source: Source
    model: str
    description: str | None = None
    provider: str | None = None
    local_inference_result: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence {self.confidence!r} outside 0..1")

    def to_data(self, image_hash: str, *, from_cache: bool) -> dict[str, Any]:
        """The API's ``data`` object (original fields plus the v1 extensions)."""
        return {
            "category": self.category.value,
            "confidence": round(self.confidence, 4),
            "description": self.description,
            "local_inference_result": (
                dict(self.local_inference_result) if self.local_inference_result else None
            ),
            "image_hash": image_hash,
            "source": Source.CACHE.value if from_cache else self.source.value,
            "provider": self.provider,
            "model": self.model,
        }
