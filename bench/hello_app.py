"""The framework baseline: a bare Quart-Trio app served exactly like ``xintu serve``.

It answers the hit scenario's requests (``POST /api/v1/classify/check-cache`` and
``batch-check-cache``) by parsing the JSON body and returning a canned answer of the
same shape and about the same size as Xintu's, with no actors, store, cache or
request log behind it. Its
Hypercorn settings come from :func:`xintu._serve.hypercorn_config` on the same
``XINTU_*`` environment, so the only difference from the service is the service.

Run: ``XINTU_SERVER_BIND=127.0.0.1:8001 XINTU_SERVER_WORKERS=0 python -m bench.hello_app``
(``workers = 0`` serves in-process with a SIGTERM/SIGINT trigger, ``N >= 1`` through
Hypercorn's supervisor, as the service does).
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime
from functools import partial
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

__all__ = ["app", "main"]

app = QuartTrio("xintu-bench-hello")
# A canned answer of the same shape and about the same size as a cached local result.
_DATA = {
    "category": "pets",
    "confidence": 0.9389,
    "description": "a cat having a striped coat (ImageNet 40%)",
    "local_inference_result": {
        "model": "efficientnet-lite0",
        "rule": "imagenet_pets",
        "top5": [
            {"index": 282, "label": "a cat having a striped coat", "probability": 0.396},
            {"index": 285, "label": "Egyptian Mau", "probability": 0.3578},
            {"index": 281, "label": "tabby cat", "probability": 0.1687},
            {"index": 287, "label": "lynx", "probability": 0.0223},
            {"index": 904, "label": "window screen", "probability": 0.0012},
        ],
        "votes": {"pets": 0.9389, "foods": 0.0039, "travel_scenery": 0.0018, "person": 0.0039},
        "detectors": {"faces": 0, "people": 0},
    },
    "source": "cache",
    "model": "efficientnet-lite0",
}


def _json(body: dict[str, Any], status: int = 200) -> Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return Response(text, status=status, content_type="application/json")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@app.get("/readyz")
async def readyz() -> Response:
    return _json({"ready": True})


@app.post("/api/v1/classify/check-cache")
async def check_cache() -> Response:
    body = json.loads(await request.get_data(as_text=False))
    data = {**_DATA, "image_hash": body["image_hash"]}
    return _json(
        {
            "success": True,
            "cached": True,
            "data": data,
            "from_cache": True,
            "request_id": "0" * 32,
            "timestamp": _now(),
        }
    )


@app.post("/api/v1/classify/batch-check-cache")
async def batch_check_cache() -> Response:
    body = json.loads(await request.get_data(as_text=False))
    items = [
        {"image_hash": h, "cached": True, "data": {**_DATA, "image_hash": h}}
        for h in body["image_hashes"]
    ]
    return _json(
        {
            "success": True,
            "total": len(items),
            "cached_count": len(items),
            "items": items,
            "request_id": "0" * 32,
            "timestamp": _now(),
        }
    )


async def _serve_in_process(hc: Any) -> None:
    from hypercorn.trio import serve

    async def shutdown_trigger() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                return

    await serve(app, hc, shutdown_trigger=shutdown_trigger)


def main() -> int:
    """Serve on ``server.bind`` with the service's Hypercorn settings."""
    from xintu._config import load_config
    from xintu._serve import hypercorn_config

    config = load_config()
    hc = hypercorn_config(config)
    if config.server.workers == 0:
        trio.run(partial(_serve_in_process, hc))
        return 0
    from hypercorn.run import run

    hc.application_path = "bench.hello_app:app"
    return int(run(hc) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
