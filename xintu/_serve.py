"""``xintu serve``: Hypercorn's trio worker around the app, with graceful shutdown.

``workers = 0`` serves in-process. Hypercorn gives an in-process server no signal
handling of its own, so :func:`serve` passes a shutdown trigger built on
``trio.open_signal_receiver``. On SIGTERM or SIGINT:

1. readiness fails and new work is answered 503 (``Draining``) at once, while the
   listener stays open for ``drain_delay_s`` (a second signal cuts this short);
2. Hypercorn stops accepting and gives in-flight requests ``graceful_timeout_s``;
3. the app drains the actors (queued work completes) and the writer flushes;
4. the process exits 0.

``workers >= 1`` runs Hypercorn's supervisor with N spawned worker processes,
each importing :mod:`xintu._asgi`; Hypercorn relays SIGTERM to them and drains
each the same way (readiness fails once its in-flight requests are done).

Every worker serves with the parent's :class:`~xintu.Config` object itself, not
with one rebuilt from the environment: the parent pickles it into the variable
``_XINTU_WORKER_CONFIG`` of the environment the workers are spawned with, and
:func:`worker_config` reads it back. So a ``--config`` file, ``XINTU_CONFIG``, the
command line's ``--bind``/``--workers`` and every ``XINTU_*`` variable count once,
in the parent; a config file edited or removed after the start changes nothing,
even for a worker Hypercorn restarts (SIGHUP). The workers start in the parent's
working directory, so a relative path in the configuration (``data.dir``, a
``sqlite:///`` URL) names the same file in every process.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import os
import pickle
import shutil
import signal
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import structlog
import trio
from hypercorn.config import Config as HypercornConfig

from . import _connections
from ._config import Config, load_config
from .http import create_app
from .http._app import ModelFactory

__all__ = ["hypercorn_config", "serve", "serve_in_process", "worker_config"]

log = structlog.get_logger("xintu.serve")

# Not an XINTU_ name: it is no configuration key, and load_config ignores it.
_WORKER_CONFIG_ENV = "_XINTU_WORKER_CONFIG"


def hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [config.server.bind]
    hc.worker_class = "trio"
    hc.workers = max(config.server.workers, 1)
    hc.graceful_timeout = config.server.graceful_timeout_s
    hc.keep_alive_timeout = config.server.keep_alive_s
    # The kernel's accept queue: Hypercorn's default of 100 overflows under a burst
    # and the kernel resets connections before the app sees them.
    hc.backlog = config.server.listen_backlog
    hc.read_timeout = math.ceil(config.server.read_timeout_s)  # Hypercorn wants an int
    hc.accesslog = None
    # Hypercorn logs through the stdlib logger that _log routes into structlog.
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.loglevel = config.log.level.upper()
    # Startup builds the model on first use: give lifespan startup time to finish.
    hc.startup_timeout = 300
    hc.shutdown_timeout = config.server.graceful_timeout_s + 10
    return hc


async def serve_in_process(
    config: Config,
    *,
    model_factory: ModelFactory | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on Hypercorn's trio worker in this process until SIGTERM or SIGINT.

    ``task_status.started`` receives the bound addresses (``--bind 127.0.0.1:0``
    picks a free port). *model_factory* replaces the ONNX classifier (tests).
    """
    from hypercorn.trio import serve as hypercorn_serve

    _connections.install()
    _connections.raise_open_files_limit(config.server.max_connections)
    app = create_app(config, model_factory=model_factory, freeze_gc=True)

    async def shutdown_trigger() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info(
                    "shutdown_signal",
                    signal=signal.Signals(signum).name,
                    drain_delay_s=config.server.drain_delay_s,
                )
                runtime = getattr(app, "runtime", None)
                if runtime is not None:
                    runtime.begin_drain()
                break
            # Keep listening (readyz 503, new work 503) so that load balancers
            # take this instance out before connections are refused.
            with trio.move_on_after(config.server.drain_delay_s):
                async for _ in signals:
                    break

    await hypercorn_serve(
        app, hypercorn_config(config), shutdown_trigger=shutdown_trigger, task_status=task_status
    )


def serve(config: Config) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    log.info(
        "serving",
        bind=config.server.bind,
        workers=config.server.workers,
        store=config.redacted()["store"]["url"] or "sqlite (data dir)",
        data_dir=str(config.data_dir),
    )
    if config.server.workers == 0:
        trio.run(partial(serve_in_process, config))
        return 0
    from hypercorn.run import run as hypercorn_run

    hc = hypercorn_config(config)
    hc.application_path = "xintu._asgi:app"
    with _worker_environment(config):
        return int(hypercorn_run(hc) or 0)


def worker_config() -> Config:
    """The configuration of a worker process (:mod:`xintu._asgi`).

    Spawned by :func:`serve`: the parent's configuration object. Loaded any other way
    (``hypercorn xintu._asgi:app``): built from the environment and ``XINTU_CONFIG``.
    """
    encoded = os.environ.get(_WORKER_CONFIG_ENV)
    if not encoded:
        return load_config()
    # Safe to unpickle: the variable is set by the parent just before it spawns
    # this process, and whoever can set a process's environment can already run
    # code in it (PYTHONPATH, PYTHONSTARTUP).
    config = pickle.loads(base64.b64decode(encoded))
    if not isinstance(config, Config):  # pragma: no cover - only serve() sets it
        raise TypeError(f"{_WORKER_CONFIG_ENV} holds a {type(config).__name__}, not a Config")
    return dataclasses.replace(config, origins=types.MappingProxyType(dict(config.origins)))


@contextmanager
def _worker_environment(config: Config) -> Iterator[None]:
    """``os.environ`` as the spawned workers must see it, restored afterwards."""
    # pickle refuses the read-only mapping proxy of the origins; a dict travels.
    plain = dataclasses.replace(config, origins=dict(config.origins))
    settings = {_WORKER_CONFIG_ENV: base64.b64encode(pickle.dumps(plain)).decode("ascii")}
    metrics_dir = None
    # Every worker writes its metrics into one directory that /metrics on any
    # worker aggregates (prometheus-client's multiprocess mode).
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="xintu-metrics-")
        settings["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
