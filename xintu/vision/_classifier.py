"""The local classifier: decode, detect, one batched ONNX run, then the rules.

:class:`LocalClassifier` is what the local pool drives: :meth:`~LocalClassifier.prepare`
in decode threads, :meth:`~LocalClassifier.infer` in inference threads with a whole
batch, one ``session.run`` per batch. Both are thread-safe: onnxruntime sessions
accept concurrent ``run`` calls (the face detectors' sessions too).

The decision, per image, from the softmax over the 1000 ImageNet classes and the
:class:`~._detect.ImageSignals`:

1. ``idcard`` when the card evidence (card outline or aspect, a portrait on one
   side, lines of text, plus ImageNet's printed-paper classes as a weak hint) is
   strong enough;
2. ``screenshot`` when the screen evidence (exact screen size, no camera EXIF,
   flat colours, text, plus ImageNet's ``website``/screen classes) is;
3. otherwise the strongest of: people (faces or people detected, or ImageNet's
   clothing classes) → ``single_person`` for one, ``social_activities`` for two or
   more; and the ImageNet mass of the ``pets``, ``foods`` and ``travel_scenery``
   classes (:mod:`._categories`);
4. ``other`` when none of those reaches :data:`MIN_VOTE`.

When both 1 and 2 pass their thresholds, the stronger wins. Flat graphics (line
art, logos) have their ImageNet content votes halved: ImageNet's nearest class for
a silhouette says little about the album category.

The confidence is that winning evidence itself (a softmax mass, or the mass
combined with detector strength), so it moves with the model's probabilities. A
face's detector strength is its size (a base plus its relative height) times its
score: BlazeFace gives a cat's or a dog's face 0.6-0.85, and a weak face must not
outvote a strong ``pets`` mass (tune half: ``cat.webp``, ``puppy.jpg``).

:meth:`~LocalClassifier.statistics` counts the images, their time, the face
detectors' work and the text path's (:class:`LocalStatistics`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._config import ImagesConfig, ModelConfig
from .._types import Category, Classification, Source
from ..errors import ModelError
from ..model import INPUT_NAME, MODEL_NAME, OUTPUT_NAME, create_session, imagenet_labels
from ._categories import GROUPS, Evidence
from ._decode import CROP_SIZE, DecodedImage, decode_image
from ._detect import Detectors, ImageSignals
from ._faces import FaceStatistics
from ._text import TextReader, TextSignals, TextStatistics, text_adjusted

__all__ = [
    "IDCARD_THRESHOLD",
    "MIN_VOTE",
    "SCREENSHOT_THRESHOLD",
    "LocalClassifier",
    "LocalStatistics",
]

#: Evidence needed for the two signal-driven categories.
IDCARD_THRESHOLD = 0.65
SCREENSHOT_THRESHOLD = 0.65
#: Weights of ImageNet's hints inside those two scores.
_DOCUMENT_HINT = 0.25
_WEBSITE_HINT = 0.45
_SCREEN_HINT = 0.25
#: Least evidence for a content category; below it the answer is ``other``.
MIN_VOTE = 0.4
#: Most confidence an ``other`` answer may claim. Its confidence is 1 - the strongest
#: evidence for any category, which is high exactly when nothing was found, yet on the
#: evaluation set's tune half a high value does not make it likelier to be right:
#: ``other`` answers are right 72 % of the time (21 of 29), 62 % of those saying
#: 0.8-0.9 (docs/evaluation.md, "Calibration"). So a weak-evidence ``other`` says at
#: most what ``other`` answers are worth, never 0.9.
OTHER_MAX_CONFIDENCE = 0.72
#: Flat graphics: nearly all neighbouring pixels equal, nearly all in 8 colours.
_GRAPHIC_FLAT = 0.8
_GRAPHIC_COLOURS = 0.9
_GRAPHIC_DISCOUNT = 0.5
#: Person evidence: ImageNet clothing mass alone counts this much less than a face.
_PERSON_CLASS_FACTOR = 0.8
#: Detector strength of one face: a base plus the face's relative height.
_FACE_BASE = 0.55
_FACE_SIZE_GAIN = 1.5
#: Confidence is kept inside this band: never certain, never zero.
_CONF_MIN, _CONF_MAX = 0.05, 0.99
_TOP_K = 5

_VOTE_KEYS: tuple[Category | Evidence, ...] = (
    Category.PETS,
    Category.FOODS,
    Category.TRAVEL_SCENERY,
    Evidence.PERSON,
    Evidence.SCREEN,
    Evidence.DOCUMENT,
)
_WEBSITE_INDEX = 916


def _vote_matrix(num_classes: int) -> npt.NDArray[np.float64]:
    """(num_classes, len(_VOTE_KEYS)): each class's weight in each vote."""
    matrix = np.zeros((num_classes, len(_VOTE_KEYS)), dtype=np.float64)
    for group in GROUPS:
        column = _VOTE_KEYS.index(group.votes)
        for index in group.classes:
            matrix[index, column] = max(matrix[index, column], group.weight)
    return matrix


