"""decode_image: every Pillow mode and container, and the nasty corpus.

Images are generated in memory with Pillow (and pillow-heif for HEIF); pixel values
are read back from the normalised tensor, ``x * 128 + 127``.
"""

from __future__ import annotations

import dataclasses
import io
import random
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xintu import Config, load_config
from xintu._config import ImagesConfig
from xintu.errors import BadImage, ClientError, PayloadTooLarge, TooManyPixels, UnsupportedFormat
from xintu.vision import DecodedImage, decode_image
from xintu.vision._decode import (
    DETECT_MAX_SIDE,
    RESIZE_SHORTER,
    WORK_LONG_SIDE,
    WORK_SHORT_SIDE,
    classifier_tensor,
    decode_safely,
    detector_gray,
    draft_request,
    gray_of,
)

ACCEPTED = "JPEG, PNG, WEBP, GIF, BMP, TIFF, MPO, HEIF, AVIF"


@pytest.fixture
def images(config: Config) -> ImagesConfig:
    return config.images


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def pixels(decoded: DecodedImage) -> npt.NDArray[np.float64]:
    """The 224x224 RGB crop the model sees, back in 0..255 (HWC)."""
    chw = np.asarray(decoded.tensor, dtype=np.float64)
    out: npt.NDArray[np.float64] = chw.transpose(1, 2, 0) * 128.0 + 127.0
    return out


def centre(decoded: DecodedImage) -> npt.NDArray[np.float64]:
    px: npt.NDArray[np.float64] = pixels(decoded)[112, 112]
    return px


def solid(mode: str, colour: object, size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new(mode, size, colour)  # type: ignore[arg-type]


# --- output contract -------------------------------------------------------------------


def test_rgb_jpeg_gives_normalised_tensor(images: ImagesConfig) -> None:
    data = encode(solid("RGB", (200, 100, 50), (640, 480)), "JPEG", quality=95)
    decoded = decode_image(data, images)
    assert decoded.tensor.dtype == np.float32
    assert decoded.tensor.shape == (3, 224, 224)
    assert decoded.tensor.flags.c_contiguous
    assert (decoded.width, decoded.height, decoded.format) == (640, 480, "JPEG")
    np.testing.assert_allclose(centre(decoded), (200, 100, 50), atol=3)
    assert decoded.gray is not None
    assert decoded.gray.dtype == np.uint8
    assert decoded.gray.shape == (480, 640)
    assert not decoded.signals.detectors_run


def test_resize_shorter_side_then_centre_crop(images: ImagesConfig) -> None:
    # 512x256: left quarter red, middle half green, right quarter blue. Shorter side
    # to 256 keeps 512x256; the centre crop 224 (x 144..368) is all green.
    arr = np.zeros((256, 512, 3), np.uint8)
    arr[:, :128] = (255, 0, 0)
    arr[:, 128:384] = (0, 255, 0)
    arr[:, 384:] = (0, 0, 255)
    decoded = decode_image(encode(Image.fromarray(arr), "PNG"), images)
    px = pixels(decoded)
    np.testing.assert_allclose(px[:, 0], np.tile((0, 255, 0), (224, 1)), atol=1)
    np.testing.assert_allclose(px[:, -1], np.tile((0, 255, 0), (224, 1)), atol=1)


def test_tiny_image_is_upscaled(images: ImagesConfig) -> None:
    decoded = decode_image(encode(solid("RGB", (10, 20, 30), (3, 2)), "PNG"), images)
    assert decoded.tensor.shape == (3, 224, 224)
    np.testing.assert_allclose(centre(decoded), (10, 20, 30), atol=1)


# --- modes ------------------------------------------------------------------------------


def test_cmyk_jpeg_adobe_inverted(images: ImagesConfig) -> None:
    data = encode(solid("CMYK", (0, 255, 255, 0)), "JPEG", quality=95)
    assert b"Adobe" in data  # libjpeg writes CMYK inverted, with the Adobe marker
    decoded = decode_image(data, images)
    np.testing.assert_allclose(centre(decoded), (255, 0, 0), atol=4)


def test_palette_png_with_transparency_on_white(images: ImagesConfig) -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (32, 0, 64, 64))  # right half: palette index 1, red
    decoded = decode_image(encode(img, "PNG", transparency=0), images)
    px = pixels(decoded)
    np.testing.assert_allclose(px[112, 10], (255, 255, 255), atol=1)  # transparent black
    np.testing.assert_allclose(px[112, 210], (255, 0, 0), atol=1)


