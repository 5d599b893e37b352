"""``xintu model build``: build (or verify) the local ONNX model in the data directory."""

from __future__ import annotations

import time

from .._config import Config
from ..model import build_model, ensure_model

__all__ = ["model_build"]


def model_build(config: Config, force: bool) -> int:
    t0 = time.perf_counter()
    if force:
        path = config.data_dir / "models" / "efficientnet-lite0.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        build_model(path)
    path = ensure_model(config.data_dir)
    print(f"{path} ready in {time.perf_counter() - t0:.2f}s ({path.stat().st_size} bytes)")
    return 0
