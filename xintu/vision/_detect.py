"""Evidence that ImageNet cannot give: faces, people, screenshots and identity cards.

Two kinds of evidence, both collected in one frozen :class:`ImageSignals`:

- cheap pixel statistics, measured by :func:`measure_pixels` while decoding (exact
  screen resolutions, camera EXIF, flat colour regions, few colours, text-like
  lines, card-shaped outlines);
- faces, found by MediaPipe's BlazeFace CNN detectors (:mod:`._faces`), and the
  people counted from them by :class:`Detectors` (:func:`count_people`).

The cv2 functions used for the pixel statistics are stateless and the ONNX
sessions accept concurrent runs: everything here is safe to call from any thread.

Counting people from faces (``single_person`` is one, ``social_activities`` two or
more) keeps only faces that are likely to be people in the photograph:

- seen by the full-range model (trained on photos of faces up to ~5 m), or by the
  short-range model with a score of at least :data:`_SHORT_ONLY_MIN_SCORE` (alone,
  it also fires at 0.5-0.65 on cat faces, animals and flowers);
- of comparable size: at least :data:`_PERSON_MIN_REL_HEIGHT` of the tallest
  counted face (a tiny face in the background, a printed face on a poster);
- not faded: the face's gray-level contrast at least :data:`_PERSON_MIN_REL_CONTRAST`
  of the strongest face's (the "ghost" portrait printed faintly on identity cards);
- one per document: inside a card outline (or a card-shaped image) a second face
  counts only if it is at least :data:`_CARD_SECOND_FACE_REL_HEIGHT` of the tallest
  face on the card: an identity document's secondary ("ghost") portrait is printed
  at most about 60 % of the main one's size, while the faces of a group photo that
  happens to have a card's aspect (photos of about 1.4:1 are within 3 % of a
  passport page's 1.42) are of similar sizes;
- separated: a face whose centre lies inside a taller counted face is the same one.

:attr:`ImageSignals.screenshot_score` and :attr:`ImageSignals.idcard_score` combine
the evidence into 0..1 scores; the weights are named constants below, chosen on the
evaluation set described in ``docs/evaluation.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from ._faces import Face, FaceDetector, FaceStatistics

__all__ = [
    "SCREEN_RESOLUTIONS",
    "Box",
    "Detectors",
    "ImageSignals",
    "count_people",
    "measure_pixels",
]

_U8Array = npt.NDArray[np.uint8]

#: A detection box in relative coordinates: (x, y, w, h), each in 0..1.
Box = tuple[float, float, float, float]

#: Exact pixel sizes (width, height) of screenshots: phones, tablets and desktops at
#: their native (@1x/@2x/@3x) resolutions. Both orientations match.
SCREEN_RESOLUTIONS: frozenset[tuple[int, int]] = frozenset(
    {
        # iPhone (portrait): SE/8, Plus, X/XS/11 Pro, XR/11, XS Max/11 Pro Max,
        # 12/13/14, 12/13 mini, 12-14 Pro Max/Plus, 14 Pro/15/16, 15/16 Pro Max, 16 Pro.
        (640, 1136),
        (750, 1334),
        (1242, 2208),
        (1080, 1920),
        (1125, 2436),
        (828, 1792),
        (1242, 2688),
        (1170, 2532),
        (1080, 2340),
        (1284, 2778),
        (1179, 2556),
        (1290, 2796),
        (1206, 2622),
        (1320, 2868),
        # Android phones (common panels).
        (720, 1280),
        (720, 1600),
        (1080, 2160),
        (1080, 2220),
        (1080, 2280),
        (1080, 2400),
        (1080, 2408),
        (1080, 2412),
        (1080, 2460),
        (1440, 2560),
        (1440, 2960),
        (1440, 3040),
        (1440, 3088),
        (1440, 3120),
        (1440, 3200),
        (1344, 2992),
        (1280, 2856),
        # Phone browsers' CSS viewports at @1x (desktop "device mode" captures).
        (375, 667),
        (375, 812),
        (390, 844),
        (393, 852),
        (412, 915),
        (414, 896),
        (360, 800),
        # Tablets.
        (1536, 2048),
        (1620, 2160),
        (1640, 2360),
        (1668, 2224),
        (1668, 2388),
        (1488, 2266),
        (2048, 2732),
        (1600, 2560),
        (1200, 1920),
        (1800, 2880),
        # Desktops and laptops (landscape).
        (1024, 768),
        (1280, 720),
        (1280, 800),
        (1280, 1024),
        (1366, 768),
        (1440, 900),
        (1536, 864),
        (1600, 900),
        (1680, 1050),
        (1920, 1080),
        (1920, 1200),
        (2048, 1152),
        (2256, 1504),
        (2560, 1080),
        (2560, 1440),
        (2560, 1600),
        (2736, 1824),
        (2880, 1800),
        (2880, 1864),
        (2940, 1912),
        (3024, 1964),
        (3072, 1920),
        (3440, 1440),
        (3456, 2234),
        (3840, 1600),
        (3840, 2160),
        (5120, 1440),
        (5120, 2880),
        (6016, 3384),
    }
)

# ID-1 cards (85.60 x 53.98 mm) and passport data pages (ID-3, 125 x 88 mm).
_CARD_ASPECTS = (85.60 / 53.98, 125.0 / 88.0)
_CARD_ASPECT_TOLERANCE = 0.03  # relative: 3:2 photos (5.4% off) do not match
# An outline seen at an angle is foreshortened: allow more, the face and text
# inside it must then confirm the card.
_OUTLINE_ASPECT_TOLERANCE = 0.10
_CARD_MIN_AREA = 0.15  # a card outline must cover this share of the image
# The outline is looked for at half the detector image's size (320 px a side): blur,
# Canny and the contour search cost ~0.35 ms instead of ~1.45, and a card covering
# 15 % of the image is still ~100 px wide. On the evaluation set no answer changed
# (5 of 150 images changed whether an outline was found, both ways).
_OUTLINE_SCALE = 0.5
# An ID photo sits in the left or right part of the card and is this tall
# relative to the card.
_CARD_FACE_SIDE = 0.42
_CARD_FACE_MIN_H, _CARD_FACE_MAX_H = 0.12, 0.8

# Screenshot score weights (sum to 1) and the saturation points of each measure.
_W_SCREEN_RES = 0.30
_W_FLAT = 0.25
_W_FEW_COLOURS = 0.15
_W_LOSSLESS = 0.10
_W_NO_CAMERA = 0.10
_W_TEXT = 0.10
_FLAT_LO, _FLAT_HI = 0.25, 0.65
_TOP_COLOURS = 8
_TOP_LO, _TOP_HI = 0.25, 0.65
_TEXT_LINES_SAT = 8
# A camera EXIF block is strong evidence against a screenshot.
_CAMERA_PENALTY = 0.35

# ID card score weights.
_W_CARD = 0.35
_W_CARD_FACE = 0.35
_W_CARD_TEXT = 0.30
_CARD_TEXT_SAT = 5

# Counting people from faces (see the module docstring).
_FULL_RANGE = "blazeface-full-range"
_SHORT_ONLY_MIN_SCORE = 0.75
_PERSON_MIN_REL_HEIGHT = 0.5
_PERSON_MIN_REL_CONTRAST = 0.5
_CARD_SECOND_FACE_REL_HEIGHT = 0.7


@dataclass(frozen=True, slots=True)
class ImageSignals:
    """Every non-ImageNet fact about one image; frozen, cheap to copy.

    The pixel statistics come from :func:`measure_pixels`; the faces and ``people``
    are filled in by :meth:`Detectors.detect` (until then ``detectors_run`` is False
    and the counts are 0). ``faces`` counts every face the detectors found,
    ``people`` those that :func:`count_people` counts as people in the photo.
    """

    width: int
    height: int
    format: str
    exif_camera: bool  # EXIF make/model or exposure data present
    screen_resolution: bool  # (width, height) is a common screen size
    flat_fraction: float  # share of neighbouring pixel pairs with identical colour
    top_colours_fraction: float  # share of pixels in the 8 most frequent exact colours
    text_lines: int  # text-line-like horizontal strokes
    card_box: Box | None  # the image, or a large outline, with a card's aspect
    detectors_run: bool = False
    face_list: tuple[Face, ...] = ()
    person_faces: tuple[Face, ...] = ()  # the faces of face_list counted as people

    @property
    def faces(self) -> int:
        """How many faces the detectors found."""
        return len(self.face_list)

    @property
    def people(self) -> int:
        """How many people the faces stand for (:func:`count_people`)."""
        return len(self.person_faces)

    @property
    def face_boxes(self) -> tuple[Box, ...]:
        return tuple(f.box for f in self.face_list)

    @property
    def persons(self) -> int:
        """Best estimate of how many people are in the picture."""
        return self.people

    @property
    def card_shape(self) -> bool:
        """The image, or a large outline in it, has an ID card's or passport's aspect."""
        return self.card_box is not None

    @property
    def face_on_side(self) -> bool:
        """A face counted as a person (not a pet's, nor a weak detection) inside the
        card, in its left or right part, sized like an ID photo.

        An identity document shows one person: with two or more people counted on
        the "card" (a group photo that has a card's aspect) there is no ID photo.
        """
        if self.card_box is None:
            return False
        kx, ky, kw, kh = self.card_box
        if sum(_centre_inside(f.box, self.card_box) for f in self.person_faces) >= 2:
            return False
        for x, y, w, h in (f.box for f in self.person_faces):
            cx = (x + w / 2 - kx) / kw
            cy = (y + h / 2 - ky) / kh
            rel_h = h / kh
            if (
                0.0 <= cx <= 1.0
                and 0.0 <= cy <= 1.0
                and _CARD_FACE_MIN_H <= rel_h <= _CARD_FACE_MAX_H
                and (cx < _CARD_FACE_SIDE or cx > 1.0 - _CARD_FACE_SIDE)
            ):
                return True
        return False

    @property
    def screenshot_score(self) -> float:
        """0..1: how much the pixels and metadata look like a screen capture."""
        score = (
            _W_SCREEN_RES * self.screen_resolution
            + _W_FLAT * _ramp(self.flat_fraction, _FLAT_LO, _FLAT_HI)
            + _W_FEW_COLOURS * _ramp(self.top_colours_fraction, _TOP_LO, _TOP_HI)
            + _W_LOSSLESS * (self.format in ("PNG", "BMP", "WEBP", "TIFF"))
            + _W_NO_CAMERA * (not self.exif_camera)
            + _W_TEXT * min(1.0, self.text_lines / _TEXT_LINES_SAT)
        )
        if self.exif_camera:
            score -= _CAMERA_PENALTY
        return _clip(score)

    @property
    def idcard_score(self) -> float:
        """0..1: card-shaped, with a portrait on one side and lines of text."""
        if not self.card_shape:
            return 0.0
        return _clip(
            _W_CARD
            + _W_CARD_FACE * self.face_on_side
            + _W_CARD_TEXT * min(1.0, self.text_lines / _CARD_TEXT_SAT)
        )

    def as_dict(self) -> dict[str, Any]:
        """The evidence as JSON-able values (for ``local_inference_result``)."""
        return {
            "faces": self.faces,
            "people": self.people,
            "face_list": [f.as_dict() | {"person": f in self.person_faces} for f in self.face_list],
            "detectors_run": self.detectors_run,
            "exif_camera": self.exif_camera,
            "screen_resolution": self.screen_resolution,
            "flat_fraction": round(self.flat_fraction, 3),
            "top_colours_fraction": round(self.top_colours_fraction, 3),
            "text_lines": self.text_lines,
            "card_shape": self.card_shape,
            "card_box": [round(v, 3) for v in self.card_box] if self.card_box else None,
            "face_on_side": self.face_on_side,
            "screenshot_score": round(self.screenshot_score, 3),
            "idcard_score": round(self.idcard_score, 3),
        }


def _ramp(value: float, lo: float, hi: float) -> float:
    return _clip((value - lo) / (hi - lo))


def _clip(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


# --- pixel statistics --------------------------------------------------------------


def measure_pixels(
    small_rgb: _U8Array,
    gray: _U8Array,
    *,
    width: int,
    height: int,
    image_format: str,
    exif_camera: bool,
) -> ImageSignals:
    """Cheap statistics of one image (a few ms), before any detector runs.

    *small_rgb* is a nearest-neighbour thumbnail (exact colours survive), *gray*
    the detectors' grayscale image; *width*/*height* the full oriented size.
    """
    screen = (width, height) in SCREEN_RESOLUTIONS or (height, width) in SCREEN_RESOLUTIONS
    # A screen-sized image (16:10 is within 1% of a card's aspect) is no card scan.
    card: Box | None = None
    if _is_card_aspect(width, height, _CARD_ASPECT_TOLERANCE) and not screen:
        card = (0.0, 0.0, 1.0, 1.0)
    else:
        card = _card_outline(_outline_image(gray))
    return ImageSignals(
        width=width,
        height=height,
        format=image_format,
        exif_camera=exif_camera,
        screen_resolution=screen,
        flat_fraction=_flat_fraction(small_rgb),
        top_colours_fraction=_top_colours_fraction(small_rgb),
        text_lines=count_text_lines(gray),
        card_box=card,
    )


def _flat_fraction(rgb: _U8Array) -> float:
    """Share of horizontal and vertical neighbour pairs with exactly equal colour."""
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        return 0.0
    packed = _pack(rgb)
    same_h = np.count_nonzero(packed[:, 1:] == packed[:, :-1])
    same_v = np.count_nonzero(packed[1:, :] == packed[:-1, :])
    pairs = packed[:, 1:].size + packed[1:, :].size
    return float(same_h + same_v) / pairs


def _top_colours_fraction(rgb: _U8Array) -> float:
    """Share of pixels covered by the most frequent exact colours."""
    packed = _pack(rgb).ravel()
    if packed.size == 0:
        return 0.0
    _values, counts = np.unique(packed, return_counts=True)
    top = np.sort(counts)[-_TOP_COLOURS:]
    return float(top.sum()) / packed.size


def _pack(rgb: _U8Array) -> npt.NDArray[np.uint32]:
    arr = rgb.astype(np.uint32)
    packed: npt.NDArray[np.uint32] = (
        (arr[..., 0] << np.uint32(16)) | (arr[..., 1] << np.uint32(8)) | arr[..., 2]
    )
    return packed


def count_text_lines(gray: _U8Array) -> int:
    """Horizontal runs of small high-contrast strokes, the shape of lines of text.

    Morphological gradient, Otsu threshold, then a wide horizontal closing joins
    the letters of a line into one blob; blobs much wider than tall, of text-like
    height and mostly filled, count as lines.
    """
    h, w = gray.shape[:2]
    if h < 16 or w < 16:
        return 0
    grad = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    _t, bw = cv2.threshold(grad, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    if _t < 24:  # almost no contrast anywhere: no text
        return 0
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (max(5, w // 60), 1))
    joined = cv2.morphologyEx(bw, cv2.MORPH_CLOSE, kernel)
    contours, _hier = cv2.findContours(joined, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    lines = 0
    min_h, max_h = max(4, h // 120), max(8, h // 12)
    for contour in contours:
        x, y, cw, ch = cv2.boundingRect(contour)
        if not (min_h <= ch <= max_h and cw >= 3 * ch and cw >= w // 25):
            continue
        fill = cv2.countNonZero(bw[y : y + ch, x : x + cw]) / float(cw * ch)
        if 0.25 <= fill <= 0.85:
            lines += 1
    return lines


def _is_card_aspect(width: float, height: float, tolerance: float) -> bool:
    aspect = max(width, height) / max(1e-9, min(width, height))
    return any(abs(aspect / a - 1.0) <= tolerance for a in _CARD_ASPECTS)


def _outline_image(gray: _U8Array) -> _U8Array:
    """*gray* at :data:`_OUTLINE_SCALE` (area interpolation), where the card outline
    is looked for; as it is when that would be under 64 pixels a side."""
    h, w = gray.shape[:2]
    size = (round(w * _OUTLINE_SCALE), round(h * _OUTLINE_SCALE))
    if min(size) < 64:
        return gray
    return np.asarray(cv2.resize(gray, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _card_outline(gray: _U8Array) -> Box | None:
    """The bounding box of a large convex quadrilateral shaped like a card, if any."""
    h, w = gray.shape[:2]
    if h < 32 or w < 32:
        return None
    edges = cv2.Canny(cv2.GaussianBlur(gray, (5, 5), 0), 50, 150)
    edges = cv2.dilate(edges, np.ones((3, 3), np.uint8))
    contours, _hier = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    image_area = float(h * w)
    for contour in contours:
        area = cv2.contourArea(contour)
        if area < _CARD_MIN_AREA * image_area or area > 0.97 * image_area:
            continue
        approx = cv2.approxPolyDP(contour, 0.02 * cv2.arcLength(contour, True), True)
        if len(approx) != 4 or not cv2.isContourConvex(approx):
            continue
        (_cx, _cy), (rw, rh), _angle = cv2.minAreaRect(approx)
        if min(rw, rh) > 0 and _is_card_aspect(rw, rh, _OUTLINE_ASPECT_TOLERANCE):
            x, y, bw, bh = cv2.boundingRect(approx)
            return (x / w, y / h, bw / w, bh / h)
    return None


# --- detectors ---------------------------------------------------------------------


class Detectors:
    """The face detectors and the people count; safe to share between threads."""

    def __init__(self, models_dir: Path) -> None:
        """Open the face models in *models_dir* (raises :class:`~xintu.errors.ModelError`)."""
        self._faces = FaceDetector(models_dir)

    def face_statistics(self) -> FaceStatistics:
        """The face detectors' counters (:meth:`FaceDetector.statistics`)."""
        return self._faces.statistics()

    def detect(
        self, image: _U8Array, signals: ImageSignals, *, gray: _U8Array | None = None
    ) -> ImageSignals:
        """*signals* with faces and people filled in from *image* (RGB, or gray).

        *gray* is *image* in gray levels, for the faces' contrast (computed when
        not given)."""
        faces = self._faces.detect(image)
        if gray is None:
            gray = image if image.ndim == 2 else _to_gray(image)
        return dataclasses.replace(
            signals,
            detectors_run=True,
            face_list=faces,
            person_faces=count_people(faces, gray, signals.card_box),
        )


def _to_gray(rgb: _U8Array) -> _U8Array:
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)


def count_people(faces: tuple[Face, ...], gray: _U8Array, card_box: Box | None) -> tuple[Face, ...]:
    """The faces of *faces* that are people in the photo (the module docstring's rules).

    *gray* is the image the faces were found in (for their contrast), *card_box* the
    card outline of :func:`measure_pixels`, if any.
    """
    candidates = [f for f in faces if _FULL_RANGE in f.models or f.score >= _SHORT_ONLY_MIN_SCORE]
    if not candidates:
        return ()
    tallest = max(f.height for f in candidates)
    contrast = {f: _contrast(gray, f.box) for f in candidates}
    strongest = contrast[max(candidates, key=lambda f: f.score)]
    counted: list[Face] = []
    for face in sorted(candidates, key=lambda f: -f.height):
        if face.height < _PERSON_MIN_REL_HEIGHT * tallest:
            continue
        if contrast[face] < _PERSON_MIN_REL_CONTRAST * strongest:
            continue
        if any(_centre_inside(face.box, other.box) for other in counted):
            continue
        counted.append(face)
    if card_box is not None:
        on_card = [f for f in counted if _centre_inside(f.box, card_box)]
        if on_card:  # sorted tallest first: the tallest stays
            least = _CARD_SECOND_FACE_REL_HEIGHT * on_card[0].height
            counted = [f for f in counted if f not in on_card or f.height >= least]
    return tuple(counted)


def _contrast(gray: _U8Array, box: Box) -> float:
    """Standard deviation of the gray levels inside *box* (relative coordinates)."""
    h, w = gray.shape[:2]
    x, y, bw, bh = box
    x0, y0 = int(x * w), int(y * h)
    x1, y1 = max(x0 + 1, int((x + bw) * w)), max(y0 + 1, int((y + bh) * h))
    patch = gray[y0:y1, x0:x1]
    return float(patch.std()) if patch.size else 0.0


def _centre_inside(box: Box, outer: Box) -> bool:
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return outer[0] <= cx <= outer[0] + outer[2] and outer[1] <= cy <= outer[1] + outer[3]
