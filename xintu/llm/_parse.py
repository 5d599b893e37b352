"""The prompt, and robust parsing of the model's JSON answer.

Models wrap JSON in code fences, put prose around it, or answer ``"Travel
Scenery"`` for ``travel_scenery``. :func:`parse_answer` accepts all of that and
nothing looser: the first JSON object in the text that has a ``category`` key is
the answer; its category must be one of the eight keys (case, spaces and hyphens
normalised), its confidence a number in 0..1. Anything else raises
:class:`~xintu.llm.BadAnswer`, which the chain counts as a failed call.

The prompt asks for the description in the configured language
(:data:`DescriptionLanguage`): ``zh``, Chinese in at most 30 characters, as the
original Xintu backend asked (its album app shows it), or ``en``, English in at
most 15 words. A longer description is kept, clipped to that length with ``…``;
space-separated text is not cut mid-word where a word boundary is near.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .._types import Category
from ._errors import BadAnswer

__all__ = [
    "DESCRIPTION_LANGUAGES",
    "SYSTEM_PROMPT",
    "DescriptionLanguage",
    "ParsedAnswer",
    "clip_description",
    "parse_answer",
    "user_prompt",
]

#: The languages the description can be asked in (``[llm] description_language``).
DescriptionLanguage = Literal["zh", "en"]
DESCRIPTION_LANGUAGES: tuple[DescriptionLanguage, ...] = ("zh", "en")

SYSTEM_PROMPT = (
    "You classify photos for a personal photo album. "
    "You answer with one JSON object and nothing else."
)

_USER_PROMPT = """\
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
{{"category": "<one of the keys above>", "confidence": <number from 0 to 1>, \
"description": "<{description}>"}}{note}"""


@dataclass(frozen=True, slots=True)
class _Language:
    description: str  # the description's placeholder in the JSON template
    note: str  # a line after the template, or ""
    max_chars: int
    max_words: int | None  # of space-separated words


_LANGUAGES: Mapping[DescriptionLanguage, _Language] = {
    # The original backend's wording (config.py CLASSIFICATION_PROMPT), less its
    # "optional" (可选): the album app shows the description.
    "zh": _Language(
        description="简短描述图片内容（中文，30字以内）",  # noqa: RUF001 - Chinese punctuation
        note="\nWrite the description in Simplified Chinese, at most 30 characters.",
        max_chars=30,
        max_words=None,
    ),
    "en": _Language(
        description="what the photo shows, at most 15 words",
        note="",
        max_chars=200,
        max_words=15,
    ),
}
_USER_PROMPTS: Mapping[DescriptionLanguage, str] = {
    code: _USER_PROMPT.format(description=lang.description, note=lang.note)
    for code, lang in _LANGUAGES.items()
}


def user_prompt(language: DescriptionLanguage) -> str:
    """The instruction sent with the photo, asking the description in *language*."""
    return _USER_PROMPTS[language]


_MAX_SCAN_CHARS = 20_000  # of the answer text; answers are a few hundred characters
_MAX_OBJECTS = 32  # '{' positions tried
_ELLIPSIS = "…"
# Dropped before the ellipsis: Latin and Chinese (full-width) separators.
_TRAILING_PUNCTUATION = " ,;:.\uff0c\u3001\uff1b\uff1a\u3002"
# A word cut back to a space loses at most this share of the allowed characters.
_WORD_BACKOFF = 0.3
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


def _is_word_char(char: str) -> bool:
    """A letter or digit of a space-separated script (CJK text may break anywhere)."""
    return char.isalnum() and unicodedata.east_asian_width(char) not in ("W", "F")


def clip_description(text: str, language: DescriptionLanguage) -> str:
    """*text* within *language*'s length: at most its words, then its characters.

    A clipped text ends in ``…``, counted in the characters. A character cut that
    would split a word of space-separated text goes back to the last space
    instead, unless that gives up more than 30 % of the allowed length.
    """
    lang = _LANGUAGES[language]
    clipped = False
    if lang.max_words is not None:
        words = text.split(" ")
        if len(words) > lang.max_words:
            text, clipped = " ".join(words[: lang.max_words]), True
    if len(text) > lang.max_chars:
        cut = lang.max_chars - len(_ELLIPSIS)
        if _is_word_char(text[cut - 1]) and _is_word_char(text[cut]):
            space = text.rfind(" ", 0, cut)
            if space >= cut * (1 - _WORD_BACKOFF):
                cut = space
        text, clipped = text[:cut], True
    if not clipped:
        return text
    return text.rstrip(_TRAILING_PUNCTUATION) + _ELLIPSIS


def _description(value: object, language: DescriptionLanguage) -> str | None:
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    if not text:
        return None
    return clip_description(text, language)


def parse_answer(text: str, *, language: DescriptionLanguage) -> ParsedAnswer:
    """The classification in the model's answer *text*; :class:`BadAnswer` if none.

    The first JSON object with a ``category`` key decides: if its category or
    confidence is off-schema the answer fails, even if a later object would pass.
    Its description is clipped to *language*'s length (:func:`clip_description`).
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
            description=_description(obj.get("description"), language),
        )
    raise BadAnswer("the answer holds no JSON object with a category")