def test_palette_png_without_transparency(images: ImagesConfig) -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0] + [0] * 765)
    np.testing.assert_allclose(centre(decode_image(encode(img, "PNG"), images)), 0, atol=1)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (0, 0, 255, 0), (255, 255, 255)),  # fully transparent: white
        ("RGBA", (0, 0, 255, 255), (0, 0, 255)),  # opaque: itself
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half black over white
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (0, 255), (0, 0, 0)),
    ],
)
def test_alpha_composited_on_white(
    images: ImagesConfig, mode: str, colour: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    decoded = decode_image(encode(solid(mode, colour), "PNG"), images)
    np.testing.assert_allclose(centre(decoded), expected, atol=1.5)


def test_gif_with_transparency_on_white(images: ImagesConfig) -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (32, 0, 64, 64))
    px = pixels(decode_image(encode(img, "GIF", transparency=0), images))
    np.testing.assert_allclose(px[112, 10], (255, 255, 255), atol=1)
    np.testing.assert_allclose(px[112, 210], (255, 0, 0), atol=1)


def test_16_bit_png_is_scaled_not_clipped(images: ImagesConfig) -> None:
    arr = np.full((32, 64), 32768, np.uint16)
    arr[:, 32:] = 65535
    img = Image.fromarray(arr)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    px = pixels(decode_image(data, images))
    np.testing.assert_allclose(px[112, 5], (128, 128, 128), atol=1)  # clipping gives 255
    np.testing.assert_allclose(px[112, 218], (255, 255, 255), atol=1)


def test_32_bit_integer_tiff(images: ImagesConfig) -> None:
    arr = np.full((32, 32), 1000, np.int32)
    arr[:, 16:] = 50000
    px = pixels(decode_image(encode(Image.fromarray(arr).convert("I"), "TIFF"), images))
    np.testing.assert_allclose(px[112, 5], (4, 4, 4), atol=1)  # 16-bit range: /257
    np.testing.assert_allclose(px[112, 218], (195, 195, 195), atol=1)


def test_float_tiff_in_unit_range(images: ImagesConfig) -> None:
    arr = np.full((32, 32), 0.5, np.float32)
    decoded = decode_image(encode(Image.fromarray(arr), "TIFF"), images)
    np.testing.assert_allclose(centre(decoded), (128, 128, 128), atol=1)


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 77, 77), ("1", 1, 255)])
def test_grayscale_and_bilevel(images: ImagesConfig, mode: str, value: int, expected: int) -> None:
    decoded = decode_image(encode(solid(mode, value), "PNG"), images)
    np.testing.assert_allclose(centre(decoded), (expected,) * 3, atol=1)


def test_grayscale_jpeg(images: ImagesConfig) -> None:
    decoded = decode_image(encode(solid("L", 200), "JPEG"), images)
    np.testing.assert_allclose(centre(decoded), (200, 200, 200), atol=2)


# --- containers -------------------------------------------------------------------------

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_uses_first_frame(images: ImagesConfig, fmt: str) -> None:
    frames = [solid("RGB", RED), solid("RGB", BLUE), solid("RGB", (0, 255, 0))]
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100}
    if fmt == "WEBP":
        params["lossless"] = True
    data = encode(frames[0], fmt, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    decoded = decode_image(data, images)
    np.testing.assert_allclose(centre(decoded), RED, atol=2)


def test_mpo_first_frame(images: ImagesConfig) -> None:
    data = encode(
        solid("RGB", RED, (320, 240)), "MPO", save_all=True, append_images=[solid("RGB", BLUE)]
    )
    decoded = decode_image(data, images)
    assert decoded.format == "MPO"
    np.testing.assert_allclose(centre(decoded), RED, atol=4)


def test_heif(images: ImagesConfig) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    buf = io.BytesIO()
    pillow_heif.from_pillow(solid("RGB", (30, 160, 90), (128, 96))).save(buf, quality=95)
    decoded = decode_image(buf.getvalue(), images)
    assert (decoded.format, decoded.width, decoded.height) == ("HEIF", 128, 96)
    np.testing.assert_allclose(centre(decoded), (30, 160, 90), atol=6)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP"])
def test_other_accepted_formats(images: ImagesConfig, fmt: str) -> None:
    decoded = decode_image(encode(solid("RGB", (90, 80, 70)), fmt, lossless=True), images)
    assert decoded.format == fmt
    np.testing.assert_allclose(centre(decoded), (90, 80, 70), atol=1)


def test_exif_orientation_applied(images: ImagesConfig) -> None:
    # Stored 200x100, left half red, right half blue; orientation 6 = rotate 90
    # degrees clockwise for display, so the left (red) half ends up on top.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = RED
    arr[:, 100:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
    decoded = decode_image(data, images)
    assert (decoded.width, decoded.height) == (100, 200)
    px = pixels(decoded)
    np.testing.assert_allclose(px[10, 112], RED, atol=6)
    np.testing.assert_allclose(px[213, 112], BLUE, atol=6)
    assert decoded.gray is not None
    assert decoded.gray.shape == (200, 100)


def test_camera_exif_is_a_signal(images: ImagesConfig) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Example"
    exif[0x0110] = "Camera 1"
    with_camera = decode_image(encode(solid("RGB", RED), "JPEG", exif=exif), images)
    without = decode_image(encode(solid("RGB", RED), "JPEG"), images)
    assert with_camera.signals.exif_camera
    assert not without.signals.exif_camera


def test_large_jpeg_takes_the_draft_path(images: ImagesConfig) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(arr), "JPEG", quality=70), images)
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.decoded_size == (1000, 750)  # 1/4: longest side >= 640, shorter >= 256
    assert decoded.gray is not None
    assert decoded.gray.shape == (480, 640)
    assert decoded.rgb is not None  # the detectors' colour twin, same size
    assert decoded.rgb.shape == (480, 640, 3)


