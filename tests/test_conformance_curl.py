"""Conformance: the curl command line against ``xintu serve``, as scripts and other apps call it.

Xintu runs as a separate process (embedded defaults: SQLite and the real ONNX
model, JSON logs); every request here is made by the ``curl`` binary, and its
output is parsed with :mod:`json`. Nothing from ``xintu/`` is imported. The checks
are the original backend's contract as its client guide (``docs/客户端调用指南.md``)
and FastAPI code give it: ``GET /api/v1/health``, CORS for browser pages on other
origins, ``"data": null`` on a miss, integer times, an upload named by the
ORIGINAL photo's hash (which differs from the uploaded bytes' hash) found again by
that hash for the same client only, and ``detail`` in error bodies.

Skipped without curl, except under ``CI=true``, where that fails.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from .conformance import CATEGORIES, curl_or_skip
from .conformance.process import XintuServer, running_xintu

IMAGES = Path(__file__).resolve().parent / "images"
CURL_MAX_TIME_S = 60
ALBUM_ORIGIN = "http://album.example"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # the final response's, names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XintuServer]:
    curl_or_skip()
    with running_xintu(tmp_path_factory.mktemp("xintu")) as running:
        yield running


@pytest.fixture
def curl(server: XintuServer, tmp_path: Path) -> Any:
    """``curl(path, *args)``: run curl against the server and return its :class:`Answer`."""
    binary = curl_or_skip()
    calls = iter(range(1_000))

    def run(path: str, *args: str) -> Answer:
        n = next(calls)
        head, body = tmp_path / f"head-{n}", tmp_path / f"body-{n}"
        done = subprocess.run(
            [
                binary,
                "--silent",
                "--show-error",
                "--max-time",
                str(CURL_MAX_TIME_S),
                "--dump-header",
                str(head),
                "--output",
                str(body),
                "--write-out",
                "%{http_code}",
                *args,
                server.base_url + path,
            ],
            capture_output=True,
            timeout=CURL_MAX_TIME_S + 10,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        # The header file holds every response (a "100 Continue" first, for big uploads).
        blocks = [b for b in head.read_bytes().decode("latin-1").split("\r\n\r\n") if b.strip()]
        headers = {}
        for line in blocks[-1].split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Answer(int(done.stdout), headers, body.read_bytes())

    return run


def _json_post(curl: Any, path: str, payload: Any, *headers: str) -> Answer:
    args = ["-H", "Content-Type: application/json", "--data-binary", json.dumps(payload)]
    for header in headers:
        args += ["-H", header]
    answer: Answer = curl(path, *args)
    return answer


def _check_cache(curl: Any, image_hash: str, *headers: str, **body: Any) -> dict[str, Any]:
    answer = _json_post(
        curl, "/api/v1/classify/check-cache", {"image_hash": image_hash, **body}, *headers
    )
    assert answer.status == 200, answer.body
    out: dict[str, Any] = answer.json()
    return out


def _original_hash(label: str) -> str:
    """The SHA-256 of a photo's ORIGINAL file, which the client has and the server never sees."""
    return hashlib.sha256(f"original file of {label}".encode()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _assert_data(data: Any) -> None:
    assert isinstance(data, dict), data
    assert data["category"] in CATEGORIES
    assert isinstance(data["confidence"], float | int)
    assert 0 <= data["confidence"] <= 1


def test_health(curl: Any) -> None:
    answer = curl("/api/v1/health")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert body["status"] == "healthy"
    assert body["database"] == "connected"
    assert body["model_api"] == "not_configured"  # no LLM in the embedded defaults
    datetime.fromisoformat(body["timestamp"])


def test_cors_preflight_without_a_key(curl: Any) -> None:
    answer = curl(
        "/api/v1/classify/check-cache",
        "-X",
        "OPTIONS",
        "-H",
        f"Origin: {ALBUM_ORIGIN}",
        "-H",
        "Access-Control-Request-Method: POST",
        "-H",
        "Access-Control-Request-Headers: content-type,x-user-id",
    )
    assert 200 <= answer.status < 300, (answer.status, answer.headers, answer.body)
    assert answer.headers["access-control-allow-origin"] in ("*", ALBUM_ORIGIN)
    methods = {m.strip().upper() for m in answer.headers["access-control-allow-methods"].split(",")}
    assert "POST" in methods or "*" in methods
    allowed = {h.strip().lower() for h in answer.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "x-user-id"} <= allowed or "*" in allowed


def test_cors_headers_on_the_answer_itself(curl: Any) -> None:
    answer = curl("/api/v1/health", "-H", f"Origin: {ALBUM_ORIGIN}")
    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] in ("*", ALBUM_ORIGIN)
    # An error must be readable by the page too (the browser hides it otherwise).
    error = _json_post(
        curl, "/api/v1/classify/check-cache", {"image_hash": "no"}, f"Origin: {ALBUM_ORIGIN}"
    )
    assert error.status == 422
    assert error.headers["access-control-allow-origin"] in ("*", ALBUM_ORIGIN)


