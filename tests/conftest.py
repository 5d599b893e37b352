"""Shared fixtures: a configuration on a temporary data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import xintu._log
from xintu import Config, load_config
from xintu._log import reset_logging

pytest_plugins = ["tests.backends"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def config(data_dir: Path) -> Config:
    """Defaults on a fresh data directory, ignoring the caller's environment."""
    return load_config(env={}, data={"dir": str(data_dir)})


# A logger cached under one test's logging configuration would hide its events from
# a later test's structlog.testing.capture_logs (a failure that depended on test order).
xintu._log.CACHE_LOGGERS = False


@pytest.fixture(autouse=True)
def _logging_reset() -> Iterator[None]:
    """configure_logging is process-wide (the CLI calls it): undo it after each test."""
    yield
    reset_logging()
