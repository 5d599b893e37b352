"""Realistic JPEGs for the load, made distinct cheaply.

Flat colours would decode in no time and say nothing about JPEG cost, so every photo
starts from one of scikit-image's bundled photographs (astronaut, cat, coffee, rocket,
...), is resized and cropped to the wanted size, and gets mild Gaussian sensor noise
before encoding, which gives it a camera-like entropy and file size.

A load run needs hundreds of photos that the service has never seen. Re-encoding each
would cost milliseconds of the generator's CPU, so :func:`distinct` makes copies of a
few pixel-different bases whose *bytes* differ by a JPEG comment segment (``COM``,
ignored by decoders) carrying a counter: every copy has its own SHA-256 and the same
decoding cost as its base.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = ["base_photos", "distinct", "jpeg", "sha256", "single_photo"]

_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")


def _source_arrays() -> list[npt.NDArray[np.uint8]]:
    import skimage.data  # slow import; only when photos are needed

    out: list[npt.NDArray[np.uint8]] = []
    for name in _SOURCES:
        loader: Callable[[], npt.NDArray[np.uint8]] = getattr(skimage.data, name)
        arr = loader()
        out.append(np.ascontiguousarray(arr[..., :3]))
    return out


def jpeg(
    arr: npt.NDArray[np.uint8],
    size: tuple[int, int],
    *,
    seed: int,
    noise: float = 3.0,
    quality: int = 88,
) -> bytes:
    """*arr* scaled to cover *size* (width, height), centre-cropped, noised, as JPEG."""
    img = Image.fromarray(arr)
    width, height = size
    scale = max(width / img.width, height / img.height)
    scaled = img.resize(
        (max(width, round(img.width * scale)), max(height, round(img.height * scale))),
        Image.Resampling.BILINEAR,
    )
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    cropped = np.asarray(scaled.crop((left, top, left + width, top + height)), dtype=np.int16)
    rng = np.random.default_rng(seed)
    noisy = cropped + rng.normal(0.0, noise, cropped.shape).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
        out, "JPEG", quality=quality, optimize=False
    )
    return out.getvalue()


def base_photos(n: int, size: tuple[int, int] = (640, 480), *, seed: int = 7) -> list[bytes]:
    """*n* pixel-distinct realistic JPEGs of *size*, cycling through the source photos."""
    arrays = _source_arrays()
    return [jpeg(arrays[i % len(arrays)], size, seed=seed + i) for i in range(n)]


def single_photo(size: tuple[int, int], *, seed: int, quality: int = 90) -> bytes:
    """One realistic JPEG of *size* (a 12-megapixel camera photo: ``(4000, 3000)``)."""
    return jpeg(_source_arrays()[3], size, seed=seed, quality=quality)


def distinct(bases: list[bytes], n: int, *, salt: str = "") -> list[bytes]:
    """*n* JPEGs with distinct bytes: ``bases`` in turn, each with a unique ``COM``."""
    out: list[bytes] = []
    for i in range(n):
        base = bases[i % len(bases)]
        comment = f"xintu-bench {salt} {i}".encode()
        segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        out.append(base[:2] + segment + base[2:])  # right after SOI
    return out


def sha256(data: bytes) -> str:
    """Hex SHA-256, as the service computes it."""
    return hashlib.sha256(data).hexdigest()
