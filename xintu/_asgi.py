"""The ASGI app for Hypercorn's spawned workers (``xintu serve --workers N``).

Each worker serves with its parent's configuration object, handed over by
:func:`xintu._serve.serve` (see :func:`~xintu._serve.worker_config`); loaded by
``hypercorn xintu._asgi:app`` instead, it builds one from the environment and
``XINTU_CONFIG``.
"""

from __future__ import annotations

from . import _connections
from ._log import configure_logging
from ._serve import worker_config
from .http import create_app

_config = worker_config()
configure_logging(_config.log)
_connections.install()
_connections.raise_open_files_limit(_config.server.max_connections)
app = create_app(_config, freeze_gc=True)
