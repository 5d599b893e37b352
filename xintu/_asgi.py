"""The ASGI app for Hypercorn's spawned workers (``xintu serve --workers N``).

Each worker builds its configuration from the environment (and ``XINTU_CONFIG``),
exactly as the parent did.
"""

from __future__ import annotations

from . import _connections
from ._config import load_config
from ._log import configure_logging
from .http import create_app

_config = load_config()
configure_logging(_config.log)
_connections.install()
_connections.raise_open_files_limit(_config.server.max_connections)
app = create_app(_config)
