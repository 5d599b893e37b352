"""The HTTP front end (Quart-Trio on Hypercorn)."""

from ._app import XintuApp as XintuApp
from ._app import create_app as create_app

__all__ = ["XintuApp", "create_app"]
