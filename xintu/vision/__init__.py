"""The local classifier: decoding, detectors, EfficientNet-Lite0 and the category rules.

- :func:`decode_image` turns untrusted bytes into the model tensor (or a client
  error: 400, 413 or 415);
- :class:`LocalClassifier` adds the face/people detectors (``prepare``), runs the
  ONNX model on a batch (``infer``) and maps ImageNet to the album categories with
  the table in :mod:`._categories`.
"""

from ._classifier import LocalClassifier as LocalClassifier
from ._decode import DecodedImage as DecodedImage
from ._decode import decode_image as decode_image
from ._detect import ImageSignals as ImageSignals

__all__ = ["DecodedImage", "ImageSignals", "LocalClassifier", "decode_image"]
