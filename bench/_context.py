"""What every scenario gets: settings, the generator pool, and started services.

:class:`Bench` starts children as context managers (so each is stopped, and its peak
memory and CPU recorded, however the scenario ends), holds the photos, and measures
the framework baseline (:mod:`bench.hello_app`) once per worker count per run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _photos
from ._http import json_request, multipart_request
from ._loadgen import GeneratorPool, LoadResult
from ._report import Row
from ._services import HOST, Service, Stores, clean_env, free_port, python_argv, start_service
from ._stats import summarize

__all__ = ["Bench", "Settings", "missing_service"]

CHECK_CACHE = "/api/v1/classify/check-cache"
BATCH_CHECK = "/api/v1/classify/batch-check-cache"
CLASSIFY = "/api/v1/classify"


@dataclass(frozen=True)
class Settings:
    """The run's parameters, printed and stored with the results."""

    quick: bool = False
    store: str = "sqlite"
    mysql_url: str = "mysql://root@127.0.0.1:3306"
    generator_processes: int = 2
    workers: int = 0
    closed_connections: int = 32
    users: int = 1000
    env: Mapping[str, str] = field(default_factory=dict)
    seed: int = 20260101

    def as_dict(self) -> dict[str, Any]:
        return {
            "quick": self.quick,
            "store": self.store,
            "generator_processes": self.generator_processes,
            "service_workers": self.workers,
            "closed_loop_connections": self.closed_connections,
            "simulated_users": self.users,
            "env_overrides": dict(self.env),
            "seed": self.seed,
        }


def missing_service() -> str | None:
    """Why the service cannot start yet (a package that has not landed), or None."""
    for module in ("xintu.store", "xintu.vision", "xintu.actors", "xintu.http"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} has not landed"
        except ImportError as exc:
            return f"{module} cannot be imported: {exc}"
    return None


