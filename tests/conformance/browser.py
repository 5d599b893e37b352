"""Headless Chromium through chromium-driver (Debian's packages), with selenium.

:func:`chromium_or_skip` skips the calling test when Chromium, chromium-driver or
selenium is missing, except under ``CI=true``, where it fails. :func:`open_chromium`
starts a headless browser on a new, empty profile with nothing that reaches beyond
loopback (no background networking, component updates, sync or QUIC), and keeps
the console and network logs for the test to read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CHROMEDRIVER", "CHROMIUM", "chromium_or_skip", "open_chromium"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--window-size=1280,1400",
)


def chromium_or_skip() -> None:
    """Skip without a browser to drive; under ``CI=true`` a missing one is a failure."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs {missing} (apt-get install chromium chromium-driver)")
        pytest.skip(f"no {missing}")


@contextmanager
def open_chromium(profile_parent: Path, *, page_load_timeout_s: float = 30) -> Iterator[Any]:
    """A selenium driver for headless Chromium on a new profile under *profile_parent*."""
    chromium_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in _FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(dir=profile_parent, prefix="chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(page_load_timeout_s)
        driver.set_script_timeout(page_load_timeout_s)
        yield driver
    finally:
        driver.quit()
