"""Regenerate the machine-made evaluation images in ``tests/images/``.

    python -m tests.eval.make_images

Screenshots are real: headless Chromium renders the pages in ``tests/eval/pages/``
at phone and desktop resolutions (device scale factors 1-3) and writes PNGs, as a
phone's or a desktop's screenshot tool would. The identity cards are synthetic
specimens (a rendered card with a photo from scikit-image or matplotlib), saved as
a JPEG "scan" and composited in perspective onto a background as a "photo of a
card". Needs ``chromium`` (Debian package), scikit-image and matplotlib.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .sources import IMAGES_DIR, package_image

PAGES = Path(__file__).parent / "pages"

# (page, CSS width, CSS height, device scale factor, output file, embedded photo)
SCREENSHOTS: tuple[tuple[str, int, int, int, str, str | None], ...] = (
    ("article", 1920, 1080, 1, "screenshot_article_1920x1080.png", None),
    ("dashboard", 1366, 768, 1, "screenshot_dashboard_1366x768.png", None),
    ("chat", 390, 844, 3, "screenshot_chat_1170x2532.png", None),
    ("settings", 375, 667, 2, "screenshot_settings_750x1334.png", None),
    ("code", 1440, 900, 1, "screenshot_code_1440x900.png", None),
    ("login", 1920, 1080, 1, "screenshot_login_1920x1080.png", None),
    # Screenshots with a photo in them, shared as JPEG (as messengers re-encode them).
    ("feed", 360, 800, 3, "screenshot_feed_cat_1080x2400.jpg", "skimage:chelsea.png"),
    ("recipe", 1440, 900, 1, "screenshot_recipe_coffee_1440x900.jpg", "skimage:coffee.png"),
)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("chromium is not installed: apt-get install -y chromium")


def _render(page: str, width: int, height: int, scale: int, photo: bytes | None) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(PAGES / "base.css", root / "base.css")
        html = (PAGES / f"{page}.html").read_text("utf-8")
        if photo is not None:
            (root / "photo.png").write_bytes(photo)
            html = html.replace("IMAGE1", "photo.png")
        (root / "page.html").write_text(html, "utf-8")
        out = root / "shot.png"
        subprocess.run(
            [
                _chromium(),
                *CHROMIUM_FLAGS,
                f"--window-size={width},{height}",
                f"--force-device-scale-factor={scale}",
                f"--screenshot={out}",
                (root / "page.html").as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return out.read_bytes()


def _face_crop(source: str, box: tuple[int, int, int, int]) -> bytes:
    img = Image.open(io.BytesIO(package_image(source))).convert("RGB").crop(box)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _perspective_photo(card: Image.Image, background: Image.Image) -> Image.Image:
    """The card lying on a surface, seen at an angle, as a phone photo would show it."""
    bg = background.convert("RGB").resize((1600, 1200), Image.Resampling.BICUBIC)
    bg = Image.blend(bg, Image.new("RGB", bg.size, (150, 110, 70)), 0.45)  # wood tint
    w, h = card.size
    # Where the card's corners land in the photo (tl, tr, br, bl).
    quad = [(330, 300), (1270, 250), (1330, 880), (290, 930)]
    coeffs = _perspective_coeffs(quad, [(0, 0), (w, 0), (w, h), (0, h)])
    warped = card.convert("RGBA").transform(
        bg.size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC
    )
    shadow = Image.new("RGBA", bg.size, (0, 0, 0, 0))
    shadow.paste((0, 0, 0, 90), mask=warped.getchannel("A").filter(ImageFilter.GaussianBlur(12)))
    bg.paste(shadow, (12, 16), shadow)
    bg.paste(warped, (0, 0), warped)
    arr = np.asarray(bg, dtype=np.float32)
    rng = np.random.default_rng(7)
    arr += rng.normal(0, 3.0, arr.shape)  # sensor noise
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(0.8))


def _perspective_coeffs(
    dst: list[tuple[int, int]], src: list[tuple[int, int]]
) -> tuple[float, ...]:
    """Pillow's 8 perspective coefficients mapping output (dst) to input (src) points."""
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    solution = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, np.float64))
    return tuple(float(c) for c in solution)


def _save_jpeg(img: Image.Image, path: Path, quality: int = 88) -> None:
    img.convert("RGB").save(path, "JPEG", quality=quality, optimize=True)


def main() -> None:
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    for page, width, height, scale, name, photo_source in SCREENSHOTS:
        photo = package_image(photo_source) if photo_source else None
        png = _render(page, width, height, scale, photo)
        img = Image.open(io.BytesIO(png))
        assert img.size == (width * scale, height * scale), (name, img.size)
        if name.endswith(".jpg"):
            _save_jpeg(img, IMAGES_DIR / name, quality=80)
        else:  # lossless, maximum compression, to keep the repository small
            img.save(IMAGES_DIR / name, "PNG", optimize=True)
        print(f"{name}: {img.size[0]}x{img.size[1]}, {(IMAGES_DIR / name).stat().st_size} bytes")

    astronaut_face = _face_crop("skimage:astronaut.png", (130, 10, 330, 260))
    card = Image.open(io.BytesIO(_render("idcard", 856, 540, 1, astronaut_face)))
    _save_jpeg(card, IMAGES_DIR / "idcard_scan_856x540.jpg")
    background = Image.open(io.BytesIO(package_image("skimage:brick.png")))
    _save_jpeg(_perspective_photo(card, background), IMAGES_DIR / "idcard_photo_1600x1200.jpg")
    hopper_face = _face_crop("matplotlib:grace_hopper.jpg", (60, 20, 460, 520))
    card2 = Image.open(io.BytesIO(_render("idcard", 856, 540, 2, hopper_face)))
    _save_jpeg(card2, IMAGES_DIR / "idcard_scan_1712x1080.jpg")
    for name in (
        "idcard_scan_856x540.jpg",
        "idcard_photo_1600x1200.jpg",
        "idcard_scan_1712x1080.jpg",
    ):
        print(f"{name}: {(IMAGES_DIR / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
