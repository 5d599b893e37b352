"""Logging: structlog for our events, the stdlib (Hypercorn, libraries) routed through it.

JSON lines when not attached to a terminal, a console renderer when attached;
``log.format`` forces either. :func:`configure_logging` is the one process-wide
setup and may be called again (tests, workers).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from ._config import LogConfig

__all__ = ["configure_logging", "reset_logging"]

# The handler configure_logging installed on the root logger, for reset_logging.
_HANDLER_NAME = "xintu"


def configure_logging(cfg: LogConfig, stream: TextIO | None = None) -> None:
    """Route structlog and the stdlib through one renderer onto *stream* (stderr)."""
    out = sys.stderr if stream is None else stream
    level = getattr(logging, cfg.level.upper())
    use_console = cfg.format == "console" or (cfg.format == "auto" and out.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(exception_formatter=_console_tracebacks())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([] if use_console else [structlog.processors.format_exc_info]),
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(level)
    for name in ("hypercorn.error", "hypercorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def _console_tracebacks() -> structlog.typing.ExceptionRenderer:
    """Tracebacks for the console renderer, never with local variables: a frame's
    locals can hold a store URL with its password or an API key."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return structlog.dev.plain_traceback
    return structlog.dev.RichTracebackFormatter(show_locals=False)


def reset_logging() -> None:
    """Undo :func:`configure_logging` (tests): structlog's defaults, our handler gone."""
    structlog.reset_defaults()
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME]
