"""The v1 HTTP API end to end: real app, real store (SQLite and MariaDB), fake model.

The local ONNX classifier is replaced by :class:`tests.fakes.FakeModel` so the
answers and call counts are exact; ``test_real_model.py`` covers the real one.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as Client
from werkzeug.datastructures import FileStorage

from xintu import Config, load_config
from xintu.http import XintuApp, create_app

from .fakes import FakeModel, fake_category

V1 = "/api/v1/classify"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(data: bytes, name: str = "photo.jpg") -> FileStorage:
    return FileStorage(io.BytesIO(data), filename=name, content_type="image/jpeg")


@pytest.fixture
def service_config(tmp_path: Path, store_url: str) -> Config:
    return load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        store={"url": store_url, "writer_flush_ms": 1},
    )


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
async def app(service_config: Config, model: FakeModel) -> AsyncIterator[XintuApp]:
    app = create_app(service_config, model_factory=lambda _c: model)
    async with app.test_app():
        yield app


@pytest.fixture
def client(app: XintuApp) -> Client:
    return app.test_client()


def multipart(
    files: list[tuple[str, str, bytes]], fields: dict[str, str] | None = None
) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body (Quart's test client sends one file per field only)."""
    boundary = "xintu-test-boundary"
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, filename, data in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def classify(client: Client, data: bytes, **form: str) -> tuple[int, Any]:
    resp = await client.post(V1, files={"image": upload(data)}, form=form or None)
    return resp.status_code, await resp.get_json()


async def flushed(app: XintuApp) -> None:
    with trio.fail_after(5):
        await app.runtime.writer.wait_idle()


# --- classify and the cache ---------------------------------------------------------


async def test_classify_then_cached(app: XintuApp, client: Client) -> None:
    data = b"photo-1"
    status, body = await classify(client, data)
    assert status == 200
    assert body["success"] is True
    assert body["from_cache"] is False
    assert body["data"]["category"] == fake_category(data).value
    assert body["data"]["image_hash"] == sha(data)
    assert body["data"]["source"] == "local"
    assert body["data"]["model"] == "fake-model"
    assert 0 <= body["data"]["confidence"] <= 1
    assert set(body) == {
        "success",
        "data",
        "from_cache",
        "processing_time_ms",
        "request_id",
        "timestamp",
    }

    status, again = await classify(client, data)
    assert status == 200
    assert again["from_cache"] is True
    assert again["data"]["source"] == "cache"
    assert again["data"]["category"] == body["data"]["category"]

    await flushed(app)
    entry = await app.store.get(sha(data))
    assert entry is not None
    assert entry.hit_count == 1
    assert entry.classification.category.value == body["data"]["category"]


async def test_check_cache_miss_then_hit(app: XintuApp, client: Client) -> None:
    data = b"photo-2"
    resp = await client.post(f"{V1}/check-cache", json={"image_hash": sha(data)})
    body = await resp.get_json()
    assert resp.status_code == 200
    assert body["success"] is True
    assert body["cached"] is False
    assert body["from_cache"] is False
    assert body["data"] is None  # present and null, as the original
    assert isinstance(body["timestamp"], str)

    await classify(client, data)
    await flushed(app)
    app.runtime.cache.lru.clear()  # force the store path
    resp = await client.post(
        f"{V1}/check-cache", json={"image_hash": sha(data).upper()}, headers={"X-User-ID": "u1"}
    )
    body = await resp.get_json()
    assert body["cached"] is True
    assert body["from_cache"] is True
    assert body["data"]["category"] == fake_category(data).value
    await flushed(app)
    entry = await app.store.get(sha(data))
    assert entry is not None
    assert entry.hit_count == 1


async def test_batch_check_cache(app: XintuApp, client: Client) -> None:
    known = [b"a", b"b"]
    for d in known:
        await classify(client, d)
    hashes = [sha(b"a"), sha(b"unknown"), sha(b"b")]
    resp = await client.post(f"{V1}/batch-check-cache", json={"image_hashes": hashes})
    body = await resp.get_json()
    assert resp.status_code == 200
    assert body["total"] == 3
    assert body["cached_count"] == 2
    assert [i["cached"] for i in body["items"]] == [True, False, True]
    assert [i["image_hash"] for i in body["items"]] == hashes
    assert body["items"][0]["data"]["category"] == fake_category(b"a").value
    # A miss carries "data": null, as the original's items do.
    assert "data" in body["items"][1]
    assert body["items"][1]["data"] is None