def test_detector_rgb_is_the_colour_twin_of_detector_gray(images: ImagesConfig) -> None:
    data = encode(solid("RGB", (200, 30, 60), (1200, 900)), "JPEG", quality=90)
    decoded = decode_image(data, images)
    assert decoded.rgb is not None
    assert decoded.gray is not None
    assert decoded.rgb.shape == (*decoded.gray.shape, 3) == (480, 640, 3)
    np.testing.assert_allclose(decoded.rgb[240, 320], (200, 30, 60), atol=4)
    gray_of_rgb = decoded.rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(gray_of_rgb, decoded.gray, atol=1)
    # Of a real photo too: the gray image is the RGB one in gray levels, pixel for
    # pixel (one resize, then the conversion), so faces found in colour and their
    # contrast measured in gray are on the same grid.
    rng = np.random.default_rng(3)
    noisy = rng.integers(0, 255, (1500, 2000, 3), dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(noisy), "JPEG", quality=85), images)
    assert decoded.rgb is not None
    assert decoded.gray is not None
    np.testing.assert_array_equal(decoded.gray, gray_of(decoded.rgb))


@pytest.mark.parametrize(
    ("size", "decoded_size", "gray_shape", "both_640"),
    [
        ((4000, 3000), (1000, 750), (480, 640), (1000, 750)),  # 1/4 either way
        ((1920, 1080), (960, 540), (360, 640), (1920, 1080)),
        ((4000, 2250), (1000, 563), (360, 640), (2000, 1125)),
        ((2250, 4000), (563, 1000), (640, 360), (1125, 2000)),  # portrait: the same
        ((6000, 4000), (750, 500), (427, 640), (1500, 1000)),
        ((5200, 300), (5200, 300), (37, 640), (5200, 300)),  # its shorter side decides
        ((800, 200), (800, 200), (160, 640), (800, 200)),  # under 2x: full size
    ],
)
def test_jpeg_draft_decodes_at_what_the_models_need(
    images: ImagesConfig,
    size: tuple[int, int],
    decoded_size: tuple[int, int],
    gray_shape: tuple[int, int],
    both_640: tuple[int, int],
) -> None:
    """The working image keeps the longest side >= 640 (the detectors' images) and
    the shorter >= 256 (the classifier's) where the photo has them, and is no larger
    than that allows; the detectors' images are the same size as from a decode that
    keeps both sides >= 640 (the default until the detectors were checked on it)."""
    data = encode(solid("RGB", (120, 140, 160), size), "JPEG", quality=80)
    decoded = decode_image(data, images)
    assert (decoded.width, decoded.height) == size
    assert decoded.decoded_size == decoded_size
    assert decoded.gray is not None
    assert decoded.gray.shape == gray_shape
    np.testing.assert_allclose(centre(decoded), (120, 140, 160), atol=3)
    assert min(decoded_size) >= min(RESIZE_SHORTER, *size)
    larger = decode_safely(data, images, short_side=DETECT_MAX_SIDE)
    assert larger.decoded_size == larger.rgb.size == both_640
    assert detector_gray(larger.rgb).shape == gray_shape
    np.testing.assert_allclose(centre_of(classifier_tensor(larger.rgb)), (120, 140, 160), atol=3)


