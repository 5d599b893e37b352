"""A worker process of the local pool: ``python -m xintu.actors._procworker``.

Started by :class:`~xintu.actors._procs.ProcessModel` (its docstring tells the
whole design). On stdin it reads frames (an 8-byte big-endian length, then the
bytes): first the set-up (the parent's ``sys.path``, then the model's builder and
the configuration, pickled), then one photo per frame. On stdout it writes one
pickled frame per frame read: ``("ready", facts)`` or ``("failed", why)`` for the
set-up, then ``("ok", Classification, stats)`` or ``("error", XintuError, stats)``
per photo, where ``stats`` is the model's ``statistics()`` after it (``None`` for a
model without one), which the service adds up over its processes.

Anything else written to stdout (a stray ``print``, a library's warning) goes to
stderr, which is the service's: the protocol has a descriptor of its own. The
process exits at EOF on stdin, when its parent is gone (a watchdog thread), and
never on SIGINT or SIGTERM (the service's drain stops it).
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import threading
import time
from typing import IO, Any

_HEADER = struct.Struct(">Q")
#: How often the watchdog checks the parent (xintu.actors._procs.PARENT_POLL_S).
_PARENT_POLL_S = 0.5


def _read_frame(stream: IO[bytes]) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def _write_frame(stream: IO[bytes], reply: tuple[Any, ...]) -> None:
    try:
        payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(payload)  # an error that cannot be rebuilt must not reach the parent
    except Exception:
        from ..errors import ClassifierError

        reply = ("error", ClassifierError("the local classifier's answer could not be sent"), None)
        payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _watch_parent(parent: int) -> None:
    """Exit as soon as the process that started this one is gone."""
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(3)


def _classify(model: Any, data: bytes) -> tuple[str, Any, Any]:
    from ..errors import ClassifierError, XintuError

    statistics = getattr(model, "statistics", None)
    try:
        results = model.infer([model.prepare(data)])
        if len(results) != 1:
            raise ClassifierError(f"model answered {len(results)} of 1 images")
        reply: tuple[str, Any] = ("ok", results[0])
    except XintuError as exc:
        reply = ("error", exc)
    except Exception as exc:
        import structlog

        structlog.get_logger("xintu.local_pool").exception("local_inference_failed")
        reply = ("error", ClassifierError(f"local classifier failed: {type(exc).__name__}"))
    return (*reply, statistics() if callable(statistics) else None)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray writes to stdout go to stderr, not into the protocol
    started = time.perf_counter()
    hello = _read_frame(requests)
    if hello is None:
        return 0
    setup = pickle.loads(hello)
    for entry in reversed(setup["sys_path"]):  # import what the parent could
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        build, config = pickle.loads(setup["setup"])
        from .._log import configure_logging

        configure_logging(config.log)
        if config.model.process_nice:
            os.nice(config.model.process_nice)  # the service's event loop first
        model = build(config)
    except Exception as exc:
        _write_frame(replies, ("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    facts = {
        "model_name": getattr(model, "model_name", "?"),
        "pid": os.getpid(),
        "startup_s": round(time.perf_counter() - started, 3),
    }
    _write_frame(replies, ("ready", facts))
    while (data := _read_frame(requests)) is not None:
        try:
            _write_frame(replies, _classify(model, data))
        except BrokenPipeError:
            return 0  # the service is gone
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