def test_check_cache_miss_has_data_null(curl: Any) -> None:
    answer = _json_post(
        curl, "/api/v1/classify/check-cache", {"image_hash": _original_hash("never uploaded")}
    )
    assert answer.status == 200
    assert b'"data":null' in answer.body.replace(b" ", b"")
    body = answer.json()
    assert body["success"] is True
    assert body["cached"] is False
    assert body["data"] is None
    assert body["from_cache"] is False  # as the original's miss
    assert isinstance(body["request_id"], str)
    datetime.fromisoformat(body["timestamp"])


def test_upload_named_by_the_original_hash(curl: Any) -> None:
    photo = IMAGES / "screenshot_recipe_coffee_1440x900.jpg"
    named = _original_hash(photo.name)
    assert named != _sha256(photo)
    answer = curl(
        "/api/v1/classify",
        "-H",
        "X-User-ID: alice",
        "-F",
        f"image=@{photo}",
        "-F",
        f"image_hash={named}",
    )
    assert answer.status == 200, answer.body  # a hash that differs from the bytes is normal
    body = answer.json()
    assert body["success"] is True
    assert body["from_cache"] is False
    assert _is_int(body["processing_time_ms"]), body["processing_time_ms"]
    _assert_data(body["data"])
    category = body["data"]["category"]
    assert body["data"]["image_hash"] == _sha256(photo)  # classified under its own bytes

    # The same client asks by the ORIGINAL's hash, as the app does next time: a hit.
    again = _check_cache(curl, named, "X-User-ID: alice")
    assert again["cached"] is True
    assert again["data"]["category"] == category
    # ... also when it names itself in the body, as the original allows.
    assert _check_cache(curl, named, user_id="alice")["cached"] is True
    # Another client does not see alice's name for the photo.
    other = _check_cache(curl, named, "X-User-ID: bob")
    assert other["cached"] is False
    assert other["data"] is None
    # The bytes' own hash is verified, so it answers everyone.
    assert _check_cache(curl, _sha256(photo), "X-User-ID: bob")["data"]["category"] == category

    # The same upload again is answered from the cache, still with an integer time.
    replay = curl("/api/v1/classify", "-H", "X-User-ID: alice", "-F", f"image=@{photo}")
    assert replay.status == 200
    assert replay.json()["from_cache"] is True
    assert _is_int(replay.json()["processing_time_ms"])


