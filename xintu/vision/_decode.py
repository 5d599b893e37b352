"""Bytes in, model tensor and detector image out: one Pillow decode per upload.

Two steps, kept apart:

- the safe decode, :func:`decode_safely`: every limit on untrusted bytes, then one
  decode to an upright RGB *working image* (:class:`SafeImage`), no larger than the
  models need;
- per-model preprocessing of that working image: :func:`classifier_tensor`
  (EfficientNet-Lite0's resize, crop and normalisation), :func:`detector_rgb` (the
  RGB image BlazeFace and the text detector see, longest side
  :data:`DETECT_MAX_SIDE`; both were trained on colour) and :func:`detector_gray`
  (its grayscale twin, for the pixel statistics, the faces' contrast and the text
  recogniser's strips).

:func:`decode_image` runs both and the pixel statistics; it is what the classifier
calls. :func:`decode_safely` is the only place where untrusted image bytes meet
Pillow. It checks, in this order, and before any pixel is decoded:

1. the byte count (:class:`~xintu.errors.PayloadTooLarge`, 413),
2. that the bytes are an image at all (:class:`~xintu.errors.BadImage`, 400),
3. that the format is accepted (:class:`~xintu.errors.UnsupportedFormat`, 415),
4. the pixel count from the header (:class:`~xintu.errors.TooManyPixels`, 413).

Then it decodes once, applies the EXIF orientation and converts every mode to RGB
(alpha composited on white, 16-bit and float images scaled, not clipped). JPEGs
decode at reduced scale (Pillow's draft mode: libjpeg scales by 1/2, 1/4 or 1/8
inside the IDCT): the smallest scale whose longest side stays at least
:data:`WORK_LONG_SIDE` and whose shorter side stays at least :data:`WORK_SHORT_SIDE`
(see :func:`draft_request`); a 4000x3000 photo decodes at 1000x750. Entropy decoding
still reads every byte, so a 12 MP JPEG costs ~20 ms even so (~60 ms at full size).

The classifier needs a shorter side of :data:`RESIZE_SHORTER` (256) and the
detectors a longest side of :data:`DETECT_MAX_SIDE` (640), so
:data:`WORK_SHORT_SIDE` is 256: a 1920x1080 JPEG decodes at 960x540 (half the CPU of
a full-size decode) and its detector images are 640x360 either way. It was 640 while
the detectors saw gray images: the smaller decode then lost a face of ``zidane.jpg``
(2 -> 1). With the detectors fed colour, the evaluation set (both halves, 150
images) gave the same category for every image at 256 as at 640, and the same
people counts but one (``t1.jpg``, a group of 6: 6 -> 5 people).

Pillow's own decompression-bomb guard stays on: its
:class:`~PIL.Image.DecompressionBombWarning` is turned into an error once per
process (see :func:`_setup_pillow`) and both it and
:class:`~PIL.Image.DecompressionBombError` become :class:`TooManyPixels`. Pillow's
guard fires above ``Image.MAX_IMAGE_PIXELS`` (about 89.5 MP), so a configured
``images.max_pixels`` above that is effectively capped there.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from .._config import ImagesConfig
from ..errors import (
    BadImage,
    ClientError,
    PayloadTooLarge,
    TooManyPixels,
    UnsupportedFormat,
)
from ._detect import ImageSignals, measure_pixels

__all__ = [
    "CROP_SIZE",
    "DETECT_MAX_SIDE",
    "RESIZE_SHORTER",
    "WORK_LONG_SIDE",
    "WORK_SHORT_SIDE",
    "DecodedImage",
    "SafeImage",
    "classifier_tensor",
    "decode_image",
    "decode_safely",
    "detector_gray",
    "detector_rgb",
    "draft_request",
]

#: The classifier's preprocessing: shorter side to 256 (bilinear), centre crop 224.
RESIZE_SHORTER = 256
CROP_SIZE = 224
#: Longest side of the grayscale image the detectors (faces, text, card outline)
#: see. The working image is decoded with its longest side at least this.
DETECT_MAX_SIDE = 640
#: Least longest and least shorter side of the decoded working image (JPEG draft
#: mode stops above them): what the detectors and the classifier need (module
#: docstring). Below 500 and 375, a 12 MP 4:3 JPEG would decode at 1/8 instead of
#: 1/4 (~4 ms less), at the price of a smaller detector image.
WORK_LONG_SIDE = DETECT_MAX_SIDE
WORK_SHORT_SIDE = RESIZE_SHORTER
#: Longest side of the RGB thumbnail used for colour statistics (nearest-neighbour,
#: so that flat UI colours survive exactly).
STATS_MAX_SIDE = 256

# EXIF tags.
_ORIENTATION = 0x0112
_MAKE = 0x010F
_MODEL = 0x0110
_EXIF_IFD = 0x8769
_EXPOSURE_TIME = 0x829A
_F_NUMBER = 0x829D
_ISO = 0x8827

_FloatArray = npt.NDArray[np.float32]
_U8Array = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """One decoded, preprocessed upload.

    ``tensor`` is the model input for this image: float32, shape (3, 224, 224),
    RGB, normalised as ``(x - 127) / 128``. ``width``/``height`` are the full-size
    dimensions after EXIF orientation; ``format`` is Pillow's format name.
    ``decoded_size`` is the size Pillow actually decoded (smaller than the image
    when JPEG draft mode applied). ``gray`` and ``rgb`` are the detectors' uint8
    images, ``(H, W)`` and ``(H, W, 3)`` of the same size (longest side at most
    :data:`DETECT_MAX_SIDE`); :meth:`LocalClassifier.prepare` keeps them only for
    the text path (which decides in ``infer``, with ImageNet's answer, whether to
    look), and drops them when the text models are absent.
    """

    tensor: _FloatArray
    width: int
    height: int
    format: str
    signals: ImageSignals
    decoded_size: tuple[int, int] = (0, 0)
    gray: _U8Array | None = field(default=None, repr=False, compare=False)
    rgb: _U8Array | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class SafeImage:
    """An upload that passed every limit, decoded once (:func:`decode_safely`).

    ``rgb`` is the upright 8-bit RGB working image: the full image, or for a JPEG a
    1/2, 1/4 or 1/8 scale of it (:func:`draft_request`). ``width``/``height`` are the
    full-size dimensions after EXIF orientation, ``decoded_size`` the size Pillow
    decoded (before orientation), ``exif_camera`` whether camera EXIF is present.
    """

    rgb: Image.Image
    width: int
    height: int
    format: str
    exif_camera: bool
    decoded_size: tuple[int, int]


_setup_lock = threading.Lock()
_setup_done = False  # process-wide, set once by _setup_pillow (documented cache)


def _setup_pillow() -> None:
    """Once per process: register the HEIF opener and make bomb warnings errors.

    Both are process-global by nature (Pillow's plugin registry and the warnings
    filter list); doing them here, idempotently and under a lock, keeps them in
    one place.
    """
    global _setup_done
    if _setup_done:
        return
    with _setup_lock:
        if _setup_done:
            return
        import pillow_heif

        pillow_heif.register_heif_opener()
        Image.init()
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        _setup_done = True


def _too_many_pixels(width: int, height: int, limit: int) -> TooManyPixels:
    return TooManyPixels(
        f"image is {width}x{height} = {width * height} pixels; the limit is {limit} pixels"
    )


def _bomb(limit: int) -> TooManyPixels:
    return TooManyPixels(f"image has too many pixels (over the limit of {limit} pixels)")


def _open(data: bytes, images: ImagesConfig) -> Image.Image:
    """Identify the image from its header, with only the accepted format plugins."""
    allowed = [f.upper() for f in images.formats]
    # MPO has no opener of its own: Pillow's JPEG opener returns MPO files.
    openers = [f for f in allowed if f in Image.OPEN]
    if "MPO" in allowed and "JPEG" not in openers:
        openers.append("JPEG")
    try:
        img = Image.open(io.BytesIO(data), formats=openers) if openers else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(images.max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data, allowed, images.max_pixels) from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Pillow's plugins raise assorted types (ValueError, OSError, SyntaxError,
        # struct.error, EOFError, ...) on malformed headers; all mean "bad image".
        raise BadImage("the image header is malformed") from exc
    if img is None:
        raise _unidentified(data, allowed, images.max_pixels)
    if img.format not in allowed:  # a plain JPEG when only MPO is accepted
        raise _unsupported(str(img.format), allowed)
    return img


def _unidentified(data: bytes, allowed: list[str], max_pixels: int) -> ClientError:
    """415 for a real image in a format that is not accepted, else 400.

    The probe opens only the header, with every Pillow plugin; an image that is
    also a decompression bomb is answered 413.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            unaccepted = probe.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _bomb(max_pixels)
    except MemoryError:
        raise
    except Exception:  # no plugin recognises the bytes, or the header is broken
        unaccepted = None
    if unaccepted is not None and unaccepted not in allowed:
        return _unsupported(unaccepted, allowed)
    return BadImage("the file is not a recognised image")


