"""``xintu classify-local PATH...``: classify image files with the local model, here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .._config import Config
from ..errors import XintuError
from ..vision import StandaloneModel, build_local_model

__all__ = ["classify_local"]


def classify_local(config: Config, paths: Sequence[Path], as_json: bool) -> int:
    # English descriptions, whatever llm.description_language says (as before the factory).
    classifier = StandaloneModel(build_local_model(config, description_language="en"))
    failures = 0
    for path in paths:
        try:
            result = classifier.classify(path.read_bytes())
        except (OSError, XintuError) as exc:
            failures += 1
            msg = exc.message if isinstance(exc, XintuError) else str(exc)
            if as_json:
                print(json.dumps({"path": str(path), "error": msg}))
            else:
                print(f"{path}: error: {msg}")
            continue
        if as_json:
            print(
                json.dumps(
                    {
                        "path": str(path),
                        "category": result.category.value,
                        "confidence": round(result.confidence, 4),
                        "description": result.description,
                        "evidence": result.local_inference_result,
                    }
                )
            )
        else:
            evidence = dict(result.local_inference_result or {})
            line = f"{path}: {result.category.value} ({result.confidence:.2f})"
            print(f"{line} {result.description or ''}".rstrip())
            top5 = evidence.get("top5") or evidence.get("imagenet_top5") or []
            for item in top5:
                print(f"    {item}")
            rule = evidence.get("rule")
            if rule:
                print(f"    rule: {rule}")
    return 1 if failures else 0
