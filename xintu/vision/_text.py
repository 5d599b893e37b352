"""Text signals: PP-OCRv4 detection and recognition, for screenshots and identity documents.

Screens and documents are made of text; ordinary photos mostly are not. This module
finds text boxes with PP-OCRv4's DB detector, reads the most promising ones with its
CTC recogniser, and turns both into evidence for :mod:`._classifier`:

- the layout: how many text boxes, how much of the image they cover, how many are
  horizontal and left-aligned with another box (lines of a page or a UI);
- keywords: words that make an identity document nearly certain (``居民身份证``,
  ``公民身份号码``, ``PASSPORT``, ``IDENTITY CARD``, a machine-readable zone, a
  Chinese citizen number with a valid check digit) and field labels that make it
  likely in pairs (``姓名``, ``出生``, ``SURNAME``, ``DATE OF BIRTH``, ...).

Inputs, as the models were trained (PaddleOCR's training configurations): the
detector sees the detectors' RGB image (:func:`~._decode.detector_rgb`) in BGR order,
``(x / 255 - mean) / std`` with ImageNet's mean and deviation, its longest side
scaled to :data:`DETECT_SIDE` (480; sides multiples of 32); the recogniser sees
strips cut from the grayscale image (longest side 640, three equal channels, ``x /
127.5 - 1``), 48 pixels high. (rapidocr's own defaults, feeding the detector ``x /
127.5 - 1``, gave the same answers on the evaluation set's tune half.)

The cost is per pixel and per column: the detector takes ~68 ms of one core at 640
pixels a side, ~36 ms at 480 and ~13 ms at 320 (320 lost two identity cards of the
tune half, 480 none); the recogniser ~0.06 ms per input column per line, read one
line per run (a batch is padded to its widest line and cost more than its lines one
by one). So the text path runs only where it can change the answer, cheapest check
first (:meth:`TextReader.read_if_useful`):

1. :func:`text_gate`, on the cheap signals and ImageNet's votes: a card shape, a
   screenshot or idcard score near its threshold, or ImageNet's mass on screens and
   printed paper; never a capture at an exact screen size that the heuristics already
   call a screenshot. (Text-like lines alone no longer open it: on the tune half they
   opened it for 5 ordinary photos and changed no answer.)
2. the classifier's own rules, asked about the outcomes that bound what text can do
   (no text at all, a full page of aligned rows, an identity keyword): when none
   changes the category, nothing runs (``settled``);
3. detection; then the words are read only if at least :data:`READ_MIN_BOXES` boxes
   were found and an identity keyword would change the category (an image the
   signals already call an identity card is not read). At most
   :data:`MAX_CANDIDATES` regions, :data:`MAX_RECOGNISED` boxes (largest first) and
   :data:`MAX_REC_COLUMNS` input columns; reading stops at the first strong keyword.

:meth:`TextReader.statistics` counts each outcome and the time.

:class:`TextReader` is thread-safe: onnxruntime sessions accept concurrent ``run``
calls, the cv2 functions used are stateless, and its counters sit behind a lock.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from .._types import Category
from ..errors import ModelError
from ..model import create_session
from ..model._ocr import TextModels, verify_text_models  # not exported: internal to vision
from ._categories import Evidence
from ._detect import ImageSignals

__all__ = [
    "DETECT_SIDE",
    "MAX_RECOGNISED",
    "READ_MIN_BOXES",
    "TextReader",
    "TextSignals",
    "TextStatistics",
    "find_keywords",
    "text_adjusted",
    "text_gate",
]

logger = logging.getLogger("xintu.vision")

_U8Array = npt.NDArray[np.uint8]
_F32Array = npt.NDArray[np.float32]

# --- detection (DB post-processing, as PaddleOCR's DBPostProcess) -------------------
_DET_STRIDE = 32  # the detector's input sides are multiples of this
#: Longest side of the detector's input (module docstring: the cost is per pixel).
DETECT_SIDE = 480
#: The detector's input normalisation, per BGR channel (module docstring).
_DET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
_DET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
_DET_PIXEL_THRESHOLD = 0.3  # probability map -> text mask
_DET_BOX_THRESHOLD = 0.5  # a region's mean probability to count as a text box
_DET_UNCLIP_RATIO = 1.6  # DB shrinks text regions; grow them back by area * r / perimeter
_DET_MIN_SIDE = 3  # px on the map, before growing
#: Regions considered per image (largest first).
MAX_CANDIDATES = 200
# --- recognition --------------------------------------------------------------------
_REC_HEIGHT = 48
_REC_MAX_WIDTH = 1280  # a longer line is squeezed to this width
#: Lines read per recogniser run: one, since a batch is padded to its widest line
#: and costs more than its lines one by one (~0.06 ms per input column either way).
_REC_BATCH = 1
_REC_MIN_BOX_HEIGHT = 6  # px in the grayscale image: smaller text is not read
#: Boxes read per image (largest first), and the recogniser's total input width.
MAX_RECOGNISED = 8
#: Fewest text boxes worth reading: an identity document has a title, a name, a
#: number, dates (the specimens of the tune half show 7 to 18 at 480 px).
READ_MIN_BOXES = 4
MAX_REC_COLUMNS = 2400
# --- layout -------------------------------------------------------------------------
_HORIZONTAL_DEG = 5.0
_ALIGN_REL = 0.012  # left edges within 1.2% of the width are aligned
_LAYOUT_BOXES_LO, _LAYOUT_BOXES_HI = 2, 12
# --- gate ---------------------------------------------------------------------------
#: Heuristic scores (``ImageSignals``) this close to the 0.65 thresholds: text may decide.
_GATE_NEAR = 0.4
#: ImageNet mass on screens, web sites and printed paper that makes text worth reading.
_GATE_HINT = 0.10
#: A capture at an exact screen size scoring this high is a screenshot whatever it says.
_GATE_SCREEN_DONE = 0.85
# --- evidence -----------------------------------------------------------------------
_STRONG_KEYWORD_SCORE = 0.95
_LABELS_BASE, _LABELS_GAIN, _LABELS_MAX = 0.45, 0.15, 0.85  # two labels: 0.75
_W_LAYOUT = 0.2  # added to the screenshot score, for an image without camera EXIF
_NO_TEXT_PENALTY = 0.15  # taken from it when the detector found no text at all
_NO_TEXT_CARD_FACTOR = 0.5  # identity documents carry text: a card shape without any

#: Words that, read anywhere, make an identity document nearly certain. Latin ones
#: are matched upper-case without spaces, with one OCR error allowed from 7 letters.
STRONG_KEYWORDS: tuple[str, ...] = (
    "居民身份证",
    "公民身份号码",
    "身份证",
    "护照",
    "通行证",
    "居住证",
    "驾驶证",
    "社会保障卡",
    "PASSPORT",  # one edit away: PASSEPORT (French) matches too
    "REISEPASS",
    "IDENTITYCARD",
    "IDCARD",
    "RESIDENCEPERMIT",
    "DRIVINGLICENCE",
    "DRIVERLICENSE",  # and DRIVERSLICENSE, one edit away
)
#: Field labels of identity documents: two of them make one likely.
FIELD_LABELS: tuple[str, ...] = (
    "姓名",
    "性别",
    "民族",
    "出生",
    "住址",
    "签发机关",
    "有效期限",
    "SURNAME",
    "GIVENNAME",
    "DATEOFBIRTH",
    "PLACEOFBIRTH",
    "NATIONALITY",
    "DATEOFISSUE",
    "DATEOFEXPIRY",
    "DOCUMENTNO",
    "EXPIRY",
)
MRZ = "MRZ"
CITIZEN_NUMBER = "CITIZEN_NUMBER"
_FUZZY_MIN_LEN = 7  # Latin keywords this long match with one OCR error

# Characters OCR reads for the MRZ filler '<', and other look-alikes.
_LOOKALIKES = str.maketrans(
    {"\u00ab": "<", "\u2039": "<", "\u304f": "<", "\u3008": "<", "\uff1c": "<", "\u00d7": "X"}
)  # guillemets, hiragana ku, angle brackets, full-width <; the multiplication sign
_MRZ_LINE = re.compile(r"[A-Z0-9<]{20,50}")
_CITIZEN = re.compile(r"(?<!\d)\d{17}[\dX](?!\d)")
_CITIZEN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


@dataclass(frozen=True, slots=True)
class TextSignals:
    """What the text path found in one image (all counts in the detector's image)."""

    reason: str  # why the gate let it run
    boxes: int  # text boxes detected
    area_fraction: float  # their total area / the image's
    horizontal_fraction: float  # share of boxes within 5 degrees of horizontal
    aligned_fraction: float  # share of boxes left-aligned with a box in another row
    rows: int  # distinct rows of horizontal boxes
    recognised: int  # boxes read
    keywords: tuple[str, ...]  # STRONG_KEYWORDS, FIELD_LABELS, MRZ, CITIZEN_NUMBER found
    elapsed_ms: float
    detect_ms: float = 0.0  # of elapsed_ms, the detector's share
    #: Why nothing was read: "few_boxes" (fewer than a document has), "settled" (a
    #: keyword would not change the answer), "" when the boxes were read (or none).
    read_skipped: str = ""
    lines: tuple[str, ...] = field(default=(), repr=False)  # what was read (not exported)

    @property
    def strong(self) -> bool:
        """A keyword that makes an identity document nearly certain."""
        return any(k not in FIELD_LABELS for k in self.keywords)

    @property
    def document_score(self) -> float:
        """0..1 identity-document evidence from the words read."""
        if self.strong:
            return _STRONG_KEYWORD_SCORE
        labels = sum(k in FIELD_LABELS for k in self.keywords)
        if labels < 2:
            return 0.0
        return min(_LABELS_MAX, _LABELS_BASE + _LABELS_GAIN * labels)

    @property
    def layout_score(self) -> float:
        """0..1: many boxes, horizontal and aligned in columns, as on a page or a screen."""
        many = _ramp(self.boxes, _LAYOUT_BOXES_LO, _LAYOUT_BOXES_HI)
        return many * (0.5 * self.horizontal_fraction + 0.5 * self.aligned_fraction)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able evidence for ``local_inference_result`` (no recognised text)."""
        return {
            "ran": True,
            "reason": self.reason,
            "boxes": self.boxes,
            "area_fraction": round(self.area_fraction, 3),
            "horizontal_fraction": round(self.horizontal_fraction, 3),
            "aligned_fraction": round(self.aligned_fraction, 3),
            "rows": self.rows,
            "recognised": self.recognised,
            "keywords": list(self.keywords),
            "read_skipped": self.read_skipped,
            "layout_score": round(self.layout_score, 3),
            "document_score": round(self.document_score, 3),
            "elapsed_ms": round(self.elapsed_ms, 1),
            "detect_ms": round(self.detect_ms, 1),
        }


@dataclass(frozen=True, slots=True)
class TextStatistics:
    """How often the text path ran, and what it cost (since the reader was made).

    Of the images ``considered``, ``gated_out`` had nothing pointing at text
    (:func:`text_gate`), ``settled`` had an answer no text could change, and ``ran``
    (detection) the rest; of those, ``read`` had their largest boxes read and
    ``read_skipped`` had boxes whose words could not change the answer. Times are
    wall-clock milliseconds (``total_ms`` includes ``detect_ms``).
    """

    considered: int
    ran: int
    by_reason: dict[str, int]  # the images that ran, by the gate's reason
    boxes_detected: int
    boxes_recognised: int
    documents: int  # images where a keyword made an identity document likely
    total_ms: float
    gated_out: int = 0
    settled: int = 0
    read: int = 0
    read_skipped: int = 0
    detect_ms: float = 0.0

    @property
    def run_rate(self) -> float:
        return self.ran / self.considered if self.considered else 0.0

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.ran if self.ran else 0.0

    def __add__(self, other: TextStatistics) -> TextStatistics:
        """Both counts together (e.g. the classifiers of several processes)."""
        reasons = dict(self.by_reason)
        for reason, n in other.by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + n
        return TextStatistics(
            considered=self.considered + other.considered,
            ran=self.ran + other.ran,
            by_reason=reasons,
            boxes_detected=self.boxes_detected + other.boxes_detected,
            boxes_recognised=self.boxes_recognised + other.boxes_recognised,
            documents=self.documents + other.documents,
            total_ms=round(self.total_ms + other.total_ms, 1),
            gated_out=self.gated_out + other.gated_out,
            settled=self.settled + other.settled,
            read=self.read + other.read,
            read_skipped=self.read_skipped + other.read_skipped,
            detect_ms=round(self.detect_ms + other.detect_ms, 1),
        )


#: The text outcomes that bound what the text path can do to an answer: no text at
#: all, a full page of aligned rows, and an identity keyword.
_NO_TEXT = TextSignals("probe", 0, 0.0, 0.0, 0.0, 0, 0, (), 0.0)
_FULL_PAGE = TextSignals("probe", _LAYOUT_BOXES_HI, 0.5, 1.0, 1.0, _LAYOUT_BOXES_HI, 0, (), 0.0)
_STRONG_WORD = STRONG_KEYWORDS[0]


def text_gate(signals: ImageSignals, *, hint: float) -> str | None:
    """Why the text path should run on this image, or ``None`` when it cannot matter.

    *hint* is ImageNet's probability mass on screens, web sites and printed paper
    (the ``screen`` and ``document`` votes of :mod:`._categories`).
    """
    if (
        signals.screen_resolution
        and not signals.card_shape
        and signals.screenshot_score >= _GATE_SCREEN_DONE
    ):
        return None  # a capture at a screen's exact size: a screenshot, whatever it says
    if signals.card_shape:
        return "card_shape"
    if signals.screenshot_score >= _GATE_NEAR or signals.idcard_score >= _GATE_NEAR:
        return "near_threshold"
    if hint >= _GATE_HINT:
        return "imagenet_hint"
    return None


def text_adjusted(
    idcard: float, screenshot: float, signals: ImageSignals, text: TextSignals | None
) -> tuple[float, float]:
    """The idcard and screenshot evidence of :mod:`._classifier` with the text added.

    Identity keywords raise the idcard evidence to their :attr:`~TextSignals.document_score`
    (card outline or not: a scan on an A4 page has none), and then the rows of text
    are the document's, not a screen's. Otherwise text laid out in rows raises the
    screenshot evidence of an image without camera EXIF, and no text at all lowers
    it (flat graphics without a word are seldom screenshots), as it lowers the
    idcard evidence of a card shape (every identity document carries text).
    """
    if text is None:
        return idcard, screenshot
    if text.document_score > 0.0:
        return max(idcard, text.document_score), screenshot
    if text.boxes == 0:
        idcard *= _NO_TEXT_CARD_FACTOR
    if not signals.exif_camera:
        if text.boxes == 0:
            screenshot -= _NO_TEXT_PENALTY
        else:
            screenshot += _W_LAYOUT * text.layout_score
    return idcard, max(0.0, screenshot)


class TextReader:
    """PP-OCRv4 detection and recognition on one pair of onnxruntime sessions."""

    def __init__(self, models: TextModels, *, intra_op_threads: int) -> None:
        """Open both models (raises :class:`~xintu.errors.ModelError`)."""
        try:
            keys = models.keys.read_text("utf-8").rstrip("\n").split("\n")
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the text dictionary {models.keys}: {exc}") from exc
        # CTC: index 0 is the blank; the dictionary; then a space (PaddleOCR's layout).
        self._chars: tuple[str, ...] = ("", *keys, " ")
        self._det = create_session(models.det, intra_op_threads=intra_op_threads)
        self._rec = create_session(models.rec, intra_op_threads=intra_op_threads)
        self._det_in = self._det.get_inputs()[0].name
        self._rec_in = self._rec.get_inputs()[0].name
        classes = self._rec.get_outputs()[0].shape[-1]
        if classes != len(self._chars):
            raise ModelError(
                f"the recogniser has {classes} classes for a dictionary of {len(keys)}"
            )
        self._lock = threading.Lock()
        self._considered = 0
        self._ran = 0
        self._by_reason: dict[str, int] = {}
        self._boxes = 0
        self._recognised = 0
        self._documents = 0
        self._total_ms = 0.0
        self._gated_out = 0
        self._settled = 0
        self._read = 0
        self._read_skipped = 0
        self._detect_ms = 0.0

    @classmethod
    def beside(cls, model_path: Path, *, intra_op_threads: int) -> TextReader | None:
        """The reader for the text models next to *model_path*, or ``None`` (logged)
        if they are missing or do not match their manifest: the classifier then works
        without text signals."""
        models = TextModels.beside(model_path)
        problem = verify_text_models(models)
        if problem is not None:
            logger.warning("text signals off: %s in %s", problem, models.directory)
            return None
        return cls(models, intra_op_threads=intra_op_threads)

    def read_if_useful(
        self,
        gray: _U8Array,
        signals: ImageSignals,
        vote: Mapping[Category | Evidence, float],
        *,
        colour: _U8Array | None = None,
        decide: Callable[[TextSignals | None], object] | None = None,
    ) -> TextSignals | None:
        """:meth:`read` where the text can change the answer, counting every outcome.

        *vote* is the classifier's ImageNet votes (:mod:`._categories`): its
        ``screen`` and ``document`` mass is the hint of :func:`text_gate`, the first
        and cheapest check. *decide*, when given, is the classifier's answer (any
        comparable value: its category) with a given text outcome (``None``: no text
        path); the path is skipped when no outcome (:data:`_NO_TEXT`,
        :data:`_FULL_PAGE`, an identity keyword) changes it, and the words are not
        read when, after detection, a keyword would not change it.
        """
        reason = text_gate(signals, hint=vote[Evidence.SCREEN] + vote[Evidence.DOCUMENT])
        words_matter = None
        if reason is not None and decide is not None:
            answer = decide(None)
            probes = (_NO_TEXT, _FULL_PAGE, replace(_NO_TEXT, keywords=(_STRONG_WORD,)))
            if all(decide(probe) == answer for probe in probes):
                with self._lock:
                    self._considered += 1
                    self._settled += 1
                return None

            def words_matter(layout: TextSignals) -> bool:
                return decide(replace(layout, keywords=(_STRONG_WORD,))) != decide(layout)

        if reason is None:
            with self._lock:
                self._considered += 1
                self._gated_out += 1
            return None
        text = self.read(
            gray,
            reason=reason,
            colour=colour,
            min_boxes=READ_MIN_BOXES,
            words_matter=words_matter,
        )
        with self._lock:
            self._considered += 1
            self._ran += 1
            self._by_reason[reason] = self._by_reason.get(reason, 0) + 1
            self._boxes += text.boxes
            self._recognised += text.recognised
            self._read += text.recognised > 0
            self._read_skipped += bool(text.read_skipped)
            self._documents += text.document_score > 0.0
            self._total_ms += text.elapsed_ms
            self._detect_ms += text.detect_ms
        return text

    def statistics(self) -> TextStatistics:
        with self._lock:
            return TextStatistics(
                considered=self._considered,
                ran=self._ran,
                by_reason=dict(self._by_reason),
                boxes_detected=self._boxes,
                boxes_recognised=self._recognised,
                documents=self._documents,
                total_ms=round(self._total_ms, 1),
                gated_out=self._gated_out,
                settled=self._settled,
                read=self._read,
                read_skipped=self._read_skipped,
                detect_ms=round(self._detect_ms, 1),
            )

    def read(
        self,
        gray: _U8Array,
        *,
        reason: str = "asked",
        colour: _U8Array | None = None,
        min_boxes: int = 1,
        words_matter: Callable[[TextSignals], bool] | None = None,
    ) -> TextSignals:
        """Detect text boxes, measure the layout and read the largest boxes.

        Boxes are detected in *colour* (the same image as *gray*, in RGB) when it is
        given, else in *gray*; lines are read from *gray*. Nothing is read
        (``read_skipped``) when fewer than *min_boxes* boxes were found, or when
        *words_matter*, asked with the layout alone (no keywords), says that words
        could not change the answer.
        """
        started = time.perf_counter()
        if colour is not None and colour.shape[:2] != gray.shape[:2]:
            raise ValueError(f"colour image {colour.shape[:2]} is not the gray {gray.shape[:2]}")
        quads = self.detect(gray if colour is None else colour)
        detected = time.perf_counter()
        h, w = gray.shape[:2]
        layout = _layout(quads, w, h)
        signals = TextSignals(
            reason=reason,
            boxes=len(quads),
            area_fraction=layout[0],
            horizontal_fraction=layout[1],
            aligned_fraction=layout[2],
            rows=layout[3],
            recognised=0,
            keywords=(),
            elapsed_ms=0.0,
            detect_ms=(detected - started) * 1000.0,
        )
        readable = [q for q in quads if _quad_size(q)[1] >= _REC_MIN_BOX_HEIGHT]
        skipped = ""
        if readable and len(quads) < min_boxes:
            skipped = "few_boxes"
        elif readable and words_matter is not None and not words_matter(signals):
            skipped = "settled"
        lines = [] if skipped else self._read_lines(gray, readable)
        return replace(
            signals,
            recognised=len(lines),
            keywords=find_keywords(lines),
            read_skipped=skipped,
            elapsed_ms=(time.perf_counter() - started) * 1000.0,
            lines=tuple(lines),
        )

    def _read_lines(self, gray: _U8Array, readable: Sequence[_F32Array]) -> list[str]:
        """The text of the largest *readable* boxes, until a strong keyword is read."""
        lines: list[str] = []
        budget = MAX_REC_COLUMNS
        strips = [_crop(gray, quad) for quad in readable[:MAX_RECOGNISED]]
        turn = self._turn(strips)
        chosen: list[_U8Array] = []
        for strip in strips:
            if _standing(strip):
                strip = np.ascontiguousarray(np.rot90(strip, turn))
            width = _rec_width(strip)
            if width > budget:
                continue
            budget -= width
            chosen.append(strip)
        for start in range(0, len(chosen), _REC_BATCH):
            lines.extend(self.recognise(chosen[start : start + _REC_BATCH]))
            if any(k not in FIELD_LABELS for k in find_keywords(lines)):
                break  # nearly certain already: the rest cannot change the answer
        return lines

    def detect(self, image: _U8Array) -> list[_F32Array]:
        """Text boxes in *image* (uint8 RGB ``(H, W, 3)``, or gray ``(H, W)``) as
        (4, 2) float32 corner arrays in *image*'s pixels, largest first.

        The detector sees *image* with its longest side at most :data:`DETECT_SIDE`
        (sides rounded to multiples of 32), in BGR order, normalised with
        :data:`_DET_MEAN` and :data:`_DET_STD` (see the module docstring)."""
        h, w = image.shape[:2]
        if h < 8 or w < 8:
            return []
        scale = min(1.0, DETECT_SIDE / max(h, w))
        rh = max(_DET_STRIDE, round(h * scale / _DET_STRIDE) * _DET_STRIDE)
        rw = max(_DET_STRIDE, round(w * scale / _DET_STRIDE) * _DET_STRIDE)
        interpolation = cv2.INTER_AREA if rw < w and rh < h else cv2.INTER_LINEAR
        resized = np.asarray(cv2.resize(image, (rw, rh), interpolation=interpolation))
        if resized.ndim == 2:
            bgr = np.repeat(resized[:, :, np.newaxis], 3, axis=2)
        else:
            bgr = resized[:, :, ::-1]
        chw = bgr.transpose(2, 0, 1).astype(np.float32)
        x = ((chw * np.float32(1 / 255.0) - _DET_MEAN) / _DET_STD)[np.newaxis]
        x = np.ascontiguousarray(x, dtype=np.float32)
        try:
            (prob,) = self._det.run(None, {self._det_in: x})
        except MemoryError:
            raise
        except Exception as exc:  # onnxruntime's errors share no base class
            raise ModelError("the text detector failed") from exc
        pmap = np.asarray(prob, dtype=np.float32)[0, 0]
        return _db_boxes(pmap, scale_x=w / rw, scale_y=h / rh, width=w, height=h)

    def recognise(self, crops: Sequence[_U8Array]) -> list[str]:
        """The text of each crop (upright lines of text), one batched run."""
        return [text for text, _score in self._recognise_scored(crops)]

    def _turn(self, strips: Sequence[_U8Array]) -> int:
        """Quarter turns (``np.rot90``'s k) that make the image's standing strips
        readable: a card photographed turned by a quarter reads bottom to top (k=-1)
        or top to bottom (k=1); the largest standing strip is read both ways round."""
        standing = [s for s in strips if _standing(s)]
        if not standing:
            return 1
        largest = max(standing, key=lambda s: s.size)
        turns = (1, -1)
        scored = self._recognise_scored([np.ascontiguousarray(np.rot90(largest, k)) for k in turns])
        return turns[int(np.argmax([score for _text, score in scored]))]

    def _recognise_scored(self, crops: Sequence[_U8Array]) -> list[tuple[str, float]]:
        """(text, mean probability of its characters) per crop, one batched run."""
        if not crops:
            return []
        widths = [_rec_width(c) for c in crops]
        batch = np.zeros((len(crops), 3, _REC_HEIGHT, max(widths)), dtype=np.float32)
        for i, (crop, width) in enumerate(zip(crops, widths, strict=True)):
            line = cv2.resize(crop, (width, _REC_HEIGHT), interpolation=cv2.INTER_LINEAR)
            batch[i, :, :, :width] = line.astype(np.float32) / 127.5 - 1.0
        try:
            (probs,) = self._rec.run(None, {self._rec_in: batch})
        except MemoryError:
            raise
        except Exception as exc:  # onnxruntime's errors share no base class
            raise ModelError("the text recogniser failed") from exc
        return [self._ctc_greedy(p) for p in np.asarray(probs)]

    def _ctc_greedy(self, probs: npt.NDArray[Any]) -> tuple[str, float]:
        """Best class per step, repeats merged, blanks dropped; and its mean probability."""
        best = probs.argmax(axis=1)
        keep = np.ones(best.shape[0], dtype=bool)
        keep[1:] = best[1:] != best[:-1]
        keep &= best != 0
        text = "".join(self._chars[int(i)] for i in best[keep])
        score = float(probs.max(axis=1)[keep].mean()) if keep.any() else 0.0
        return text, score


# --- keywords ----------------------------------------------------------------------


def find_keywords(lines: Iterable[str]) -> tuple[str, ...]:
    """Identity-document keywords in the recognised *lines*, in a fixed order."""
    found: set[str] = set()
    for raw in lines:
        line = unicodedata.normalize("NFKC", raw).translate(_LOOKALIKES)
        compact = re.sub(r"[\s·.,:;'\"/_\-|]+", "", line)
        upper = compact.upper().replace("RN", "M")  # OCR reads "rn" as "m"
        found.update(word for word, pattern in _PATTERNS if pattern.search(upper))
        if compact.isupper() and _MRZ_LINE.fullmatch(compact) and "<<" in compact:
            found.add(MRZ)
        if any(_citizen_number_ok(m.group()) for m in _CITIZEN.finditer(compact.upper())):
            found.add(CITIZEN_NUMBER)
    order = (*STRONG_KEYWORDS, MRZ, CITIZEN_NUMBER, *FIELD_LABELS)
    return tuple(k for k in order if k in found)


def _pattern(word: str) -> re.Pattern[str]:
    """*word* (OCR's "rn" read as "m"), with one edit allowed if it is Latin and long."""
    target = word.replace("RN", "M")
    if not (word.isascii() and len(word) >= _FUZZY_MIN_LEN):
        return re.compile(re.escape(target))
    variants = {re.escape(target)}
    for i in range(len(target)):
        head, tail = re.escape(target[:i]), re.escape(target[i + 1 :])
        variants.add(head + tail)  # a letter lost
        variants.add(head + "." + tail)  # a letter misread
        variants.add(head + "." + re.escape(target[i:]))  # a letter added
    return re.compile("|".join(sorted(variants, key=len, reverse=True)))


_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (word, _pattern(word)) for word in (*STRONG_KEYWORDS, *FIELD_LABELS)
)


def _citizen_number_ok(number: str) -> bool:
    """ISO 7064 MOD 11-2 check digit of an 18-character Chinese citizen number."""
    total = sum(int(d) * w for d, w in zip(number[:17], _CITIZEN_WEIGHTS, strict=True))
    return "10X98765432"[total % 11] == number[17]


# --- geometry ----------------------------------------------------------------------


def _db_boxes(
    pmap: _F32Array, *, scale_x: float, scale_y: float, width: int, height: int
) -> list[_F32Array]:
    """DB post-processing: threshold, regions, score, grow, scale to the image."""
    mask = np.asarray(
        cv2.dilate((pmap > _DET_PIXEL_THRESHOLD).astype(np.uint8), np.ones((2, 2), np.uint8)),
        dtype=np.uint8,
    )
    contours, _hier = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    contours = sorted(contours, key=cv2.contourArea, reverse=True)[:MAX_CANDIDATES]
    boxes: list[tuple[float, _F32Array]] = []
    for contour in contours:
        (cx, cy), (bw, bh), angle = cv2.minAreaRect(contour)
        if min(bw, bh) < _DET_MIN_SIDE:
            continue
        region = np.asarray(cv2.boxPoints(((cx, cy), (bw, bh), angle)), dtype=np.float32)
        if _region_score(pmap, region) < _DET_BOX_THRESHOLD:
            continue
        grow = bw * bh * _DET_UNCLIP_RATIO / (2.0 * (bw + bh))
        quad = np.asarray(
            cv2.boxPoints(((cx, cy), (bw + 2 * grow, bh + 2 * grow), angle)), dtype=np.float32
        )
        quad[:, 0] = np.clip(quad[:, 0] * scale_x, 0, width - 1)
        quad[:, 1] = np.clip(quad[:, 1] * scale_y, 0, height - 1)
        long_side, short_side = _quad_size(quad)
        if short_side < _DET_MIN_SIDE + 2 or long_side < _DET_MIN_SIDE + 2:
            continue
        boxes.append((long_side * short_side, _ordered(quad)))
    boxes.sort(key=lambda b: b[0], reverse=True)
    return [quad for _area, quad in boxes]


def _region_score(pmap: _F32Array, points: _F32Array) -> float:
    """Mean probability inside the polygon *points* (PaddleOCR's "fast" score)."""
    h, w = pmap.shape
    x0 = int(np.clip(np.floor(points[:, 0].min()), 0, w - 1))
    x1 = int(np.clip(np.ceil(points[:, 0].max()), 0, w - 1))
    y0 = int(np.clip(np.floor(points[:, 1].min()), 0, h - 1))
    y1 = int(np.clip(np.ceil(points[:, 1].max()), 0, h - 1))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    shifted = (points - np.array([x0, y0], dtype=np.float32)).astype(np.int32)
    cv2.fillPoly(mask, [shifted], 1)
    return float(cv2.mean(pmap[y0 : y1 + 1, x0 : x1 + 1], mask)[0])


def _ordered(quad: _F32Array) -> _F32Array:
    """Corners as top-left, top-right, bottom-right, bottom-left."""
    by_x = quad[np.argsort(quad[:, 0], kind="stable")]
    left = by_x[:2][np.argsort(by_x[:2, 1], kind="stable")]
    right = by_x[2:][np.argsort(by_x[2:, 1], kind="stable")]
    return np.array([left[0], right[0], right[1], left[1]], dtype=np.float32)


def _quad_size(quad: _F32Array) -> tuple[float, float]:
    """(long side, short side) of an ordered quadrilateral."""
    a = float(np.linalg.norm(quad[0] - quad[1]))
    b = float(np.linalg.norm(quad[1] - quad[2]))
    return max(a, b), min(a, b)


def _crop(gray: _U8Array, quad: _F32Array) -> _U8Array:
    """The box straightened to a rectangle, its top-left corner first."""
    w = max(
        1, round(float(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[3] - quad[2]))))
    )
    h = max(
        1, round(float(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2]))))
    )
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(quad, target)
    strip = cv2.warpPerspective(
        gray, matrix, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
    )
    return np.ascontiguousarray(strip, dtype=np.uint8)