def centre_of(tensor: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    px: npt.NDArray[np.float64] = tensor[:, 112, 112].astype(np.float64) * 128.0 + 127.0
    return px


def test_draft_request_in_the_images_orientation() -> None:
    assert draft_request((4000, 3000)) == (WORK_LONG_SIDE, WORK_SHORT_SIDE) == (640, 256)
    assert draft_request((4000, 3000), short_side=RESIZE_SHORTER) == (640, 256)
    assert draft_request((3000, 4000), short_side=RESIZE_SHORTER) == (256, 640)
    assert draft_request((300, 200)) == (300, 200)  # never more than the image
    assert draft_request((4000, 3000), 320, 128) == (320, 128)


def test_safe_decode_keeps_the_limits_and_gives_the_working_image(
    images: ImagesConfig,
) -> None:
    """decode_safely is the limits and one decode; each model's preprocessing
    (classifier_tensor, detector_gray) starts from its working image."""
    data = encode(solid("RGB", (10, 200, 30), (4000, 3000)), "JPEG", quality=80)
    safe = decode_safely(data, images)
    assert (safe.width, safe.height, safe.format) == (4000, 3000, "JPEG")
    assert safe.rgb.mode == "RGB"
    assert safe.rgb.size == safe.decoded_size == (1000, 750)
    small = decode_safely(data, images, long_side=320, short_side=128)
    assert small.rgb.size == (500, 375)  # 1/8
    assert classifier_tensor(safe.rgb).shape == (3, 224, 224)
    assert detector_gray(safe.rgb).shape == (480, 640)
    assert detector_gray(safe.rgb, 200).shape == (150, 200)
    tight = dataclasses.replace(images, max_pixels=4000 * 3000 - 1)
    with pytest.raises(TooManyPixels):
        decode_safely(data, tight)


def test_png_is_decoded_at_full_size(images: ImagesConfig) -> None:
    decoded = decode_image(encode(solid("RGB", RED, (1000, 800)), "PNG"), images)
    assert decoded.decoded_size == (1000, 800)


def test_threads_decode_independently(images: ImagesConfig) -> None:
    blobs = [encode(solid("RGB", (i * 20, 0, 255 - i * 20), (300, 200)), "PNG") for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: decode_image(b, images), blobs * 3))
    for i, decoded in enumerate(results):
        k = i % 12
        np.testing.assert_allclose(centre(decoded), (k * 20, 0, 255 - k * 20), atol=1)


# --- the nasty corpus -------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but whose data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (8000, 8000),  # over our 50 MP limit, under Pillow's own guard
        (10_000, 10_000),  # Pillow's DecompressionBombWarning range
        (100_000, 100_000),  # Pillow's DecompressionBombError range
    ],
)
def test_decompression_bomb_is_refused_before_decoding(
    images: ImagesConfig, width: int, height: int
) -> None:
    data = bomb_png(width, height)
    assert len(data) < 200
    with pytest.raises(TooManyPixels) as info:
        decode_image(data, images)  # pytest turns any leaked warning into an error
    pixels_ = width * height
    if pixels_ <= Image.MAX_IMAGE_PIXELS:  # type: ignore[operator]
        assert str(info.value) == (
            f"image is {width}x{height} = {pixels_} pixels; the limit is 50000000 pixels"
        )
    else:
        assert str(info.value) == "image has too many pixels (over the limit of 50000000 pixels)"


def test_bomb_in_an_unaccepted_format_is_too_many_pixels(images: ImagesConfig) -> None:
    with pytest.raises(TooManyPixels):
        decode_image(bomb_png(100_000, 100_000), dataclasses.replace(images, formats=("JPEG",)))


def test_pixel_limit_from_config(images: ImagesConfig) -> None:
    small_limit = dataclasses.replace(images, max_pixels=100 * 100)
    data = encode(solid("RGB", RED, (101, 100)), "PNG")
    with pytest.raises(TooManyPixels, match=r"^image is 101x100 = 10100 pixels; the limit"):
        decode_image(data, small_limit)
    decode_image(encode(solid("RGB", RED, (100, 100)), "PNG"), small_limit)


def test_too_many_bytes_is_checked_first(images: ImagesConfig) -> None:
    limited = dataclasses.replace(images, max_image_bytes=1000)
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(b"\x00" * 1001, limited)  # not an image either: size wins
    assert type(info.value) is PayloadTooLarge
    assert str(info.value) == "image is 1001 bytes; the limit is 1000 bytes"


