"""The upload image: decoded once, EXIF-transposed, downscaled, re-encoded as JPEG.

Uploading a 12-megapixel original costs seconds and thousands of tokens; the
model sees no more than ``max_side_px`` on the longest side anyway. JPEG draft
mode lets a large JPEG decode at 1/2, 1/4 or 1/8 scale straight away (never below
the target size). Alpha is composited on white (a transparent screenshot stays
readable). The result is deterministic for given bytes and settings, so the same
photo always uploads the same bytes.

:func:`prepare_upload` is CPU work: the pool runs it in a worker thread (tiny
images inline, see :mod:`xintu.llm._pool`). The base64 text is made there too.
"""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from ._errors import ImageNotUploadable

__all__ = ["UploadImage", "prepare_upload"]


@dataclass(frozen=True, slots=True)
class UploadImage:
    """The JPEG sent upstream, its size, and its base64 text (shared by every provider)."""

    jpeg: bytes = field(repr=False)
    width: int
    height: int
    b64: str = field(repr=False)


@functools.cache
def _register_heif() -> None:
    """Register pillow-heif's opener once (idempotent; Pillow's registry is global)."""
    try:
        import pillow_heif
    except ImportError:  # pragma: no cover - a dependency, but optional here
        return
    pillow_heif.register_heif_opener()


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith(("I", "F")):
        # 16/32-bit grayscale: scale to 8 bits rather than clip.
        extrema = img.getextrema()
        lo, hi = extrema[0], extrema[1]
        if not isinstance(lo, int | float) or not isinstance(hi, int | float):
            return img.convert("RGB")
        span = float(hi - lo) or 1.0
        return img.point(lambda v: (v - lo) * 255.0 / span).convert("L").convert("RGB")
    return img.convert("RGB")


def prepare_upload(data: bytes, *, max_side_px: int, quality: int) -> UploadImage:
    """Decode *data*, apply its EXIF orientation, fit it in *max_side_px*, encode JPEG.

    Raises :class:`ImageNotUploadable` for anything Pillow cannot decode (the
    local model, which validates uploads properly, then has the last word).
    """
    _register_heif()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                # Decode at the smallest 1/2^k scale still >= the target size.
                img.draft("RGB", (max_side_px, max_side_px))
            oriented = ImageOps.exif_transpose(img)
            rgb = _rgb(oriented)
            if max(rgb.size) > max_side_px:
                rgb.thumbnail((max_side_px, max_side_px), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            rgb.save(out, format="JPEG", quality=quality)
    except MemoryError:
        raise
    except Exception as exc:
        # Pillow raises assorted types on bad input (UnidentifiedImageError, OSError,
        # ValueError, SyntaxError, DecompressionBombError, ...): all mean "cannot upload".
        raise ImageNotUploadable(
            f"the image could not be prepared for upload ({type(exc).__name__})"
        ) from exc
    jpeg = out.getvalue()
    return UploadImage(
        jpeg=jpeg,
        width=rgb.width,
        height=rgb.height,
        b64=base64.b64encode(jpeg).decode("ascii"),
    )
