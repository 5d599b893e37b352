"""``Idempotency-Key`` retries from outside, by software nobody here wrote.

``curl`` (as a subprocess) and the ``requests`` library build every multipart upload
with a new random boundary, as browsers, httpx and OkHttp do. Against a real Hypercorn
server, a retry of the same upload under the same key must get the first answer
replayed (``Idempotency-Replayed: true``), and a retry with another image under that
key must get 422 ``idempotency_key_reused``. The tests check that the boundaries
really differ, so they cannot pass by accident.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import trio

from xintu import Config, load_config

from .conformance import curl_or_skip
from .serving import DecodingModel, real_server

IMAGES = Path(__file__).parent / "images"
CAT = IMAGES / "screenshot_feed_cat_1080x2400.jpg"
COFFEE = IMAGES / "screenshot_recipe_coffee_1440x900.jpg"
IDCARD = IMAGES / "idcard_scan_856x540.jpg"
V1 = "/api/v1/classify"
REPLAYED = "Idempotency-Replayed"
CLIENT_TIMEOUT_S = 30
REUSED = {
    "success": False,
    "error": "this Idempotency-Key was already used for a different request",
    "error_code": "idempotency_key_reused",
    "detail": "this Idempotency-Key was already used for a different request",
}


@pytest.fixture
def service_config(tmp_path: Path) -> Config:
    # The embedded SQLite store: real_server stops the server by cancellation, which
    # leaves a MySQL pool's sockets unclosed (test_idempotency covers both stores).
    return load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        store={"writer_flush_ms": 1},
        ratelimit={"rate_per_s": 0.0, "burst": 1, "max_clients": 1},
    )


@pytest.fixture
async def base(service_config: Config) -> AsyncIterator[str]:
    async with real_server(service_config, DecodingModel(service_config.images)) as url:
        yield url


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    sent_content_type: str  # what the client sent

    def json(self) -> Any:
        return json.loads(self.body)


def boundary_of(content_type: str) -> str:
    match = re.search(r"boundary=(\S+)", content_type)
    assert match is not None, content_type
    return match.group(1)


# --- curl --------------------------------------------------------------------------------


@pytest.fixture
def curl_path() -> str:
    return curl_or_skip()


async def curl(curl_path: str, url: str, tmp_path: Path, *args: str) -> Answer:
    """One request by the curl command line tool; ``-v`` shows what it sent."""
    headers_file = tmp_path / "curl-headers"
    body_file = tmp_path / "curl-body"
    with trio.fail_after(CLIENT_TIMEOUT_S + 5):
        done = await trio.run_process(
            [
                curl_path,
                "--silent",
                "--show-error",
                "--verbose",
                "--noproxy",
                "*",
                "--max-time",
                str(CLIENT_TIMEOUT_S),
                "--dump-header",
                str(headers_file),
                "--output",
                str(body_file),
                *args,
                url,
            ],
            capture_stdout=True,
            capture_stderr=True,
        )
    trace = done.stderr.decode("utf-8", "replace")
    sent = re.findall(r"^> Content-Type: (.*?)\r?$", trace, re.MULTILINE | re.IGNORECASE)
    # The last block is the final answer (after any "100 Continue").
    block = headers_file.read_bytes().decode("latin-1").strip().split("\r\n\r\n")[-1]
    status_line, *lines = block.split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body_file.read_bytes(), sent[-1])


async def test_curl_retries_an_upload_with_a_new_boundary_and_gets_the_replay(
    base: str, curl_path: str, tmp_path: Path
) -> None:
    upload = ("--header", "Idempotency-Key: curl-retry-1", "--form", f"image=@{CAT}")
    with trio.fail_after(60):
        first = await curl(curl_path, base + V1, tmp_path, *upload)
        again = await curl(curl_path, base + V1, tmp_path, *upload)
    assert boundary_of(first.sent_content_type) != boundary_of(again.sent_content_type)
    assert first.status == 200, first.body
    assert REPLAYED.lower() not in first.headers
    assert first.json()["success"] is True
    assert again.status == 200, again.body
    assert again.headers[REPLAYED.lower()] == "true"
    assert again.body == first.body
    assert again.headers["content-type"] == first.headers["content-type"] == "application/json"


async def test_curl_retry_with_another_image_under_the_key_is_422(
    base: str, curl_path: str, tmp_path: Path
) -> None:
    key = ("--header", "Idempotency-Key: curl-retry-2")
    with trio.fail_after(60):
        first = await curl(curl_path, base + V1, tmp_path, *key, "--form", f"image=@{CAT}")
        other = await curl(curl_path, base + V1, tmp_path, *key, "--form", f"image=@{COFFEE}")
    assert first.status == 200, first.body
    assert other.status == 422, other.body
    assert other.json() == REUSED | {"request_id": other.headers["x-request-id"]}
    assert REPLAYED.lower() not in other.headers


async def test_curl_json_with_other_key_order_and_spacing_is_replayed(
    base: str, curl_path: str, tmp_path: Path
) -> None:
    image_hash = "ab" * 32
    compact = json.dumps({"image_hash": image_hash, "user_id": "ann"}, separators=(",", ":"))
    spaced = json.dumps({"user_id": "ann", "image_hash": image_hash}, indent=2)
    common = ("--header", "Idempotency-Key: curl-json", "--json")
    with trio.fail_after(60):
        first = await curl(curl_path, base + V1 + "/check-cache", tmp_path, *common, compact)
        again = await curl(curl_path, base + V1 + "/check-cache", tmp_path, *common, spaced)
    assert first.status == 200, first.body
    assert first.json()["cached"] is False
    assert again.headers[REPLAYED.lower()] == "true"
    assert again.body == first.body


# --- requests ----------------------------------------------------------------------------


def _requests_post(url: str, key: str, files: list[tuple[str, Path]]) -> Answer:
    with requests.Session() as session:
        session.trust_env = False  # no proxies from the environment: loopback only
        resp = session.post(
            url,
            headers={"Idempotency-Key": key},
            files=[(field, (path.name, path.read_bytes(), "image/jpeg")) for field, path in files],
            timeout=CLIENT_TIMEOUT_S,
        )
    sent = resp.request.headers["Content-Type"]
    headers = {name.lower(): value for name, value in resp.headers.items()}
    return Answer(resp.status_code, headers, resp.content, sent)


async def requests_post(url: str, key: str, files: list[tuple[str, Path]]) -> Answer:
    with trio.fail_after(CLIENT_TIMEOUT_S + 5):
        return await trio.to_thread.run_sync(_requests_post, url, key, files)


async def test_requests_retries_a_batch_with_a_new_boundary_and_gets_the_replay(
    base: str,
) -> None:
    images = [("images", CAT), ("images", IDCARD)]
    with trio.fail_after(60):
        first = await requests_post(base + V1 + "/batch", "requests-batch-1", images)
        again = await requests_post(base + V1 + "/batch", "requests-batch-1", images)
    assert boundary_of(first.sent_content_type) != boundary_of(again.sent_content_type)
    assert first.status == 200, first.body
    assert REPLAYED.lower() not in first.headers
    items = first.json()["items"]
    assert [(i["index"], i["filename"], i["success"]) for i in items] == [
        (0, CAT.name, True),
        (1, IDCARD.name, True),
    ]
    assert again.status == 200, again.body
    assert again.headers[REPLAYED.lower()] == "true"
    assert again.body == first.body


async def test_requests_batch_retry_with_other_images_or_order_is_422(base: str) -> None:
    url = base + V1 + "/batch"
    with trio.fail_after(60):
        first = await requests_post(url, "requests-batch-2", [("images", CAT), ("images", IDCARD)])
        assert first.status == 200, first.body
        for images in (
            [("images", IDCARD), ("images", CAT)],  # the same images, another order
            [("images", CAT), ("images", COFFEE)],  # another image
            [("images", CAT)],  # one image less
        ):
            other = await requests_post(url, "requests-batch-2", images)
            assert other.status == 422, (images, other.body)
            assert other.json() == REUSED | {"request_id": other.headers["x-request-id"]}
