"""API keys: which ones a request's ``Authorization: Bearer KEY`` matches.

``security.api_key_sha256`` and ``security.admin_key_sha256`` hold SHA-256 digests;
a request's key is matched by comparing digests in constant time (:class:`KeyRing`),
so the keys themselves are never held, logged or compared as text. With admin keys
configured, the admin endpoints (:func:`is_admin_path`) need one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from ..errors import ConfigError

__all__ = ["ADMIN_PATHS", "KeyRing", "bearer_token", "is_admin_path"]

# Endpoints that need an admin key when admin keys are configured.
ADMIN_PATHS = frozenset({"/metrics", "/api/v1/stats"})
_ADMIN_PREFIX = "/admin"


def is_admin_path(path: str) -> bool:
    """Whether *path* is an admin endpoint (``/metrics``, ``/api/v1/stats``, ``/admin…``)."""
    path = path.rstrip("/") or "/"
    return path in ADMIN_PATHS or path == _ADMIN_PREFIX or path.startswith(_ADMIN_PREFIX + "/")


class KeyRing:
    """API keys by their SHA-256 digests; :meth:`match` compares in constant time."""

    def __init__(self, digests: Iterable[str], *, setting: str) -> None:
        keys: list[bytes] = []
        for text in digests:
            value = text.strip().lower()
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ConfigError(setting, "each entry must be a SHA-256 digest (64 hex)")
            keys.append(bytes.fromhex(value))
        self._keys = tuple(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def match(self, token: bytes) -> bytes | None:
        """The digest of *token* if it is one of the keys, else ``None``.

        Every configured digest is compared, with :func:`hmac.compare_digest`, so the
        time taken does not depend on which key (if any) matched, nor where the
        digests first differ.
        """
        digest = hashlib.sha256(token).digest()
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(digest, key)
        return digest if found else None


def bearer_token(header: str | None) -> bytes | None:
    """The token of ``Authorization: Bearer TOKEN`` as raw bytes, else ``None``.

    Header values reach Quart decoded as Latin-1, so encoding back to Latin-1 gives
    the bytes the client sent: what ``printf %s "$KEY" | sha256sum`` hashes.
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        return token.encode("latin-1")
    except UnicodeEncodeError:
        return None
