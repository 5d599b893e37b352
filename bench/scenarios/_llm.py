"""What the LLM scenarios share: the fake upstream as a child, its knobs and statistics.

The fake (:mod:`xintu.testing.fakellm`) runs as its own process on a free port; the service
reaches it as an OpenAI-compatible provider. Its behaviour changes at run time
through ``POST /_fake/control``; ``GET /_fake/stats`` counts calls, failures and
calls per image hash. :class:`StatsPoller` samples those counters in a thread while
a load runs, so the scenarios can tell when upstream calls stopped (the breaker
opened) and how many were made in a window.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from .._context import Bench
from .._services import HOST, Service, free_port, python_argv

__all__ = [
    "BreakerPoller",
    "FakeLlm",
    "LlmSettings",
    "SeededService",
    "StatsPoller",
    "fake_llm",
    "hedge_counters",
    "llm_missing",
    "llm_settings",
    "seeded_llm_service",
    "service_counters",
]

_POLL_S = 0.1


def llm_missing() -> str | None:
    """Why the LLM scenarios cannot run yet, or None.

    A configuration that does not load at all is not a missing prerequisite: its
    :class:`~xintu.errors.ConfigError` propagates and the scenario fails.
    """
    if importlib.util.find_spec("xintu.testing.fakellm") is None:
        return "the fake LLM upstream (xintu.testing.fakellm) has not landed"
    from xintu import load_config
    from xintu.errors import ConfigError

    load_config(env={})
    try:
        config = load_config(env=_service_env(1))
    except ConfigError as exc:
        return f"the service has no LLM settings yet ({exc})"
    if getattr(config, "llm", None) is None:
        return "the service configuration has no [llm] section yet"
    return None


def _service_env(port: int) -> dict[str, str]:
    return {
        "XINTU_LLM_PROVIDERS": "openai",
        "XINTU_LLM_OPENAI_BASE_URL": f"http://{HOST}:{port}/v1",
        "XINTU_LLM_OPENAI_API_KEY": "bench-not-a-secret",
        "XINTU_LLM_OPENAI_MODEL": "fake-vision",
    }


@dataclass(frozen=True)
class LlmSettings:
    """The service settings the LLM scenarios size their load from."""

    deadline_s: float
    workers: int
    breaker_open_s: float
    breaker_min_calls: int
    breaker_consecutive_failures: int
    fallback_reserve_s: float
    # 0 where the service predates the slow-call rule.
    breaker_slow_call_s: float = 0.0


def llm_settings(bench: Bench, extra_env: Mapping[str, str] | None = None) -> LlmSettings:
    """The effective settings for a service started with *extra_env*."""
    from xintu import load_config

    env = _service_env(1) | dict(bench.settings.env) | dict(extra_env or {})
    config = load_config(env=env)
    llm = config.llm
    return LlmSettings(
        deadline_s=config.server.request_deadline_s,
        workers=llm.workers,
        breaker_open_s=llm.breaker_open_s,
        breaker_min_calls=llm.breaker_min_calls,
        breaker_consecutive_failures=llm.breaker_consecutive_failures,
        fallback_reserve_s=llm.fallback_reserve_s,
        breaker_slow_call_s=getattr(llm, "breaker_slow_call_s", 0.0),
    )


class BreakerPoller(threading.Thread):
    """Samples the service's ``xintu_breaker_state`` for one provider from ``/metrics``
    every 0.2 s: ``(monotonic s, state)`` with 0 closed, 1 half-open, 2 open. A scrape
    samples the actors first, so each reading is current."""

    def __init__(self, svc: Service, provider: str) -> None:
        super().__init__(daemon=True, name="breaker-poller")
        self.url = f"{svc.url}/metrics"
        self.line = f'xintu_breaker_state{{provider="{provider}"}} '
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self._stop_event.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    for line in client.get(self.url).text.splitlines():
                        if line.startswith(self.line):
                            state = int(float(line.rsplit(" ", 1)[1]))
                            self.samples.append((time.monotonic(), state))
                self._stop_event.wait(_BREAKER_POLL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def first_open(self, start: float, end: float) -> float | None:
        """The first sample time in [start, end) at which the breaker was open."""
        return next((t for t, state in self.samples if start <= t < end and state == 2), None)


_BREAKER_POLL_S = 0.2

# Counters of the service's /metrics that say where LLM work went.
_COUNTERS = ("xintu_llm_fallbacks_total", "xintu_shed_requests_total", "xintu_llm_calls_total")
_HEDGE_METRICS = ("xintu_llm_hedges_total", "xintu_llm_hedge_after_seconds")


def _metric_values(svc: Service, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The samples on ``/metrics`` whose line starts with one of *prefixes*, by
    their name and labels; raises :class:`httpx.HTTPError`."""
    text = httpx.get(f"{svc.url}/metrics", timeout=5.0).text
    out: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def service_counters(svc: Service) -> dict[str, Any]:
    """Fallbacks by reason, sheds by reason and LLM calls by outcome, from ``/metrics``."""
    try:
        return _metric_values(svc, _COUNTERS)
    except httpx.HTTPError as exc:
        return {"error": repr(exc)}


