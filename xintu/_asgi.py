"""The ASGI app for Hypercorn's spawned workers (``xintu serve --workers N``).

Each worker builds its configuration from the environment (and ``XINTU_CONFIG``),
exactly as the parent did.
"""

from __future__ import annotations

from ._config import load_config
from ._log import configure_logging
from .http import create_app

_config = load_config()
configure_logging(_config.log)
app = create_app(_config)