class Bench:
    """The run's shared state, handed to every scenario."""

    def __init__(
        self,
        settings: Settings,
        *,
        out_dir: Path,
        tmp: Path,
        gen: GeneratorPool,
        stores: Stores,
    ) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.tmp = tmp
        self.gen = gen
        self.stores = stores
        self.data_dir = tmp / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.services: dict[str, dict[str, Any]] = {}
        #: Numbers one scenario measured that a later one sizes its load from.
        self.measured: dict[str, float] = {}
        self._bases: list[bytes] | None = None
        self._model_path: Path | None = None
        self._hit_set: tuple[list[bytes], list[str]] | None = None
        self._hit_store: str | None = None
        self.hit_store_seeded = False

    # --- durations and photos ----------------------------------------------------------

    def dur(self, full_s: float, quick_s: float) -> float:
        """A phase length: *full_s*, or *quick_s* with ``--quick``."""
        return quick_s if self.settings.quick else full_s

    def photos(self, n: int, salt: str) -> list[bytes]:
        """*n* distinct realistic 640x480 JPEGs (distinct across salts too)."""
        if self._bases is None:
            self._bases = _photos.base_photos(24, (640, 480), seed=self.settings.seed)
        return _photos.distinct(self._bases, n, salt=f"{self.settings.seed}-{salt}")

    def hit_set(self) -> tuple[list[bytes], list[str]]:
        """The photos (and their hashes) that the hit scenarios seed and then look up."""
        if self._hit_set is None:
            photos = self.photos(int(self.dur(100, 32)), "hits")
            self._hit_set = (photos, [_photos.sha256(p) for p in photos])
        return self._hit_set

    def hit_store(self) -> str:
        """One store for every hit scenario: seeded by the first, reused by the others."""
        if self._hit_store is None:
            self._hit_store = self.stores.new_url("hits")
        return self._hit_store

    def model_path(self) -> Path:
        """The ONNX model in the run's data directory, built once per run."""
        if self._model_path is None:
            from xintu.model import ensure_model

            self._model_path = ensure_model(self.data_dir)
        return self._model_path

    # --- children ----------------------------------------------------------------------

    def peak_rss_mib(self, label: str) -> float | None:
        """Peak RSS (MiB, summed over its process tree) of the stopped child *label*."""
        info = self.services.get(label)
        return None if info is None else float(info["memory"]["peak_rss_mib_total"])

    def rss_row(self, label: str, baseline: str | None = None) -> Row:
        """A table row: the child's peak RSS, against *baseline*'s if given."""
        info = self.services.get(label, {}).get("memory", {})
        return Row(
            f"service peak RSS ({label})",
            self.peak_rss_mib(label),
            "MiB",
            baseline or "",
            self.peak_rss_mib(baseline) if baseline else None,
            f"VmHWM summed over {info.get('processes', '?')} process(es)",
        )

    @contextlib.contextmanager
    def _child(
        self,
        label: str,
        argv: list[str],
        port: int,
        env: dict[str, str],
        ready_path: str,
        info: Mapping[str, Any] | None = None,
    ) -> Iterator[Service]:
        """Start a child, yield it, stop it, and record its memory, CPU and exit code."""
        started = time.monotonic()
        service = start_service(
            label, argv, port=port, env=env, log_dir=self.out_dir / "logs", ready_path=ready_path
        )
        try:
            yield service
        finally:
            memory = service.memory()
            cpu_s = service.cpu_seconds()
            code = service.stop()
            self.services[label] = {
                "argv": service.argv[1:],
                **(info or {}),
                "memory": memory,
                "cpu_s": cpu_s,
                "seconds_to_ready": service.start_s,
                "seconds_up": round(time.monotonic() - started, 1),
                "exit_code": code,
                "log": str(service.log_path.relative_to(self.out_dir)),
            }

    def _xintu_env(self, port: int, workers: int, extra: Mapping[str, str]) -> dict[str, str]:
        env = {
            "XINTU_DATA_DIR": str(self.data_dir),
            "XINTU_SERVER_BIND": f"{HOST}:{port}",
            "XINTU_SERVER_WORKERS": str(workers),
            "XINTU_LOG_LEVEL": "warning",
            "XINTU_LOG_FORMAT": "json",
        }
        return clean_env(env | dict(self.settings.env) | dict(extra))

    @contextlib.contextmanager
    def xintu(
        self,
        label: str,
        *,
        workers: int | None = None,
        env: Mapping[str, str] | None = None,
        store_url: str | None = None,
    ) -> Iterator[Service]:
        """``xintu serve`` on a free port and the run's data directory.

        The store is *store_url*, else a fresh empty one.
        """
        self.model_path()  # build before the service's startup clock runs
        port = free_port()
        w = self.settings.workers if workers is None else workers
        extra = {"XINTU_STORE_URL": store_url or self.stores.new_url(label)} | dict(env or {})
        argv = python_argv("-m", "xintu", "serve", "--bind", f"{HOST}:{port}", "--workers", str(w))
        shown = {k: v for k, v in extra.items() if k != "XINTU_STORE_URL" and "KEY" not in k}
        env = self._xintu_env(port, w, extra)
        with self._child(label, argv, port, env, "/readyz", {"env": shown}) as svc:
            yield svc

    @contextlib.contextmanager
    def hello(self, workers: int) -> Iterator[Service]:
        """The Quart-Trio hello-world baseline with the service's Hypercorn settings."""
        port = free_port()
        argv = python_argv("-m", "bench.hello_app")
        env = self._xintu_env(port, workers, {})
        with self._child(f"hello-w{workers}", argv, port, env, "/readyz") as svc:
            yield svc

    @contextlib.contextmanager
    def child(
        self, label: str, argv: Sequence[str], port: int, ready_path: str
    ) -> Iterator[Service]:
        """Any other child (the fake LLM), with a cleaned environment."""
        with self._child(label, list(argv), port, clean_env(), ready_path) as svc:
            yield svc

    # --- load --------------------------------------------------------------------------

    def closed(self, svc: Service, payloads: Sequence[bytes], **kw: Any) -> LoadResult:
        """Closed loop against *svc* (see :meth:`GeneratorPool.closed_loop`)."""
        kw.setdefault("connections", self.settings.closed_connections)
        return self.gen.closed_loop(HOST, svc.port, payloads, **kw)

    def open(
        self,
        svc: Service,
        payloads: Sequence[bytes],
        offsets: npt.NDArray[np.float64],
        choice: npt.NDArray[np.int64],
        **kw: Any,
    ) -> LoadResult:
        """Open loop against *svc* (see :meth:`GeneratorPool.open_loop`)."""
        return self.gen.open_loop(HOST, svc.port, payloads, offsets, choice, **kw)

    def _user(self, i: int) -> list[tuple[str, str]]:
        return [("X-User-ID", f"bench-user-{i % self.settings.users}")]

    def check_cache_payloads(self, svc: Service, hashes: Sequence[str]) -> list[bytes]:
        """``check-cache`` requests: every hash, spread over the simulated users.

        There are at least as many requests as users, so that a closed loop cycling
        through them sends each user's requests at ``rate / users``.
        """
        n = max(len(hashes), self.settings.users)
        return [
            json_request(
                CHECK_CACHE,
                {"image_hash": hashes[i % len(hashes)]},
                host=svc.host_header,
                headers=self._user(i),
            )
            for i in range(n)
        ]

    def batch_payloads(self, svc: Service, hashes: Sequence[str], size: int) -> list[bytes]:
        """``batch-check-cache`` requests of the first *size* hashes, one per user."""
        body = {"image_hashes": list(hashes[:size])}
        return [
            json_request(BATCH_CHECK, body, host=svc.host_header, headers=self._user(i))
            for i in range(self.settings.users)
        ]

    def classify_payloads(self, svc: Service, photos: Sequence[bytes]) -> list[bytes]:
        """One ``POST /classify`` per photo, photo *i* from simulated user *i*."""
        return [
            multipart_request(
                CLASSIFY, [("image", f"p{i}.jpg", p)], host=svc.host_header, headers=self._user(i)
            )
            for i, p in enumerate(photos)
        ]

    def seed(self, svc: Service, photos: Sequence[bytes], connections: int = 8) -> dict[str, Any]:
        """Classify *photos* once each (closed loop); every one must succeed."""
        result = self.closed(
            svc,
            self.classify_payloads(svc, photos),
            connections=connections,
            duration_s=600.0,
            reuse=False,
            timeout_s=60.0,
        )
        summary = summarize(result.samples, duration_s=result.wall_s)
        if summary["accepted"] != len(photos):
            raise RuntimeError(f"seeding failed: {summary['status_counts']}")
        return summary
