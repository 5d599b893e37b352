"""``xintu admin``: operators' commands, sent to a running service over HTTP.

``xintu admin reclassify`` and ``xintu admin purge`` call ``/admin/reclassify`` and
``/admin/purge`` (:mod:`xintu.http._admin`) of the service at ``--server`` (default:
``http://`` + ``server.bind``). They talk to the service, not to the store: a
re-classification needs the service's LLM pool and its spool of photo bytes, and
a purge must also leave the service's LRU and spool. The admin key is read from
the environment variable ``XINTU_ADMIN_KEY`` (never from the command line, where
other users of the machine could read it in the process list) and sent as
``Authorization: Bearer KEY``; without it, nothing is sent (a service without
keys).

Exit status: 0 when the service answered 2xx, 1 when it answered an error (its
message printed), 2 for bad arguments or a service that cannot be reached.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import httpx

from .._config import Config

__all__ = ["ADMIN_KEY_ENV", "admin_purge", "admin_reclassify"]

ADMIN_KEY_ENV = "XINTU_ADMIN_KEY"
_TIMEOUT_S = 30.0


def _base_url(config: Config, server: str | None) -> str:
    if server:
        return server.rstrip("/")
    host, _, port = config.server.bind.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):  # a wildcard listen address: ask loopback
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def _post(config: Config, server: str | None, path: str, body: dict[str, Any]) -> int:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(ADMIN_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = _base_url(config, server) + path
    try:
        resp = httpx.post(url, content=json.dumps(body), headers=headers, timeout=_TIMEOUT_S)
    except httpx.HTTPError as exc:
        print(f"xintu admin: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if not resp.is_success:
        message = answer.get("error") if isinstance(answer, dict) else resp.text[:200]
        print(f"xintu admin: {resp.status_code}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(answer, ensure_ascii=False, indent=2))
    return 0


def admin_reclassify(
    config: Config,
    *,
    server: str | None,
    hashes: list[str],
    source: str | None,
    since: str | None,
    until: str | None,
    limit: int | None,
) -> int:
    """Ask the service to re-classify entries by hash, or by source and date."""
    body: dict[str, Any]
    if hashes:
        if source or since or until or limit is not None:
            print(
                "xintu admin reclassify: give hashes or --source/--since/--until/--limit",
                file=sys.stderr,
            )
            return 2
        body = {"image_hashes": hashes}
    else:
        if not (source or since or until):
            print(
                "xintu admin reclassify: give hashes, or at least one of --source, --since,"
                " --until (refusing to re-classify every entry)",
                file=sys.stderr,
            )
            return 2
        body = {}
        for name, value in (("source", source), ("since", since), ("until", until)):
            if value is not None:
                body[name] = value
        if limit is not None:
            body["limit"] = limit
    return _post(config, server, "/admin/reclassify", body)


def admin_purge(config: Config, *, server: str | None, image_hash: str) -> int:
    """Ask the service to purge the entry of *image_hash*."""
    return _post(config, server, "/admin/purge", {"image_hash": image_hash})
