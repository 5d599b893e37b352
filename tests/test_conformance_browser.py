"""Conformance: a browser page on another origin runs the ORIGINAL client guide's flow.

Xintu runs as a separate ``xintu serve`` process (embedded defaults: SQLite and the
real ONNX model, JSON logs). The page ``tests/conformance/album_client.html`` is
served from a second origin (another port) by the standard library's web server;
headless Chromium opens it with the API's base URL in the query, and its plain
JavaScript does what the original backend's client guide tells a web client to
do: health at start, SHA-256 of each ORIGINAL photo (WebCrypto), check-cache, a
canvas resize to 1024 px JPEG quality 0.8 on a miss, upload with the original's
hash, batch-check-cache and /classify/batch for the misses, then asks again by the
originals' hashes. The page writes a JSON report; this test reads it and asserts.

A third origin, which sends no CORS headers, is the control: the same browser
cannot read it with ``fetch``, so the API's answers are readable only because the
API sends CORS headers. A screenshot lands in ``test-artifacts/``. Skipped without
Chromium, except under ``CI=true``, where that fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from .conformance import CATEGORIES
from .conformance.browser import chromium_or_skip, open_chromium
from .conformance.origin import serving_directory
from .conformance.process import XintuServer, running_xintu

HERE = Path(__file__).resolve().parent
PAGE_DIR = HERE / "conformance"
IMAGES = HERE / "images"
ARTIFACTS = HERE.parent / "test-artifacts"
SINGLE = "idcard_photo_1600x1200.jpg"
BATCH = sorted(p.name for p in IMAGES.iterdir() if p.name != SINGLE)
USER = "album-user-1"
OTHER_USER = "album-user-2"
REPORT_TIMEOUT_S = 120


@dataclass(frozen=True)
class Origins:
    page: str  # the album page's site
    control: str  # a site that sends no CORS headers


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XintuServer]:
    chromium_or_skip()  # before the server starts: no browser, nothing to do
    with running_xintu(tmp_path_factory.mktemp("xintu")) as running:
        yield running


@pytest.fixture(scope="module")
def origins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origins]:
    site = tmp_path_factory.mktemp("album-site")
    for name in ("album_client.html", "album_client.js"):
        shutil.copy(PAGE_DIR / name, site / name)
    shutil.copytree(IMAGES, site / "photos")
    control = tmp_path_factory.mktemp("control-site")
    (control / "control.txt").write_text("no CORS headers here\n")
    with serving_directory(site) as page, serving_directory(control) as other:
        yield Origins(page=page, control=other)


def _run_page(driver: Any, url: str) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    report = driver.find_element(By.ID, "report")
    WebDriverWait(driver, REPORT_TIMEOUT_S, poll_frequency=0.2).until(
        lambda _d: report.get_attribute("data-state") == "done"
    )
    parsed: dict[str, Any] = json.loads(report.get_attribute("textContent"))
    return parsed


def _preflights(driver: Any) -> list[dict[str, Any]]:
    """CORS preflights Chromium sent, from its DevTools network log."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") != "Network.requestWillBeSent":
            continue
        params = message["params"]
        request = params["request"]
        if params.get("type") == "Preflight" or request.get("method") == "OPTIONS":
            out.append(request)
    return out


