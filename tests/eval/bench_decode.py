"""Quick timings of decoding, detectors and inference (not a test; numbers vary).

    python -m tests.eval.bench_decode [--data-dir DIR] [--repeat N]

Inputs are JPEGs made from a real photo (scikit-learn's ``china.jpg``, with mild
sensor-like noise so the 12 MP file is not unrealistically smooth): 640x480 and
4000x3000. Prints the median milliseconds of ``decode_image`` (decode, EXIF,
mode conversion, tensor, detector image, pixel statistics), of
``LocalClassifier.prepare`` (plus face and people detectors) and of
``LocalClassifier.infer`` on one image.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from xintu import load_config
from xintu.model import ensure_model
from xintu.vision import LocalClassifier, decode_image

from .sources import package_image


def _jpeg(size: tuple[int, int]) -> bytes:
    photo = Image.open(io.BytesIO(package_image("sklearn:china.jpg"))).convert("RGB")
    arr = np.asarray(photo.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    arr += np.random.default_rng(0).normal(0, 4.0, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up (per-thread detectors, caches)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


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
    for size in ((640, 480), (4000, 3000)):
        data = _jpeg(size)
        decode = _median_ms(lambda d=data: decode_image(d, config.images), args.repeat)
        prepare = _median_ms(lambda d=data: classifier.prepare(d), args.repeat)
        prepared = classifier.prepare(data)
        infer = _median_ms(lambda p=prepared: classifier.infer([p]), args.repeat)
        full = Image.open(io.BytesIO(data))
        no_draft = _median_ms(lambda f=full, d=data: Image.open(io.BytesIO(d)).load(), 5)
        del full
        print(
            f"{size[0]}x{size[1]} JPEG ({len(data) // 1024} KiB): decode_image {decode:.1f} ms, "
            f"prepare {prepare:.1f} ms, infer(1) {infer:.1f} ms; "
            f"Pillow full-size decode alone {no_draft:.1f} ms"
        )


if __name__ == "__main__":
    main()
