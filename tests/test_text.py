"""Text signals: the PP-OCRv4 models on disk, detection, recognition, keywords, gating.

The models are read out of the pinned ``rapidocr-onnxruntime`` wheel once per test
session (``pip download`` the first time; pip's cache afterwards); each test uses
real onnxruntime sessions on real images from ``tests/images`` and packages.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw, ImageFont

from xintu import Category, load_config
from xintu.model import ensure_model
from xintu.model._ocr import (
    OCR_WHEEL_FILE,
    OCR_WHEEL_SHA256,
    TextModels,
    ensure_text_models,
    verify_text_models,
)
from xintu.vision import LocalClassifier, decode_image
from xintu.vision._categories import Evidence
from xintu.vision._text import (
    DETECT_SIDE,
    READ_MIN_BOXES,
    TextReader,
    TextSignals,
    find_keywords,
    text_adjusted,
    text_gate,
)

from .test_classifier import image

IMAGES = Path(__file__).parent / "images"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``models/`` directory with the text models (and the wheel in ``wheels/``)."""
    models = tmp_path_factory.mktemp("text-data") / "models"
    ensure_text_models(models)
    return models


@pytest.fixture(scope="session")
def reader(models_dir: Path) -> TextReader:
    return TextReader(TextModels(models_dir / "ppocr-v4"), intra_op_threads=1)


def gray_of(data: bytes) -> npt.NDArray[np.uint8]:
    decoded = decode_image(data, load_config(env={}).images)
    assert decoded.gray is not None
    return decoded.gray


# --- detection and recognition -------------------------------------------------------


def test_detects_rows_of_text_on_a_screenshot(reader: TextReader) -> None:
    gray = gray_of((IMAGES / "screenshot_settings_750x1334.png").read_bytes())
    text = reader.read(gray)
    assert text.boxes >= 10
    assert text.rows >= 8
    assert text.horizontal_fraction == 1.0
    assert text.aligned_fraction >= 0.8
    assert "Settings" in text.lines
    assert text.keywords == ()


def test_finds_no_text_on_a_landscape(reader: TextReader) -> None:
    gray = gray_of(image("sklearn:china.jpg"))
    assert reader.detect(gray) == []
    text = reader.read(gray)
    assert (text.boxes, text.recognised, text.area_fraction, text.layout_score) == (0, 0, 0, 0)


def test_recognises_a_rendered_line(reader: TextReader) -> None:
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    img = Image.new("L", (640, 200), 255)
    draw = ImageDraw.Draw(img)
    draw.text((20, 20), "PASSPORT", font=ImageFont.truetype(str(font), 36), fill=0)
    draw.text((20, 110), "Xintu reads 2024 photos", font=ImageFont.truetype(str(font), 36), fill=0)
    gray = np.asarray(img, dtype=np.uint8)
    assert len(reader.detect(gray)) == 2
    text = reader.read(gray)
    assert set(text.lines) == {"PASSPORT", "Xintu reads 2024 photos"}
    assert text.keywords == ("PASSPORT",)
    assert text.document_score == 0.95


def test_reading_is_thread_safe(reader: TextReader) -> None:
    gray = gray_of((IMAGES / "idcard_scan_856x540.jpg").read_bytes())
    alone = reader.read(gray)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: reader.read(gray), range(4)))
    assert all(r.lines == alone.lines and r.boxes == alone.boxes for r in results)


class _Recording:
    """An onnxruntime session that remembers every input it was given."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs: list[npt.NDArray[np.float32]] = []

    def run(self, names: Any, feeds: dict[str, npt.NDArray[np.float32]]) -> Any:
        self.inputs.extend(feeds.values())
        return self.session.run(names, feeds)


def test_the_detector_sees_a_small_colour_image_as_it_was_trained(
    reader: TextReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PP-OCRv4's detector was trained on BGR images normalised with ImageNet's mean
    and deviation; it sees at most DETECT_SIDE (480) pixels a side, and its boxes come
    back in the given image's pixels."""
    det = _Recording(reader._det)
    monkeypatch.setattr(reader, "_det", det)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    img = Image.new("RGB", (640, 480), (255, 0, 0))  # pure red
    ImageDraw.Draw(img).text(
        (40, 200), "PASSPORT", font=ImageFont.truetype(str(font), 48), fill=(255, 255, 255)
    )
    (quad,) = reader.detect(np.asarray(img, dtype=np.uint8))
    (x,) = det.inputs
    assert x.shape == (1, 3, 352, DETECT_SIDE)
    assert DETECT_SIDE == 480
    blue, green, red = x[0, :, 5, 5]  # a red pixel, channels in BGR order
    assert red == pytest.approx((1.0 - 0.406) / 0.225, abs=1e-4)
    assert green == pytest.approx((0.0 - 0.456) / 0.224, abs=1e-4)
    assert blue == pytest.approx((0.0 - 0.485) / 0.229, abs=1e-4)
    assert 20 <= quad[:, 0].min() <= 50
    assert 250 <= quad[:, 0].max() <= 320
    assert 190 <= quad[:, 1].min() <= 215
    assert 240 <= quad[:, 1].max() <= 275


