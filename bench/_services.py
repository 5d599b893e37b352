"""Child processes the harness starts and stops: the service, the baselines, the fake LLM.

Every child runs on ``127.0.0.1`` on a free port, logs to a file in the results
folder, gets an environment cleaned of the caller's ``XINTU_*`` settings and LLM API
keys, and is stopped with SIGTERM (then SIGKILL after a grace period). While it runs,
a sampler thread reads ``/proc`` for the process and its descendants (Hypercorn's
spawned workers): peak resident memory (``VmHWM``) and CPU time.

:class:`Stores` makes one fresh store per service: a SQLite file in the run's
temporary folder, or a ``xintu_bench_*`` database on MariaDB that it drops at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = [
    "MetricsAt",
    "Service",
    "ServiceError",
    "Stores",
    "clean_env",
    "free_port",
    "logged_latencies_ms",
    "parse_metrics",
    "process_tree",
    "read_proc",
    "start_service",
]

HOST = "127.0.0.1"
_SAMPLE_EVERY_S = 0.25
_STRIPPED_ENV = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DASHSCOPE_API_KEY")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServiceError(RuntimeError):
    """A child process did not start, or died."""


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without ``XINTU_*`` and LLM keys, plus *extra*."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("XINTU_") and k not in _STRIPPED_ENV
    }
    env.update(extra or {})
    return env


def _children(pid: int) -> list[int]:
    """Children of every thread of *pid*: Trio starts the local model's worker
    processes from a worker thread, and /proc lists a child under the thread that
    started it, so the main thread's list alone misses them."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def read_proc(pid: int) -> tuple[int, int, float] | None:
    """(VmHWM KiB, VmRSS KiB, CPU seconds) of *pid*, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    hwm = rss = 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    return hwm, rss, cpu


class _Sampler(threading.Thread):
    """Keeps, per pid of the tree, the peak ``VmHWM`` and the latest CPU seconds."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name=f"sampler-{pid}")
        self.pid = pid
        self.peak_kib: dict[int, int] = {}
        self.cpu_s: dict[int, float] = {}
        self.rss_kib: dict[int, int] = {}
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> None:
        for pid in process_tree(self.pid):
            got = read_proc(pid)
            if got is None:
                continue
            hwm, rss, cpu = got
            with self._lock:
                self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), hwm)
                self.rss_kib[pid] = rss
                self.cpu_s[pid] = cpu

    def run(self) -> None:
        while not self._stop_event.wait(_SAMPLE_EVERY_S):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()


class Service:
    """A started child process listening on ``HOST:port``."""

    def __init__(
        self, name: str, proc: subprocess.Popen[bytes], port: int, log_path: Path, argv: list[str]
    ) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.argv = argv
        self._sampler = _Sampler(proc.pid)
        self._sampler.start()
        self.start_s: float | None = None  # seconds until ready

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def host_header(self) -> str:
        return f"{HOST}:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the process and its descendants."""
        self._sampler.sample()
        return round(sum(self._sampler.cpu_s.values()), 3)

    def memory(self) -> dict[str, Any]:
        """Peak RSS (``VmHWM``) of each process of the tree, their sum, and the current RSS."""
        self._sampler.sample()
        peak = self._sampler.peak_kib
        return {
            "peak_rss_mib_total": round(sum(peak.values()) / 1024, 1),
            "peak_rss_mib_per_process": [round(v / 1024, 1) for v in peak.values()],
            "rss_mib_now": round(sum(self._sampler.rss_kib.values()) / 1024, 1),
            "processes": len(peak),
        }

    def metrics(self, prefixes: tuple[str, ...] = ("",)) -> dict[str, float]:
        """The samples of its ``/metrics`` whose name starts with one of *prefixes*
        (:func:`parse_metrics`); empty when it does not answer."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=5.0).text
        except httpx.HTTPError:
            return {}
        return parse_metrics(text, prefixes)

    def logged_latencies_ms(
        self, *, route: str, status: int, hashed: bool | None = None
    ) -> list[float]:
        """Its request log's latencies (:func:`logged_latencies_ms`)."""
        return logged_latencies_ms(self.log_path, route=route, status=status, hashed=hashed)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ServiceError(
                f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.tail()}"
            )

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after *grace_s*; returns the exit code."""
        self._sampler.sample()
        self._sampler.stop()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def parse_metrics(text: str, prefixes: tuple[str, ...] = ("",)) -> dict[str, float]:
    """``{'name{labels}': value}`` for every sample of a Prometheus exposition whose
    name starts with one of *prefixes* (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(prefixes):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def logged_latencies_ms(
    log_path: Path, *, route: str, status: int, hashed: bool | None = None
) -> list[float]:
    """``latency_ms`` of the service's own ``request`` log events for *route*
    answered *status* (JSON log lines; none below ``XINTU_LOG_LEVEL=info``): the
    time the service measured, from the request's start in the app to its answer,
    without the accept, the wait for the loop or the bytes on the wire.

    *hashed* keeps only the events with an ``image_hash`` (True: an upload whose
    body was read and hashed before its answer, e.g. refused after the header
    check) or only those without (False: e.g. refused from its headers)."""
    out: list[float] = []
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if '"request"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(event, dict)
            and event.get("event") == "request"
            and event.get("route") == route
            and event.get("status") == status
            and isinstance(event.get("latency_ms"), int | float)
            and (hashed is None or bool(event.get("image_hash")) == hashed)
        ):
            out.append(float(event["latency_ms"]))
    return out


