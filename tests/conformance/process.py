"""``xintu serve`` as a separate process, started and stopped the way an operator does.

:func:`running_xintu` starts ``python -m xintu serve --bind 127.0.0.1:<free port>``
on the embedded defaults (SQLite and the real local ONNX model in a fresh data
directory, which the first start builds) with JSON logs, waits (bounded) until
``/readyz`` answers 200, yields a :class:`XintuServer`, and at the end sends
SIGTERM and requires exit status 0 within a bound. Only the standard library is
used: the client side holds no code from ``xintu/``.

``CONFORMANCE_XINTU_TREE=<checkout>`` runs the server from another source tree
(e.g. a ``git worktree`` of an older commit) with this virtual environment.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TREE_ENV", "XintuServer", "free_port", "running_xintu"]

TREE_ENV = "CONFORMANCE_XINTU_TREE"
_POLL_S = 0.2
_LLM_KEYS = frozenset({"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DASHSCOPE_API_KEY"})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class XintuServer:
    """A running ``xintu serve``: where it answers and where it writes."""

    base_url: str
    data_dir: Path
    log_path: Path
    pid: int

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (lines that are not JSON are skipped)."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


@contextmanager
def running_xintu(
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 120.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[XintuServer]:
    """``xintu serve`` on a free loopback port, data and log under *workdir*.

    *env* adds ``XINTU_*`` settings to the defaults; the caller's own ``XINTU_*``
    variables and LLM keys (which the service honours) are never passed on, so the
    server classifies with its local model only, as a fresh install does. Raises
    :class:`AssertionError` (with the log's tail) if the server exits early, is not
    ready within *ready_timeout_s*, or does not exit 0 within *stop_timeout_s* of
    SIGTERM.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    data_dir = workdir / "data"
    log_path = workdir / "server.log"
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith("XINTU_") and k not in _LLM_KEYS
    }
    child_env |= {"XINTU_DATA_DIR": str(data_dir), "XINTU_LOG_FORMAT": "json", **(env or {})}
    cwd: Path | None = None
    tree = os.environ.get(TREE_ENV)
    if tree:
        cwd = Path(tree).resolve()
        child_env["PYTHONPATH"] = str(cwd)
    command = [sys.executable, "-m", "xintu", "serve", "--bind", f"127.0.0.1:{port}"]
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, cwd=cwd, env=child_env, stdout=log, stderr=subprocess.STDOUT
        )
    server = XintuServer(base_url, data_dir, log_path, proc.pid)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while _status(f"{base_url}/readyz") != 200:
            if proc.poll() is not None:
                raise AssertionError(
                    f"xintu serve exited with {proc.returncode} before it was ready:\n"
                    + server.log_tail()
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"xintu serve was not ready in {ready_timeout_s:.0f} s:\n" + server.log_tail()
                )
            time.sleep(_POLL_S)
    except BaseException:
        _kill(proc)
        raise
    failed = True
    try:
        yield server
        failed = False
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            returncode = proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            if not failed:
                raise AssertionError(
                    f"xintu serve did not exit within {stop_timeout_s:.0f} s of SIGTERM:\n"
                    + server.log_tail()
                ) from None
        else:
            if not failed and returncode != 0:
                raise AssertionError(
                    f"xintu serve exited with {returncode} after SIGTERM:\n" + server.log_tail()
                )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