def test_lines_are_read_one_by_one(reader: TextReader, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recogniser batch is padded to its widest line and costs more than its lines
    read one by one; each run reads one line, and reading stops at a strong keyword."""
    rec = _Recording(reader._rec)
    monkeypatch.setattr(reader, "_rec", rec)
    font = ImageFont.truetype(
        str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), 30
    )
    img = Image.new("L", (640, 300), 255)
    draw = ImageDraw.Draw(img)
    draw.text((20, 20), "Xintu reads many photos today", font=font, fill=0)
    draw.text((20, 120), "PASSPORT", font=font, fill=0)
    draw.text((20, 220), "Nothing", font=font, fill=0)
    text = reader.read(np.asarray(img, dtype=np.uint8))
    assert text.boxes == 3
    assert text.lines == ("Xintu reads many photos today", "PASSPORT")  # largest first
    assert [x.shape[0] for x in rec.inputs] == [1, 1]


def _signals(**changes: Any) -> Any:
    images = load_config(env={}).images
    base = decode_image(_camera_jpeg("skimage:chelsea.png"), images).signals
    return replace(base, **changes)


def test_text_lines_alone_do_not_open_the_gate() -> None:
    """The cheap line counter alone never opened the gate where text changed the answer
    (tune half: 5 photos, no change); the card shape, the scores and ImageNet do."""
    lines = _signals(exif_camera=False, text_lines=40, format="JPEG")
    assert lines.screenshot_score < 0.4
    assert text_gate(lines, hint=0.0) is None
    assert text_gate(lines, hint=0.2) == "imagenet_hint"


def test_no_text_path_where_no_text_can_change_the_answer(reader: TextReader) -> None:
    """read_if_useful asks the classifier's decision about the bounding text outcomes
    (none, a page of rows, an identity keyword) and skips when none changes it."""
    gray = gray_of((IMAGES / "idcard_scan_856x540.jpg").read_bytes())
    card = _signals(card_box=(0.0, 0.0, 1.0, 1.0))
    vote = dict.fromkeys([Category.PETS, Category.FOODS, Category.TRAVEL_SCENERY], 0.0)
    vote |= dict.fromkeys(list(Evidence), 0.0)
    asked: list[TextSignals | None] = []

    def settled(text: TextSignals | None) -> str:
        asked.append(text)
        return "idcard"

    before = reader.statistics()
    assert reader.read_if_useful(gray, card, vote, decide=settled) is None
    after = reader.statistics()
    assert (after.considered, after.settled, after.ran) == (
        before.considered + 1,
        before.settled + 1,
        before.ran,
    )
    assert asked[0] is None
    assert len(asked) == 4

    def keywords_decide(text: TextSignals | None) -> str:
        return "idcard" if text is not None and text.document_score > 0 else "screenshot"

    text = reader.read_if_useful(gray, card, vote, decide=keywords_decide)
    assert text is not None
    assert text.read_skipped == ""
    assert text.keywords

    def layout_decides(text: TextSignals | None) -> str:
        return "screenshot" if text is not None and text.boxes else "other"

    text = reader.read_if_useful(gray, card, vote, decide=layout_decides)
    assert text is not None
    assert text.boxes >= 8
    assert (text.read_skipped, text.recognised, text.keywords) == ("settled", 0, ())
    final = reader.statistics()
    assert (final.ran, final.read, final.read_skipped) == (
        after.ran + 2,
        after.read + 1,
        after.read_skipped + 1,
    )
    assert final.detect_ms > after.detect_ms


def test_a_photo_with_a_word_or_two_is_not_read(reader: TextReader) -> None:
    font = ImageFont.truetype(
        str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), 30
    )
    img = Image.new("L", (640, 300), 255)
    ImageDraw.Draw(img).text((20, 20), "PASSPORT", font=font, fill=0)
    gray = np.asarray(img, dtype=np.uint8)
    vote = dict.fromkeys([Category.PETS, Category.FOODS, Category.TRAVEL_SCENERY], 0.0)
    vote |= dict.fromkeys(list(Evidence), 0.0)
    text = reader.read_if_useful(gray, _signals(card_box=(0.0, 0.0, 1.0, 1.0)), vote)
    assert text is not None
    assert (text.boxes, text.read_skipped, text.keywords) == (1, "few_boxes", ())
    assert READ_MIN_BOXES == 4


# --- identity documents ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["idcard_scan_856x540.jpg", "idcard_scan_1712x1080.jpg", "idcard_photo_1600x1200.jpg"]
)
def test_id_specimen_gets_identity_keywords(reader: TextReader, name: str) -> None:
    text = reader.read(gray_of((IMAGES / name).read_bytes()))
    # Reading stops at the first strong keyword: one of the two is enough.
    assert {"IDENTITYCARD", "MRZ"} & set(text.keywords)
    assert text.boxes >= 8
    assert text.document_score == 0.95


@pytest.mark.parametrize(
    ("lines", "keywords"),
    [
        (["中华人民共和国", "居民身份证"], ("居民身份证", "身份证")),
        (["公民身份号码 11010519491231002X"], ("公民身份号码", "CITIZEN_NUMBER")),
        (["11010519491231002X"], ("CITIZEN_NUMBER",)),
        (["公民身份号码"], ("公民身份号码",)),
        (["11010519491231002 1"], ()),  # not 18 characters in a row
        (["110105194912310021"], ()),  # check digit wrong
        (["姓名 张三", "性别 男 民族 汉"], ("姓名", "性别", "民族")),
        (["P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<"], ("MRZ",)),
        (["IDXMP\u00d70T482177\u00ab\u00ab\u00ab\u00ab\u00ab\u00ab\u00ab"], ("MRZ",)),
        (["cout<<value<<endl; std::cout<<x"], ()),  # code is not a machine-readable zone
        (["Sumame", "Dateofbirth"], ("SURNAME", "DATEOFBIRTH")),  # OCR's "rn" as "m"
        (["Passeport / Passport"], ("PASSPORT",)),
        (["Reset your password"], ()),
        (["IDENTITY CARD"], ("IDENTITYCARD",)),
    ],
)
def test_find_keywords(lines: list[str], keywords: tuple[str, ...]) -> None:
    assert find_keywords(lines) == keywords


# --- gating ---------------------------------------------------------------------------


def _camera_jpeg(source: str) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Xintu Camera Co."  # Make
    exif[0x0110] = "XC-1"  # Model
    out = io.BytesIO()
    Image.open(io.BytesIO(image(source))).convert("RGB").save(out, "JPEG", exif=exif)
    return out.getvalue()


def test_text_adjusted() -> None:
    images = load_config(env={}).images
    signals = decode_image((IMAGES / "idcard_scan_856x540.jpg").read_bytes(), images).signals
    none = TextSignals("card_shape", 0, 0.0, 0.0, 0.0, 0, 0, (), 1.0)
    assert text_adjusted(0.8, 0.5, signals, None) == (0.8, 0.5)
    assert text_adjusted(0.8, 0.5, signals, none) == (0.4, 0.35)
    words = replace(none, boxes=12, horizontal_fraction=1.0, aligned_fraction=1.0)
    assert text_adjusted(0.0, 0.9, signals, replace(words, keywords=("MRZ",))) == (0.95, 0.9)
    assert text_adjusted(0.0, 0.5, signals, words) == (0.0, 0.7)


def test_gate_reasons() -> None:
    images = load_config(env={}).images
    card = decode_image((IMAGES / "idcard_scan_856x540.jpg").read_bytes(), images).signals
    assert text_gate(card, hint=0.0) == "card_shape"
    photo = decode_image(_camera_jpeg("skimage:chelsea.png"), images).signals
    assert text_gate(photo, hint=0.0) is None
    assert text_gate(photo, hint=0.5) == "imagenet_hint"


# --- the files on disk -----------------------------------------------------------------


@pytest.fixture
def extracted(models_dir: Path, tmp_path: Path) -> TextModels:
    """A fresh models directory with the session's wheel in its cache, extracted."""
    wheels = tmp_path / "models" / "wheels"
    wheels.mkdir(parents=True)
    shutil.copy(models_dir / "wheels" / OCR_WHEEL_FILE, wheels)
    return ensure_text_models(tmp_path / "models")


def _extracting(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for r in caplog.records if (m := r.getMessage()).startswith("extracting ")]


def test_extracted_files_match_the_manifest(extracted: TextModels) -> None:
    manifest = json.loads(extracted.manifest.read_text("utf-8"))
    assert manifest["wheel_sha256"] == OCR_WHEEL_SHA256
    assert manifest["files"]["det.onnx"]["size"] == 4_745_517
    assert manifest["files"]["rec.onnx"]["size"] == 10_857_958
    keys = extracted.keys.read_text("utf-8").split("\n")
    assert len(keys) == 6623 + 1  # and the final newline
    assert {"身", "份", "证", "<", "P"} <= set(keys)
    assert verify_text_models(extracted) is None


def _flip_one_byte(m: TextModels) -> None:
    data = bytearray(m.rec.read_bytes())
    data[len(data) // 2] ^= 1
    m.rec.write_bytes(bytes(data))


def _truncate(m: TextModels) -> None:
    m.det.write_bytes(m.det.read_bytes()[:1000])


def _stale(m: TextModels) -> None:
    manifest = json.loads(m.manifest.read_text("utf-8"))
    m.manifest.write_text(json.dumps(manifest | {"builder_version": "0"}))


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_flip_one_byte, "rec.onnx: checksum differs from the manifest"),
        (_truncate, "det.onnx: size differs from the manifest"),
        (lambda m: m.keys.unlink(), "no keys.txt"),
        (lambda m: m.manifest.unlink(), "no manifest"),
        (lambda m: m.manifest.write_text("{not json"), "unreadable manifest"),
        (_stale, "extracted by another builder version"),
    ],
)
def test_a_bad_file_is_extracted_again(
    extracted: TextModels,
    caplog: pytest.LogCaptureFixture,
    corrupt: Callable[[TextModels], None],
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="xintu.model")
    good = verify_text_models(extracted)
    assert good is None
    corrupt(extracted)
    assert verify_text_models(extracted) == reason
    assert ensure_text_models(extracted.directory.parent) == extracted
    assert _extracting(caplog) == [f"extracting text models into {extracted.directory} ({reason})"]
    assert verify_text_models(extracted) is None