class MetricsAt:
    """Scrapes of a service's ``/metrics`` at fixed ``time.monotonic()`` instants,
    each in a timer thread, so that a scenario can take the difference of its
    counters and histograms over a phase of its load (``before``/``after``).

    ``join()`` waits for them; :meth:`get` is a scrape by its label (empty if the
    service did not answer or the instant never came).
    """

    def __init__(
        self, svc: Service, at: Mapping[str, float], prefixes: tuple[str, ...] = ("",)
    ) -> None:
        self.scrapes: dict[str, dict[str, float]] = {}
        self.taken_at: dict[str, float] = {}
        self._timers = [
            threading.Timer(max(when - time.monotonic(), 0.0), self._take, (svc, label, prefixes))
            for label, when in at.items()
        ]
        for timer in self._timers:
            timer.daemon = True
            timer.start()

    def _take(self, svc: Service, label: str, prefixes: tuple[str, ...]) -> None:
        self.taken_at[label] = time.monotonic()
        self.scrapes[label] = svc.metrics(prefixes)

    def join(self, timeout_s: float = 10.0) -> None:
        for timer in self._timers:
            timer.join(timeout_s)

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def get(self, label: str) -> dict[str, float]:
        return self.scrapes.get(label, {})


def start_service(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    env: Mapping[str, str],
    log_dir: Path,
    ready_path: str = "/readyz",
    timeout_s: float = 120.0,
) -> Service:
    """Start *argv*, wait until ``GET ready_path`` answers 200, return the :class:`Service`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the harness's Ctrl-C does not reach it; stop() does
        )
    service = Service(name, proc, port, log_path, list(argv))
    started = time.monotonic()
    deadline = started + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc.poll() is not None:
                service.stop()
                raise ServiceError(f"{name} exited with {proc.returncode}:\n{service.tail()}")
            try:
                if client.get(service.url + ready_path).status_code == 200:
                    service.start_s = round(time.monotonic() - started, 2)
                    return service
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                service.stop()
                raise ServiceError(f"{name} not ready after {timeout_s:.0f} s:\n{service.tail()}")
            time.sleep(0.1)


def python_argv(*args: str) -> list[str]:
    """``[sys.executable, *args]``."""
    return [sys.executable, *args]


class Stores:
    """One fresh, empty store per service: SQLite files, or MariaDB databases."""

    def __init__(self, kind: str, tmp: Path, mysql_url: str) -> None:
        if kind not in ("sqlite", "mysql"):
            raise ValueError(f"unknown store kind {kind!r}")
        self.kind = kind
        self._tmp = tmp
        self._mysql_url = mysql_url.rstrip("/")
        self._created: list[str] = []
        self._tag = secrets.token_hex(3)

    def new_url(self, label: str) -> str:
        """The ``XINTU_STORE_URL`` of a new empty store named after *label*."""
        if self.kind == "sqlite":
            return f"sqlite:///{self._tmp / f'{label}.sqlite3'}"
        name = f"xintu_bench_{self._tag}_{len(self._created)}"
        _mysql_exec(self._mysql_url, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        self._created.append(name)
        return f"{self._mysql_url}/{name}"

    def describe(self) -> str:
        if self.kind == "sqlite":
            return "sqlite (file in the run's temporary folder)"
        parts = urlsplit(self._mysql_url)
        return f"mysql {parts.hostname}:{parts.port or 3306} (xintu_bench_* databases)"

    def cleanup(self) -> None:
        """Drop every database this object created."""
        while self._created:
            name = self._created.pop()
            with contextlib.suppress(Exception):
                _mysql_exec(self._mysql_url, f"DROP DATABASE IF EXISTS `{name}`")


def _mysql_exec(url: str, sql: str) -> None:
    import trio
    import trio_mysql

    parts = urlsplit(url)

    async def run() -> None:
        conn = trio_mysql.connect(
            host=parts.hostname or HOST,
            port=parts.port or 3306,
            user=parts.username or "root",
            password=parts.password or "",
            use_unicode=True,
        )
        with trio.fail_after(10):
            await conn.connect()
            try:
                async with conn.cursor() as cur:
                    await cur.execute(sql)
            finally:
                await conn.aclose()

    trio.run(run)