@dataclass(frozen=True, slots=True)
class LocalStatistics:
    """What one :class:`LocalClassifier` did since it was made (its ``statistics()``).

    ``prepared``/``prepare_ms``: images through :meth:`~LocalClassifier.prepare`
    (decode and face detection) and their wall-clock milliseconds;
    ``inferred``/``infer_ms``: images through :meth:`~LocalClassifier.infer`
    (EfficientNet, the rules and the text path); ``faces``: the face detectors'
    counters; ``text``: the text path's (``None`` when it is off).
    """

    prepared: int
    prepare_ms: float
    inferred: int
    infer_ms: float
    faces: FaceStatistics
    text: TextStatistics | None

    def __add__(self, other: LocalStatistics) -> LocalStatistics:
        """Both counts together: the local pool's worker processes each have their
        own classifier, and ``sum(parts[1:], parts[0])`` is the service's total."""
        text = self.text if other.text is None else other.text
        if self.text is not None and other.text is not None:
            text = self.text + other.text
        return LocalStatistics(
            prepared=self.prepared + other.prepared,
            prepare_ms=round(self.prepare_ms + other.prepare_ms, 1),
            inferred=self.inferred + other.inferred,
            infer_ms=round(self.infer_ms + other.infer_ms, 1),
            faces=self.faces + other.faces,
            text=text,
        )


@dataclass(frozen=True, slots=True)
class _Decision:
    category: Category
    confidence: float
    rule: str