def hedge_counters(svc: Service) -> dict[str, float]:
    """The service's hedge counters and current hedge budget, from ``/metrics``."""
    try:
        return _metric_values(svc, _HEDGE_METRICS)
    except httpx.HTTPError:
        return {}


def lognormal_mean_s(median_ms: float, sigma: float) -> float:
    """Mean of the fake's lognormal latency, in seconds."""
    return median_ms / 1000.0 * math.exp(sigma * sigma / 2)


class FakeLlm:
    """Handle on the running fake: service env, knobs, statistics."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.env = _service_env(service.port)
        self._client = httpx.Client(base_url=service.url, timeout=5.0)

    def control(self, **changes: Any) -> dict[str, Any]:
        """Change :class:`xintu.testing.fakellm.Behaviour` fields now."""
        resp = self._client.post("/_fake/control", json=changes)
        resp.raise_for_status()
        return dict(resp.json())

    def stats(self, *, images: bool = False) -> dict[str, Any]:
        """The fake's counters; *images* adds calls per uploaded image's SHA-256."""
        resp = self._client.get("/_fake/stats", params={"images": "1"} if images else None)
        resp.raise_for_status()
        return dict(resp.json())

    def reset(self) -> None:
        self._client.post("/_fake/reset").raise_for_status()

    def close(self) -> None:
        self._client.close()


@contextlib.contextmanager
def fake_llm(bench: Bench, label: str, **cli: float) -> Iterator[FakeLlm]:
    """``python -m xintu.testing.fakellm`` on a free port with *cli* options
    (``latency_median_ms``)."""
    port = free_port()
    args = ["--port", str(port), "--seed", str(bench.settings.seed)]
    for key, value in cli.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    argv = python_argv("-m", "xintu.testing.fakellm", *args)
    with bench.child(label, argv, port, "/_fake/stats") as svc:
        fake = FakeLlm(svc)
        try:
            yield fake
        finally:
            fake.close()


@dataclass
class SeededService:
    """The fake upstream, the service wired to it, and the photos it already knows."""

    fake: FakeLlm
    svc: Service
    known: list[bytes]
    seeding: dict[str, Any]
    # False if seeding never reached the upstream: the service is not using the LLM.
    reached_upstream: bool


@contextlib.contextmanager
def seeded_llm_service(
    bench: Bench,
    label: str,
    *,
    env: Mapping[str, str],
    known: int,
    latency_median_ms: float,
    latency_sigma: float,
) -> Iterator[SeededService]:
    """Start the fake and the service, classify *known* photos through a fast
    upstream, then give the upstream the scenario's latency and zero its counters."""
    with fake_llm(bench, f"{label}-fakellm", latency_median_ms=5) as fake:
        with bench.xintu(label, env=fake.env | dict(env)) as svc:
            photos = bench.photos(known, f"{label}-known")
            seeding = bench.seed(svc, photos, connections=16)
            reached = fake.stats()["calls"] > 0
            if reached:
                fake.control(latency_median_ms=latency_median_ms, latency_sigma=latency_sigma)
                fake.reset()
            yield SeededService(fake, svc, photos, seeding, reached)


class StatsPoller(threading.Thread):
    """Samples the fake's counters every 0.1 s: ``(monotonic s, calls, failed, in_flight)``."""

    def __init__(self, fake: FakeLlm) -> None:
        super().__init__(daemon=True, name="fakellm-poller")
        self.url = fake.service.url + "/_fake/stats"
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self._stop_event.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    s = client.get(self.url).json()
                    self.samples.append((time.monotonic(), s["calls"], s["failed"], s["in_flight"]))
                self._stop_event.wait(_POLL_S)

    def stop(self) -> list[tuple[float, int, int, int]]:
        self._stop_event.set()
        self.join(5)
        return self.samples

    def calls_at(self, when: float) -> int:
        """Calls counted at the last sample taken at or before *when* (monotonic)."""
        before = [s[1] for s in self.samples if s[0] <= when]
        return before[-1] if before else 0

    def call_rate(self, t0: float, *, bin_s: float = 1.0) -> tuple[list[float], list[float]]:
        """Upstream calls per second in bins of *bin_s*, on the load's time axis."""
        if len(self.samples) < 2:
            return [], []
        t = np.array([s[0] - t0 for s in self.samples])
        calls = np.array([s[1] for s in self.samples], dtype=float)
        edges = np.arange(max(0.0, float(t[0])), float(t[-1]) + bin_s, bin_s)
        at_edges = np.interp(edges, t, calls)
        rates = np.diff(at_edges) / bin_s
        return [round(float(x), 2) for x in edges[:-1] + bin_s / 2], rates.round(2).tolist()

    def series(self, t0: float) -> dict[str, list[float]]:
        """Samples relative to *t0*, for the JSON."""
        return {
            "t": [round(s[0] - t0, 2) for s in self.samples],
            "calls": [s[1] for s in self.samples],
            "failed": [s[2] for s in self.samples],
            "in_flight": [s[3] for s in self.samples],
        }