async def test_client_hash_is_verified_in_verify_mode(
    service_config: Config, model: FakeModel
) -> None:
    app = create_app(
        service_config.replace(api={"client_hash_mode": "verify"}), model_factory=lambda _c: model
    )
    async with app.test_app():
        client = app.test_client()
        status, body = await classify(client, b"photo-3", image_hash=sha(b"other"))
        assert status == 422
        message = "image_hash does not match the SHA-256 of the uploaded image"
        assert body == {
            "success": False,
            "error": message,
            "error_code": "image_hash_mismatch",
            "request_id": body["request_id"],
            "detail": message,
        }
        status, body = await classify(client, b"photo-3", image_hash=sha(b"photo-3"))
        assert status == 200
        resp = await client.post(
            f"{V1}/batch",
            files={"images": upload(b"x1")},
            form={"image_hashes": json.dumps([sha(b"nope")])},
        )
        body = await resp.get_json()
        assert resp.status_code == 200
        assert body["items"][0]["success"] is False
        assert body["items"][0]["error_code"] == "image_hash_mismatch"


async def test_bad_image_is_400_and_not_cached(
    app: XintuApp, client: Client, model: FakeModel
) -> None:
    status, body = await classify(client, b"bad bytes")
    assert status == 400
    assert body["error_code"] == "invalid_image"
    status, _ = await classify(client, b"bad bytes")
    assert status == 400
    assert model.prepared[b"bad bytes"] == 2  # failures are not cached
    await flushed(app)
    assert await app.store.get(sha(b"bad bytes")) is None


@pytest.mark.parametrize(
    ("path", "payload", "status", "code"),
    [
        ("check-cache", {"image_hash": "abc"}, 422, "validation_failed"),
        ("check-cache", {}, 422, "validation_failed"),
        ("check-cache", [1, 2], 400, "bad_request"),
        ("check-cache", {"image_hash": "0" * 64, "user_id": 5}, 422, "validation_failed"),
        ("batch-check-cache", {"image_hashes": []}, 422, "validation_failed"),
        ("batch-check-cache", {"image_hashes": ["0" * 64] * 101}, 422, "validation_failed"),
        ("batch-check-cache", {"image_hashes": ["xyz"]}, 422, "validation_failed"),
    ],
)
async def test_json_validation(
    client: Client, path: str, payload: Any, status: int, code: str
) -> None:
    resp = await client.post(f"{V1}/{path}", json=payload)
    body = await resp.get_json()
    assert resp.status_code == status
    assert body["success"] is False
    assert body["error_code"] == code
    assert body["request_id"] == resp.headers["X-Request-ID"]


