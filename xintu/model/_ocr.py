"""The PP-OCRv4 text models, read out of a pinned ``rapidocr-onnxruntime`` wheel.

The wheel ``rapidocr-onnxruntime==1.4.4`` (Apache-2.0) ships PaddleOCR's PP-OCRv4
detection and recognition models as ONNX files; the recognition model carries its
character dictionary (6,623 characters) in its ONNX metadata under ``character``.
The package itself cannot be a dependency (it requires ``opencv-python``, which
clashes with the ``opencv-python-headless`` Xintu uses), so at model-build time
(``xintu model build``, first start, container build) the wheel is fetched with
``pip download --no-deps``, checked against :data:`OCR_WHEEL_SHA256`, and the files
are read out of the zip. Nothing is fetched at serving time, nothing is imported
from the package, and the angle classifier is not used (text is read upright).

``<data_dir>/models/ppocr-v4/`` then holds::

    det.onnx        PP-OCRv4 detection (DB), 4,745,517 bytes
    rec.onnx        PP-OCRv4 recognition (CTC), 10,857,958 bytes
    keys.txt        the recognition dictionary, one character a line (UTF-8)
    manifest.json   {"builder_version", "wheel", "wheel_sha256",
                     "files": {name: {"size", "sha256"}}}, written last

and ``<data_dir>/models/ppocr-v4.lock`` is the lock that extractors ``flock``.

Every file is written atomically and the manifest last, exactly as for the
EfficientNet model (:mod:`._artifact`); a directory whose files do not match the
manifest (partial, corrupt, another wheel) is extracted again. The downloaded wheel
is kept in ``<data_dir>/models/wheels/`` (beside the face detectors' wheel), so a
rebuild needs no network; a wheel put there by hand is used once its SHA-256 is
checked, which is how an offline host is provisioned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import ModelError
from ._weights import file_sha256
from ._wheels import fetch_pinned_wheel

__all__ = [
    "OCR_DIR_NAME",
    "OCR_WHEEL",
    "OCR_WHEEL_SHA256",
    "TextModels",
    "ensure_text_models",
    "verify_text_models",
]

logger = logging.getLogger("xintu.model")

OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
OCR_WHEEL_FILE = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
OCR_WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
OCR_DIR_NAME = "ppocr-v4"
#: Bumped whenever what is extracted (or how) changes: older directories are redone.
OCR_BUILDER_VERSION = "1"

#: File in the data directory -> (member of the wheel, its SHA-256).
_MEMBERS: dict[str, tuple[str, str]] = {
    "det.onnx": (
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    ),
    "rec.onnx": (
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    ),
}
_KEYS = "keys.txt"
_MANIFEST = "manifest.json"
_KEYS_METADATA = "character"


@dataclass(frozen=True, slots=True)
class TextModels:
    """Paths of the extracted text models (see the module docstring)."""

    directory: Path

    @classmethod
    def beside(cls, model_path: Path) -> TextModels:
        """The text models next to the EfficientNet file at *model_path*."""
        return cls(model_path.parent / OCR_DIR_NAME)

    @property
    def det(self) -> Path:
        return self.directory / "det.onnx"

    @property
    def rec(self) -> Path:
        return self.directory / "rec.onnx"

    @property
    def keys(self) -> Path:
        return self.directory / _KEYS

    @property
    def manifest(self) -> Path:
        return self.directory / _MANIFEST


def ensure_text_models(models_dir: Path, *, wheel_dir: Path | None = None) -> TextModels:
    """``<models_dir>/ppocr-v4``, extracted (again) unless it matches its manifest.

    *models_dir* is the directory of the EfficientNet file (``<data_dir>/models``).
    Fetches the pinned wheel into *wheel_dir* (default ``<models_dir>/wheels``) if it
    is not there. Serialises with other extractors on a file lock and re-verifies
    first, like :func:`~xintu.model.ensure_model`, which calls it. Blocks for
    seconds when it extracts (call it from a thread in async code). Raises
    :class:`~xintu.errors.ModelError` if the wheel cannot be had or is not the
    pinned one, or a file cannot be written.
    """
    from ._artifact import _build_lock  # _artifact imports this module: import late

    models = TextModels(models_dir / OCR_DIR_NAME)
    if verify_text_models(models) is None:
        return models
    with _build_lock(models.directory):  # flocks models/ppocr-v4.lock
        problem = verify_text_models(models)  # another process may have done it
        if problem is not None:
            logger.info("extracting text models into %s (%s)", models.directory, problem)
            started = time.perf_counter()
            wheel = fetch_wheel(models_dir / "wheels" if wheel_dir is None else wheel_dir)
            _extract(wheel, models)
            logger.info(
                "extracted text models into %s in %.1f s",
                models.directory,
                time.perf_counter() - started,
            )
    return models


def verify_text_models(models: TextModels) -> str | None:
    """``None`` if every file matches the manifest of this builder, else why not."""
    try:
        manifest = json.loads(models.manifest.read_text("utf-8"))
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError):
        return "unreadable manifest"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return "unreadable manifest"
    if (
        manifest.get("builder_version") != OCR_BUILDER_VERSION
        or manifest.get("wheel_sha256") != OCR_WHEEL_SHA256
    ):
        return "extracted by another builder version"
    files: dict[str, Any] = manifest["files"]
    for name in (*_MEMBERS, _KEYS):
        entry = files.get(name)
        path = models.directory / name
        if not isinstance(entry, dict):
            return f"{name} is not in the manifest"
        try:
            if path.stat().st_size != entry.get("size"):
                return f"{name}: size differs from the manifest"
            if file_sha256(path) != entry.get("sha256"):
                return f"{name}: checksum differs from the manifest"
        except FileNotFoundError:
            return f"no {name}"
        except OSError as exc:
            return f"unreadable {name}: {exc.strerror}"
    return None


def fetch_wheel(wheel_dir: Path) -> Path:
    """The pinned wheel in *wheel_dir*, downloaded with pip if absent or wrong."""
    return fetch_pinned_wheel(wheel_dir, OCR_WHEEL, OCR_WHEEL_FILE, OCR_WHEEL_SHA256)


def _extract(wheel: Path, models: TextModels) -> None:
    from ._artifact import _write_atomic  # see ensure_text_models

    contents: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name, (member, sha256) in _MEMBERS.items():
                data = zf.read(member)
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise ModelError(f"{member} in {wheel.name} is not the pinned file")
                contents[name] = data
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"cannot read the text models from {wheel}: {exc}") from exc
    contents[_KEYS] = _dictionary(contents["rec.onnx"]).encode("utf-8")
    manifest: dict[str, Any] = {
        "builder_version": OCR_BUILDER_VERSION,
        "wheel": OCR_WHEEL,
        "wheel_sha256": OCR_WHEEL_SHA256,
        "files": {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in contents.items()
        },
    }
    try:
        models.directory.mkdir(parents=True, exist_ok=True)
        for name, data in contents.items():
            _write_atomic(models.directory / name, data)
        _write_atomic(
            models.manifest, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        )
    except OSError as exc:
        raise ModelError(f"cannot write the text models in {models.directory}: {exc}") from exc


def _dictionary(rec_onnx: bytes) -> str:
    """The recognition model's character list (its ``character`` metadata), one a line."""
    try:
        model = onnx.load_model_from_string(rec_onnx)
    except Exception as exc:  # protobuf's DecodeError has no public base to name
        raise ModelError(f"cannot read the recognition model: {exc}") from exc
    for prop in model.metadata_props:
        if prop.key == _KEYS_METADATA:
            chars = prop.value.rstrip("\n").split("\n")  # not splitlines: U+2028 etc.
            if len(chars) < 100 or any(len(c) != 1 for c in chars):
                raise ModelError("the recognition model's dictionary is malformed")
            return "\n".join(chars) + "\n"
    raise ModelError("the recognition model has no character dictionary")