def _unsupported(name: str, allowed: list[str]) -> UnsupportedFormat:
    return UnsupportedFormat(
        f"image format {name} is not accepted; accepted formats: {', '.join(allowed)}"
    )


def _exif_info(img: Image.Image) -> tuple[int, bool]:
    """(EXIF orientation 1..8, whether camera EXIF — make/model/exposure — is present)."""
    try:
        exif = img.getexif()
    except MemoryError:
        raise
    except Exception:  # malformed EXIF is common and harmless: ignore it
        return 1, False
    orientation = exif.get(_ORIENTATION, 1)
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1
    camera = any(str(exif.get(tag, "")).strip(" \x00") for tag in (_MAKE, _MODEL))
    if not camera:
        try:
            ifd = exif.get_ifd(_EXIF_IFD)
        except MemoryError:
            raise
        except Exception:
            ifd = {}
        camera = any(tag in ifd for tag in (_EXPOSURE_TIME, _F_NUMBER, _ISO))
    return orientation, camera


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha on white, wide ranges scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        if "transparency" in img.info:
            return _on_white(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _on_white(img.convert("RGBA"))
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    if mode.startswith(("I", "F")):
        return Image.fromarray(_scale_to_u8(np.asarray(img)), "L").convert("RGB")
    return img.convert("RGB")  # any other mode Pillow knows how to convert


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _scale_to_u8(arr: npt.NDArray[np.generic]) -> _U8Array:
    """A single-channel integer or float image scaled to 0..255.

    16-bit data scales by 255/65535; 32-bit integers in 0..255 or 0..65535 are
    taken as 8- or 16-bit; floats in 0..1 scale by 255; anything else is
    stretched from its minimum to its maximum.
    """
    if arr.ndim != 2:
        arr = arr.reshape(arr.shape[0], -1)
    a = arr.astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    kind = arr.dtype.kind
    if kind == "u" and arr.dtype.itemsize == 2:
        scaled = a / 257.0
    elif kind in "iu" and lo >= 0 and hi <= 255:
        scaled = a
    elif kind in "iu" and lo >= 0 and hi <= 65535:
        scaled = a / 257.0
    elif kind == "f" and lo >= 0 and hi <= 1.0:
        scaled = a * 255.0
    elif hi > lo:
        scaled = (a - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(a)
    out: _U8Array = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


def classifier_tensor(rgb: Image.Image) -> _FloatArray:
    """EfficientNet-Lite0's input from an RGB image: shorter side to 256 (bilinear),
    centre crop 224, ``(x - 127) / 128``, CHW float32, C-contiguous.

    Resizing only the crop's source box gives the same pixels as resizing the
    whole image and then cropping, for a fraction of the work.
    """
    w, h = rgb.size
    scale = RESIZE_SHORTER / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    left = (rw - CROP_SIZE) // 2
    top = (rh - CROP_SIZE) // 2
    box = (
        left * w / rw,
        top * h / rh,
        (left + CROP_SIZE) * w / rw,
        (top + CROP_SIZE) * h / rh,
    )
    crop = rgb.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR, box=box)
    hwc: _U8Array = np.asarray(crop, dtype=np.uint8)
    # One pass into the CHW output; * (1/128) equals / 128 exactly (a power of two).
    chw: _FloatArray = np.empty((3, CROP_SIZE, CROP_SIZE), dtype=np.float32)
    np.subtract(hwc.transpose(2, 0, 1), np.float32(127.0), out=chw, dtype=np.float32)
    chw *= np.float32(1.0 / 128.0)
    return chw


def detector_gray(rgb: Image.Image, max_side: int = DETECT_MAX_SIDE) -> _U8Array:
    """The detectors' uint8 grayscale image: :func:`detector_rgb` in gray levels
    (ITU-R 601 weights, as Pillow's ``"L"``)."""
    return gray_of(detector_rgb(rgb, max_side))


def gray_of(rgb: _U8Array) -> _U8Array:
    """An ``(H, W, 3)`` uint8 RGB array in gray levels (ITU-R 601 weights)."""
    gray: _U8Array = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)
    return gray