class LocalClassifier:
    """EfficientNet-Lite0 plus detectors, answering with album categories."""

    model_name: str

    def __init__(
        self,
        model: ModelConfig,
        images: ImagesConfig,
        model_path: Path,
        *,
        description_language: str = "en",
    ) -> None:
        """Open the ONNX session at *model_path* and the face detectors beside it
        (:func:`xintu.model.ensure_model` puts them there); raises :class:`ModelError`.

        *description_language* (``llm.description_language``: ``"zh"`` or ``"en"``)
        is the language of the answers' ``description``, as the LLM's."""
        self.model_name = MODEL_NAME
        self._language = description_language
        self._images = images
        self._session = create_session(model_path, intra_op_threads=model.intra_op_threads)
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise ModelError(f"the model at {model_path} lacks {INPUT_NAME!r}/{OUTPUT_NAME!r}")
        self._labels = imagenet_labels()
        self._votes = _vote_matrix(len(self._labels))
        self._detectors = Detectors(model_path.parent)
        # Text signals (_text.py): off, with a warning, when the OCR models are absent.
        self._text = TextReader.beside(model_path, intra_op_threads=model.intra_op_threads)
        self._lock = threading.Lock()
        self._prepared = 0
        self._prepare_ms = 0.0
        self._inferred = 0
        self._infer_ms = 0.0

    def prepare(self, data: bytes) -> DecodedImage:
        """Decode *data* and run the detectors; thread-safe (a decode thread's job).

        Raises the errors of :func:`decode_image`. The faces are found in the
        detectors' RGB image. The returned image keeps the detectors' gray and RGB
        copies only for the text path (at most 640x640 pixels each), which decides
        in :meth:`infer`, with ImageNet's answer, whether to look at them.
        """
        started = time.perf_counter()
        decoded = decode_image(data, self._images)
        gray, rgb = decoded.gray, decoded.rgb
        if gray is None or rgb is None:  # pragma: no cover - decode_image sets both
            return decoded
        signals = self._detectors.detect(rgb, decoded.signals, gray=gray)
        keep = self._text is not None
        prepared = replace(
            decoded, signals=signals, gray=gray if keep else None, rgb=rgb if keep else None
        )
        elapsed = (time.perf_counter() - started) * 1000.0
        with self._lock:
            self._prepared += 1
            self._prepare_ms += elapsed
        return prepared

    def infer(self, batch: Sequence[DecodedImage]) -> list[Classification]:
        """Classify prepared images with one ``session.run``; thread-safe."""
        if not batch:
            return []
        for item in batch:
            if item.tensor.shape != (3, CROP_SIZE, CROP_SIZE):
                raise ValueError(f"tensor of shape {item.tensor.shape}, not (3, 224, 224)")
        started = time.perf_counter()
        x = np.stack([item.tensor for item in batch]).astype(np.float32, copy=False)
        try:
            (logits,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})
        except MemoryError:
            raise
        except Exception as exc:
            # onnxruntime's errors share no base class (pybind11 types, RuntimeError).
            raise ModelError(f"the local model failed on a batch of {len(batch)}") from exc
        probs = _softmax(np.asarray(logits, dtype=np.float64))
        votes = probs @ self._votes
        results = [
            self._classify_one(p, v, item.signals, item.gray, item.rgb)
            for p, v, item in zip(probs, votes, batch, strict=True)
        ]
        elapsed = (time.perf_counter() - started) * 1000.0
        with self._lock:
            self._inferred += len(batch)
            self._infer_ms += elapsed
        return results

    def classify(self, data: bytes) -> Classification:
        """:meth:`prepare` then :meth:`infer` on one image (tests, tools)."""
        return self.infer([self.prepare(data)])[0]

    def statistics(self) -> LocalStatistics:
        """A snapshot of the counters (images, time, face detection, text path);
        thread-safe. Each process's classifier counts its own images."""
        with self._lock:
            prepared, prepare_ms = self._prepared, self._prepare_ms
            inferred, infer_ms = self._inferred, self._infer_ms
        return LocalStatistics(
            prepared=prepared,
            prepare_ms=round(prepare_ms, 1),
            inferred=inferred,
            infer_ms=round(infer_ms, 1),
            faces=self._detectors.face_statistics(),
            text=self.text_statistics(),
        )

    def text_statistics(self) -> TextStatistics | None:
        """How often the text path ran and what it cost; ``None`` when it is off."""
        return None if self._text is None else self._text.statistics()

    # --- the rules -------------------------------------------------------------------

    def _classify_one(
        self,
        probs: npt.NDArray[np.float64],
        votes: npt.NDArray[np.float64],
        signals: ImageSignals,
        gray: npt.NDArray[np.uint8] | None = None,
        rgb: npt.NDArray[np.uint8] | None = None,
    ) -> Classification:
        vote = {key: float(votes[i]) for i, key in enumerate(_VOTE_KEYS)}
        website = float(probs[_WEBSITE_INDEX])
        text = None
        if self._text is not None and gray is not None:
            text = self._text.read_if_useful(
                gray,
                signals,
                vote,
                colour=rgb,
                decide=lambda t: _decide(vote, website, signals, t).category,
            )
        decision = _decide(vote, website, signals, text)
        top = np.argsort(-probs)[:_TOP_K]
        top5 = [
            {"index": int(i), "label": self._labels[i], "probability": round(float(probs[i]), 4)}
            for i in top
        ]
        evidence: dict[str, Any] = {
            "model": self.model_name,
            "rule": decision.rule,
            "top5": top5,
            "votes": {str(k): round(v, 4) for k, v in vote.items()},
            "detectors": {"faces": signals.faces, "people": signals.people},
            "signals": signals.as_dict(),
            "text": text.as_dict() if text is not None else {"ran": False},
        }
        return Classification(
            category=decision.category,
            confidence=decision.confidence,
            source=Source.LOCAL,
            model=self.model_name,
            description=(
                _describe_zh(decision.category, signals)
                if self._language == "zh"
                else _describe(self._labels[int(top[0])], float(probs[top[0]]), signals)
            ),
            provider=None,
            local_inference_result=evidence,
        )


