"""Xintu: photo classification for a photo album, on Trio.

The public surface is re-exported here; everything else lives in private modules.
"""

from ._config import Config as Config
from ._config import load_config as load_config
from ._types import CATEGORIES as CATEGORIES
from ._types import Category as Category
from ._types import Classification as Classification
from ._types import Source as Source

__version__ = "0.1.0"

__all__ = [
    "CATEGORIES",
    "Category",
    "Classification",
    "Config",
    "Source",
    "load_config",
]