def detector_rgb(rgb: Image.Image, max_side: int = DETECT_MAX_SIDE) -> _U8Array:
    """The detectors' uint8 RGB image, ``(H, W, 3)``: *rgb* with its longest side at
    most *max_side* (OpenCV's area interpolation: antialiased, ~2.7 ms for a 12 MP
    photo's 1000x750 working image against ~3.9 ms for Pillow's bilinear)."""
    arr: _U8Array = np.asarray(rgb, dtype=np.uint8)
    size = _fit(rgb.size, max_side)
    if size == rgb.size:
        return arr
    out: _U8Array = np.asarray(cv2.resize(arr, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    return out


def draft_request(
    size: tuple[int, int], long_side: int = WORK_LONG_SIDE, short_side: int = WORK_SHORT_SIDE
) -> tuple[int, int]:
    """The size to ask of ``Image.draft`` for an image of *size* (width, height).

    Pillow's JPEG draft picks the largest of 1/8, 1/4, 1/2 with each side still at
    least the requested one; asking for (long, short) in the image's orientation
    keeps the longest side >= *long_side* and the shorter >= *short_side*, and no
    more. A side the image does not have is asked as it is (no scaling).
    """
    w, h = size
    if w >= h:
        return max(1, min(long_side, w)), max(1, min(short_side, h))
    return max(1, min(short_side, w)), max(1, min(long_side, h))


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    if max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def decode_safely(
    data: bytes,
    images: ImagesConfig,
    *,
    long_side: int = WORK_LONG_SIDE,
    short_side: int = WORK_SHORT_SIDE,
) -> SafeImage:
    """Check *data* against every limit, then decode it once to an upright RGB image.

    JPEGs decode at the smallest draft scale that keeps the longest side >=
    *long_side* and the shorter side >= *short_side* (see :func:`draft_request`);
    other formats at full size. Thread-safe, CPU-bound (run it in a thread).

    Raises :class:`PayloadTooLarge`, :class:`BadImage`, :class:`UnsupportedFormat`
    or :class:`TooManyPixels` (see the module docstring); each message is safe to
    show to the client.
    """
    if len(data) > images.max_image_bytes:
        raise PayloadTooLarge(
            f"image is {len(data)} bytes; the limit is {images.max_image_bytes} bytes"
        )
    if not data:
        raise BadImage("the image is empty (0 bytes)")
    _setup_pillow()
    # The image reads from an in-memory buffer: there is no file to close.
    img = _open(data, images)
    fmt = img.format or "unknown"
    width, height = img.size
    if width <= 0 or height <= 0:
        raise BadImage("the image has no pixels")
    if width * height > images.max_pixels:
        raise _too_many_pixels(width, height, images.max_pixels)
    orientation, exif_camera = _exif_info(img)
    draft = draft_request((width, height), long_side, short_side)
    rgb = _decode_rgb(img, fmt, orientation, images.max_pixels, draft)
    decoded_size = img.size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return SafeImage(
        rgb=rgb,
        width=width,
        height=height,
        format=fmt,
        exif_camera=exif_camera,
        decoded_size=decoded_size,
    )


def decode_image(data: bytes, images: ImagesConfig) -> DecodedImage:
    """Decode and preprocess one upload; thread-safe, CPU-bound (run it in a thread).

    :func:`decode_safely`, then :func:`classifier_tensor`, :func:`detector_gray` and
    the pixel statistics. Raises the errors of :func:`decode_safely`.
    """
    safe = decode_safely(data, images)
    rgb = safe.rgb
    tensor = classifier_tensor(rgb)
    colour = detector_rgb(rgb, DETECT_MAX_SIDE)
    gray = gray_of(colour)
    ssize = _fit(rgb.size, STATS_MAX_SIDE)
    small = rgb.resize(ssize, Image.Resampling.NEAREST) if ssize != rgb.size else rgb
    signals = measure_pixels(
        np.asarray(small, dtype=np.uint8),
        gray,
        width=safe.width,
        height=safe.height,
        image_format=safe.format,
        exif_camera=safe.exif_camera,
    )
    return DecodedImage(
        tensor=tensor,
        width=safe.width,
        height=safe.height,
        format=safe.format,
        signals=signals,
        decoded_size=safe.decoded_size,
        gray=gray,
        rgb=colour,
    )


def _decode_rgb(
    img: Image.Image, fmt: str, orientation: int, max_pixels: int, draft: tuple[int, int]
) -> Image.Image:
    """Decode the first frame (JPEGs at the *draft* scale) to an upright RGB copy."""
    try:
        if fmt in ("JPEG", "MPO"):
            img.draft("RGB", draft)
        img.load()
        frame: Image.Image = img
        if orientation != 1:
            frame = ImageOps.exif_transpose(img)
        return _to_rgb(frame)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(max_pixels) from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Truncated data raises OSError; broken streams ValueError, SyntaxError,
        # EOFError, struct.error and others, depending on the plugin.
        raise BadImage("the image data is truncated or corrupt") from exc