def _decide(
    vote: dict[Category | Evidence, float],
    website: float,
    s: ImageSignals,
    text: TextSignals | None = None,
) -> _Decision:
    """The rules of the module docstring, in order."""
    idcard = s.idcard_score + _DOCUMENT_HINT * vote[Evidence.DOCUMENT] if s.card_shape else 0.0
    screen_objects = vote[Evidence.SCREEN] - website  # weighted mass of other screen classes
    screenshot = s.screenshot_score + _WEBSITE_HINT * website + _SCREEN_HINT * screen_objects
    idcard, screenshot = text_adjusted(idcard, screenshot, s, text)  # identity words, layout
    # Both can fire (a card-shaped page element inside a screenshot): the stronger wins.
    if idcard >= IDCARD_THRESHOLD and idcard >= screenshot:
        return _Decision(Category.IDCARD, _conf(idcard), "idcard_signals")
    if screenshot >= SCREENSHOT_THRESHOLD:
        return _Decision(Category.SCREENSHOT, _conf(screenshot), "screenshot_signals")

    # Line art and flat graphics (a silhouette, a logo) are no photos of pets, food
    # or places, whatever ImageNet's nearest class is: their content votes count less.
    graphic = s.flat_fraction >= _GRAPHIC_FLAT and s.top_colours_fraction >= _GRAPHIC_COLOURS
    discount = _GRAPHIC_DISCOUNT if graphic else 1.0
    person = _person_evidence(vote[Evidence.PERSON], s)
    candidates: list[tuple[float, Category, str]] = [
        (discount * vote[Category.PETS], Category.PETS, "imagenet_pets"),
        (discount * vote[Category.FOODS], Category.FOODS, "imagenet_foods"),
        (
            discount * vote[Category.TRAVEL_SCENERY],
            Category.TRAVEL_SCENERY,
            "imagenet_travel_scenery",
        ),
    ]
    if person > 0.0:
        if s.persons >= 2:
            candidates.append((person, Category.SOCIAL_ACTIVITIES, "people_detected"))
        elif s.persons == 1:
            candidates.append((person, Category.SINGLE_PERSON, "person_detected"))
        else:
            candidates.append(
                (discount * person, Category.SINGLE_PERSON, "imagenet_person_classes")
            )
    best, category, rule = max(candidates, key=lambda c: c[0])
    if best >= MIN_VOTE:
        return _Decision(category, _conf(best), rule)
    strongest = max(best, idcard, screenshot)
    return _Decision(
        Category.OTHER, _conf(min(1.0 - strongest, OTHER_MAX_CONFIDENCE)), "no_category_evidence"
    )


def _person_evidence(person_mass: float, s: ImageSignals) -> float:
    """0..1: detector strength combined with ImageNet's clothing classes."""
    detector = 0.0
    if s.person_faces:
        tallest = max(f.height for f in s.person_faces)
        best = max(f.score for f in s.person_faces)
        detector = best * min(1.0, _FACE_BASE + _FACE_SIZE_GAIN * tallest)
    imagenet = _PERSON_CLASS_FACTOR * person_mass
    return 1.0 - (1.0 - detector) * (1.0 - imagenet)


def _conf(value: float) -> float:
    return round(min(_CONF_MAX, max(_CONF_MIN, value)), 4)


def _softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    out: npt.NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return out


# The album categories as the original backend's prompt names them.
_CATEGORY_ZH: dict[Category, str] = {
    Category.SOCIAL_ACTIVITIES: "社交活动",
    Category.PETS: "宠物萌照",
    Category.SINGLE_PERSON: "单人照片",
    Category.FOODS: "美食记录",
    Category.TRAVEL_SCENERY: "旅行风景",
    Category.SCREENSHOT: "手机截图",
    Category.IDCARD: "证件照",
    Category.OTHER: "其它",
}


def _describe_zh(category: Category, s: ImageSignals) -> str:
    """A short Chinese description (at most 30 characters, as the original asked
    of its LLM): the category's name, the faces counted, and that the local model
    said it ("本地识别"). There are no Chinese ImageNet labels offline; the English
    top-5 stays in ``local_inference_result``."""
    parts = [_CATEGORY_ZH[category]]
    if s.people >= 2:
        parts.append(f"{s.people}人")
    elif s.faces:
        parts.append(f"{s.faces}张人脸")
    return "，".join(parts) + "（本地识别）"  # noqa: RUF001 (Chinese punctuation)


def _describe(label: str, probability: float, s: ImageSignals) -> str:
    """A short human sentence: "tabby cat (ImageNet 62%), 1 face"."""
    parts = [f"{label} (ImageNet {probability:.0%})"]
    if s.faces:
        parts.append(f"{s.faces} face{'s' if s.faces != 1 else ''}")
    if s.people != s.faces:
        parts.append(f"{s.people} counted as {'person' if s.people == 1 else 'people'}")
    if s.screenshot_score >= 0.5:
        parts.append("looks like a screenshot")
    if s.idcard_score >= 0.5:
        parts.append("looks like an ID card")
    return ", ".join(parts)
