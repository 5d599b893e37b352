"""Faces found by MediaPipe's BlazeFace detectors, decoded in NumPy.

Two ONNX models (built by :mod:`xintu.model`, see :data:`xintu.model.FACE_MODELS`)
look at the same image: the short-range model (128x128 input, faces within about
2 m: portraits, selfies, ID photos) and the full-range model (192x192, smaller and
more distant faces, as in group photos and street scenes). For each:

1. the RGB image (what BlazeFace was trained on; the classifier passes the
   detectors' RGB copy, longest side 640) is letterboxed into the model's square
   (aspect kept, black bars, as MediaPipe's ``ImageToTensorCalculator`` with
   ``keep_aspect_ratio``) and scaled to ``x / 127.5 - 1``; a grayscale image, if
   given, is fed as three equal channels (on the evaluation set that lost faces in
   group photos: t1.jpg 6 -> 3, sample2.jpg 3 -> 2, bus.jpg 2 -> 1);
2. every anchor (MediaPipe's SSD anchor layout: fixed-size anchors on 16x16 and
   8x8 grids for short range, one 48x48 grid for full range) gets a score
   ``sigmoid(clip(logit, -100, 100))`` and a box: centre ``anchor + offset / S``,
   size ``raw / S``;
3. boxes scoring at least :data:`MIN_FACE_SCORE` (MediaPipe's default, 0.5) from
   both models go through MediaPipe's *weighted* non-maximum suppression
   (IoU above 0.3 joins a cluster; the cluster's box is the score-weighted mean, its
   score the best one), and are mapped back to relative image coordinates.

Each :class:`Face` remembers which models saw it. :meth:`FaceDetector.statistics`
counts the images, the faces and the time (behind a lock). onnxruntime sessions accept
concurrent ``run`` calls, so one :class:`FaceDetector` serves all decode threads;
each session uses one intra-op thread (the detectors are small: about 1 ms and 3 ms
per image here, and several decode threads run at once).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from ..errors import ModelError
from ..model import (
    FACE_BOXES,
    FACE_INPUT,
    FACE_MODELS,
    FACE_SCORES,
    FaceModelSpec,
    create_session,
    face_model_path,
)

__all__ = ["MIN_FACE_SCORE", "NMS_IOU", "Face", "FaceDetector", "FaceStatistics", "ssd_anchors"]

#: MediaPipe's default ``min_score_thresh`` for both face detection models.
MIN_FACE_SCORE = 0.5
#: MediaPipe's ``min_suppression_threshold`` (IoU) for BlazeFace.
NMS_IOU = 0.3
_LOGIT_CLIP = 100.0
_MIN_LOGIT = float(np.log(MIN_FACE_SCORE / (1.0 - MIN_FACE_SCORE)))

_U8Array = npt.NDArray[np.uint8]
_F32Array = npt.NDArray[np.float32]
_F64Array = npt.NDArray[np.float64]

#: A box in relative image coordinates: (x, y, w, h).
Box = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class Face:
    """One face: its box (relative to the image, clipped to 0..1), score, detectors."""

    box: Box
    score: float
    models: tuple[str, ...]  # names of the models that saw it, e.g. ("blazeface-full-range",)

    @property
    def height(self) -> float:
        return self.box[3]

    def as_dict(self) -> dict[str, object]:
        return {
            "box": [round(v, 4) for v in self.box],
            "score": round(self.score, 3),
            "models": list(self.models),
        }


@dataclass(frozen=True, slots=True)
class FaceStatistics:
    """What the face detectors did since they were opened (:meth:`FaceDetector.statistics`)."""

    images: int  # images both models ran on
    with_faces: int  # of those, images with at least one face
    faces: int  # faces found (after suppression)
    total_ms: float  # wall-clock milliseconds in detection (both models, decoding)

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.images if self.images else 0.0

    def __add__(self, other: FaceStatistics) -> FaceStatistics:
        """Both counts together (e.g. the classifiers of several processes)."""
        return FaceStatistics(
            self.images + other.images,
            self.with_faces + other.with_faces,
            self.faces + other.faces,
            round(self.total_ms + other.total_ms, 1),
        )


def ssd_anchors(spec: FaceModelSpec) -> _F32Array:
    """Anchor centres ``(A, 2)`` (x, y in 0..1) of MediaPipe's SSD anchor calculator.

    Consecutive layers with the same stride share one grid; each layer adds
    ``anchors_per_layer`` anchors to every cell of it. Order: grid by grid, row by
    row, cell by cell, anchor by anchor (the model's output order).
    """
    centres: list[tuple[float, float]] = []
    layer = 0
    while layer < len(spec.strides):
        stride = spec.strides[layer]
        same = 0
        while layer + same < len(spec.strides) and spec.strides[layer + same] == stride:
            same += 1
        side = -(-spec.input_size // stride)  # ceil
        per_cell = same * spec.anchors_per_layer
        for y in range(side):
            for x in range(side):
                centres.extend([((x + 0.5) / side, (y + 0.5) / side)] * per_cell)
        layer += same
    anchors = np.asarray(centres, dtype=np.float32)
    if anchors.shape != (spec.num_anchors, 2):
        raise ValueError(f"{spec.name}: {anchors.shape[0]} anchors, expected {spec.num_anchors}")
    return anchors


@dataclass(frozen=True, slots=True)
class _Model:
    spec: FaceModelSpec
    session: object
    anchors: _F32Array


class FaceDetector:
    """Both BlazeFace models on one image; thread-safe, no per-call state."""

    def __init__(self, models_dir: Path) -> None:
        """Open the face models in *models_dir* (raises :class:`ModelError`)."""
        models = []
        for spec in FACE_MODELS:
            path = face_model_path(models_dir, spec)
            session = create_session(path, intra_op_threads=1)
            inputs = {i.name for i in session.get_inputs()}
            outputs = {o.name for o in session.get_outputs()}
            if inputs != {FACE_INPUT} or outputs != {FACE_BOXES, FACE_SCORES}:
                raise ModelError(f"the face model at {path} has unexpected inputs or outputs")
            models.append(_Model(spec, session, ssd_anchors(spec)))
        self._models = tuple(models)
        self._lock = threading.Lock()
        self._images = 0
        self._with_faces = 0
        self._faces = 0
        self._total_ms = 0.0

    def statistics(self) -> FaceStatistics:
        """A snapshot of the counters; thread-safe."""
        with self._lock:
            return FaceStatistics(
                self._images, self._with_faces, self._faces, round(self._total_ms, 1)
            )

    def detect(self, image: _U8Array) -> tuple[Face, ...]:
        """Faces in *image* (uint8, ``(H, W, 3)`` RGB as the models were trained on,
        or ``(H, W)`` gray, fed as three equal channels), best first."""
        h, w = image.shape[:2]
        if h < 2 or w < 2:
            return ()
        started = time.perf_counter()
        faces = self._detect(image)
        elapsed = (time.perf_counter() - started) * 1000.0
        with self._lock:
            self._images += 1
            self._with_faces += bool(faces)
            self._faces += len(faces)
            self._total_ms += elapsed
        return faces

    def _detect(self, image: _U8Array) -> tuple[Face, ...]:
        boxes: list[_F64Array] = []
        scores: list[_F64Array] = []
        sources: list[npt.NDArray[np.int64]] = []
        for index, model in enumerate(self._models):
            b, s = self._run(model, image)
            boxes.append(b)
            scores.append(s)
            sources.append(np.full(len(s), index, dtype=np.int64))
        return _weighted_nms(
            np.concatenate(boxes),
            np.concatenate(scores),
            np.concatenate(sources),
            tuple(m.spec.name for m in self._models),
        )

    def _run(self, model: _Model, image: _U8Array) -> tuple[_F64Array, _F64Array]:
        """Boxes ``(n, 4)`` as relative (x0, y0, x1, y1) and scores of one model."""
        size = model.spec.input_size
        tensor, scale, pad_x, pad_y = _letterbox(image, size)
        try:
            raw_boxes, raw_scores = model.session.run(  # type: ignore[attr-defined]
                [FACE_BOXES, FACE_SCORES], {FACE_INPUT: tensor}
            )
        except MemoryError:
            raise
        except Exception as exc:  # onnxruntime's errors share no base class
            raise ModelError(f"the face model {model.spec.name} failed") from exc
        logits = np.asarray(raw_scores, dtype=np.float64).reshape(-1)
        keep = np.flatnonzero(logits >= _MIN_LOGIT)
        if keep.size == 0:
            return np.zeros((0, 4)), np.zeros(0)
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[keep], -_LOGIT_CLIP, _LOGIT_CLIP)))
        reg = np.asarray(raw_boxes, dtype=np.float64).reshape(-1, 16)[keep]
        anchors = model.anchors[keep].astype(np.float64)
        # Centre and size in the square input, in input pixels.
        cx = (reg[:, 0] / size + anchors[:, 0]) * size
        cy = (reg[:, 1] / size + anchors[:, 1]) * size
        bw, bh = reg[:, 2], reg[:, 3]
        h, w = image.shape[:2]
        x0 = (cx - bw / 2 - pad_x) / (w * scale)
        x1 = (cx + bw / 2 - pad_x) / (w * scale)
        y0 = (cy - bh / 2 - pad_y) / (h * scale)
        y1 = (cy + bh / 2 - pad_y) / (h * scale)
        return np.stack([x0, y0, x1, y1], axis=1), scores


def _letterbox(image: _U8Array, size: int) -> tuple[_F32Array, float, int, int]:
    """``[1, 3, size, size]`` input, the scale, and the left/top padding in pixels."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = np.asarray(cv2.resize(image, (nw, nh), interpolation=interpolation), dtype=np.uint8)
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    square = np.zeros((size, size, 3), dtype=np.uint8)
    if small.ndim == 2:
        square[pad_y : pad_y + nh, pad_x : pad_x + nw] = small[:, :, None]
    else:
        square[pad_y : pad_y + nh, pad_x : pad_x + nw] = small[:, :, :3]
    tensor = square.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
    return np.ascontiguousarray(tensor.transpose(2, 0, 1)[None]), scale, pad_x, pad_y


def _iou(box: _F64Array, boxes: _F64Array) -> _F64Array:
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = np.maximum(area + areas - inter, 1e-12)
    out: _F64Array = inter / union
    return out


def _weighted_nms(
    boxes: _F64Array,
    scores: _F64Array,
    sources: npt.NDArray[np.int64],
    names: tuple[str, ...],
) -> tuple[Face, ...]:
    """MediaPipe's weighted NMS: clusters around the best remaining box, averaged."""
    order = np.argsort(-scores, kind="stable")
    boxes, scores, sources = boxes[order], scores[order], sources[order]
    remaining = np.ones(len(scores), dtype=bool)
    faces: list[Face] = []
    for i in range(len(scores)):
        if not remaining[i]:
            continue
        cluster = remaining & (_iou(boxes[i], boxes) > NMS_IOU)
        cluster[i] = True
        weights = scores[cluster]
        x0, y0, x1, y1 = (boxes[cluster] * weights[:, None]).sum(axis=0) / weights.sum()
        remaining &= ~cluster
        x0, y0 = max(0.0, float(x0)), max(0.0, float(y0))
        x1, y1 = min(1.0, float(x1)), min(1.0, float(y1))
        if x1 <= x0 or y1 <= y0:
            continue
        seen = tuple(names[k] for k in sorted(set(sources[cluster].tolist())))
        faces.append(Face((x0, y0, x1 - x0, y1 - y0), float(scores[i]), seen))
    return tuple(faces)
