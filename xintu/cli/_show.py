"""``xintu config show``: the effective configuration, secrets redacted, with origins."""

from __future__ import annotations

import json

from .._config import Config

__all__ = ["config_show"]


def config_show(config: Config) -> int:
    for section, values in config.redacted().items():
        print(f"[{section}]")
        for key, value in values.items():
            origin = config.origins.get(f"{section}.{key}", "default")
            print(f"{key} = {json.dumps(value)}  # {origin}")
        print()
    return 0
