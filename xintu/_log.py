"""Logging: structlog for our events, the stdlib (Hypercorn, libraries) routed through it.

JSON lines when not attached to a terminal, a console renderer when attached;
``log.format`` forces either. :func:`configure_logging` is the one process-wide
setup and may be called again (tests, workers).

Our own events take the short way (the request line is written once per request,
so its cost counts; issue 14). The level is checked first, before any processor
runs (:class:`_LevelFiltered`: an event below ``log.level`` costs one comparison).
In JSON mode an event is then rendered once by structlog's own processors and
written as one line, in one ``write`` under the stdlib handler's lock
(:class:`_LineWriter`), without the round trip through a ``logging.LogRecord``,
the root logger and ``ProcessorFormatter``; the line is the same JSON object, key
for key and in the same order, as that round trip made. The stdlib's records
(Hypercorn, libraries) and the console mode still go through the stdlib handler
with the same processors. Lines are written synchronously on the caller's thread,
as the stdlib handler does.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog

from ._config import LogConfig

__all__ = ["configure_logging", "reset_logging"]

# The handler configure_logging installed on the root logger, for reset_logging.
_HANDLER_NAME = "xintu"
#: structlog's ``cache_logger_on_first_use`` for :func:`configure_logging`. The test
#: suite turns it off (tests/conftest.py): a module's logger cached under one test's
#: configuration would keep its processors, and ``structlog.testing.capture_logs`` in
#: a later test would not see its events.
CACHE_LOGGERS = True


class _Sink:
    """Where :class:`_LineWriter` writes, and the level our events are kept from.

    One per process, changed in place by :func:`configure_logging`, so a logger
    cached before a reconfiguration (``cache_logger_on_first_use``) follows it.
    """

    def __init__(self) -> None:
        self.stream: TextIO = sys.stderr
        self.lock: threading.RLock | threading.Lock = threading.Lock()
        self.level = logging.INFO


_SINK = _Sink()


class _LevelFiltered(structlog.BoundLoggerBase):
    """A bound logger that drops an event below the configured level before any
    processor runs; otherwise as ``structlog.stdlib.BoundLogger`` (the method name
    reaches the processors: ``exception`` sets ``exc_info``)."""

    def _at(self, level: int, method: str, event: str | None, args: Any, kw: Any) -> Any:
        if level < _SINK.level:
            return None
        if args:
            event = str(event) % args
        return self._proxy_to_logger(method, event, **kw)

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.DEBUG, "debug", event, args, kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.INFO, "info", event, args, kw)

    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.WARNING, "warning", event, args, kw)

    warn = warning

    def error(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.ERROR, "error", event, args, kw)

    def exception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        kw.setdefault("exc_info", True)
        return self._at(logging.ERROR, "exception", event, args, kw)

    def critical(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.CRITICAL, "critical", event, args, kw)

    fatal = critical


class _LineWriter:
    """The end of the JSON chain: writes each rendered event as one line."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name  # for structlog.stdlib.add_logger_name

    def write(self, line: str) -> None:
        sink = _SINK
        try:
            with sink.lock:
                sink.stream.write(line + "\n")
                sink.stream.flush()
        except Exception:  # as logging.Handler.handleError: a log line never fails a request
            if logging.raiseExceptions and sys.stderr is not None:
                sys.stderr.write("--- xintu: a log line could not be written\n")

    debug = info = warning = warn = error = exception = critical = fatal = msg = write


def _line_writer(*args: Any) -> _LineWriter:
    return _LineWriter(str(args[0]) if args else "xintu")


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
    assert handler.lock is not None  # createLock() ran in Handler.__init__
    _SINK.stream, _SINK.lock, _SINK.level = out, handler.lock, level
    if use_console:  # the stdlib round trip: the console renderer's colours and tracebacks
        processors = [*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter]
        factory: Any = structlog.stdlib.LoggerFactory()
    else:  # rendered here, written by _LineWriter: the same line as the round trip
        processors = [*shared, structlog.processors.format_exc_info, renderer]
        factory = _line_writer
    structlog.configure(
        processors=processors,
        logger_factory=factory,
        wrapper_class=_LevelFiltered,
        cache_logger_on_first_use=CACHE_LOGGERS,
    )
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
    _SINK.stream, _SINK.lock, _SINK.level = sys.stderr, threading.Lock(), logging.INFO
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME]
