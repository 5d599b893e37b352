"""What the original backend's clients rely on, beyond the classification calls.

``GET /api/v1/health``, CORS for browser clients on other origins, integer
processing times and the ``detail`` field of errors. The conformance suite
(tests/test_conformance_*.py) drives the same from outside with curl and a browser.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client
from werkzeug.datastructures import FileStorage

from xintu import load_config
from xintu.http import XintuApp, create_app

from .fakes import FakeModel

V1 = "/api/v1/classify"
API_KEY = "k-" + "7" * 30
ORIGIN = "http://album.example:8080"

Serving = Callable[..., AbstractAsyncContextManager[tuple[XintuApp, Client]]]


@pytest.fixture
def serving(tmp_path: Path) -> Serving:
    @asynccontextmanager
    async def serve(**sections: Any) -> AsyncIterator[tuple[XintuApp, Client]]:
        config = load_config(env={}, data={"dir": str(tmp_path / "data")}, **sections)
        app = create_app(config, model_factory=lambda _c: FakeModel())
        async with app.test_app():
            yield app, app.test_client()

    return serve


def keyed() -> dict[str, Any]:
    return {"security": {"api_key_sha256": [hashlib.sha256(API_KEY.encode()).hexdigest()]}}


async def test_health_as_the_original(serving: Serving) -> None:
    async with serving() as (_app, client):
        resp = await client.get("/api/v1/health")
        body = await resp.get_json()
    assert resp.status_code == 200
    assert body["status"] == "healthy"
    assert body["database"] == "connected"
    assert body["model_api"] == "not_configured"  # no LLM: the local model answers
    assert isinstance(body["timestamp"], str)
    assert body["llm_providers"] == {}


async def test_health_says_when_an_llm_is_configured(serving: Serving) -> None:
    llm = {
        "providers": ["vl"],
        "provider": {"vl": {"base_url": "http://127.0.0.1:9/v1", "model": "qwen-vl"}},
    }
    async with serving(llm=llm) as (_app, client):
        body = await (await client.get("/api/v1/health")).get_json()
    assert body["model_api"] == "available"
    # The extension: each provider's breaker state and its last error (none yet).
    assert body["llm_providers"] == {
        "vl": {"state": "closed", "last_error": None, "last_error_at": None}
    }


async def test_health_is_unhealthy_when_the_store_is_down(serving: Serving) -> None:
    async with serving() as (app, client):
        await app.store.aclose()
        resp = await client.get("/api/v1/health")
        body = await resp.get_json()
    assert resp.status_code == 200  # as the original: the body says it
    assert body["status"] == "unhealthy"
    assert body["database"] == "disconnected"


async def test_cors_for_any_origin_by_default(serving: Serving) -> None:
    async with serving() as (_app, client):
        resp = await client.post(
            f"{V1}/check-cache", json={"image_hash": "a" * 64}, headers={"Origin": ORIGIN}
        )
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers
    exposed = {h.strip().lower() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"retry-after", "x-request-id", "idempotency-replayed"} <= exposed


async def test_preflight_needs_no_key_and_errors_carry_cors(serving: Serving) -> None:
    async with serving(**keyed()) as (_app, client):
        resp = await client.options(
            f"{V1}/check-cache",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-user-id",
            },
        )
        assert resp.status_code == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "x-user-id"} <= allowed
        assert int(resp.headers["Access-Control-Max-Age"]) > 0
        # The refusal itself is readable by the page's script.
        resp = await client.post(
            f"{V1}/check-cache", json={"image_hash": "a" * 64}, headers={"Origin": ORIGIN}
        )
        assert resp.status_code == 401
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        # A plain OPTIONS without the preflight headers is no way around the key.
        assert (await client.options(f"{V1}/check-cache")).status_code == 401


async def test_cors_restricted_to_the_configured_origins(serving: Serving) -> None:
    async with serving(api={"cors_origins": [ORIGIN]}) as (_app, client):
        ok = await client.post(
            f"{V1}/check-cache", json={"image_hash": "a" * 64}, headers={"Origin": ORIGIN}
        )
        other = await client.post(
            f"{V1}/check-cache",
            json={"image_hash": "a" * 64},
            headers={"Origin": "http://evil.example"},
        )
    assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in ok.headers["Vary"]
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_no_cors_headers_when_no_origin_is_allowed(serving: Serving) -> None:
    async with serving(api={"cors_origins": []}) as (_app, client):
        resp = await client.post(
            f"{V1}/check-cache", json={"image_hash": "a" * 64}, headers={"Origin": ORIGIN}
        )
    assert "Access-Control-Allow-Origin" not in resp.headers


def test_a_bad_origin_setting_stops_the_start() -> None:
    from xintu.errors import ConfigError

    with pytest.raises(ConfigError, match=r"api\.cors_origins: each entry must be"):
        load_config(env={"XINTU_API_CORS_ORIGINS": "album.example"})


async def test_processing_times_are_integers(serving: Serving) -> None:
    async with serving() as (_app, client):
        image = FileStorage(io.BytesIO(b"photo"), filename="a.jpg", content_type="image/jpeg")
        body = await (await client.post(V1, files={"image": image})).get_json()
        assert type(body["processing_time_ms"]) is int
        image = FileStorage(io.BytesIO(b"photo 2"), filename="", content_type="image/jpeg")
        body = await (await client.post(f"{V1}/batch", files={"images": image})).get_json()
    assert type(body["total_processing_time_ms"]) is int
    item = body["items"][0]
    assert type(item["processing_time_ms"]) is int
    # Every item has every field of the original's BatchClassifyItem.
    assert {"index", "filename", "success", "data", "error", "from_cache"} <= set(item)
    assert item["error"] is None
    assert item["filename"] == "image_0"  # the original's name for an unnamed file


async def test_errors_carry_detail_as_the_original(serving: Serving) -> None:
    async with serving() as (_app, client):
        resp = await client.post(f"{V1}/check-cache", json={"image_hash": "xyz"})
        body = await resp.get_json()
    assert resp.status_code == 422
    assert (
        body["detail"] == body["error"] == "image_hash must be 64 hexadecimal characters (SHA-256)"
    )


# --- JSON bodies (the request path under real conditions) -----------------------------


async def test_a_large_json_body_is_413_before_it_is_parsed(serving: Serving) -> None:
    async with serving() as (_app, client):
        padding = "x" * 70_000
        resp = await client.post(
            f"{V1}/check-cache", json={"image_hash": "a" * 64, "user_id": padding}
        )
        body = await resp.get_json()
    assert resp.status_code == 413
    assert body["error"] == "a JSON body may have at most 65536 bytes"


async def test_deeply_nested_json_is_400_not_500(serving: Serving) -> None:
    async with serving(server={"max_json_bytes": 1_000_000}) as (_app, client):
        nested = b"[" * 200_000 + b"]" * 200_000
        resp = await client.post(
            f"{V1}/check-cache", data=nested, headers={"Content-Type": "application/json"}
        )
        body = await resp.get_json()
    assert resp.status_code == 400
    assert body["error"] == "body is JSON nested too deeply"


async def test_metric_labels_take_no_method_string_from_the_client(serving: Serving) -> None:
    async with serving() as (_app, client):
        for i in range(3):
            resp = await client.open(f"{V1}/check-cache", method=f"BREW{i}")
            assert resp.status_code == 405
        text = await (await client.get("/metrics")).get_data(as_text=True)
    assert "BREW" not in text
    assert 'method="other"' in text
    # Store read errors are exported by how they were answered (none here).
    assert 'xintu_cache_store_read_errors_total{answered="miss"} 0.0' in text
    assert 'xintu_cache_store_read_errors_total{answered="refused"} 0.0' in text


async def test_cache_checks_leave_the_evidence_out_unless_asked(serving: Serving) -> None:
    async with serving() as (_app, client):
        image = FileStorage(io.BytesIO(b"photo e"), filename="e.jpg", content_type="image/jpeg")
        up = await (await client.post(V1, files={"image": image})).get_json()
        assert up["data"]["local_inference_result"]  # the upload's own answer keeps it
        image_hash = up["data"]["image_hash"]
        lean = await (
            await client.post(f"{V1}/check-cache", json={"image_hash": image_hash})
        ).get_json()
        full = await (
            await client.post(f"{V1}/check-cache?evidence=true", json={"image_hash": image_hash})
        ).get_json()
        batch = await (
            await client.post(f"{V1}/batch-check-cache", json={"image_hashes": [image_hash]})
        ).get_json()
    assert lean["data"]["local_inference_result"] is None
    assert full["data"]["local_inference_result"] == up["data"]["local_inference_result"]
    assert batch["items"][0]["data"]["local_inference_result"] is None
    assert lean["data"]["category"] == up["data"]["category"]
