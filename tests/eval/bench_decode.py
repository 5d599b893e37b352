"""Quick timings of decoding, detectors and inference (not a test; numbers vary).

    python -m tests.eval.bench_decode [--data-dir DIR] [--repeat N]

Inputs are JPEGs made from a real photo (scikit-learn's ``china.jpg``, with mild
sensor-like noise so the 12 MP file is not unrealistically smooth): 640x480,
1920x1080 and 4000x3000. Prints the median milliseconds (wall, and the calling
thread's CPU) of ``decode_image`` (decode, EXIF, mode conversion, tensor, detector
images, pixel statistics), of ``LocalClassifier.prepare`` (plus the face detectors)
and of ``LocalClassifier.infer`` on one image; then the parts: the two BlazeFace
models, EfficientNet's session run, the text detector at ``DETECT_SIDE`` and one
48x320 recogniser line; and the classifier's own counters
(``LocalClassifier.statistics()``) after the run.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from xintu import load_config
from xintu.model import ensure_model
from xintu.vision import LocalClassifier, decode_image
from xintu.vision._text import DETECT_SIDE

from .sources import package_image


def _jpeg(size: tuple[int, int]) -> bytes:
    photo = Image.open(io.BytesIO(package_image("sklearn:china.jpg"))).convert("RGB")
    arr = np.asarray(photo.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    arr += np.random.default_rng(0).normal(0, 4.0, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _median_ms(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(wall, thread CPU) median milliseconds of *fn*, after one warm-up call."""
    fn()  # warm up (per-thread detectors, caches)
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        cpus.append((time.thread_time() - c) * 1000)
        walls.append((time.perf_counter() - t) * 1000)
    return statistics.median(walls), statistics.median(cpus)


def _full_decode(data: bytes) -> None:
    Image.open(io.BytesIO(data)).load()


def _ms(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.1f} ms ({pair[1]:.1f} CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("XINTU_EVAL_CACHE", Path.home() / ".cache" / "xintu-eval")),
    )
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    config = load_config(env={})
    classifier = LocalClassifier(config.model, config.images, ensure_model(args.data_dir))
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for size in ((640, 480), (1920, 1080), (4000, 3000)):
        data = _jpeg(size)
        decode = _median_ms(partial(decode_image, data, config.images), args.repeat)
        prepare = _median_ms(partial(classifier.prepare, data), args.repeat)
        prepared = classifier.prepare(data)
        infer = _median_ms(partial(classifier.infer, [prepared]), args.repeat)
        full = _median_ms(partial(_full_decode, data), 5)
        print(
            f"{size[0]}x{size[1]} JPEG ({len(data) // 1024} KiB): decode_image {_ms(decode)}, "
            f"prepare {_ms(prepare)}, infer(1) {_ms(infer)}; "
            f"Pillow full-size decode alone {_ms(full)}"
        )
    decoded = decode_image(_jpeg((640, 480)), config.images)
    assert decoded.rgb is not None
    rgb = decoded.rgb
    faces = classifier._detectors._faces  # the parts, timed alone
    for model in faces._models:
        cost = _median_ms(partial(faces._run, model, rgb), args.repeat)
        print(f"  {model.spec.name} on 640x480: {_ms(cost)}")
    x = decoded.tensor[np.newaxis]
    session = classifier._session
    name = session.get_inputs()[0].name
    run = _median_ms(lambda: session.run(None, {name: x}), args.repeat)
    print(f"  EfficientNet-Lite0 run, batch 1: {_ms(run)}")
    reader = classifier._text
    if reader is not None:
        detect = _median_ms(lambda: reader.detect(rgb), max(3, args.repeat // 3))
        line = np.full((48, 320), 255, dtype=np.uint8)
        read = _median_ms(lambda: reader.recognise([line]), max(3, args.repeat // 3))
        print(f"  text detector at {DETECT_SIDE} px: {_ms(detect)}; one 48x320 line: {_ms(read)}")
    print(classifier.statistics())


if __name__ == "__main__":
    main()
