"""Redaction of secrets for logs and ``config show``."""

from __future__ import annotations

__all__ = ["redact_url"]


def redact_url(url: str) -> str:
    """``mysql://u:secret@h/db`` → ``mysql://u:***@h/db``; URLs without a password unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, at, host = rest.rpartition("@")
    user, colon, _ = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}{at}{host}"
