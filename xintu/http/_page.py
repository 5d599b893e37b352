"""The album page at ``/`` and its assets at ``/assets/<name>``.

Plain HTML, CSS and JavaScript from ``xintu/http/static/`` (package data; nothing
from a CDN, so it works offline). The page talks to the v1 API like any client:
it hashes photos with SubtleCrypto, asks ``batch-check-cache``, uploads the misses,
and polls ``/readyz`` and ``/api/v1/stats`` for its live panel.

Headers:

- the page: a strict ``Content-Security-Policy`` (``default-src 'self'``; images
  also from ``blob:`` for the local thumbnails; no inline script or style),
  ``Cache-Control: no-cache`` with an ``ETag``, and the usual hardening headers;
- the assets: referenced as ``/assets/NAME?v=DIGEST``, so a request carrying the
  current digest is ``immutable`` for a year and any other is revalidated.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from functools import cache
from importlib import resources

from quart import Blueprint, Response, request
from werkzeug.exceptions import NotFound

__all__ = ["CSP", "page"]

page = Blueprint("page", __name__)

CSP = "; ".join(
    [
        "default-src 'self'",
        "img-src 'self' blob:",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_IMMUTABLE = "public, max-age=31536000, immutable"
_HARDENING = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    digest: str  # first 16 hex of SHA-256: the version and the ETag


def _asset(body: bytes, name: str) -> _Asset:
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    kind = _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return _Asset(body, kind, hashlib.sha256(body).hexdigest()[:16])


@cache
def _assets() -> dict[str, _Asset]:
    """Every file of ``static/`` except the page, read once (package data never changes)."""
    folder = resources.files("xintu.http") / "static"
    return {
        item.name: _asset(item.read_bytes(), item.name)
        for item in folder.iterdir()
        if item.is_file() and item.name != "index.html" and not item.name.startswith(".")
    }


@cache
def _index() -> _Asset:
    """The page, with ``{{asset:NAME}}`` replaced by the asset's versioned URL."""
    text = (resources.files("xintu.http") / "static" / "index.html").read_text("utf-8")
    for name, asset in _assets().items():
        text = text.replace("{{asset:" + name + "}}", f"/assets/{name}?v={asset.digest}")
    return _asset(text.encode(), "index.html")


def _respond(asset: _Asset, cache_control: str, extra: dict[str, str]) -> Response:
    etag = f'"{asset.digest}"'
    headers = {"ETag": etag, "Cache-Control": cache_control, **_HARDENING, **extra}
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        return Response(b"", status=304, headers=headers)
    return Response(asset.body, status=200, content_type=asset.content_type, headers=headers)


@page.get("/")
async def index() -> Response:
    """The album page."""
    return _respond(_index(), "no-cache", {"Content-Security-Policy": CSP})


@page.get("/assets/<name>")
async def asset(name: str) -> Response:
    """A static asset; immutable when asked for by its current digest."""
    found = _assets().get(name)
    if found is None:
        raise NotFound()
    current = request.args.get("v") == found.digest
    return _respond(found, _IMMUTABLE if current else "no-cache", {})
