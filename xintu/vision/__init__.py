"""The local classifier: decoding, detectors, EfficientNet-Lite0 and the category rules.

- :func:`decode_image` turns untrusted bytes into the model tensor (or a client
  error: 400, 413 or 415);
- :class:`LocalClassifier` adds the face/people detectors (``prepare``), runs the
  ONNX model on a batch (``infer``) and maps ImageNet to the album categories with
  the table in :mod:`._categories`;
- :func:`build_local_model` is the one place that builds the local model from the
  configuration (``model.kind``, :mod:`._factory`).
"""

from ._classifier import LocalClassifier as LocalClassifier
from ._decode import DecodedImage as DecodedImage
from ._decode import decode_image as decode_image
from ._detect import ImageSignals as ImageSignals
from ._factory import StandaloneModel as StandaloneModel
from ._factory import build_local_model as build_local_model
from ._factory import ensure_local_model_files as ensure_local_model_files

__all__ = [
    "DecodedImage",
    "ImageSignals",
    "LocalClassifier",
    "StandaloneModel",
    "build_local_model",
    "decode_image",
    "ensure_local_model_files",
]
