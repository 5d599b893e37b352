"""The prompt, and robust parsing of the model's JSON answer.

Models wrap JSON in code fences, put prose around it, or answer ``"Travel
Scenery"`` for ``travel_scenery``. :func:`parse_answer` accepts all of that and
nothing looser: the first JSON object in the text that has a ``category`` key is
the answer; its category must be one of the eight keys (case, spaces and hyphens
normalised), its confidence a number in 0..1. Anything else raises
:class:`~xintu.llm.BadAnswer`, which the chain counts as a failed call.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .._types import Category
from ._errors import BadAnswer

__all__ = ["SYSTEM_PROMPT", "USER_PROMPT", "ParsedAnswer", "parse_answer"]

SYSTEM_PROMPT = (
    "You classify photos for a personal photo album. "
    "You answer with one JSON object and nothing else."
)

USER_PROMPT = """\
Classify this photo into exactly one album category.

Categories:
- social_activities: two or more people together (friends, family, parties, group photos, events)
- pets: animals kept as pets (dogs, cats, rabbits, birds, fish), alone or in the foreground
- single_person: one person is the subject (portraits, selfies)
- foods: food or drinks as the subject (dishes, meals, snacks, cakes, coffee)
- travel_scenery: landscapes, nature, cities, landmarks, buildings, streets
- screenshot: a screenshot of a phone, tablet or computer screen (apps, chats, web pages)
- idcard: identity documents and cards (ID cards, passports, driving licences, bank cards)
- other: anything else (objects, documents that are not ID cards, art, blurry photos)

Answer with only this JSON object:
{"category": "<one of the keys above>", "confidence": <number from 0 to 1>, \
"description": "<what the photo shows, at most 15 words>"}"""

_MAX_SCAN_CHARS = 20_000  # of the answer text; answers are a few hundred characters
_MAX_OBJECTS = 32  # '{' positions tried
_MAX_DESCRIPTION = 200
_FENCE_RE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_CATEGORIES = {c.value: c for c in Category}


@dataclass(frozen=True, slots=True)
class ParsedAnswer:
    """A validated answer: one of the eight categories, a confidence in 0..1."""

    category: Category
    confidence: float
    description: str | None


def _candidates(text: str) -> list[dict[str, Any]]:
    """JSON objects in *text*, in order: whole text, fenced blocks, then any ``{...}``."""
    found: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    chunks = [text, *(m.group(1) for m in _FENCE_RE.finditer(text))]
    for chunk in chunks:
        chunk = chunk.strip()
        try:
            obj = json.loads(chunk)
        except ValueError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    start, tried = text.find("{"), 0
    while start != -1 and tried < _MAX_OBJECTS:
        tried += 1
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        start = text.find("{", end)
    return found


def _category(value: object) -> Category:
    if not isinstance(value, str):
        raise BadAnswer("the answer's category is not a string")
    key = re.sub(r"[\s-]+", "_", value.strip().lower())
    category = _CATEGORIES.get(key)
    if category is None:
        raise BadAnswer(f"the answer's category {value[:40]!r} is not one of the eight keys")
    return category


def _confidence(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise BadAnswer("the answer's confidence is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadAnswer("the answer's confidence is not a number")
    confidence = float(value)
    if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
        raise BadAnswer(f"the answer's confidence {confidence!r} is outside 0..1")
    return confidence


def _description(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    if not text:
        return None
    return text if len(text) <= _MAX_DESCRIPTION else text[: _MAX_DESCRIPTION - 1] + "…"


def parse_answer(text: str) -> ParsedAnswer:
    """The classification in the model's answer *text*; :class:`BadAnswer` if none.

    The first JSON object with a ``category`` key decides: if its category or
    confidence is off-schema the answer fails, even if a later object would pass.
    """
    scanned = text[:_MAX_SCAN_CHARS]
    for obj in _candidates(scanned):
        if "category" not in obj:
            continue
        if "confidence" not in obj:
            raise BadAnswer("the answer has no confidence")
        return ParsedAnswer(
            category=_category(obj["category"]),
            confidence=_confidence(obj["confidence"]),
            description=_description(obj.get("description")),
        )
    raise BadAnswer("the answer holds no JSON object with a category")