def test_a_good_directory_is_left_alone(
    extracted: TextModels, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xintu.model")
    inode = extracted.rec.stat().st_ino
    assert ensure_text_models(extracted.directory.parent) == extracted
    assert _extracting(caplog) == []
    assert extracted.rec.stat().st_ino == inode


# --- in the classifier ----------------------------------------------------------------


@pytest.fixture(scope="session")
def data_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory's ``models/`` as :func:`~xintu.model.ensure_model` leaves it."""
    data_dir = tmp_path_factory.mktemp("classifier-data")
    return ensure_model(data_dir).parent


@pytest.fixture(scope="session")
def classifier(data_models: Path) -> LocalClassifier:
    config = load_config(env={})
    return LocalClassifier(config.model, config.images, data_models / "efficientnet-lite0.onnx")


@pytest.mark.parametrize(
    "name", ["idcard_scan_856x540.jpg", "idcard_scan_1712x1080.jpg", "idcard_photo_1600x1200.jpg"]
)
def test_id_specimen_is_an_idcard(classifier: LocalClassifier, name: str) -> None:
    result = classifier.classify((IMAGES / name).read_bytes())
    assert result.local_inference_result is not None
    text = result.local_inference_result["text"]
    assert text["ran"] is True
    assert {"IDENTITYCARD", "MRZ"} & set(text["keywords"])
    assert text["boxes"] >= 8
    assert result.category is Category.IDCARD


@pytest.mark.parametrize("source", ["skimage:chelsea.png", "sklearn:china.jpg"])
def test_an_ordinary_camera_photo_does_not_run_ocr(
    classifier: LocalClassifier, source: str
) -> None:
    before = classifier.text_statistics()
    assert before is not None
    result = classifier.classify(_camera_jpeg(source))
    assert result.local_inference_result is not None
    assert result.local_inference_result["signals"]["exif_camera"] is True
    assert result.local_inference_result["text"] == {"ran": False}
    after = classifier.text_statistics()
    assert after is not None
    assert (after.considered, after.ran) == (before.considered + 1, before.ran)


def test_an_exact_size_screenshot_does_not_run_ocr(classifier: LocalClassifier) -> None:
    data = (IMAGES / "screenshot_chat_1170x2532.png").read_bytes()
    result = classifier.classify(data)
    assert result.category is Category.SCREENSHOT
    assert result.local_inference_result is not None
    assert result.local_inference_result["text"] == {"ran": False}


def test_statistics_count_runs(classifier: LocalClassifier) -> None:
    before = classifier.text_statistics()
    assert before is not None
    classifier.classify((IMAGES / "idcard_photo_1600x1200.jpg").read_bytes())
    after = classifier.text_statistics()
    assert after is not None
    assert after.ran == before.ran + 1
    assert after.documents == before.documents + 1
    assert after.total_ms > before.total_ms
    assert 0.0 < after.run_rate <= 1.0


def test_without_text_models_the_classifier_works_without_text(
    data_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "efficientnet-lite0.onnx"
    shutil.copy(data_models / model.name, model)
    for face in data_models.glob("blazeface-*"):
        shutil.copy(face, tmp_path / face.name)
    config = load_config(env={})
    with caplog.at_level(logging.WARNING, logger="xintu.vision"):
        local = LocalClassifier(config.model, config.images, model)
    assert local.text_statistics() is None
    assert [r.getMessage() for r in caplog.records] == [
        f"text signals off: no manifest in {tmp_path / 'ppocr-v4'}"
    ]
    result = local.classify((IMAGES / "idcard_scan_856x540.jpg").read_bytes())
    assert result.local_inference_result is not None
    assert result.local_inference_result["text"] == {"ran": False}