async def test_malformed_json_is_400(client: Client) -> None:
    resp = await client.post(
        f"{V1}/check-cache", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    assert (await resp.get_json())["error"] == "body is not valid JSON"


async def test_missing_image_field_is_400(client: Client) -> None:
    resp = await client.post(V1, files={"photo": upload(b"x")})
    body = await resp.get_json()
    assert resp.status_code == 400
    assert body["error"] == "multipart field 'image' is required"


async def test_body_over_limit_is_413(tmp_path: Path, store_url: str) -> None:
    config = load_config(
        env={},
        data={"dir": str(tmp_path)},
        store={"url": store_url},
        server={"max_body_bytes": 4096},
    )
    app = create_app(config, model_factory=lambda _c: FakeModel())
    async with app.test_app():
        resp = await app.test_client().post(V1, files={"image": upload(b"x" * 10_000)})
        body = await resp.get_json()
    assert resp.status_code == 413
    assert body["error_code"] == "payload_too_large"


async def test_unknown_route_is_json_404(client: Client) -> None:
    resp = await client.get("/api/v1/nope")
    body = await resp.get_json()
    assert resp.status_code == 404
    assert body["error_code"] == "not_found"
    resp = await client.get(V1)
    assert resp.status_code == 405
    assert (await resp.get_json())["error_code"] == "method_not_allowed"


# --- batch ---------------------------------------------------------------------------


async def test_batch_classify(app: XintuApp, client: Client) -> None:
    images = [b"b1", b"bad one", b"b3", b"b1"]
    body, headers = multipart([("images", f"{i}.jpg", d) for i, d in enumerate(images)])
    resp = await client.post(f"{V1}/batch", data=body, headers=headers)
    body = await resp.get_json()
    assert resp.status_code == 200
    assert body["total"] == 4
    assert body["success_count"] == 3
    assert body["fail_count"] == 1
    assert [i["index"] for i in body["items"]] == [0, 1, 2, 3]
    assert [i["filename"] for i in body["items"]] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert body["items"][1]["success"] is False
    assert body["items"][1]["error_code"] == "invalid_image"
    assert body["items"][0]["data"]["category"] == body["items"][3]["data"]["category"]


async def test_batch_hash_list_checked(client: Client) -> None:
    resp = await client.post(
        f"{V1}/batch", files={"images": upload(b"x1")}, form={"image_hashes": "[1, 2]"}
    )
    assert resp.status_code == 422


async def test_batch_ndjson_stream(client: Client) -> None:
    images = [b"n1", b"n2", b"n3"]
    body, headers = multipart([("images", "x.jpg", d) for d in images])
    resp = await client.post(
        f"{V1}/batch", data=body, headers=headers | {"Accept": "application/x-ndjson"}
    )
    assert resp.status_code == 200
    assert resp.content_type == "application/x-ndjson"
    lines = [json.loads(line) for line in (await resp.get_data()).splitlines()]
    assert len(lines) == 4
    assert sorted(line["index"] for line in lines[:3]) == [0, 1, 2]
    assert lines[3]["total"] == 3
    assert lines[3]["success_count"] == 3


# --- singleflight, admission, deadlines ---------------------------------------------


async def test_concurrent_requests_for_one_image_classify_once(
    client: Client, model: FakeModel
) -> None:
    data = b"popular photo"
    results: list[tuple[int, Any]] = []

    async def one() -> None:
        results.append(await classify(client, data))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert all(status == 200 for status, _ in results)
    assert {body["data"]["category"] for _, body in results} == {fake_category(data).value}
    assert model.prepared[data] == 1


async def test_deadline_header_gives_504_and_work_still_cached(
    app: XintuApp, client: Client, model: FakeModel
) -> None:
    gate = trio.Event()
    original = model.prepare

    def slow_prepare(data: bytes) -> object:
        trio.from_thread.run_sync(lambda: None)  # in a worker thread
        trio.from_thread.run(gate.wait)
        return original(data)

    model.prepare = slow_prepare  # type: ignore[method-assign]
    resp = await client.post(
        V1, files={"image": upload(b"slow one")}, headers={"X-Deadline-Ms": "50"}
    )
    body = await resp.get_json()
    assert resp.status_code == 504
    assert body["error_code"] == "deadline_exceeded"
    gate.set()
    # The retry joins the flight still running or hits its cached result:
    # either way the image was decoded once.
    status, body = await classify(client, b"slow one")
    assert status == 200
    assert model.prepared[b"slow one"] == 1
    await flushed(app)
    assert await app.store.get(sha(b"slow one")) is not None


async def test_full_inbox_is_503_with_retry_after(tmp_path: Path, store_url: str) -> None:
    config = load_config(
        env={},
        data={"dir": str(tmp_path)},
        store={"url": store_url},
        dispatcher={"inbox_size": 1, "max_in_flight": 1},
        model={"inbox_size": 1, "decode_threads": 1, "inference_threads": 1},
    )
    gate = trio.Event()
    model = FakeModel()
    original = model.prepare

    def blocked(data: bytes) -> object:
        trio.from_thread.run(gate.wait)
        return original(data)

    model.prepare = blocked  # type: ignore[method-assign]
    app = create_app(config, model_factory=lambda _c: model)
    statuses: list[int] = []
    retry_after: list[str] = []
    four_answered = trio.Event()
    async with app.test_app():
        client = app.test_client()

        async def one(i: int) -> None:
            resp = await client.post(V1, files={"image": upload(f"img{i}".encode())})
            statuses.append(resp.status_code)
            if len(statuses) == 4:
                four_answered.set()
            if resp.status_code == 503:
                retry_after.append(resp.headers["Retry-After"])
                assert (await resp.get_json())["error_code"] == "overloaded"

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(one, i)
            with trio.fail_after(5):
                await four_answered.wait()  # refusals come at once, not after the gate
            gate.set()
    assert statuses.count(503) >= 4
    assert statuses.count(200) >= 1
    assert all(int(v) >= 1 for v in retry_after)


# --- operations ---------------------------------------------------------------------


async def test_healthz_readyz_openapi(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status_code == 200
    resp = await client.get("/readyz")
    body = await resp.get_json()
    assert resp.status_code == 200, body
    assert body["ready"] is True
    assert body["checks"]["store"] == "ok"
    resp = await client.get("/openapi.json")
    doc = await resp.get_json()
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) >= {
        "/api/v1/classify",
        "/api/v1/classify/batch",
        "/api/v1/classify/check-cache",
        "/api/v1/classify/batch-check-cache",
        "/healthz",
        "/readyz",
    }


async def test_draining_refuses_new_work(app: XintuApp, client: Client) -> None:
    app.runtime.begin_drain()
    status, body = await classify(client, b"late")
    assert status == 503
    assert body["error_code"] == "draining"
    resp = await client.get("/readyz")
    assert resp.status_code == 503
    assert (await resp.get_json())["checks"]["draining"] is True


async def test_request_log_rows_written(app: XintuApp, client: Client) -> None:
    status, body = await classify(client, b"logged", image_hash=sha(b"logged"))
    assert status == 200
    await flushed(app)
    # One row per request, unique request id, with the classification.
    row = await app.store.get_request_log(body["request_id"])
    assert row is not None
    assert row.image_hash == sha(b"logged")
    assert row.category == body["data"]["category"]
    assert row.from_cache is False
    assert row.source == "local"
    assert row.image_size == len(b"logged")