def _standing(strip: _U8Array) -> bool:
    """A strip much taller than wide: a line of text turned by a quarter."""
    h, w = strip.shape[:2]
    return bool(h >= 1.5 * w)


def _rec_width(crop: _U8Array) -> int:
    """The recogniser's input width for *crop* at height 48 (a multiple of 8)."""
    h, w = int(crop.shape[0]), int(crop.shape[1])
    width = math.ceil(_REC_HEIGHT * w / max(1, h) / 8) * 8
    return max(16, min(_REC_MAX_WIDTH, width))


def _layout(quads: Sequence[_F32Array], width: int, height: int) -> tuple[float, float, float, int]:
    """(area fraction, horizontal fraction, aligned fraction, rows) of the boxes."""
    if not quads:
        return 0.0, 0.0, 0.0, 0
    area = sum(float(cv2.contourArea(q)) for q in quads) / float(width * height)
    flat: list[tuple[float, float, float]] = []  # (left x, centre y, height)
    for q in quads:
        dx, dy = q[1] - q[0]
        tilt = abs(math.degrees(math.atan2(float(dy), float(dx))))
        if min(tilt, 180.0 - tilt) <= _HORIZONTAL_DEG and _quad_size(q)[0] == float(
            np.linalg.norm(q[0] - q[1])
        ):
            flat.append((float(q[:, 0].min()), float(q[:, 1].mean()), _quad_size(q)[1]))
    tolerance = max(3.0, _ALIGN_REL * width)
    aligned = sum(
        any(
            abs(x - x2) <= tolerance and abs(y - y2) > 0.5 * min(h, h2)
            for j, (x2, y2, h2) in enumerate(flat)
            if j != i
        )
        for i, (x, y, h) in enumerate(flat)
    )
    rows = 0
    last_y = -math.inf
    for _x, y, h in sorted(flat, key=lambda f: f[1]):
        if y - last_y > 0.5 * h:
            rows += 1
            last_y = y
    n = len(quads)
    return min(1.0, area), len(flat) / n, aligned / n, rows


def _ramp(value: float, lo: float, hi: float) -> float:
    return min(1.0, max(0.0, (value - lo) / (hi - lo)))