def test_original_client_flow_in_a_browser_on_another_origin(
    server: XintuServer, origins: Origins, tmp_path: Path
) -> None:
    query = urllib.parse.urlencode(
        {
            "api": server.base_url,
            "user": USER,
            "other_user": OTHER_USER,
            "single": SINGLE,
            "batch": ",".join(BATCH),
            "control": f"{origins.control}/control.txt",
        }
    )
    with open_chromium(tmp_path) as driver:
        report = _run_page(driver, f"{origins.page}/album_client.html?{query}")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "conformance-album-client.png"
        driver.save_screenshot(str(shot))
        preflights = _preflights(driver)
        console = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    (ARTIFACTS / "conformance-album-client.json").write_text(json.dumps(report, indent=1))

    assert report["page_origin"] == origins.page != server.base_url
    # The control: this browser does enforce CORS between these loopback origins.
    assert report["control"] == {
        "url": f"{origins.control}/control.txt",
        "cors_fetch": "rejected TypeError",
        "no_cors_fetch": "resolved opaque",
    }
    failed_calls = [c for c in report["calls"] if c["error"] is not None]
    assert failed_calls == []  # every fetch to the API from the other origin worked
    assert report["errors"] == []
    failed_checks = [c for c in report["checks"] if not c["ok"]]
    assert failed_checks == []
    assert len(report["checks"]) > 100

    # (a) health, as the guide's app calls it at start.
    health = report["health"]
    assert health["status"] == "healthy"
    assert health["database"] == "connected"
    assert health["model_api"] == "not_configured"  # no LLM in the embedded defaults

    # (b) one photo: hashed, missed, resized as the guide demands, uploaded, then found.
    photos = {p["name"]: p for p in report["photos"]}
    original = (IMAGES / SINGLE).read_bytes()
    single = report["single"]
    assert single["original_hash"] == hashlib.sha256(original).hexdigest()
    assert single["first_cached"] is False
    resized = single["resized"]
    assert (resized["width"], resized["height"]) == (1024, 768)
    assert resized["type"] == "image/jpeg"
    assert resized["jpeg_magic"] is True
    assert resized["hash"] != single["original_hash"]
    # Classified under the uploaded bytes' own hash; the original's hash is the alias.
    assert single["upload"]["data"]["image_hash"] == resized["hash"]
    assert single["second"]["cached"] is True
    assert single["second"]["data"]["category"] == single["upload"]["data"]["category"]
    assert single["other_user"]["cached"] is False
    assert photos[SINGLE]["via"] == "upload"

    # (c) the batch: one hit (the photo above, for the same user), the rest uploaded.
    batch = report["batch"]
    assert batch["first"]["cached_count"] == 1
    assert batch["misses"] == BATCH
    assert len(batch["uploads"]) == 1  # 10 misses: one /classify/batch call of at most 20
    for item in batch["resized"]:
        with Image.open(IMAGES / item["photo"]) as img:
            long_side = max(img.size)
        assert max(item["width"], item["height"]) == min(long_side, 1024), item
        assert item["jpeg_magic"] is True
    uploaded = batch["uploads"][0]["items"]
    assert [i["data"]["image_hash"] for i in uploaded] == [r["hash"] for r in batch["resized"]]
    assert batch["second"]["cached_count"] == len(BATCH) + 1
    # (d) a strict client's view of every answer it used.
    assert {p["category"] for p in photos.values()} <= CATEGORIES
    assert sorted(p["via"] for p in photos.values()) == ["upload"] * (len(BATCH) + 1)
    for call in report["calls"]:
        assert (call["response_type"], call["status"]) == ("cors", 200), call
        # A header the API exposes (X-Request-ID) is readable by the script.
        assert call["request_id_header"], call
        if "request_id" in call["body"]:
            assert call["request_id_header"] == call["body"]["request_id"], call

    # JSON with X-User-ID is not a simple request: Chromium asked first, and was allowed.
    preflighted = {urllib.parse.urlsplit(p["url"]).path for p in preflights}
    assert "/api/v1/classify/check-cache" in preflighted
    assert "/api/v1/classify/batch-check-cache" in preflighted
    options = [
        r for r in server.log_records() if r.get("event") == "request" and r["method"] == "OPTIONS"
    ]
    assert {r["route"] for r in options} >= {
        "/api/v1/classify/check-cache",
        "/api/v1/classify",
        "/api/v1/classify/batch-check-cache",
        "/api/v1/classify/batch",
    }
    assert {r["status"] for r in options} <= {200, 204}

    assert shot.stat().st_size > 10_000
    control_path = "/control.txt"
    assert [m for m in console if control_path not in m] == []  # only the control was refused


@pytest.mark.parametrize(
    ("path", "request_headers"),
    [
        ("/api/v1/classify/check-cache", "content-type,x-user-id"),
        ("/api/v1/classify/batch-check-cache", "content-type,x-user-id"),
        ("/api/v1/classify", "x-user-id"),
        ("/api/v1/classify/batch", "x-user-id"),
    ],
)
def test_preflight_as_chromium_sends_it(
    server: XintuServer, origins: Origins, path: str, request_headers: str
) -> None:
    """The OPTIONS request Chromium sends before a POST with JSON or X-User-ID, no API key."""
    req = urllib.request.Request(
        server.base_url + path,
        method="OPTIONS",
        headers={
            "Origin": origins.page,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": request_headers,
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, headers = resp.status, resp.headers
    except urllib.error.HTTPError as exc:
        exc.close()
        status, headers = exc.code, exc.headers
    assert 200 <= status < 300, (status, dict(headers))
    assert headers["Access-Control-Allow-Origin"] in ("*", origins.page)
    methods = {
        m.strip().upper() for m in headers.get("Access-Control-Allow-Methods", "").split(",")
    }
    assert "POST" in methods or "*" in methods
    allowed = {
        h.strip().lower() for h in headers.get("Access-Control-Allow-Headers", "").split(",")
    }
    assert set(request_headers.split(",")) <= allowed or "*" in allowed
    assert headers.get("Access-Control-Allow-Credentials") in (None, "false")