def test_zero_bytes(images: ImagesConfig) -> None:
    with pytest.raises(BadImage) as info:
        decode_image(b"", images)
    assert str(info.value) == "the image is empty (0 bytes)"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(random.Random(1).randbytes(5000), id="random-bytes"),
        pytest.param(b"hello, this is a text file named photo.jpg\n" * 20, id="text-as-jpg"),
        pytest.param(b"<html><body><img src=x></body></html>", id="html"),
        pytest.param(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", id="pdf-header"),
        pytest.param(b"\xff\xd8\xff", id="jpeg-magic-only"),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
        pytest.param(b"GIF89a", id="gif-magic-only"),
    ],
)
def test_not_an_image(images: ImagesConfig, data: bytes) -> None:
    with pytest.raises(BadImage) as info:
        decode_image(data, images)
    assert type(info.value) is BadImage
    assert str(info.value) in {
        "the file is not a recognised image",
        "the image header is malformed",
    }


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg(images: ImagesConfig, cut: float) -> None:
    rng = np.random.default_rng(2)
    data = encode(Image.fromarray(rng.integers(0, 255, (300, 400, 3), np.uint8)), "JPEG")
    with pytest.raises(BadImage) as info:
        decode_image(data[: int(len(data) * cut)], images)
    assert str(info.value) == "the image data is truncated or corrupt"


def test_truncated_png(images: ImagesConfig) -> None:
    rng = np.random.default_rng(3)
    data = encode(Image.fromarray(rng.integers(0, 255, (300, 400, 3), np.uint8)), "PNG")
    with pytest.raises(BadImage, match=r"^the image data is truncated or corrupt$"):
        decode_image(data[: len(data) // 2], images)


def test_png_with_bad_crc(images: ImagesConfig) -> None:
    data = bytearray(bomb_png(16, 16))
    data[29] ^= 0xFF  # IHDR's CRC
    with pytest.raises(BadImage):
        decode_image(bytes(data), images)


def test_zero_width_png(images: ImagesConfig) -> None:
    with pytest.raises(BadImage):
        decode_image(bomb_png(0, 16), images)


def test_polyglot_jpeg_with_zip_appended_still_decodes(images: ImagesConfig) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("payload.txt", "not a picture")
    data = encode(solid("RGB", (20, 200, 20)), "JPEG", quality=95) + buf.getvalue()
    decoded = decode_image(data, images)
    assert decoded.format == "JPEG"
    np.testing.assert_allclose(centre(decoded), (20, 200, 20), atol=4)


@pytest.mark.parametrize(("fmt", "name"), [("ICO", "ICO"), ("TGA", "TGA"), ("PPM", "PPM")])
def test_real_image_in_unaccepted_format(images: ImagesConfig, fmt: str, name: str) -> None:
    data = encode(solid("RGB", RED, (32, 32)), fmt)
    with pytest.raises(UnsupportedFormat) as info:
        decode_image(data, images)
    assert str(info.value) == f"image format {name} is not accepted; accepted formats: {ACCEPTED}"


def test_accepted_formats_come_from_config(images: ImagesConfig) -> None:
    png = encode(solid("RGB", RED), "PNG")
    with pytest.raises(UnsupportedFormat, match=r"^image format PNG is not accepted; accepted"):
        decode_image(png, dataclasses.replace(images, formats=("JPEG",)))
    ico = encode(solid("RGB", RED, (32, 32)), "ICO")
    decoded = decode_image(ico, dataclasses.replace(images, formats=("ICO",)))
    assert decoded.format == "ICO"


def test_messages_are_client_safe(images: ImagesConfig) -> None:
    for data in (b"junk" * 10, bomb_png(100_000, 100_000), encode(solid("RGB", RED), "TGA")):
        with pytest.raises((BadImage, TooManyPixels, UnsupportedFormat)) as info:
            decode_image(data, images)
        message = str(info.value)
        assert "BytesIO" not in message
        assert "0x" not in message
        assert "/" not in message
        assert info.value.__cause__ is not None or isinstance(info.value, TooManyPixels)


_FUZZ_BASES = [
    encode(
        Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 60, 3), dtype=np.uint8)),
        fmt,
    )
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(_FUZZ_BASES),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
)
def test_corrupted_files_only_raise_client_errors(
    base: bytes, edits: list[tuple[float, int]], cut: float | None
) -> None:
    images = load_config(env={}).images
    data = bytearray(base)
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    try:
        decoded = decode_image(bytes(data), images)
    except ClientError:
        return
    assert decoded.tensor.shape == (3, 224, 224)
    assert np.isfinite(decoded.tensor).all()
