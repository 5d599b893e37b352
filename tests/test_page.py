"""The album page: its headers, and a real browser uploading real photos.

The browser test runs ``xintu serve`` as a subprocess on embedded defaults (the
real ONNX model), started and stopped by :mod:`tests.conformance.process`, and
drives Debian's Chromium headless through chromium-driver.
It is skipped when Chromium is missing, except under ``CI=true``, where it fails
(``.ci/run`` installs Chromium). A screenshot lands in ``test-artifacts/``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from quart.typing import TestClientProtocol as Client

from xintu import Config, load_config
from xintu.http import XintuApp, create_app
from xintu.http._page import CSP

from .conformance.browser import open_chromium
from .conformance.process import running_xintu
from .fakes import FakeModel

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


# --- headers, without a browser ------------------------------------------------------------


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    config: Config = load_config(env={}, data={"dir": str(tmp_path / "data")})
    app: XintuApp = create_app(config, model_factory=lambda _c: FakeModel())
    async with app.test_app():
        yield app.test_client()


async def test_page_has_a_strict_csp_and_versioned_assets(client: Client) -> None:
    resp = await client.get("/")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Content-Security-Policy"] == CSP
    assert CSP.startswith("default-src 'self'; ")
    assert "'unsafe-inline'" not in CSP
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    html = await resp.get_data(as_text=True)
    assert "{{asset:" not in html
    assert "http://" not in html
    assert "https://" not in html  # nothing from a CDN
    assert "<script>" not in html  # no inline script (the CSP would block it)

    etag = resp.headers["ETag"]
    again = await client.get("/", headers={"If-None-Match": etag})
    assert again.status_code == 304


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
async def test_assets_have_types_and_cache_headers(
    client: Client, name: str, content_type: str
) -> None:
    html = await (await client.get("/")).get_data(as_text=True)
    marker = f"/assets/{name}?v="
    assert marker in html
    version = html.split(marker, 1)[1].split('"', 1)[0]

    current = await client.get(f"/assets/{name}?v={version}")
    assert current.status_code == 200
    assert current.headers["Content-Type"] == content_type
    assert current.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert current.headers["ETag"] == f'"{version}"'
    assert current.headers["X-Content-Type-Options"] == "nosniff"

    stale = await client.get(f"/assets/{name}?v=old")
    assert stale.headers["Cache-Control"] == "no-cache"
    revalidated = await client.get(f"/assets/{name}", headers={"If-None-Match": f'"{version}"'})
    assert revalidated.status_code == 304


async def test_unknown_asset_is_a_json_404(client: Client) -> None:
    resp = await client.get("/assets/../../_config.py")
    assert resp.status_code == 404
    resp = await client.get("/assets/nope.js")
    assert resp.status_code == 404
    assert (await resp.get_json())["error_code"] == "not_found"


# --- a real browser ---------------------------------------------------------------------------


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[str]:
    """``xintu serve`` on embedded defaults: the real model, SQLite in a temporary dir."""
    with running_xintu(tmp_path / "server") as server:
        yield server.base_url


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with open_chromium(tmp_path) as driver:
        yield driver


def _photos(folder: Path) -> dict[str, Path]:
    skimage_data = pytest.importorskip("skimage.data")
    folder.mkdir()
    out = {}
    for name in ("chelsea", "coffee", "astronaut"):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(skimage_data, name)()).save(path, "JPEG", quality=90)
        out[name] = path
    return out


def _cards(driver: Any) -> list[dict[str, str]]:
    script = """
        return Array.from(document.querySelectorAll('.group .card')).map(c => ({
            group: c.closest('.group').dataset.category,
            name: c.dataset.name,
            source: c.dataset.source || '',
            conf: c.querySelector('.conf').textContent,
        }));
    """
    cards: list[dict[str, str]] = driver.execute_script(script)
    return cards


def test_album_page_in_headless_chromium(live_server: str, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photos = _photos(tmp_path / "photos")
    driver = browser
    driver.get(live_server + "/")
    assert driver.title == "Xintu album"
    wait = WebDriverWait(driver, 60, poll_frequency=0.2)

    def settled(count: int) -> Any:
        def check(d: Any) -> list[dict[str, str]] | bool:
            cards = _cards(d)
            done = [c for c in cards if c["group"] not in ("__pending",)]
            return cards if len(done) == count else False

        return check

    picker = driver.find_element(By.ID, "file-input")
    picker.send_keys("\n".join(str(p) for p in photos.values()))
    cards = wait.until(settled(3))
    by_name = {c["name"]: c for c in cards}
    assert by_name["chelsea.jpg"]["group"] == "pets"
    assert by_name["coffee.jpg"]["group"] == "foods"
    assert by_name["astronaut.jpg"]["group"] == "single_person"
    for card in cards:
        assert card["source"] == "local"
        assert card["conf"].endswith("%")
    headings = {
        e.get_attribute("data-category"): " ".join(
            e.find_element(By.CSS_SELECTOR, "h2").text.split()
        )
        for e in driver.find_elements(By.CSS_SELECTOR, ".group")
        if e.is_displayed()
    }
    assert headings == {"pets": "Pets 1", "foods": "Foods 1", "single_person": "Single person 1"}

    # The same photos again: hashed in the browser, answered by check-cache.
    picker.send_keys("\n".join(str(p) for p in photos.values()))
    cards = wait.until(settled(6))
    assert sorted(c["source"] for c in cards) == ["cache"] * 3 + ["local"] * 3
    assert {c["group"] for c in cards if c["name"] == "chelsea.jpg"} == {"pets"}

    # The live panel: readiness from /readyz, and statistics or a graceful note.
    wait.until(lambda d: d.find_element(By.ID, "health-pill").text == "ready")
    wait.until(lambda d: d.find_element(By.ID, "stats").text not in ("", "loading…"))
    progress = driver.find_element(By.ID, "progress-text").text
    assert progress == "6 of 6 photos done · 3 from cache"

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "album-page.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    problems = [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "/api/v1/stats" not in entry["message"]
    ]
    assert problems == []  # no CSP violation, no script error, no failed request