def test_batch_named_by_the_original_hashes(curl: Any) -> None:
    photos = [IMAGES / "screenshot_settings_750x1334.png", IMAGES / "idcard_scan_856x540.jpg"]
    named = [_original_hash(p.name) for p in photos]
    args = ["-H", "X-User-ID: carol"]
    for photo in photos:
        args += ["-F", f"images=@{photo}"]
    args += ["-F", f"image_hashes={json.dumps(named)}"]
    answer = curl("/api/v1/classify/batch", *args)
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["success"] is True
    assert (body["total"], body["success_count"], body["fail_count"]) == (2, 2, 0)
    assert _is_int(body["total_processing_time_ms"]), body["total_processing_time_ms"]
    for index, item in enumerate(body["items"]):
        assert item["index"] == index
        assert item["filename"] == photos[index].name
        assert item["success"] is True
        assert item["error"] is None
        assert _is_int(item["processing_time_ms"]), item["processing_time_ms"]
        _assert_data(item["data"])
    categories = [item["data"]["category"] for item in body["items"]]

    missing = _original_hash("not in this batch")
    checked = _json_post(
        curl,
        "/api/v1/classify/batch-check-cache",
        {"image_hashes": [*named, missing]},
        "X-User-ID: carol",
    )
    assert checked.status == 200, checked.body
    out = checked.json()
    assert (out["success"], out["total"], out["cached_count"]) == (True, 3, 2)
    assert [i["image_hash"] for i in out["items"]] == [*named, missing]
    assert [i["cached"] for i in out["items"]] == [True, True, False]
    assert [i["data"]["category"] for i in out["items"][:2]] == categories
    assert "data" in out["items"][2]
    assert out["items"][2]["data"] is None

    stranger = _json_post(
        curl, "/api/v1/classify/batch-check-cache", {"image_hashes": named}, "X-User-ID: dave"
    ).json()
    assert stranger["cached_count"] == 0
    assert [(i["cached"], i["data"]) for i in stranger["items"]] == [(False, None)] * 2


def test_upload_without_a_user_id(curl: Any) -> None:
    """The guide's functions default to ``userId = null``: no X-User-ID at all."""
    photo = IMAGES / "screenshot_dashboard_1366x768.png"
    named = _original_hash(photo.name)
    answer = curl("/api/v1/classify", "-F", f"image=@{photo}", "-F", f"image_hash={named}")
    assert answer.status == 200, answer.body
    category = answer.json()["data"]["category"]
    again = _check_cache(curl, named)
    assert again["cached"] is True
    assert again["data"]["category"] == category
    batch = _json_post(curl, "/api/v1/classify/batch-check-cache", {"image_hashes": [named]})
    assert batch.json()["items"][0]["cached"] is True


def test_batch_with_a_bad_file_fails_only_that_item(curl: Any, tmp_path: Path) -> None:
    """The guide: in a batch, one photo's failure does not fail the others."""
    photo = IMAGES / "screenshot_code_1440x900.png"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    answer = curl(
        "/api/v1/classify/batch",
        "-H",
        "X-User-ID: frank",
        "-F",
        f"images=@{broken};type=image/jpeg",
        "-F",
        f"images=@{photo}",
    )
    assert answer.status == 200, answer.body
    body = answer.json()
    assert (body["total"], body["success_count"], body["fail_count"]) == (2, 1, 1)
    failed, done = body["items"]
    assert failed["index"] == 0
    assert failed["filename"] == "broken.jpg"
    assert failed["success"] is False
    assert failed["data"] is None
    assert isinstance(failed["error"], str)
    assert failed["error"]
    assert failed["from_cache"] is False
    assert _is_int(failed["processing_time_ms"])
    assert done["success"] is True
    _assert_data(done["data"])


def _assert_error(answer: Answer, status: int) -> None:
    assert answer.status == status, answer.body
    body = answer.json()
    assert body["success"] is False
    assert isinstance(body["error"], str)
    assert body["error"]
    assert body["detail"] == body["error"]  # the original (FastAPI) answered {"detail": ...}
    assert isinstance(body["error_code"], str)
    assert isinstance(body["request_id"], str)


def test_errors_carry_detail(curl: Any, tmp_path: Path) -> None:
    bad_hash = _json_post(curl, "/api/v1/classify/check-cache", {"image_hash": "xyz"})
    _assert_error(bad_hash, 422)
    too_many = [_original_hash(str(n)) for n in range(101)]  # the guide: at most 100
    _assert_error(
        _json_post(curl, "/api/v1/classify/batch-check-cache", {"image_hashes": too_many}), 422
    )
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo at all\n")
    _assert_error(curl("/api/v1/classify", "-F", f"image=@{notes};type=image/jpeg"), 400)
