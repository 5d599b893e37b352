"""/metrics exports the local model's own counters (faces, the text path, time)."""

from __future__ import annotations

from pathlib import Path

from xintu import load_config
from xintu.http import create_app
from xintu.vision._classifier import LocalStatistics
from xintu.vision._faces import FaceStatistics
from xintu.vision._text import TextStatistics

from .fakes import FakeModel
from .test_ops import metric


class CountingModel(FakeModel):
    """A fake local model that reports counters as ``LocalClassifier.statistics()`` does."""

    def statistics(self) -> LocalStatistics:
        return LocalStatistics(
            prepared=5,
            prepare_ms=60.0,
            inferred=5,
            infer_ms=40.0,
            faces=FaceStatistics(images=5, with_faces=2, faces=3, total_ms=25.0),
            text=TextStatistics(
                considered=5,
                ran=2,
                by_reason={"no_exif": 2},
                boxes_detected=9,
                boxes_recognised=4,
                documents=1,
                total_ms=80.0,
                detect_ms=50.0,
                gated_out=2,
                settled=1,
                read=1,
                read_skipped=1,
            ),
        )


async def test_metrics_export_the_local_models_counters(tmp_path: Path) -> None:
    config = load_config(env={}, data={"dir": str(tmp_path)})
    app = create_app(config, model_factory=lambda _c: CountingModel())
    async with app.test_app():
        text = (await (await app.test_client().get("/metrics")).get_data()).decode()
    assert metric(text, "xintu_local_face_images_total", outcome="detected") == 5
    assert metric(text, "xintu_local_face_images_total", outcome="with_faces") == 2
    assert metric(text, "xintu_local_faces_found_total") == 3
    assert metric(text, "xintu_local_text_images_total", outcome="gated_out") == 2
    assert metric(text, "xintu_local_text_images_total", outcome="settled") == 1
    assert metric(text, "xintu_local_text_images_total", outcome="detected") == 2
    assert metric(text, "xintu_local_text_images_total", outcome="read") == 1
    assert metric(text, "xintu_local_model_seconds_total", stage="text_detect") == 0.05
    assert metric(text, "xintu_local_model_seconds_total", stage="prepare") == 0.06
