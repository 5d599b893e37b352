"""The ``xintu`` command line.

::

    xintu serve [--bind HOST:PORT] [--workers N]
    xintu model build [--force]
    xintu classify PATH... [--server URL] [--api-key KEY] [--output FILE.json|.csv]
                   [--sort-into DIR --mode copy|move|link] [--dry-run] [--concurrency N]
    xintu classify-local PATH...
    xintu config show

``--config PATH`` (a TOML file over the defaults; else ``XINTU_CONFIG``) is accepted
before the command and after any (sub)command: ``xintu --config F serve`` and
``xintu serve --config F`` are the same; given twice, the later one wins.

One module per command: :mod:`._main` parses the arguments (``--config`` included)
and hands over to ``serve`` (:mod:`xintu._serve`), :mod:`._model` (``model
build``), :mod:`._classify` (``classify``: a folder of photos into albums),
:mod:`._local` (``classify-local``) or :mod:`._show` (``config show``), each
imported only when its command runs. ``python -m xintu`` is :func:`main` too.
"""

from ._main import main as main

__all__ = ["main"]
